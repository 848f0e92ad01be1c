"""Formats, templating, truncation, errors and the collator's batch contract."""

import json

import pytest
from transformers import AutoTokenizer

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.data.datamodule import PreferenceDataModule, tokenize_rows
from dpo_lightning.data.formats import PreferenceDataError, normalize_row
from dpo_lightning.data.reading import read_rows
from dpo_lightning.data.tokenize import tokenize_pair

from conftest import CHAT_TEMPLATE, PAIRS, conversational_rows, write_jsonl


def test_collator_worked_example():
    batch = PreferenceCollator(pad_token_id=0)(
        [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
         {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]


def test_collator_pads_to_multiple():
    batch = PreferenceCollator(pad_token_id=9, pad_to_multiple_of=8)(
        [{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3, 4]}])
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"][0, 2:].tolist() == [9] * 6


def test_implicit_conversational_prompt_is_the_shared_prefix():
    row = conversational_rows()[0]
    pair = normalize_row(row, "f line 1")
    assert pair.prompt == row["chosen"][:2]
    assert pair.chosen == row["chosen"][2:] and pair.rejected == row["rejected"][2:]


def test_explicit_prompt_and_string_completions_in_a_conversation():
    pair = normalize_row({"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "no"}, "w")
    assert pair.chosen == [{"role": "assistant", "content": "hello"}] and pair.conversational


def test_standard_implicit_prompt_follows_trl():
    pair = normalize_row({"chosen": "Human: sky? Assistant: blue", "rejected": "Human: sky? Assistant: green"}, "w")
    assert pair.prompt == "Human: sky? Assistant:" and pair.chosen == " blue" and pair.rejected == " green"


def test_conversational_tokenization(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pair = normalize_row(conversational_rows()[0], "w")
    t = tokenize_pair(pair, tok)
    prompt_text = tok.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
    assert t.prompt_ids == tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert t.chosen_ids[-1] == tok.eos_token_id  # the end-of-turn token is part of the completion
    assert tok.decode(t.chosen_ids, skip_special_tokens=True).split() == PAIRS[0][1].split()
    assert not t.boundary_mismatch


def test_standard_text_gets_eos(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    t = tokenize_pair(normalize_row({"prompt": "hello ", "chosen": "hi there", "rejected": "no"}, "w"), tok)
    assert t.chosen_ids == tok("hi there")["input_ids"] + [tok.eos_token_id]
    assert t.rejected_ids[-1] == tok.eos_token_id


def test_unfinished_responses_have_no_end_of_turn(tiny_model_dir):
    # a response cut off by a length budget never had an end of turn: it trains on its text's tokens only
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = conversational_rows()[0]
    finished = tokenize_pair(normalize_row(row, "w"), tok)
    cut = tokenize_pair(normalize_row({**row, "rejected_unfinished": True}, "w"), tok)
    prompt_text = tok.apply_chat_template(row["rejected"][:-1], tokenize=False, add_generation_prompt=True)
    text_ids = tok(prompt_text + PAIRS[0][2], add_special_tokens=False)["input_ids"][len(finished.prompt_ids):]
    assert cut.rejected_ids == text_ids and finished.rejected_ids == text_ids + [tok.eos_token_id]
    assert cut.chosen_ids == finished.chosen_ids and cut.prompt_ids == finished.prompt_ids
    both = tokenize_pair(normalize_row({**row, "chosen_unfinished": True, "rejected_unfinished": True}, "w"), tok)
    assert both.chosen_ids == finished.chosen_ids[:-1] and both.rejected_ids == text_ids
    # standard text: no eos_token appended
    plain = {"prompt": "hello ", "chosen": "hi there", "rejected": "no", "chosen_unfinished": True}
    t = tokenize_pair(normalize_row(plain, "w"), tok)
    assert t.chosen_ids == tok("hi there")["input_ids"] and t.rejected_ids[-1] == tok.eos_token_id
    # a null (a data set column other rows fill) is false
    assert normalize_row({**plain, "chosen_unfinished": None}, "w").chosen_unfinished is False


def test_unfinished_response_under_a_template_that_trims_or_rewrites(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = {"prompt": [{"role": "user", "content": "hello !"}], "chosen": "hi there . ", "rejected": " no , ",
           "rejected_unfinished": True}
    tok.chat_template = CHAT_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
    t = tokenize_pair(normalize_row(row, "data.jsonl line 4"), tok)
    assert t.rejected_ids == tok("no ,", add_special_tokens=False)["input_ids"]  # matched on the trimmed text
    tok.chat_template = CHAT_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | upper }}")
    with pytest.raises(PreferenceDataError, match=r"data.jsonl line 4: field 'rejected_unfinished': the chat "
                                                  r"template .* does not render the rejected text as written"):
        tokenize_pair(normalize_row(row, "data.jsonl line 4"), tok)


def test_truncation_policy(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pair = normalize_row({"prompt": "what is your name ? " * 5, "chosen": "i am deep smol , made by the team .",
                          "rejected": "no"}, "w")
    full = tokenize_pair(pair, tok)
    t = tokenize_pair(pair, tok, max_length=12, max_prompt_length=8)
    assert t.prompt_ids == full.prompt_ids[-8:] and t.prompt_truncated  # prompt keeps its end
    assert t.chosen_ids == full.chosen_ids[:4] and t.completion_truncated  # response keeps its start
    assert t.rejected_ids == full.rejected_ids  # already fits
    assert tokenize_pair(pair, tok, max_length=len(full.prompt_ids)) is None  # no room left: dropped


def test_counts_summarise_every_drop_and_truncation(tmp_path, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = conversational_rows()
    rows.append({"chosen": rows[0]["chosen"], "rejected": rows[0]["chosen"]})  # identical pair
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    kept, counts = tokenize_rows(path, "train", tok, max_length=30, max_prompt_length=25)
    assert counts["read"] == 9 and len(kept) == 8
    assert counts["dropped: chosen identical to rejected"] == 1
    assert counts["truncated: response cut to max_length"] >= 1


@pytest.mark.parametrize("content, field, fragment", [
    ('{"chosen": "a", "rejected": "b", "prompt": "p"}\n{"chosen": "x"\n', None, "line 2: malformed JSON"),
    ('{"prompt": "p", "chosen": "a"}\n', "rejected", "line 1: field 'rejected': missing"),
    ('{"prompt": "p", "chosen": "  ", "rejected": "b"}\n', "chosen", "line 1: field 'chosen': empty completion"),
    ('{"prompt": "p", "chosen": 3, "rejected": "b"}\n', "chosen", "field 'chosen': expected a string"),
    ('{"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"},'
     ' {"role": "assistant", "content": "a"}]}\n', "chosen", "field 'chosen': empty completion"),
    ('{"chosen": [{"role": "user"}], "rejected": []}\n', "chosen", "field 'chosen[0].content': missing"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "rejected_unfinished": "yes"}\n', "rejected_unfinished",
     "line 1: field 'rejected_unfinished': expected true or false, got \"yes\""),
])
def test_bad_rows_name_file_row_and_field(tmp_path, tiny_model_dir, content, field, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(PreferenceDataError) as err:
        tokenize_rows(str(path), "train", tok, 64, 32)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_non_utf8_and_empty_files(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(PreferenceDataError, match="latin1.jsonl line 1: not valid UTF-8"):
        read_rows(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PreferenceDataError, match="empty.jsonl: no rows"):
        read_rows(str(empty))


def test_every_file_kind_reads_the_same_rows(tmp_path):
    import datasets

    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    ds = datasets.Dataset.from_list(rows)
    paths = [write_jsonl(tmp_path / "d.jsonl", rows), str(tmp_path / "d.json"), str(tmp_path / "d.parquet"),
             str(tmp_path / "d.csv"), str(tmp_path / "saved")]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds.to_parquet(paths[2])
    ds.to_csv(paths[3], index=False)
    datasets.DatasetDict({"train": ds}).save_to_disk(paths[4])
    for path in paths:
        got = [normalize_row(r, w) for w, r in read_rows(path, "train")]
        assert [(p.prompt, p.chosen, p.rejected) for p in got] == [tuple(r.values()) for r in rows], path


def test_datamodule_split_cache_and_batches(tmp_path, tiny_model_dir, pairs_jsonl):
    kwargs = dict(train_path=pairs_jsonl, tokenizer_name_or_path=tiny_model_dir, val_fraction=0.25, batch_size=3,
                  cache_dir=str(tmp_path / "cache"))
    dm = PreferenceDataModule(**kwargs)
    dm.setup("fit")
    assert len(dm.train_pairs) == 6 and len(dm.val_pairs) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 6 and batch["loss_mask"].shape == batch["input_ids"].shape
    cached = list((tmp_path / "cache" / "tokenized").iterdir())
    assert len(cached) == 1  # the file is tokenized once; both splits are index sets over its table
    assert dm.written == [str(cached[0])]
    dm2 = PreferenceDataModule(**kwargs)
    dm2.setup("fit")  # served from the cache: identical pairs, nothing written
    assert dm2.written == [] and dm2.train_pairs == dm.train_pairs and dm2.val_pairs == dm.val_pairs
    assert sorted(dm.train_pairs.rows.tolist() + dm.val_pairs.rows.tolist()) == list(range(8))
    other = PreferenceDataModule(**{**kwargs, "max_length": 20, "max_prompt_length": 10})
    other.setup("fit")  # different settings -> a different cache entry, not a stale hit
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 2
    assert other.train_pairs != dm.train_pairs


def test_bad_settings_fail_before_loading():
    with pytest.raises(ValueError, match="max_prompt_length"):
        PreferenceDataModule(train_path="x", tokenizer_name_or_path="y", max_length=10, max_prompt_length=10)
    with pytest.raises(ValueError, match="val_fraction"):
        PreferenceDataModule(train_path="x", tokenizer_name_or_path="y", val_fraction=1.5)
