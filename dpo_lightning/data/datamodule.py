"""PreferenceDataModule: preference rows -> tokenized pairs -> ``(2B, T)`` batches (``collate.py``)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from typing import Any, Optional

import numpy as np
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..model.loading import load_tokenizer
from . import tokenized
from .collate import PreferenceCollator
from .formats import BadRowPolicy, PreferenceDataError
from .reading import fingerprint_source, hub_fingerprint
from .sampling import EpochShuffleSampler, ResumableDataLoader, padding_fraction
from .table import COLUMNS, PairTable, reference_table
from .token_batches import TokenBudgetBatchSampler

MAX_LOGGED_SKIPS = 20  # skipped rows logged one by one; the rest are counted
CACHE_VERSION = "v6"  # changes when what a row tokenizes to changes for the same inputs


def tokenize_rows(path: str, split: str, tokenizer: PreTrainedTokenizerBase, max_length: Optional[int],
                  max_prompt_length: Optional[int], on_bad_row: BadRowPolicy = "error",
                  chat_template_kwargs: Optional[dict[str, Any]] = None, num_proc: int = 1,
                  ) -> tuple[PairTable, Counter]:
    """Read, normalise and tokenize every row of ``path`` (in memory, no cache); returns the kept pairs and the
    counts of what happened to the others (``dropped: ...``) and to the kept ones (``truncated: ...``).

    A bad row raises :class:`PreferenceDataError` naming file, row and field; under ``on_bad_row="skip"`` it is
    counted by kind (``dropped: bad row, <kind>``) and its message is logged instead."""
    settings = dict(max_length=max_length, max_prompt_length=max_prompt_length, on_bad_row=on_bad_row,
                    chat_template_kwargs=chat_template_kwargs)
    table = tokenized.build(path, split, tokenizer, settings, num_proc)
    return _select(table, path, None, "in-memory")


def _select(table: Any, path: str, rows: Optional[np.ndarray], key: str) -> tuple[PairTable, Counter]:
    """The kept pairs among ``rows`` of a tokenized table, and their counts; logs the skipped rows' messages."""
    counts = tokenized.count(table, rows)
    messages, skipped = tokenized.errors(table, rows, MAX_LOGGED_SKIPS)
    for message in messages:
        rank_zero_warn(f"[dpo_lightning] skipped (data.on_bad_row=skip): {message}")
    if skipped > len(messages):
        rank_zero_warn(f"[dpo_lightning] ... and {skipped - len(messages)} more skipped rows in {path}")
    kept = tokenized.kept_rows(table, rows)
    tokenized.check_usable(path, kept, counts)
    return PairTable(table.data, kept, key), counts


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
        max_tokens: cut training batches by this budget of pair tokens (prompt once, both responses) per device
            instead of ``batch_size`` pairs: many short pairs or few long ones a step (``data/token_batches.py``);
            pairs with ``model.packing`` into rows. Validation batches still hold ``val_batch_size`` pairs.
        val_batch_size: pairs per validation step; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: pad sequence length to a multiple of this (8 helps tensor cores).
        cache_dir: where tokenized data is cached as memory-mapped Arrow tables, keyed by data content, tokenizer
            and settings; ``None`` tokenizes in memory on every run.
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
        num_proc: processes that tokenize (``datasets``' ``map``); the result is cached, so this only matters the
            first time a data set is seen.
    """

    def __init__(self, train_path: str, tokenizer_name_or_path: str, val_path: Optional[str] = None,
                 val_fraction: float = 0.0, split_seed: int = 42, shuffle_seed: int = 42, train_split: str = "train",
                 val_split: str = "test", max_length: Optional[int] = 1024, max_prompt_length: Optional[int] = 512,
                 batch_size: int = 2, val_batch_size: Optional[int] = None, max_tokens: Optional[int] = None,
                 num_workers: int = 0,
                 pad_to_multiple_of: Optional[int] = None, cache_dir: Optional[str] = "~/.cache/dpo_lightning",
                 group_by_length: bool = True, length_group_batches: int = 50, on_bad_row: BadRowPolicy = "error",
                 trust_remote_code: bool = False, chat_template_kwargs: Optional[dict[str, Any]] = None,
                 num_proc: int = 1) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
            raise ValueError(f"data.max_prompt_length ({max_prompt_length}) must be below data.max_length "
                             f"({max_length}) to leave room for the response")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1, got {batch_size}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"data.max_tokens must be at least 1, got {max_tokens}")
        if num_proc < 1:
            raise ValueError(f"data.num_proc must be at least 1, got {num_proc}")
        if length_group_batches < 1:
            raise ValueError(f"data.length_group_batches must be at least 1, got {length_group_batches}")
        self.save_hyperparameters()
        self.tokenizer: Optional[PreTrainedTokenizerBase] = None
        self.train_pairs: Optional[PairTable] = None
        self.val_pairs: Optional[PairTable] = None
        self.written: list[str] = []  # cache directories this process wrote (only one process per node writes)
        self._tables: dict[tuple[str, str], tuple[Any, str]] = {}  # (path, split) -> (table, origin), during setup
        self._keys: dict[tuple[str, str], tuple[Optional[str], str]] = {}  # (path, split) -> (cache directory, key)

    # ------------------------------------------------------------------------------------------- setup
    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer_name_or_path, self.hparams.trust_remote_code)
        return self.tokenizer

    def _settings(self) -> dict[str, Any]:
        hp = self.hparams
        return dict(max_length=hp.max_length, max_prompt_length=hp.max_prompt_length, on_bad_row=hp.on_bad_row,
                    chat_template_kwargs=hp.chat_template_kwargs)

    def _cache(self, path: str, split: str) -> tuple[Optional[str], str]:
        """Where the tokenized table of ``path`` is cached (None: no cache), and its key."""
        if (path, split) not in self._keys:
            self._keys[(path, split)] = self._cache_key(path, split)
        return self._keys[(path, split)]

    def _cache_key(self, path: str, split: str) -> tuple[Optional[str], str]:
        cache_dir = os.path.expanduser(self.hparams.cache_dir) if self.hparams.cache_dir is not None else None
        memo = os.path.join(cache_dir, "fingerprints") if cache_dir else None
        source = fingerprint_source(path, split, memo) or hub_fingerprint(path, split)
        tok = self.load_tokenizer()
        key = hashlib.sha256(json.dumps([
            source, tok.backend_tokenizer.to_str() if tok.is_fast else tok.name_or_path,
            tok.chat_template, tok.eos_token, self._settings(), CACHE_VERSION]).encode()).hexdigest()[:24]
        return (os.path.join(cache_dir, "tokenized", key) if cache_dir else None), key

    def _table(self, path: str, split: str) -> tuple[Any, str]:
        """The tokenized table of ``path`` (memory-mapped from the cache, else tokenized now) and its key."""
        directory, key = self._cache(path, split)
        if (path, split) not in self._tables:
            table = tokenized.load_cached(directory) if directory else None
            origin = "cached"
            if table is None:
                table, origin = tokenized.build(path, split, self.tokenizer, {**self._settings(), "key": key},
                                                self.hparams.num_proc, directory), "tokenized"
                if directory:
                    self.written.append(directory)
            self._tables[(path, split)] = table, origin
        return self._tables[(path, split)][0], key

    def _sources(self, stage: Optional[str]) -> list[tuple[str, str, str, Optional[str]]]:
        """``(name, path, split, part)`` of each data set ``stage`` still needs; ``part`` is ``train`` or ``val``
        of a training file split by ``data.val_fraction``, else None."""
        hp = self.hparams
        want_train = stage in (None, "fit") and self.train_pairs is None
        want_val = self.val_pairs is None and (hp.val_path is not None or hp.val_fraction > 0)
        by_fraction = hp.val_path is None and hp.val_fraction > 0
        out = [("val", hp.train_path if by_fraction else hp.val_path, hp.train_split if by_fraction else hp.val_split,
                "val" if by_fraction else None)] if want_val else []
        return out + ([("train", hp.train_path, hp.train_split, "train" if by_fraction else None)]
                      if want_train else [])

    def _fraction_rows(self, n: int, part: str) -> np.ndarray:
        """The raw rows of ``part`` when ``data.val_fraction`` of ``n`` rows is held out (seeded)."""
        order = list(range(n))
        random.Random(self.hparams.split_seed).shuffle(order)
        n_val = max(1, round(n * self.hparams.val_fraction))
        if part == "train" and n_val >= n:
            raise PreferenceDataError(f"{self.hparams.train_path}: data.val_fraction {self.hparams.val_fraction} "
                                      f"holds out {n_val} of its {n} rows for validation, leaving none to train on; "
                                      "set data.val_fraction 0 or give data.val_path")
        return np.sort(np.asarray(order[:n_val] if part == "val" else order[n_val:], dtype=np.int64))

    def prepare_data(self) -> None:
        """Tokenize into the cache. Lightning runs this on one process per node before ``setup``, so only that
        process writes; the others memory-map its tables in ``setup``."""
        if self.hparams.cache_dir is None:
            return
        stage = self.trainer.state.fn if self.trainer is not None else None  # "fit", "validate", ...
        for _, path, split, _ in self._sources(stage):
            directory, key = self._cache(path, split)
            if not tokenized.is_cached(directory):
                self._table(path, split)
        self._tables.clear()

    def setup(self, stage: Optional[str] = None) -> None:
        sources = self._sources(stage)
        for name, path, split, part in sources:
            table, key = self._table(path, split)
            rows = self._fraction_rows(len(table), part) if part else None
            pairs, counts = _select(table, path, rows, key + (f"|{part}" if part else ""))
            origin = self._tables[(path, split)][1]
            rank_zero_info(f"[dpo_lightning] {name} data {path} ({origin}): {tokenized.summarize(counts)}")
            setattr(self, f"{name}_pairs", pairs)
        self._tables.clear()

    # ------------------------------------------------------------------------------- the loaded pairs
    def pairs(self, split: str) -> Optional[PairTable]:
        """The tokenized pairs of ``split`` (``train`` or ``val``; the test loop runs on ``val``), once set up."""
        return {"train": self.train_pairs, "val": self.val_pairs}[split]

    def needs_reference_logps(self, split: str) -> bool:
        """Whether ``split`` is loaded and its pairs lack reference log-probs."""
        pairs = self.pairs(split)
        return pairs is not None and pairs.reference is None

    def attach_reference_logps(self, split: str, logps: Any) -> None:
        """Keep each pair's ``[chosen, rejected]`` reference log-probs (an ``(N, 2)`` tensor in the split's order,
        or a table from ``table.reference_table``) as columns beside its tokens, so that they follow it through
        every shuffle, epoch and DDP shard into ``batch["ref_logps"]``."""
        pairs = self.pairs(split)
        if isinstance(logps, Tensor):
            if logps.shape != (len(pairs), 2):
                raise ValueError(f"reference log-probs of shape {tuple(logps.shape)} for {len(pairs)} {split} pairs")
            logps = reference_table(logps)
        pairs.set_reference(logps)

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
        prompt, chosen, rejected = (pairs.lengths(c) for c in COLUMNS)
        if hp.max_tokens:
            self.train_sampler = TokenBudgetBatchSampler(prompt + chosen + rejected, hp.max_tokens, hp.shuffle_seed,
                                                         world, rank, hp.length_group_batches if hp.group_by_length
                                                         else None)
            batches = self.train_sampler.global_batches(0)[rank::world]
            order, sizes = np.concatenate(batches) if batches else np.zeros(0, np.int64), [len(b) for b in batches]
            loader_batching = {"batch_size": None}  # the sampler yields whole batches
        else:
            lengths = pairs.padded_lengths() if hp.group_by_length else None
            self.train_sampler = EpochShuffleSampler(pairs, hp.shuffle_seed, world, rank, lengths, hp.batch_size,
                                                     hp.length_group_batches)
            order, sizes = self.train_sampler.global_order(0)[rank::world], hp.batch_size
            loader_batching = {"batch_size": hp.batch_size}
        plain, shared = (padding_fraction(order, prompt, chosen, rejected, sizes, s) for s in (False, True))
        rank_zero_info(f"[dpo_lightning] train batches: {plain:.1%} of token slots are padding in the plain layout, "
                       f"{shared:.1%} in the prefix-shared one (data.group_by_length: "
                       f"{str(hp.group_by_length).lower()})")
        return ResumableDataLoader(self.train_pairs, sampler=self.train_sampler, collate_fn=self.collator,
                                   num_workers=hp.num_workers, start_epoch=self._start_epoch, **loader_batching)

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
