"""The Arrow data path: batched, multi-process tokenizing equal to the row-by-row computation; a memory-mapped cache
that a second run reads without tokenizing; splits, lengths and reference log-probs held as arrays, not per-pair
Python objects."""

import json
import os
import pickle
import time

import datasets
import numpy as np
import pytest
from datasets.table import ConcatenationTable, MemoryMappedTable, concat_tables

from dpo_lightning.data import tokenized
from dpo_lightning.data.datamodule import PreferenceDataModule, tokenize_rows
from dpo_lightning.data.formats import PreferenceDataError, normalize_row
from dpo_lightning.data.reading import read_rows
from dpo_lightning.data.table import PairTable, reference_table
from dpo_lightning.data.tokenize import tokenize_pair
from dpo_lightning.model.loading import load_tokenizer

from conftest import PAIRS, build_tokenizer, conversational_rows, write_jsonl

BAD = [b'{"prompt": "hi", "chosen": "a"', b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',
       b'{"prompt": "hi", "chosen": "a", "rejected": ""}', b'{"prompt": "hi", "chosen": 3, "rejected": "b"}']


def _mixed_lines(n: int) -> list[bytes]:
    """``n`` lines: standard and conversational pairs, a bad line every 37, an identical pair every 53, blanks."""
    rows = conversational_rows()
    lines = []
    for i in range(n):
        if i % 37 == 5:
            lines.append(BAD[i % len(BAD)])
        elif i % 53 == 7:
            lines.append(json.dumps({"prompt": "hi", "chosen": "same .", "rejected": "same ."}).encode())
        elif i % 41 == 3:
            lines.append(b"   ")
        elif i % 2:
            p, c, r = PAIRS[i % len(PAIRS)]
            lines.append(json.dumps({"prompt": p + " " + "yes " * (i % 9), "chosen": c, "rejected": r}).encode())
        else:
            lines.append(json.dumps(rows[i % len(rows)]).encode())
    return lines


@pytest.fixture
def mixed_jsonl(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(_mixed_lines(700)) + b"\n")
    return str(path)


def _row_by_row(path, tok, max_length, max_prompt_length):
    """The pairs and skip messages computed one row at a time, without the Arrow path."""
    pairs, messages = [], []
    for where, row in read_rows(path, "train", "skip"):
        try:
            if isinstance(row, PreferenceDataError):
                raise row
            pair = normalize_row(row, where)
            if pair.identical:
                continue
            out = tokenize_pair(pair, tok, max_length, max_prompt_length)
        except PreferenceDataError as error:
            messages.append(str(error))
            continue
        if out is not None:
            pairs.append({c: getattr(out, c) for c in ("prompt_ids", "chosen_ids", "rejected_ids")})
    return pairs, messages


@pytest.mark.parametrize("num_proc", [1, 2])
def test_batched_map_equals_row_by_row_tokenizing_with_line_numbers(tiny_model_dir, mixed_jsonl, num_proc):
    tok = load_tokenizer(tiny_model_dir)
    expected, messages = _row_by_row(mixed_jsonl, tok, 24, 12)
    settings = dict(max_length=24, max_prompt_length=12, on_bad_row="skip", chat_template_kwargs=None)
    table = tokenized.build(mixed_jsonl, "train", tok, settings, num_proc)
    pairs, counts = tokenize_rows(mixed_jsonl, "train", tok, 24, 12, on_bad_row="skip", num_proc=num_proc)
    assert list(pairs) == expected and len(expected) > 500
    got, n_skipped = tokenized.errors(table, None, 1000)
    assert got == messages and n_skipped == len(messages) == 19
    assert "mixed.jsonl line 6: not valid UTF-8" in messages[0]  # line numbers survive the blank lines
    assert counts["read"] == 700 - sum(1 for i in range(700) if i % 41 == 3 and i % 37 != 5 and i % 53 != 7)
    assert counts["dropped: chosen identical to rejected"] > 0 and counts["truncated: prompt cut to max_prompt_length"]
    assert counts["read"] - sum(v for k, v in counts.items() if k.startswith("dropped")) == len(expected)


def test_a_bad_row_stops_the_map_with_its_line_under_either_num_proc(tiny_model_dir, tmp_path):
    lines = _mixed_lines(600)
    lines = [line for line in lines if line not in BAD]
    lines[550] = BAD[3]
    path = tmp_path / "late_bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    for num_proc in (1, 2):
        with pytest.raises(PreferenceDataError, match=r"late_bad.jsonl line 551: field 'chosen': expected a string"):
            tokenize_rows(str(path), "train", load_tokenizer(tiny_model_dir), 64, 32, num_proc=num_proc)


