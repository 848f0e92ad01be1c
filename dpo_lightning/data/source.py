"""Every data source as one Arrow table of raw rows (a ``datasets.Dataset``), for the batched tokenizing ``map``.

* JSON Lines files (``reading.py`` handles byte-order marks, UTF-16 and compression) become a table of
  ``(__line, __json)``: each non-blank line's number and its bytes, unparsed, so that parsing runs in the ``map``
  workers and a bad line is reported there with its line number. A JSON array becomes one row per element,
  numbered from 1.
* Parquet, CSV, Arrow files, ``save_to_disk`` directories and hub data sets are read by ``datasets`` as they are;
  a row is named by its number from 1 (a CSV file's header not counted).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import datasets
import pyarrow as pa

from .formats import PreferenceDataError
from .reading import (
    JSON_SUFFIXES,
    decompression_errors,
    is_json_array,
    is_local_file,
    iter_lines,
    read_json_array,
    split_compression,
    table_dataset,
)

LINE, JSON = "__line", "__json"  # columns of a raw JSON table
RAW_SCHEMA = pa.schema([(LINE, pa.int64()), (JSON, pa.binary())])
WRITE_BATCH = 10_000  # rows per Arrow record batch while reading a JSON file


@dataclass(frozen=True)
class RawSource:
    """How to read and name the rows of one source's raw table (see :func:`open_source`)."""

    path: str
    json_rows: bool  # rows are JSON text (``__line``, ``__json``), not columns
    unit: str = "row"  # "line" for JSON Lines, "row" for JSON arrays and tables
    encoding: str = "UTF-8"

    def where(self, number: int) -> str:
        """A row's name from its ``__line`` (JSON files), or from its index in the table (columns)."""
        return f"{self.path} {self.unit} {number if self.json_rows else number + 1}"


def _json_records(path: str, array: bool) -> Iterator[tuple[int, bytes, str]]:
    """``(line or index, JSON bytes, encoding)`` per row of a JSON Lines file or (``array``) a JSON array."""
    if array:
        for number, row in enumerate(read_json_array(path), start=1):
            yield number, json.dumps(row).encode(), "UTF-8"
        return
    for lineno, raw, encoding in iter_lines(path):
        if raw.strip():
            yield lineno, raw, encoding


def _write_json_rows(path: str, array: bool, out: Optional[str]) -> tuple[datasets.Dataset, str]:
    """The rows of a JSON file as ``(__line, __json)`` record batches, streamed to ``out`` (an Arrow file that is
    then memory-mapped) or kept in memory when ``out`` is None; also the file's encoding."""
    batches: list[pa.RecordBatch] = []
    sink = pa.OSFile(out, "wb") if out else None
    writer = pa.ipc.new_stream(sink, RAW_SCHEMA) if sink else None
    numbers: list[int] = []
    texts: list[bytes] = []
    encoding = "UTF-8"

    def flush() -> None:
        batch = pa.record_batch([pa.array(numbers, pa.int64()), pa.array(texts, pa.binary())], schema=RAW_SCHEMA)
        writer.write_batch(batch) if writer else batches.append(batch)
        numbers.clear()
        texts.clear()

    try:
        for number, text, encoding in _json_records(path, array):
            numbers.append(number)
            texts.append(text)
            if len(numbers) == WRITE_BATCH:
                flush()
        flush()
    finally:
        if writer:
            writer.close()
            sink.close()
    dataset = datasets.Dataset.from_file(out) if out else datasets.Dataset(pa.Table.from_batches(batches))
    return dataset, encoding


def open_source(path: str, split: str, workdir: Optional[str] = None) -> tuple[datasets.Dataset, RawSource]:
    """The raw rows of ``path`` as Arrow, and how to read them; a JSON file's rows are written under ``workdir``
    (memory when None)."""
    if is_local_file(path) and not os.path.isfile(path):
        raise PreferenceDataError(f"{path}: file not found")
    with decompression_errors(path):
        if split_compression(path)[0].endswith(JSON_SUFFIXES):
            array = is_json_array(path)  # read once: it opens (and decompresses) the file
            dataset, encoding = _write_json_rows(path, array, os.path.join(workdir, "raw.arrow") if workdir else None)
            source = RawSource(path, json_rows=True, unit="row" if array else "line", encoding=encoding)
        else:
            dataset, source = table_dataset(path, split), RawSource(path, json_rows=False)
    if len(dataset) == 0:
        raise PreferenceDataError(f"{path}: no rows")
    return dataset, source
