"""Reading sources a user has: byte-order marks and UTF-16, compressed files, null and NaN cells of Parquet and CSV
files, and paths that are not what they seem. Each either reads the same pairs as the plain file or stops with a
message naming the file (and row and field where there is one)."""

import bz2
import codecs
import gzip
import json
import lzma

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_lightning.data.datamodule import tokenize_rows
from dpo_lightning.data.formats import PreferenceDataError, normalize_row
from dpo_lightning.data.reading import parse_json_line, read_rows
from dpo_lightning.data.source import JSON, LINE, open_source
from dpo_lightning.model.loading import load_tokenizer

from conftest import PAIRS

ROWS = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
TEXT = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS)


def _plain(rows):
    return [row for _, row in rows]


def read_arrow(path, split="train"):
    """``(where, row)`` as the training path sees them: the source's Arrow rows, JSON parsed as its map does."""
    dataset, source = open_source(path, split)
    if not source.json_rows:
        return [(source.where(i), row) for i, row in enumerate(dataset)]
    return [(source.where(r[LINE]), parse_json_line(r[JSON], source.where(r[LINE]), source.encoding))
            for r in dataset]


READERS = pytest.mark.parametrize("read", [read_rows, read_arrow], ids=["python", "arrow"])


@pytest.mark.parametrize("name, encode", [
    ("bom.jsonl", lambda text: codecs.BOM_UTF8 + text.encode("utf-8")),
    ("utf16le.jsonl", lambda text: text.encode("utf-16")),  # Python writes the mark, little-endian here
    ("utf16be.jsonl", lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be")),
    ("windows.jsonl", lambda text: text.replace("\n", "\r\n").encode("utf-8")),
])
@READERS
def test_byte_order_marks_and_line_ends_read_the_same_rows(read, tmp_path, name, encode):
    path = tmp_path / name
    path.write_bytes(encode(TEXT))
    rows = read(str(path))
    assert _plain(rows) == ROWS
    assert [where for where, _ in rows] == [f"{path} line {i}" for i in range(1, len(ROWS) + 1)]


@READERS
def test_a_json_array_with_a_byte_order_mark(read, tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(codecs.BOM_UTF8 + json.dumps(ROWS).encode())
    assert _plain(read(str(path))) == ROWS


@READERS
def test_a_bad_line_in_utf16_names_its_line(read, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes((TEXT + '{"prompt": "hi", "chosen": "a"\n').encode("utf-16"))
    with pytest.raises(PreferenceDataError, match=rf"{path} line {len(ROWS) + 1}: malformed JSON"):
        read(str(path))


def _zstd(path, data):
    with pa.CompressedOutputStream(str(path), "zstd") as out:  # zstandard ships with pyarrow
        out.write(data)


@pytest.mark.parametrize("suffix, write", [
    (".gz", lambda path, data: path.write_bytes(gzip.compress(data))),
    (".bz2", lambda path, data: path.write_bytes(bz2.compress(data))),
    (".xz", lambda path, data: path.write_bytes(lzma.compress(data))),
    (".zst", _zstd),
])
@READERS
def test_compressed_json_lines_read_the_same_rows_and_lines(read, tmp_path, suffix, write):
    path = tmp_path / f"pairs.jsonl{suffix}"
    write(path, TEXT.encode())
    rows = read(str(path))
    assert _plain(rows) == ROWS and rows[2][0] == f"{path} line 3"


@READERS
def test_a_damaged_compressed_file_is_named(read, tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(gzip.compress(TEXT.encode())[:-20])  # cut short
    with pytest.raises(PreferenceDataError, match=rf"{path}: cannot be decompressed as \.gz"):
        read(str(path))
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text(TEXT)  # named .gz, but not compressed
    with pytest.raises(PreferenceDataError, match="cannot be decompressed as .gz"):
        read(str(plain))


@READERS
def test_a_compressed_csv_reads_like_the_csv(read, tmp_path):
    lines = ["prompt,chosen,rejected"] + [",".join(f'"{v}"' for v in (p, c, r)) for p, c, r in PAIRS]
    path = tmp_path / "pairs.csv.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    assert _plain(read(str(path))) == ROWS


def test_null_and_nan_cells_of_parquet_and_csv_name_row_and_field(tmp_path, tiny_model_dir):
    table = pa.table({"prompt": [p for p, _, _ in PAIRS], "chosen": [None] + [c for _, c, _ in PAIRS[1:]],
                      "rejected": [r for _, _, r in PAIRS]})
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(table, parquet)
    with pytest.raises(PreferenceDataError, match=rf"{parquet} row 1: field 'chosen': no value \(null"):
        tokenize_rows(str(parquet), "train", load_tokenizer(tiny_model_dir), 128, 64)
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\nhi,hello,\nwho are you ?,i am deep smol .,i am smollm .\n")
    with pytest.raises(PreferenceDataError, match=rf"{csv} row 1: field 'rejected': no value"):
        tokenize_rows(str(csv), "train", load_tokenizer(tiny_model_dir), 128, 64)
    pairs, counts = tokenize_rows(str(csv), "train", load_tokenizer(tiny_model_dir), 128, 64, on_bad_row="skip")
    assert len(pairs) == 1 and counts["dropped: bad row, missing field"] == 1


def test_nan_in_optional_fields_means_unset():
    pair = normalize_row({"prompt": float("nan"), "chosen": "ab", "rejected": "ac", "chosen_unfinished": float("nan"),
                          "rejected_unfinished": None}, "f row 0")
    assert (pair.prompt, pair.chosen, pair.rejected) == ("a", "b", "c")  # no prompt: the shared prefix is the prompt
    assert not pair.chosen_unfinished and not pair.rejected_unfinished
    with pytest.raises(PreferenceDataError, match="field 'chosen': no value"):
        normalize_row({"prompt": "a", "chosen": float("nan"), "rejected": "b"}, "f row 0")


@READERS
def test_paths_that_are_not_data(read, tmp_path):
    folder = tmp_path / "not_a_dataset"
    folder.mkdir()
    (folder / "pairs.jsonl").write_text(TEXT)
    with pytest.raises(PreferenceDataError, match="a directory, but not a data set saved with save_to_disk"):
        read(str(folder))
    for name in ("missing.jsonl", "missing.jsonl.gz", "missing.csv.gz", "missing.parquet"):
        with pytest.raises(PreferenceDataError, match=f"{name}: file not found"):
            read(str(tmp_path / name))
    empty = tmp_path / "empty.jsonl.gz"
    empty.write_bytes(gzip.compress(b"\n\n"))
    with pytest.raises(PreferenceDataError, match="no rows"):
        read(str(empty))
    text = tmp_path / "pairs.txt"  # a local file of another kind is not looked up on the Hub
    text.write_text(TEXT)
    with pytest.raises(PreferenceDataError, match=r"pairs.txt: not a kind of file read here; give JSON Lines"):
        read(str(text))


def test_rows_of_arrays_and_tables_count_from_one(tmp_path, tiny_model_dir):
    bad = [ROWS[0], {"prompt": "hi", "chosen": "a"}]  # the second row lacks 'rejected'
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(bad))
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt,chosen,rejected\nhi,hello,hey\nwho,me,\n")
    for path in (array, csv):
        with pytest.raises(PreferenceDataError, match=rf"{path.name} row 2: field 'rejected'"):
            tokenize_rows(str(path), "train", load_tokenizer(tiny_model_dir), 128, 64)



@pytest.mark.parametrize("name, write", [
    ("bom.jsonl", lambda path: path.write_bytes(codecs.BOM_UTF8 + TEXT.encode())),
    ("utf16.jsonl", lambda path: path.write_bytes(TEXT.encode("utf-16"))),
    ("windows.jsonl", lambda path: path.write_bytes(TEXT.replace("\n", "\r\n").encode())),
    ("pairs.jsonl.gz", lambda path: path.write_bytes(gzip.compress(TEXT.encode()))),
    ("pairs.jsonl.zst", lambda path: _zstd(path, TEXT.encode())),
    ("array.json.xz", lambda path: path.write_bytes(lzma.compress(json.dumps(ROWS).encode()))),
])
def test_every_encoding_and_compression_trains_on_the_plain_files_tokens(tmp_path, tiny_model_dir, name, write):
    tok = load_tokenizer(tiny_model_dir)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(TEXT)
    write(tmp_path / name)
    assert list(tokenize_rows(str(tmp_path / name), "train", tok, 64, 32)[0]) == \
        list(tokenize_rows(str(plain), "train", tok, 64, 32)[0])