def test_the_cache_is_memory_mapped_and_a_second_run_tokenizes_nothing(tiny_model_dir, mixed_jsonl, tmp_path):
    kwargs = dict(train_path=mixed_jsonl, tokenizer_name_or_path=tiny_model_dir, val_fraction=0.1, batch_size=4,
                  max_length=24, max_prompt_length=12, on_bad_row="skip", cache_dir=str(tmp_path / "cache"))
    cold = PreferenceDataModule(**kwargs, num_proc=2)
    cold.prepare_data()
    cold.setup("fit")
    warm = PreferenceDataModule(**kwargs)  # num_proc does not change the ids, so it is not part of the key
    warm.setup("fit")
    assert len(cold.written) == 1 and warm.written == []
    assert warm.train_pairs == cold.train_pairs and warm.val_pairs == cold.val_pairs
    data = warm.train_pairs.data
    blocks = [b for row in data.blocks for b in row] if isinstance(data, ConcatenationTable) else [data]
    assert all(isinstance(b, MemoryMappedTable) for b in blocks)
    # a DataLoader worker receives the table as file paths, not as a copy of the tokens
    assert len(pickle.dumps(warm.train_pairs.data)) < 10_000 < warm.train_pairs.data.nbytes
    batch = next(iter(warm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8


def test_splits_lengths_and_reference_are_arrays_over_the_table(tiny_model_dir, pairs_jsonl):
    pairs, _ = tokenize_rows(pairs_jsonl, "train", load_tokenizer(tiny_model_dir), 64, 32)
    lists = list(pairs)
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert pairs.lengths(column).tolist() == [len(p[column]) for p in lists]
    assert pairs.padded_lengths().tolist() == [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))
                                               for p in lists]
    view = pairs[2:7:2]
    assert isinstance(view, PairTable) and list(view) == lists[2:7:2] and pairs[-1] == lists[-1]
    assert view.fingerprint != pairs.fingerprint
    logps = np.arange(2 * len(pairs), dtype=np.float32).reshape(-1, 2)
    pairs.set_reference(reference_table(logps))
    assert [p["ref_logps"] for p in pairs] == logps.tolist()
    assert [p["ref_logps"] for p in pairs[1::3]] == logps[1::3].tolist()
    with pytest.raises(ValueError, match="for 3 pairs, the table has 8"):
        pairs.set_reference(reference_table(logps[:3]))


def test_every_table_source_reads_the_same_pairs(tiny_model_dir, tmp_path):
    rows = conversational_rows()
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    tok = load_tokenizer(tiny_model_dir)
    expected, _ = tokenize_rows(str(tmp_path / "saved"), "train", tok, 64, 32)
    assert len(expected) == len(rows)
    for path in (arrow, tmp_path / "rows.parquet"):
        assert list(tokenize_rows(str(path), "train", tok, 64, 32)[0]) == list(expected), path


def test_a_changed_file_gets_a_new_table_although_its_hash_is_remembered(tiny_model_dir, tmp_path):
    rows = conversational_rows()
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    os.utime(path, (time.time() - 60, time.time() - 60))  # old enough for its hash to be remembered
    kwargs = dict(train_path=path, tokenizer_name_or_path=tiny_model_dir, cache_dir=str(tmp_path / "cache"))
    first = PreferenceDataModule(**kwargs)
    first.setup("fit")
    assert len(os.listdir(tmp_path / "cache" / "fingerprints")) == 1
    again = PreferenceDataModule(**kwargs)
    again.setup("fit")
    assert again.written == [] and again.train_pairs == first.train_pairs
    write_jsonl(path, rows[::-1])  # the same size, other content, a new modification time
    changed = PreferenceDataModule(**kwargs)
    changed.setup("fit")
    assert changed.written and list(changed.train_pairs) == list(first.train_pairs)[::-1]


def test_a_tokenizer_saved_with_padding_and_truncation_on_encodes_as_its_call_does(tmp_path, pairs_jsonl):
    tok = build_tokenizer()
    tok.backend_tokenizer.enable_padding(pad_id=0, pad_token="<pad>", length=64)
    tok.backend_tokenizer.enable_truncation(max_length=5)
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.backend_tokenizer.padding is not None and loaded.backend_tokenizer.truncation is not None
    got = list(tokenize_rows(pairs_jsonl, "train", loaded, 64, 32)[0])  # first: it meets the saved state
    expected, _ = _row_by_row(pairs_jsonl, loaded, 64, 32)  # tokenizer(...) resets both before encoding
    assert got == expected
    assert max(len(p["chosen_ids"]) for p in expected) < 64 and len(expected[0]["prompt_ids"]) > 5


def test_pairs_are_read_across_record_batches(tiny_model_dir, pairs_jsonl):
    pairs, _ = tokenize_rows(pairs_jsonl, "train", load_tokenizer(tiny_model_dir), 64, 32)
    lists = list(pairs)
    data = concat_tables([pairs.data] * 3)  # three record batches
    assert data.table.column("chosen_ids").num_chunks == 3
    table = PairTable(data, np.arange(3 * len(lists))[::-1], "k")
    assert table.__getitems__([0, 7, 8, 15, 16, 23]) == [(lists * 3)[::-1][i] for i in (0, 7, 8, 15, 16, 23)]
    assert list(table) == (lists * 3)[::-1]
