"""Reference log-probs computed once, before training, and cached on disk (``model.precompute_ref_log_probs``).

A DPO step otherwise runs the frozen reference forward on every batch of every epoch, and keeps a second model in
memory for it. Here one no-grad pass over the train and validation pairs stores each pair's reference log-probs
with the pair itself (``pair["ref_logps"] = [chosen, rejected]``), so they follow the pair through any shuffle,
epoch or DDP shard; the collator turns them into ``batch["ref_logps"]`` and the reference model is released.

The cache file is keyed by the reference's weights (file names, sizes and modification times), the dtype and
precision, and the exact token ids of every pair: any change gives a new entry. Under DDP each rank computes its
strided share of the pairs and the results are gathered, so every rank holds all of them; global rank 0 writes
the file (temporary file + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .atomic import atomic_open
from .data import REF_KEY, padded_length  # REF_KEY: the pair field and the batch key
from .formats import fingerprint_source
from .logprobs import ResponseLogps, response_logps


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


def cache_file(cache_dir: str, name: str, pairs: list[dict], settings: list[Any]) -> str:
    """Where the reference log-probs of ``pairs`` under ``settings`` are cached."""
    h = hashlib.sha256(json.dumps(settings).encode())
    for p in pairs:
        h.update(json.dumps([p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]]).encode())
    return os.path.join(os.path.expanduser(cache_dir), "ref_logps", f"{name}-{h.hexdigest()[:24]}.pt")


@torch.no_grad()
def compute_reference_logps(reference: nn.Module, pairs: list[dict], collate: Callable[[list[dict]], dict],
                            batch_size: int, device: torch.device, chunk_size: int = 1024,
                            autocast: Optional[Callable[[], Any]] = None, desc: str = "Reference log-probs",
                            progress: bool = True, logps_fn: Callable[..., ResponseLogps] = response_logps) -> Tensor:
    """``(N, 2)`` reference log-probs ``[chosen, rejected]`` of each pair, in the order of ``pairs``.

    Pairs are visited longest first in batches of ``batch_size``, so padding stays small; the result is put back in
    the original order. ``logps_fn`` is ``response_logps`` or ``shared_prefix_logps`` (prompt encoded once).
    """
    order = sorted(range(len(pairs)), key=lambda i: -padded_length(pairs[i]))
    out = torch.zeros(len(pairs), 2, dtype=torch.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress or len(order) <= batch_size):
        index = order[start:start + batch_size]
        batch = collate([pairs[i] for i in index])
        inputs = [batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask")]
        with autocast() if autocast is not None else nullcontext():
            logps = logps_fn(reference, *inputs, chunk_size=chunk_size).logps.float().cpu()  # (2B,)
        out[index] = torch.stack(logps.chunk(2), dim=-1)  # (B, 2)
    return out


def attach(pairs: list[dict], logps: Tensor) -> None:
    """Store each pair's ``[chosen, rejected]`` reference log-probs in the pair."""
    for pair, values in zip(pairs, logps.tolist()):
        pair[REF_KEY] = values


def save(path: str, logps: Tensor) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(logps, f)


def load(path: str, n_pairs: int) -> Optional[Tensor]:
    if not os.path.exists(path):
        return None
    logps = torch.load(path, weights_only=True)
    return logps if logps.shape == (n_pairs, 2) else None
