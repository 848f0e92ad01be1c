"""Bad rows: each kind is an error naming file, line and field, or under ``data.on_bad_row=skip`` a counted skip.

Kinds covered (13): malformed JSON, bytes that are not UTF-8, a row that is not an object, a missing field, a
misnamed field, a wrong type, a message without content, a string prompt with message completions, an empty chosen,
an empty rejected, chosen and rejected sharing no prompt, a template that does not split prompt and completion,
and an empty file; plus two counted drops under either policy: chosen identical to rejected, and a prompt that
leaves no room within max_length.
"""

import json
from itertools import zip_longest

import pytest
from transformers import AutoTokenizer

from dpo_lightning.data.datamodule import PreferenceDataModule, tokenize_rows
from dpo_lightning.data.formats import PreferenceDataError

from conftest import PAIRS, write_jsonl

GOOD = [json.dumps({"prompt": p, "chosen": c, "rejected": r}).encode() for p, c, r in PAIRS]


def _msgs(system, answer):
    return [{"role": "system", "content": system}, {"role": "user", "content": "who are you ?"},
            {"role": "assistant", "content": answer}]


# (kind, the bad line, the field the message names or None, a fragment of the message)
BAD_LINES = [
    ("malformed JSON", b'{"prompt": "hi", "chosen": "a"', None, "malformed JSON at column 31"),  # where it ends
    ("not UTF-8", b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', None, "not valid UTF-8"),
    ("not an object", b'["hi", "a", "b"]', None, "expected an object with 'chosen' and 'rejected', got list"),
    ("missing field", b'{"prompt": "hi", "chosen": "a"}', "rejected", "missing (fields present: ['chosen', 'prompt'])"),
    ("missing field", b'{"prompt": "hi", "chosen": "a", "rejected_response": "b"}', "rejected",
     "fields present: ['chosen', 'prompt', 'rejected_response']"),
    ("wrong type", b'{"prompt": "hi", "chosen": 3, "rejected": "b"}', "chosen", "expected a string"),
    ("missing field", json.dumps({"chosen": [{"role": "user"}], "rejected": _msgs("s", "b")}).encode(),
     "chosen[0].content", "missing"),
    ("wrong type", json.dumps({"prompt": "hi", "chosen": _msgs("s", "a"), "rejected": _msgs("s", "b")}).encode(),
     "prompt", "a string prompt cannot be combined with message-list completions"),
    ("empty completion", b'{"prompt": "hi", "chosen": "   ", "rejected": "b"}', "chosen", "empty completion"),
    ("empty completion", b'{"prompt": "hi", "chosen": "a", "rejected": ""}', "rejected", "empty completion"),
    ("no shared prompt", json.dumps({"chosen": _msgs("you are deep smol .", "a"),
                                     "rejected": _msgs("you are smollm .", "b")}).encode(),
     "chosen", "share no leading message"),
]


@pytest.fixture
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _write(path, lines):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.mark.parametrize("kind, line, field, fragment", BAD_LINES, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD_LINES)])
def test_each_bad_row_is_an_error_naming_file_line_and_field(tmp_path, tok, kind, line, field, fragment):
    path = _write(tmp_path / "bad.jsonl", [GOOD[0], line, GOOD[1]])
    with pytest.raises(PreferenceDataError) as err:
        tokenize_rows(path, "train", tok, 64, 32)
    message = str(err.value)
    assert message.startswith(f"{path} line 2: ") and fragment in message, message
    if field is not None:
        assert f"field '{field}'" in message
    assert err.value.kind == kind


def test_skip_policy_counts_every_kind_and_keeps_every_good_row(tmp_path, tok, recwarn):
    lines = [x for pair in zip_longest(GOOD, [b[1] for b in BAD_LINES]) for x in pair if x is not None]
    lines += [json.dumps({"prompt": "hi", "chosen": "same", "rejected": "same"}).encode()]
    path = _write(tmp_path / "mixed.jsonl", lines)
    kept, counts = tokenize_rows(path, "train", tok, 64, 32, on_bad_row="skip")
    clean, _ = tokenize_rows(_write(tmp_path / "good.jsonl", GOOD), "train", tok, 64, 32)
    assert kept == clean  # every good row, in order
    expected = {}
    for kind, *_ in BAD_LINES:
        expected[f"dropped: bad row, {kind}"] = expected.get(f"dropped: bad row, {kind}", 0) + 1
    expected["dropped: chosen identical to rejected"] = 1
    assert {k: v for k, v in counts.items() if k.startswith("dropped")} == expected
    assert counts["read"] == len(lines)
    logged = [str(w.message) for w in recwarn if "skipped (data.on_bad_row=skip)" in str(w.message)]
    assert len(logged) == len(BAD_LINES) and all("mixed.jsonl line" in m for m in logged)


