"""Reading raw rows, each with where it came from (``file line 7``, ``file row 3``), from every source the data
module takes: JSON Lines and JSON (UTF-8, with or without a byte-order mark, or UTF-16 with one; plain or
compressed ``.gz``/``.bz2``/``.xz``/``.zst``), Parquet, CSV, a ``save_to_disk`` directory or a hub data set."""

from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import io
import json
import lzma
import os
import time
from contextlib import contextmanager
from typing import IO, Any, Iterator, Optional, Union, get_args

from ..atomic import atomic_open
from .formats import BadRowPolicy, PreferenceDataError

COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": None}  # None: through pyarrow
JSON_SUFFIXES = (".jsonl", ".json")
TABLE_SUFFIXES = (".parquet", ".csv", ".arrow")
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
MEMO_AFTER_S = 2.0  # a file's content hash is remembered once it is this many seconds old


def split_compression(path: str) -> tuple[str, str]:
    """``("data.jsonl", ".gz")`` for ``data.jsonl.gz``; the compression is empty for a plain file."""
    stem, suffix = os.path.splitext(path)
    return (stem, suffix) if suffix in COMPRESSIONS else (path, "")


def _open_bytes(path: str) -> IO[bytes]:
    """The file's bytes, decompressed by its suffix."""
    compression = split_compression(path)[1]
    if compression == ".zst":  # zstandard ships with pyarrow, a dependency of datasets
        import pyarrow as pa

        return io.BufferedReader(pa.input_stream(path, compression="zstd"))
    return COMPRESSIONS[compression](path, "rb") if compression else open(path, "rb")


def iter_lines(path: str) -> Iterator[tuple[int, bytes, str]]:
    """``(line number, raw bytes, encoding)`` per line. A UTF-8 byte-order mark is dropped; a UTF-16 file (its
    mark tells) is decoded whole and its lines handed on in UTF-8."""
    with _open_bytes(path) as f:
        head = f.peek(4)[:4]
        if head.startswith(UTF16_BOMS):
            try:
                text = f.read().decode("utf-16")
            except UnicodeDecodeError as e:
                raise PreferenceDataError(f"{path}: not valid UTF-16 (byte {e.start})") from None
            for lineno, line in enumerate(io.StringIO(text, newline=""), start=1):
                yield lineno, line.encode("utf-8"), "UTF-16"
            return
        if head.startswith(codecs.BOM_UTF8):
            f.read(len(codecs.BOM_UTF8))
        for lineno, raw in enumerate(f, start=1):
            yield lineno, raw, "UTF-8"


def parse_json_line(raw: bytes, where: str, encoding: str = "UTF-8") -> Any:
    """One JSON Lines line, or a :class:`PreferenceDataError` of kind ``not UTF-8`` or ``malformed JSON``."""
    try:
        return json.loads(raw.decode("utf-8").rstrip("\r\n"))  # so that an error's column is on this line
    except UnicodeDecodeError as e:
        raise PreferenceDataError(f"{where}: not valid {encoding} (byte {e.start} of the line)", "not UTF-8") from None
    except json.JSONDecodeError as e:
        raise PreferenceDataError(f"{where}: malformed JSON at column {e.colno}: {e.msg}", "malformed JSON") from None


