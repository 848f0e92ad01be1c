"""Reference log-probs computed once, before training, and cached on disk (``model.precompute_ref_log_probs``).

A DPO step otherwise runs the frozen reference forward on every batch of every epoch, and keeps a second model in
memory for it. Here one no-grad pass over the train and validation pairs computes each pair's reference log-probs
and hands them to the data module (``attach_reference_logps``), which keeps them as two columns beside the pairs'
tokens (``data/table.py``), so they follow each pair through any shuffle, epoch or DDP shard; batches carry them
as ``batch["ref_logps"]`` and the reference model is released.

The cache is an Arrow file, memory-mapped when read, keyed by the reference's weights (file names, sizes and
modification times), the dtype and precision, and the pairs (the tokenized table's key, which hashes the data,
tokenizer and settings, and which of its rows the split holds): any change gives a new entry. Under DDP each rank
computes its strided share of the pairs and the results are gathered, so every rank holds all of them; global
rank 0 writes the file (temporary file + rename).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from datasets.table import MemoryMappedTable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..atomic import atomic_open
from ..data.reading import fingerprint_source
from ..data.table import REF_COLUMNS, PairTable, reference_table
from ..model.logprobs import ResponseLogps, response_logps
from ..model.prefix_sharing import choose_layout

CACHE_VERSION = "v2"


def weights_fingerprint(path: str) -> str:
    """Names, sizes and modification times of a model directory's files (``formats.fingerprint_source``). A hub id
    is resolved to its local snapshot directory (whose path holds the commit hash); the id alone when it is not
    downloaded yet."""
    if not os.path.isdir(path):
        try:
            from transformers.utils import cached_file

            path = os.path.dirname(cached_file(path, "config.json", local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the local hub cache: the id is all there is to key on
            return path
    return fingerprint_source(os.path.abspath(path), split="")


def cache_file(cache_dir: str, name: str, pairs: PairTable, settings: list[Any]) -> str:
    """Where the reference log-probs of ``pairs`` under ``settings`` are cached."""
    h = hashlib.sha256(json.dumps([settings, pairs.fingerprint]).encode())
    return os.path.join(os.path.expanduser(cache_dir), "ref_logps", f"{name}-{h.hexdigest()[:24]}.arrow")


@torch.no_grad()
def compute_reference_logps(reference: nn.Module, pairs: PairTable, collate: Callable[[list[dict]], dict],
                            batch_size: int, device: torch.device, chunk_size: int = 1024,
                            autocast: Optional[Callable[[], Any]] = None, desc: str = "Reference log-probs",
                            progress: bool = True, logps_fn: Callable[..., ResponseLogps] = response_logps) -> Tensor:
    """``(N, 2)`` reference log-probs ``[chosen, rejected]`` of each pair, in the order of ``pairs``.

    Pairs are visited longest first in batches of ``batch_size``, so padding stays small; the result is put back in
    the original order. ``logps_fn`` is ``response_logps`` or ``shared_prefix_logps`` (prompt encoded once).
    """
    order = np.argsort(-pairs.padded_lengths(), kind="stable")
    out = torch.zeros(len(pairs), 2, dtype=torch.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress or len(order) <= batch_size):
        index = order[start:start + batch_size]
        batch = collate(pairs.__getitems__(index))
        inputs = [batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask")]
        with autocast() if autocast is not None else nullcontext():
            logps = logps_fn(reference, *inputs, chunk_size=chunk_size).logps.float().cpu()  # (2B,)
        out[torch.from_numpy(index)] = torch.stack(logps.chunk(2), dim=-1)  # (B, 2)
    return out


def save(path: str, logps: Tensor) -> None:
    """Write ``(N, 2)`` log-probs as an Arrow file of the columns ``table.REF_COLUMNS``."""
    table = reference_table(logps).table
    with atomic_open(path, "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)


def load(path: str, n_pairs: int) -> Optional[MemoryMappedTable]:
    """The cached log-probs, memory-mapped, or None when there are none for ``n_pairs`` pairs."""
    if not os.path.exists(path):
        return None
    logps = MemoryMappedTable.from_file(path)
    return logps if len(logps) == n_pairs and logps.column_names == list(REF_COLUMNS) else None


def precompute(trainer: Any, datamodule: Any, open_reference: Callable[[], AbstractContextManager[nn.Module]],
               reference_path: str, settings: list[Any], batch_size: Optional[int], chunk_size: int,
               prefix_sharing: bool, ld_alpha: Optional[float] = None,
               splits: Sequence[str] = ("train", "val"), packing: bool = False,
               row_tokens: Optional[int] = None) -> None:
    """Attach reference log-probs to the pairs of ``datamodule``'s ``splits`` (``train``, ``val``; a
    :class:`~dpo_lightning.data.datamodule.PreferenceDataModule`): from the cache when every rank finds every split
    there, else computed now with the reference that ``open_reference()`` yields, which is released afterwards.

    Args:
        trainer: the Lightning trainer (ranks, device, precision context, progress on global rank 0).
        reference_path: the reference's weights, for the cache key (with ``settings``: dtype, attention
            implementation, precision; not the layout or batch size, which change the values only by rounding).
        batch_size: pairs per batch of the pass; the data's batch size when None.
        prefix_sharing: run the pass in the prefix-sharing layout when the reference allows it, as the steps do.
        ld_alpha: LD-DPO's weight of tokens past the shorter response (``logprobs.head_logps``); part of the key.
        splits: which of the data module's splits to cover; a split whose pairs all have log-probs is skipped.
        packing, row_tokens: pack several pairs into a row (``model/packing.py``), as the steps do.
    """
    todo = [(name, datamodule.pairs(name)) for name in splits if datamodule.needs_reference_logps(name)]
    if not todo:
        return
    settings = [weights_fingerprint(reference_path), *settings, CACHE_VERSION] + \
        ([f"ld_alpha={ld_alpha}"] if ld_alpha is not None else [])  # unset: the same key as without LD-DPO
    cache_dir = datamodule.hparams.cache_dir
    files = {name: cache_file(cache_dir, name, pairs, settings) if cache_dir else None for name, pairs in todo}
    cached = {name: load(files[name], len(pairs)) if files[name] else None for name, pairs in todo}
    if trainer.strategy.reduce_boolean_decision(all(v is not None for v in cached.values()), all=True):
        for name, _ in todo:
            datamodule.attach_reference_logps(name, cached[name])
        rank_zero_info(f"[dpo_lightning] reference log-probs from the cache ({', '.join(files.values())}); "
                       "the reference model is not loaded")
        return
    with open_reference() as reference:
        logps_fn = functools.partial(choose_layout([reference], prefix_sharing, packing=packing,
                                                           row_tokens=row_tokens), ld_alpha=ld_alpha)
        for name, pairs in todo:
            logps = _computed_on_all_ranks(trainer, reference, pairs, datamodule.collator,
                                           batch_size or datamodule.hparams.batch_size, chunk_size,
                                           f"Reference log-probs ({name})", logps_fn)
            datamodule.attach_reference_logps(name, logps)
            if files[name] and trainer.is_global_zero:
                save(files[name], logps)
    del reference  # released: the steps read the attached log-probs
    rank_zero_info(f"[dpo_lightning] reference log-probs computed for {', '.join(n for n, _ in todo)}; "
                   "the reference model is released")


def _computed_on_all_ranks(trainer: Any, reference: nn.Module, pairs: PairTable, collate: Callable, batch_size: int,
                           chunk_size: int, desc: str, logps_fn: Callable[..., ResponseLogps]) -> Tensor:
    """``(N, 2)`` log-probs of all ``pairs`` on every rank: each DDP rank computes its strided share, then they
    are gathered (pair i came from rank i % world)."""
    world, strategy = trainer.world_size, trainer.strategy
    part = compute_reference_logps(reference, pairs[trainer.global_rank::world], collate, batch_size,
                                   strategy.root_device, chunk_size, trainer.precision_plugin.forward_context,
                                   desc=desc, progress=trainer.is_global_zero, logps_fn=logps_fn)
    if world == 1:
        return part
    rows = -(-len(pairs) // world)
    padded = torch.zeros(rows, 2)
    padded[:len(part)] = part
    gathered = strategy.all_gather(padded.to(strategy.root_device)).cpu()  # (world, rows, 2)
    return gathered.transpose(0, 1).reshape(-1, 2)[:len(pairs)]
