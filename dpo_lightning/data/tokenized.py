"""Raw rows -> tokenized Arrow table, built once by a batched ``datasets`` ``map`` and memory-mapped after.

The table has one row per raw row, in source order: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (int32,
empty when the row was dropped), ``status`` (``""`` when kept, else the reason it was dropped, e.g.
``dropped: bad row, malformed JSON``), ``error`` (a bad row's message, naming file, line or row, and field) and
``flags`` (bits of :data:`FLAGS`: what happened to a kept pair). Splits (a validation fraction) are index sets
over it, so the file is tokenized once whatever the split.

With a cache directory the table lives in ``<cache>/tokenized/<key>/``: the ``map`` writes its shards into a
temporary directory that is renamed into place when complete, so a reader never sees half a table; ``<key>``
hashes the data, the tokenizer and every setting that changes the ids. A second run memory-maps it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections import Counter
from typing import Any, Optional

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from .formats import BadRowPolicy, PreferenceDataError, normalize_row
from .reading import parse_json_line
from .source import JSON, LINE, RawSource, open_source
from .table import COLUMNS
from .tokenize import render, split_pair

FLAGS = {1: "truncated: prompt cut to max_prompt_length", 2: "truncated: response cut to max_length",
         4: "note: last prompt token merged with the response"}
FEATURES = datasets.Features({**{c: datasets.List(datasets.Value("int32")) for c in COLUMNS},
                              "status": datasets.Value("string"), "error": datasets.Value("string"),
                              "flags": datasets.Value("int8")})
MAP_BATCH = 256  # rows per map call: one tokenizer call encodes 3 x MAP_BATCH texts


def encode(texts: list[str], tokenizer: PreTrainedTokenizerBase, special: bool) -> list[list[int]]:
    """Token ids of ``texts``: a fast tokenizer's Rust ``encode_batch`` directly (the ids ``tokenizer(texts)`` gives,
    without building its Python encodings), else ``tokenizer(texts)``."""
    if not tokenizer.is_fast:
        return tokenizer(texts, add_special_tokens=special)["input_ids"]
    backend = tokenizer.backend_tokenizer
    # the state ``tokenizer(texts)`` sets before encoding: a saved tokenizer may carry padding or truncation
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if backend.encode_special_tokens != split:
        backend.encode_special_tokens = split
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=special)]


def tokenize_batch(batch: dict[str, list], indices: list[int], *, source: RawSource,
                   tokenizer: PreTrainedTokenizerBase, max_length: Optional[int], max_prompt_length: Optional[int],
                   on_bad_row: BadRowPolicy, chat_template_kwargs: Optional[dict[str, Any]]) -> dict[str, list]:
    """The ``map`` function: raw rows -> the table's columns. A bad row raises under ``on_bad_row="error"``."""
    n = len(indices)
    out: dict[str, list] = {c: [[] for _ in range(n)] for c in COLUMNS}
    out.update(status=[""] * n, error=[""] * n, flags=[0] * n)
    names = list(batch)
    rendered = {True: [], False: []}  # add_special_tokens -> [(position, pair, texts)]

    def bad(i: int, error: PreferenceDataError) -> None:
        if on_bad_row == "error" or error.kind is None:
            raise error
        out["status"][i], out["error"][i] = f"dropped: bad row, {error.kind}", str(error)

    for i in range(n):
        try:
            if source.json_rows:
                where = source.where(batch[LINE][i])
                row = parse_json_line(batch[JSON][i], where, source.encoding)
            else:
                where = source.where(indices[i])
                row = {name: batch[name][i] for name in names}
            pair = normalize_row(row, where)
            if pair.identical:
                out["status"][i] = "dropped: chosen identical to rejected"
                continue
            texts, special = render(pair, tokenizer, chat_template_kwargs)
            rendered[special].append((i, pair, texts))
        except PreferenceDataError as error:
            bad(i, error)
    for special, items in rendered.items():
        if not items:
            continue
        ids = encode([t for _, _, texts in items for t in texts], tokenizer, special)
        for k, (i, pair, _) in enumerate(items):
            try:
                tok = split_pair(pair, *ids[3 * k:3 * k + 3], max_length, max_prompt_length)
            except PreferenceDataError as error:
                bad(i, error)
                continue
            if tok is None:
                out["status"][i] = f"dropped: prompt leaves no room within max_length {max_length}"
                continue
            if tok.chosen_ids == tok.rejected_ids:  # they differed only past the cut: the pair has no gradient
                out["status"][i] = f"dropped: chosen identical to rejected within max_length {max_length}"
                continue
            for c in COLUMNS:
                out[c][i] = getattr(tok, c)
            out["flags"][i] = tok.prompt_truncated | tok.completion_truncated << 1 | tok.boundary_mismatch << 2
    return out


