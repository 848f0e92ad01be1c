"""PreferenceDataModule: preference rows -> tokenized pairs -> ``(2B, T)`` batches (``collate.py``)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from typing import Any, Optional

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..atomic import atomic_open
from ..model.loading import load_tokenizer
from .collate import REF_KEY, PreferenceCollator, padded_length
from .formats import BadRowPolicy, PreferenceDataError, normalize_row
from .reading import fingerprint_source, read_rows
from .sampling import EpochShuffleSampler, ResumableDataLoader, padding_fraction
from .tokenize import tokenize_pair

_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
MAX_LOGGED_SKIPS = 20  # skipped rows logged one by one; the rest are counted


def tokenize_rows(path: str, split: str, tokenizer: PreTrainedTokenizerBase, max_length: Optional[int],
                  max_prompt_length: Optional[int], rows: Optional[list] = None, on_bad_row: BadRowPolicy = "error",
                  chat_template_kwargs: Optional[dict[str, Any]] = None) -> tuple[list[dict], Counter]:
    """Read, normalise and tokenize every row of ``path``; returns the kept pairs and the counts of what
    happened to the others (``dropped: ...``) and to the kept ones (``truncated: ...``).

    A bad row raises :class:`PreferenceDataError` naming file, row and field; under ``on_bad_row="skip"`` it is
    counted by kind (``dropped: bad row, <kind>``) and its message is logged instead."""
    rows = read_rows(path, split, on_bad_row) if rows is None else rows
    counts: Counter = Counter(read=len(rows))
    kept, skipped = [], []
    for where, raw in tqdm(rows, desc=f"Tokenizing {os.path.basename(path) or path}", disable=len(rows) < 2000):
        try:
            if isinstance(raw, PreferenceDataError):  # a line the reader could not parse (skip policy)
                raise raw
            pair = normalize_row(raw, where)
            if pair.identical:
                counts["dropped: chosen identical to rejected"] += 1
                continue
            tok = tokenize_pair(pair, tokenizer, max_length, max_prompt_length, chat_template_kwargs)
        except PreferenceDataError as error:
            if on_bad_row == "error" or error.kind is None:
                raise
            counts[f"dropped: bad row, {error.kind}"] += 1
            skipped.append(str(error))
            continue
        if tok is None:
            counts[f"dropped: prompt leaves no room within max_length {max_length}"] += 1
            continue
        counts["truncated: prompt cut to max_prompt_length"] += tok.prompt_truncated
        counts["truncated: response cut to max_length"] += tok.completion_truncated
        counts["note: last prompt token merged with the response"] += tok.boundary_mismatch
        kept.append({c: getattr(tok, c) for c in _COLUMNS})
    for message in skipped[:MAX_LOGGED_SKIPS]:
        rank_zero_warn(f"[dpo_lightning] skipped (data.on_bad_row=skip): {message}")
    if len(skipped) > MAX_LOGGED_SKIPS:
        rank_zero_warn(f"[dpo_lightning] ... and {len(skipped) - MAX_LOGGED_SKIPS} more skipped rows in {path}")
    if not kept:
        raise PreferenceDataError(f"{path}: no usable pairs ({summarize(counts)})")
    return kept, counts


def summarize(counts: Counter) -> str:
    """One line: how many pairs were read and kept, and why any were dropped or truncated."""
    dropped = sum(v for k, v in counts.items() if k.startswith("dropped"))
    details = ", ".join(f"{k.split(': ', 1)[1]}: {v}" for k, v in sorted(counts.items()) if ": " in k and v)
    return f"{counts['read']} read, {counts['read'] - dropped} kept" + (f" ({details})" if details else "")


class PreferenceDataModule(LightningDataModule):
    """Preference pairs from local files (JSON/JSONL/Parquet/CSV), a ``save_to_disk`` directory or a hub data set.

    Args:
        train_path: training data: a ``.jsonl``/``.json``/``.parquet``/``.csv`` file (plain, ``.gz``, ``.bz2``,
            ``.xz`` or ``.zst``), a ``datasets`` directory
            saved with ``save_to_disk``, or a Hugging Face Hub data set name.
        tokenizer_name_or_path: tokenizer to use; linked to ``model.model_name_or_path`` by the CLI.
        val_path: validation data (same forms as ``train_path``). If unset, ``val_fraction`` of the training
            rows is held out instead.
        val_fraction: share of training rows held out for validation when ``val_path`` is unset (seeded).
        split_seed: seed of that hold-out split.
        shuffle_seed: seed of the training order; epoch ``e`` uses ``shuffle_seed + e``, so a resumed run
            sees the same batches as an uninterrupted one.
        train_split: split name for ``save_to_disk`` dataset dicts and hub data sets.
        val_split: split name for ``val_path`` (hub data sets and dataset dicts).
        max_length: maximum prompt + response tokens (see the truncation policy in ``tokenize.py``).
        max_prompt_length: maximum prompt tokens; longer prompts keep their end.
        batch_size: pairs per device per step (each step runs ``2 * batch_size`` sequences).
        val_batch_size: pairs per validation step; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: pad sequence length to a multiple of this (8 helps tensor cores).
        cache_dir: where tokenized data is cached, keyed by data content, tokenizer and settings;
            ``None`` disables caching.
        group_by_length: batch pairs of similar length together (shuffled groups of ``length_group_batches``
            batches, sorted by length): less padding, so faster steps; the start-of-fit log line gives the padding
            share either way. On by default (off in ``transformers``); set false for a plain shuffle.
        length_group_batches: batches per length-sorted group; larger groups pad less but order the data less
            randomly.
        on_bad_row: what a bad row does (malformed JSON, a missing or mistyped field, an empty completion,
            no shared prompt, bytes that are not UTF-8, a template that does not split prompt and completion):
            ``error`` stops with a message naming file, row and field; ``skip`` counts it by kind, logs it and goes
            on. Identical chosen/rejected and prompts with no room left are always counted drops.
        trust_remote_code: allow tokenizer code from the model repository to run.
        chat_template_kwargs: extra arguments of every ``apply_chat_template`` call, e.g. ``{enable_thinking:
            false}`` for thinking models (TRL's option of the same name). A row's ``tools`` column goes to the
            template too.
    """

    def __init__(self, train_path: str, tokenizer_name_or_path: str, val_path: Optional[str] = None,
                 val_fraction: float = 0.0, split_seed: int = 42, shuffle_seed: int = 42, train_split: str = "train",
                 val_split: str = "test", max_length: Optional[int] = 1024, max_prompt_length: Optional[int] = 512,
                 batch_size: int = 2, val_batch_size: Optional[int] = None, num_workers: int = 0,
                 pad_to_multiple_of: Optional[int] = None, cache_dir: Optional[str] = "~/.cache/dpo_lightning",
                 group_by_length: bool = True, length_group_batches: int = 50, on_bad_row: BadRowPolicy = "error",
                 trust_remote_code: bool = False, chat_template_kwargs: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
            raise ValueError(f"data.max_prompt_length ({max_prompt_length}) must be below data.max_length "
                             f"({max_length}) to leave room for the response")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1, got {batch_size}")
        if length_group_batches < 1:
            raise ValueError(f"data.length_group_batches must be at least 1, got {length_group_batches}")
        self.save_hyperparameters()
        self.tokenizer: Optional[PreTrainedTokenizerBase] = None
        self.train_pairs: Optional[list[dict]] = None
        self.val_pairs: Optional[list[dict]] = None
        self.written: list[str] = []  # cache files this process wrote (only one process per node writes)

    # ------------------------------------------------------------------------------------------- setup
    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer_name_or_path, self.hparams.trust_remote_code)
        return self.tokenizer

    def _cache_path(self, name: str, path: str, split: str, extra: str = "") -> Optional[str]:
        if self.hparams.cache_dir is None:
            return None
        source = fingerprint_source(path, split)
        if not source:
            return None
        tok = self.tokenizer
        key = json.dumps([source, extra, tok.backend_tokenizer.to_str() if tok.is_fast else tok.name_or_path,
                          tok.chat_template, tok.eos_token, self.hparams.max_length, self.hparams.max_prompt_length,
                          self.hparams.on_bad_row, "v3"] + ([self.hparams.chat_template_kwargs]
                                                             if self.hparams.chat_template_kwargs else []))
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        return os.path.join(os.path.expanduser(self.hparams.cache_dir), "tokenized", f"{name}-{digest}.json")

    def _load(self, name: str, path: str, split: str, rows: Optional[list], extra: str, write: bool) -> list[dict]:
        """Tokenized pairs from the cache, or tokenized now (and cached when ``write``)."""
        cache = self._cache_path(name, path, split, extra)
        if cache and os.path.exists(cache):
            with open(cache) as f:
                blob = json.load(f)
            pairs, counts = blob["pairs"], Counter(blob["counts"])
            origin = "cached"
        else:
            pairs, counts = tokenize_rows(path, split, self.tokenizer, self.hparams.max_length,
                                          self.hparams.max_prompt_length, rows, self.hparams.on_bad_row,
                                          self.hparams.chat_template_kwargs)
            origin = "tokenized"
            if cache and write:
                with atomic_open(cache) as f:  # a reader never sees half a file
                    json.dump({"pairs": pairs, "counts": dict(counts)}, f)
                self.written.append(cache)
        rank_zero_info(f"[dpo_lightning] {name} data {path} ({origin}): {summarize(counts)}")
        return pairs

    def _sources(self, stage: Optional[str]) -> list[tuple[str, str, str, Optional[list], str]]:
        """``(name, path, split, rows, cache key extra)`` of each data set ``stage`` still needs."""
        hp = self.hparams
        want_train = stage in (None, "fit") and self.train_pairs is None
        want_val = self.val_pairs is None and (hp.val_path is not None or hp.val_fraction > 0)
        if hp.val_path is not None or hp.val_fraction == 0:
            return ([("val", hp.val_path, hp.val_split, None, "")] if want_val else []) + \
                   ([("train", hp.train_path, hp.train_split, None, "")] if want_train else [])
        if not (want_train or want_val):
            return []
        rows = read_rows(hp.train_path, hp.train_split, hp.on_bad_row)
        order = list(range(len(rows)))
        random.Random(hp.split_seed).shuffle(order)
        n_val = max(1, round(len(rows) * hp.val_fraction))
        key = f"fraction={hp.val_fraction},seed={hp.split_seed}"
        out = []
        if want_val:
            out.append(("val", hp.train_path, hp.train_split, [rows[i] for i in sorted(order[:n_val])], "val:" + key))
        if want_train:
            out.append(("train", hp.train_path, hp.train_split, [rows[i] for i in sorted(order[n_val:])],
                        "train:" + key))
        return out

    def prepare_data(self) -> None:
        """Tokenize into the cache. Lightning runs this on one process per node before ``setup``, so only that
        process writes; the others read its files in ``setup``."""
        if self.hparams.cache_dir is None:
            return
        self.load_tokenizer()
        stage = self.trainer.state.fn if self.trainer is not None else None  # "fit", "validate", ...
        for name, path, split, rows, extra in self._sources(stage):
            cache = self._cache_path(name, path, split, extra)
            if cache and not os.path.exists(cache):
                self._load(name, path, split, rows, extra, write=True)

    def setup(self, stage: Optional[str] = None) -> None:
        sources = self._sources(stage)
        if not sources:
            return  # Lightning calls setup once per stage; keep what is already loaded
        self.load_tokenizer()
        for name, path, split, rows, extra in sources:
            # under a trainer the cache was written by prepare_data; used on its own, setup writes it
            pairs = self._load(name, path, split, rows, extra, write=self.trainer is None)
            setattr(self, f"{name}_pairs", pairs)

    # ------------------------------------------------------------------------------- the loaded pairs
    def pairs(self, split: str) -> Optional[list[dict]]:
        """The tokenized pairs of ``split`` (``train`` or ``val``; the test loop runs on ``val``), once set up."""
        return {"train": self.train_pairs, "val": self.val_pairs}[split]

    def needs_reference_logps(self, split: str) -> bool:
        """Whether ``split`` is loaded and some of its pairs lack reference log-probs."""
        return any(REF_KEY not in pair for pair in self.pairs(split) or ())

    def attach_reference_logps(self, split: str, logps: Tensor) -> None:
        """Keep each pair's ``[chosen, rejected]`` reference log-probs (``(N, 2)``, in the split's order) with the
        pair, so that they follow it through every shuffle, epoch and DDP shard into ``batch["ref_logps"]``."""
        pairs = self.pairs(split)
        if logps.shape != (len(pairs), 2):
            raise ValueError(f"reference log-probs of shape {tuple(logps.shape)} for {len(pairs)} {split} pairs")
        for pair, values in zip(pairs, logps.tolist()):
            pair[REF_KEY] = values

    @property
    def collator(self) -> PreferenceCollator:
        """Pairs -> :class:`~dpo_lightning.data.collate.PreferenceBatch`, with this tokenizer's padding."""
        return PreferenceCollator(self.load_tokenizer().pad_token_id, self.hparams.pad_to_multiple_of)

    # ------------------------------------------------------------------------------------- dataloaders

    def _start_epoch(self, resuming: bool) -> int:
        """Set the training order of the trainer's current epoch; return the batches a resumed epoch skips."""
        if self.trainer is None:
            return 0
        loop = self.trainer.fit_loop
        self.train_sampler.set_epoch(loop.epoch_progress.current.processed)  # the epoch Lightning is in
        return loop.epoch_loop.batch_progress.current.processed if resuming else 0

    def train_dataloader(self) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        hp, pairs = self.hparams, self.train_pairs
        prompt, chosen, rejected = ([len(p[k]) for p in pairs] for k in _COLUMNS)
        lengths = [padded_length(p) for p in pairs] if hp.group_by_length else None
        self.train_sampler = EpochShuffleSampler(pairs, hp.shuffle_seed, world, rank, lengths, hp.batch_size,
                                                 hp.length_group_batches)
        order = self.train_sampler.global_order(0)[rank::world]
        plain, shared = (padding_fraction(order, prompt, chosen, rejected, hp.batch_size, s) for s in (False, True))
        rank_zero_info(f"[dpo_lightning] train batches: {plain:.1%} of token slots are padding, {shared:.1%} with "
                       f"prefix sharing (data.group_by_length: {str(hp.group_by_length).lower()})")
        return ResumableDataLoader(self.train_pairs, batch_size=self.hparams.batch_size, sampler=self.train_sampler,
                                   collate_fn=self.collator, num_workers=self.hparams.num_workers,
                                   start_epoch=self._start_epoch)

    def _eval_loader(self, stage: str) -> DataLoader:
        if not self.val_pairs:
            raise PreferenceDataError(f"{stage} needs validation data: set data.val_path or data.val_fraction")
        return DataLoader(self.val_pairs, batch_size=self.hparams.val_batch_size or self.hparams.batch_size,
                          shuffle=False, collate_fn=self.collator, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        fitting = self.trainer is None or self.trainer.state.fn == "fit"
        if not self.val_pairs and fitting:
            return []  # no validation configured: `fit` skips the loop, `validate` raises below
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
