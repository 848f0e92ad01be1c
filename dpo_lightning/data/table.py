"""PairTable: the tokenized pairs of one split, read from a memory-mapped Arrow table as they are needed.

A split holds no per-pair Python objects: the token ids stay in the Arrow table (``tokenized.py``), the split is
an index array over its rows, the lengths that samplers and the reference pass sort by are numpy arrays read from
the list offsets, and precomputed reference log-probs are a second Arrow table of the split's length. Pickled
into DataLoader workers, a memory-mapped table travels as its file path, so every worker and every DDP rank reads
the same pages.

Indexing gives what the collator takes: ``table[i]`` a pair dict (``prompt_ids``, ``chosen_ids``,
``rejected_ids`` as lists, ``ref_logps`` ``[chosen, rejected]`` when attached), ``table[a:b]`` a PairTable view.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.table import InMemoryTable, Table

from .collate import REF_KEY

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
REF_COLUMNS = ("chosen", "rejected")
READ_CHUNK = 1024  # pairs per Arrow read while iterating


class PairTable(Sequence):
    """The pairs at ``rows`` of ``data`` (a ``datasets`` table with :data:`COLUMNS`), in that order.

    ``key`` names the table's content (its cache key); with the rows it makes :attr:`fingerprint`.
    """

    def __init__(self, data: Table, rows: np.ndarray, key: str, reference: Optional[Table] = None) -> None:
        self.data, self.rows, self.key = data, np.asarray(rows, dtype=np.int64), key
        self.reference: Optional[Table] = None
        self._lengths: Optional[dict[str, np.ndarray]] = None
        if reference is not None:
            self.set_reference(reference)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Union[int, slice, list[int]]) -> Any:
        if isinstance(index, list):  # a whole batch (``data/token_batches.py``)
            return self.__getitems__(index)
        if isinstance(index, slice):
            positions = np.arange(len(self.rows))[index]
            reference = self.reference.fast_gather(positions) if self.reference is not None else None
            return PairTable(self.data, self.rows[index], self.key, _as_table(reference))
        if not -len(self) <= index < len(self):
            raise IndexError(f"pair {index} of {len(self)}")
        return self.__getitems__([index % len(self)])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The pairs at ``indices`` in one Arrow read (the DataLoader's batched fetch)."""
        positions = np.asarray(indices, dtype=np.int64)
        # fast_gather slices the record batches that hold the rows; Arrow's take on a chunked list column would first
        # concatenate the whole column, a copy of every token for each batch
        columns = self.data.fast_gather(self.rows[positions]).select(list(COLUMNS)).to_pydict()
        pairs = [dict(zip(COLUMNS, values)) for values in zip(*(columns[c] for c in COLUMNS))]
        if self.reference is not None:
            ref = self.reference.fast_gather(positions).to_pydict()
            for pair, values in zip(pairs, zip(*(ref[c] for c in REF_COLUMNS))):
                pair[REF_KEY] = list(values)
        return pairs

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self), READ_CHUNK):
            yield from self.__getitems__(range(start, min(start + READ_CHUNK, len(self))))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # compared by content, and reference log-probs attach in place

    def lengths(self, column: str) -> np.ndarray:
        """Token counts of ``column`` (one of :data:`COLUMNS`) per pair, from the Arrow list offsets."""
        if self._lengths is None:
            self._lengths = {c: pc.list_value_length(self.data.column(c)).to_numpy()[self.rows] for c in COLUMNS}
        return self._lengths[column]

    def padded_lengths(self) -> np.ndarray:
        """Columns each pair takes in a plain batch (``PreferenceCollator``): prompt + the longer response."""
        return self.lengths("prompt_ids") + np.maximum(self.lengths("chosen_ids"), self.lengths("rejected_ids"))

    @property
    def fingerprint(self) -> str:
        """Changes whenever the token ids or the selection of pairs change."""
        return hashlib.sha256(self.key.encode() + self.rows.tobytes()).hexdigest()[:24]

    def set_reference(self, logps: Table) -> None:
        """Attach reference log-probs (a table of :data:`REF_COLUMNS`, one row per pair), in place: loaders
        already made from this table see them."""
        if len(logps) != len(self.rows):
            raise ValueError(f"reference log-probs for {len(logps)} pairs, the table has {len(self.rows)}")
        self.reference = logps


def reference_table(logps: Any) -> InMemoryTable:
    """An ``(N, 2)`` tensor or array of ``[chosen, rejected]`` log-probs as a table of :data:`REF_COLUMNS`."""
    values = np.asarray(logps, dtype=np.float32)
    return InMemoryTable(pa.table({c: values[:, k] for k, c in enumerate(REF_COLUMNS)}))


def _as_table(table: Optional[Any]) -> Optional[Table]:
    if table is None or isinstance(table, Table):
        return table
    return InMemoryTable(table)