def _map(dataset: datasets.Dataset, source: RawSource, tokenizer: PreTrainedTokenizerBase, settings: dict[str, Any],
         num_proc: int, out_dir: Optional[str], desc: str) -> datasets.Dataset:
    return dataset.map(
        tokenize_batch, with_indices=True, batched=True, batch_size=MAP_BATCH, remove_columns=dataset.column_names,
        features=FEATURES, num_proc=num_proc if num_proc > 1 and len(dataset) >= 2 * MAP_BATCH else None,
        keep_in_memory=out_dir is None, cache_file_name=os.path.join(out_dir, "tokens.arrow") if out_dir else None,
        load_from_cache_file=False, new_fingerprint=settings.get("key", "in-memory"), desc=desc,
        fn_kwargs=dict(source=source, tokenizer=tokenizer, on_bad_row=settings["on_bad_row"],
                       max_length=settings["max_length"], max_prompt_length=settings["max_prompt_length"],
                       chat_template_kwargs=settings["chat_template_kwargs"]))


def _shards(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "tokens*.arrow")))


def is_cached(directory: Optional[str]) -> bool:
    return directory is not None and os.path.exists(os.path.join(directory, "done.json"))


def load_cached(directory: str) -> Optional[datasets.Dataset]:
    """The table cached in ``directory`` (memory-mapped), or None when there is none."""
    if not is_cached(directory):
        return None
    return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in _shards(directory)])


def build(path: str, split: str, tokenizer: PreTrainedTokenizerBase, settings: dict[str, Any], num_proc: int = 1,
          directory: Optional[str] = None) -> datasets.Dataset:
    """Tokenize ``path`` into the table; into ``directory`` (then memory-mapped) or in memory when None.
    ``settings``: ``max_length``, ``max_prompt_length``, ``on_bad_row``, ``chat_template_kwargs`` and ``key``."""
    name = os.path.basename(path.rstrip("/")) or path
    if directory is None:
        return _map(*open_source(path, split), tokenizer, settings, num_proc, None, f"Tokenizing {name}")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
        raw_dir = os.path.join(work, "raw")
        os.makedirs(raw_dir)
        table = _map(*open_source(path, split, raw_dir), tokenizer, settings, num_proc, work, f"Tokenizing {name}")
        rows = len(table)
        del table
        shutil.rmtree(raw_dir)
        with open(os.path.join(work, "done.json"), "w") as f:
            json.dump({"rows": rows, "source": path, "split": split}, f)
        os.chmod(work, 0o755)  # mkdtemp makes it private; the cache is shared like any other
        try:
            os.rename(work, directory)
        except OSError:  # another process finished first: use its table
            if load_cached(directory) is None:
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return load_cached(directory)


def kept_rows(table: datasets.Dataset, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """Indices of the kept pairs among ``rows`` (all rows when None), in order."""
    status = table.data.column("status")
    kept = np.flatnonzero(pc.equal(status, "").to_numpy(zero_copy_only=False))
    return kept if rows is None else np.intersect1d(kept, rows)


def count(table: datasets.Dataset, rows: Optional[np.ndarray] = None) -> Counter:
    """What happened to ``rows`` (all when None): ``read``, each drop reason, each truncation (see ``FLAGS``)."""
    status, flags = table.data.column("status"), table.data.column("flags")
    if rows is not None:
        indices = pa.array(rows, pa.int64())
        status, flags = status.take(indices), flags.take(indices)
    counts = Counter(read=len(status))
    for item in pc.value_counts(status).to_pylist():
        if item["values"]:
            counts[item["values"]] = item["counts"]
    bits = flags.to_numpy(zero_copy_only=False)
    for bit, name in FLAGS.items():
        counts[name] = int(np.count_nonzero(bits & bit))
    return counts


def errors(table: datasets.Dataset, rows: Optional[np.ndarray], limit: int) -> tuple[list[str], int]:
    """The first ``limit`` messages of skipped bad rows among ``rows``, and how many there are."""
    error = table.data.column("error")
    if rows is not None:
        error = error.take(pa.array(rows, pa.int64()))
    found = pc.indices_nonzero(pc.not_equal(error, ""))
    return error.take(found.slice(0, limit)).to_pylist(), len(found)


def summarize(counts: Counter) -> str:
    """One line: how many pairs were read and kept, and why any were dropped or truncated."""
    dropped = sum(v for k, v in counts.items() if k.startswith("dropped"))
    details = ", ".join(f"{k.split(': ', 1)[1]}: {v}" for k, v in sorted(counts.items()) if ": " in k and v)
    return f"{counts['read']} read, {counts['read'] - dropped} kept" + (f" ({details})" if details else "")


def check_usable(path: str, kept: np.ndarray, counts: Counter) -> None:
    if len(kept) == 0:
        raise PreferenceDataError(f"{path}: no usable pairs ({summarize(counts)})")