def test_template_that_does_not_split_prompt_and_completion(tmp_path, tok):
    rows = [{"chosen": _msgs("s", c), "rejected": _msgs("s", r)} for _, c, r in PAIRS[:3]]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    # a template that leaves the assistant's turn out: prompt + response renders exactly as the prompt
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
    with pytest.raises(PreferenceDataError, match=r"chat.jsonl line 1: field 'chosen': empty completion after "
                                                  r"tokenization \(does the chat template render the assistant"):
        tokenize_rows(path, "train", tok, 64, 32)
    # a template that renders the prompt differently once a response follows (a marker on the last turn)
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}hello {% endif %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(PreferenceDataError, match="field 'prompt': the chat template does not split prompt and "
                                                  "completion") as err:
        tokenize_rows(path, "train", tok, 64, 32)
    assert err.value.kind == "template does not split prompt and completion"
    with pytest.raises(PreferenceDataError, match="no usable pairs.*template does not split prompt and completion: 3"):
        tokenize_rows(path, "train", tok, 64, 32, on_bad_row="skip")


def test_too_long_prompts_and_identical_pairs_are_counted_under_either_policy(tmp_path, tok):
    long_prompt = " ".join(["what is your name ?"] * 20)  # 100 tokens
    long_answer = " ".join(["my name is deep smol ."] * 20)  # 120 tokens: the pair differs only past max_length
    lines = GOOD[:2] + [json.dumps({"prompt": long_prompt, "chosen": "a", "rejected": "b"}).encode(),
                        json.dumps({"prompt": "hi", "chosen": "x", "rejected": "x"}).encode(),
                        json.dumps({"prompt": "hi", "chosen": long_answer, "rejected": long_answer + " no"}).encode()]
    path = _write(tmp_path / "d.jsonl", lines)
    for policy in ("error", "skip"):
        kept, counts = tokenize_rows(path, "train", tok, 64, None, on_bad_row=policy)
        assert len(kept) == 2
        assert counts["dropped: prompt leaves no room within max_length 64"] == 1
        assert counts["dropped: chosen identical to rejected"] == 1
        assert counts["dropped: chosen identical to rejected within max_length 64"] == 1


def test_empty_file_is_an_error_under_either_policy(tmp_path, tok):
    path = _write(tmp_path / "empty.jsonl", [])
    for policy in ("error", "skip"):
        with pytest.raises(PreferenceDataError, match="empty.jsonl: no rows"):
            tokenize_rows(path, "train", tok, 64, 32, on_bad_row=policy)


def test_a_validation_fraction_that_leaves_no_training_row_is_named(tmp_path, tiny_model_dir):
    path = _write(tmp_path / "one.jsonl", GOOD[:1])
    dm = PreferenceDataModule(train_path=path, tokenizer_name_or_path=tiny_model_dir, cache_dir=None, val_fraction=0.1)
    with pytest.raises(PreferenceDataError, match=r"one.jsonl: data.val_fraction 0.1 holds out 1 of its 1 rows"):
        dm.setup("fit")
    dm.setup("validate")  # validation alone takes the row
    assert len(dm.val_pairs) == 1


def test_datamodule_skip_policy_and_its_own_cache_entry(tmp_path, tiny_model_dir):
    path = _write(tmp_path / "mixed.jsonl", GOOD + [BAD_LINES[0][1], BAD_LINES[1][1]])
    kwargs = dict(train_path=path, tokenizer_name_or_path=tiny_model_dir, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(PreferenceDataError, match="mixed.jsonl line 9: malformed JSON"):
        PreferenceDataModule(**kwargs).setup("fit")
    dm = PreferenceDataModule(**kwargs, on_bad_row="skip")
    dm.setup("fit")
    assert len(dm.train_pairs) == len(GOOD)
    with pytest.raises(PreferenceDataError, match="malformed JSON"):  # the skip run's cache never serves "error"
        PreferenceDataModule(**kwargs).setup("fit")


def test_a_chat_template_that_refuses_the_conversation_names_the_row(tmp_path, tok):
    # as Gemma's template does for a system message: raise_exception('System role not supported')
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    def msgs(answer):
        return [{"role": "user", "content": "who are you ?"}, {"role": "assistant", "content": answer}]

    rows = [{"chosen": msgs(c), "rejected": msgs(r)} for _, c, r in PAIRS[:2]]
    rows.insert(1, {"chosen": _msgs("s", "a"), "rejected": _msgs("s", "b")})
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(PreferenceDataError, match=r"chat.jsonl line 2: field 'prompt': the chat template of .* refused "
                                                  r"the conversation: System role not supported"):
        tokenize_rows(path, "train", tok, 64, 32)
    kept, counts = tokenize_rows(path, "train", tok, 64, 32, on_bad_row="skip")
    assert len(kept) == 2 and counts["dropped: bad row, chat template refused the conversation"] == 1