def _read_json_lines(path: str, on_bad_row: BadRowPolicy) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` per non-blank line; a line that cannot be read is raised, or yielded as its
    :class:`PreferenceDataError` under ``on_bad_row="skip"``."""
    for lineno, raw, encoding in iter_lines(path):
        if not raw.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            yield where, parse_json_line(raw, where, encoding)
        except PreferenceDataError as error:
            if on_bad_row == "error":
                raise
            yield where, error


def is_json_array(path: str) -> bool:
    """Whether a ``.json``/``.jsonl`` file holds one JSON array (else JSON Lines, whatever the suffix says: many
    ``.json`` files are JSON Lines)."""
    lines = iter_lines(path)
    first = next((raw for _, raw, _ in lines if raw.strip()), b"")
    lines.close()
    return first.lstrip().startswith(b"[")


def read_json_array(path: str) -> list[Any]:
    """The rows of a file holding one JSON array."""
    try:
        text = b"".join(raw for _, raw, _ in iter_lines(path)).decode("utf-8")
        rows = json.loads(text)
    except UnicodeDecodeError as e:
        raise PreferenceDataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise PreferenceDataError(f"{path} line {e.lineno}: malformed JSON at column {e.colno}: {e.msg}") from None
    if not isinstance(rows, list):
        raise PreferenceDataError(f"{path}: expected a JSON array of rows or JSON Lines, got a JSON "
                                  f"{type(rows).__name__}")
    return rows


def _read_json(path: str, on_bad_row: BadRowPolicy) -> Iterator[tuple[str, Any]]:
    if not is_json_array(path):
        yield from _read_json_lines(path, on_bad_row)
        return
    for i, row in enumerate(read_json_array(path), start=1):  # rows count from 1, as JSON Lines lines do
        yield f"{path} row {i}", row


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name))
               for name in ("dataset_dict.json", "dataset_info.json", "state.json"))


def table_dataset(path: str, split: str) -> Any:
    """A ``datasets.Dataset`` of a Parquet, CSV or Arrow file, a ``save_to_disk`` directory or a hub data set."""
    import datasets

    if os.path.isdir(path):
        if not _is_saved_dataset(path):
            raise PreferenceDataError(f"{path}: a directory, but not a data set saved with save_to_disk (it has no "
                                      "dataset_dict.json or dataset_info.json); give a file, or the saved directory")
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise PreferenceDataError(f"{path}: no split '{split}' (splits: {sorted(ds)})")
            ds = ds[split]
        return ds
    stem = split_compression(path)[0]
    if stem.endswith(".parquet"):
        return datasets.Dataset.from_parquet(path)
    if stem.endswith(".csv"):
        return datasets.Dataset.from_csv(path)
    if stem.endswith(".arrow"):
        return datasets.Dataset.from_file(path)
    if os.path.isfile(path):
        raise PreferenceDataError(f"{path}: not a kind of file read here; give JSON Lines or JSON (.jsonl, .json), "
                                  ".parquet, .csv or .arrow, plain or compressed (.gz, .bz2, .xz, .zst)")
    return datasets.load_dataset(path, split=split)  # a data set on the Hugging Face Hub (or a loading script)


@contextmanager
def decompression_errors(path: str) -> Iterator[None]:
    """Turn the error of a damaged or mislabelled compressed file into a :class:`PreferenceDataError`."""
    try:
        yield
    except (OSError, EOFError, lzma.LZMAError) as error:
        if not split_compression(path)[1]:
            raise
        raise PreferenceDataError(f"{path}: cannot be decompressed as {split_compression(path)[1]}: "
                                  f"{error}") from None


def is_local_file(path: str) -> bool:
    """Whether ``path`` names a file of a kind read here (a hub data set name names none)."""
    return split_compression(path)[0].endswith(JSON_SUFFIXES + TABLE_SUFFIXES)


def read_rows(path: str, split: str = "train", on_bad_row: BadRowPolicy = "error") -> list[tuple[str, Any]]:
    """All raw rows of a local file, a ``save_to_disk`` directory or a hub data set, with their locations.

    A JSON Lines line that is not UTF-8 or not JSON raises; under ``on_bad_row="skip"`` it comes back as its
    :class:`PreferenceDataError` in place of the row, for the caller to count.
    """
    if on_bad_row not in get_args(BadRowPolicy):
        raise ValueError(f"on_bad_row must be one of {get_args(BadRowPolicy)}, got {on_bad_row!r}")
    if is_local_file(path) and not os.path.isfile(path):
        raise PreferenceDataError(f"{path}: file not found")
    with decompression_errors(path):
        if split_compression(path)[0].endswith(JSON_SUFFIXES):
            rows = list(_read_json(path, on_bad_row))
        else:
            # rows count from 1, a CSV file's header not counted
            rows = [(f"{path} row {i}", row) for i, row in enumerate(table_dataset(path, split), start=1)]
    if not rows:
        raise PreferenceDataError(f"{path}: no rows")
    return rows


def read_prompt_rows(path: str) -> list[tuple[str, dict[str, Any]]]:
    """Rows with a non-empty string ``prompt`` (prompt files for ``build-pairs``, probes and ``compare``). A
    conversational prompt of one user message (TRL's prompt-only format) is read as that message's text; the
    system message comes from the command's system prompt settings, so a prompt that carries its own, or several
    turns, is refused with the form to use."""
    rows = read_rows(path)
    for where, row in rows:
        prompt = row.get("prompt") if isinstance(row, dict) else None
        one_user = isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], dict) \
            and prompt[0].get("role") == "user"
        if one_user:
            content = prompt[0].get("content")
            if not isinstance(content, str):
                raise PreferenceDataError(f"{where}: field 'prompt': the user message's content must be a string, "
                                          f"got {type(content).__name__}")
            row["prompt"] = prompt = content
        elif isinstance(prompt, list):
            roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in prompt]
            raise PreferenceDataError(f"{where}: field 'prompt': a conversation with roles {roles}; a prompt file "
                                      "takes one question, as a string or one user message, and the system "
                                      "message comes from the system prompt settings (e.g. --system_prompts)")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PreferenceDataError(f"{where}: field 'prompt': expected a non-empty string")
    return rows


def read_prompt_files(paths: Union[str, list[str]]) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """One prompt file or a list read as one, in order: the paths and the rows of ``read_prompt_rows``."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("--prompts_path is an empty list: give at least one prompt file")
    return paths, [row for path in paths for row in read_prompt_rows(path)]


def fingerprint_source(path: str, split: str, memo_dir: Optional[str] = None) -> str:
    """A string that changes whenever the data behind ``path`` changes (used as part of cache keys).

    A file is hashed by content. With ``memo_dir`` the hash is remembered there under the file's path, size,
    modification time and inode, so an unchanged multi-gigabyte file is not read again on the next run."""
    h = hashlib.sha256(f"{path}|{split}".encode())
    if os.path.isfile(path):
        stat = os.stat(path)
        stamp = f"{os.path.abspath(path)}|{split}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_dev}"
        memo = os.path.join(memo_dir, hashlib.sha256(stamp.encode()).hexdigest()[:32]) if memo_dir else None
        if memo and os.path.exists(memo):
            with open(memo) as f:
                return f.read()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if memo and time.time() - stat.st_mtime > MEMO_AFTER_S:  # a file written just now may change in the same tick
            with atomic_open(memo) as f:
                f.write(h.hexdigest())
    elif os.path.isdir(path):
        for root, _, files in sorted(os.walk(path)):
            for name in sorted(files):
                full = os.path.join(root, name)
                h.update(f"{os.path.relpath(full, path)}|{os.path.getsize(full)}|{os.path.getmtime(full)}".encode())
    else:
        return ""  # not a local path: see hub_fingerprint
    return h.hexdigest()


def hub_fingerprint(path: str, split: str) -> str:
    """The fingerprint ``datasets`` gives a hub data set (it changes with the data set's revision)."""
    if is_local_file(path):
        raise PreferenceDataError(f"{path}: file not found")
    return table_dataset(path, split)._fingerprint
