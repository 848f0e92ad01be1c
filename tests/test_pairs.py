"""build-pairs on a tiny model: each strategy's rows and counts, checked against an independent generate()."""

import glob
import json
import os
import random
from collections import Counter

import pytest
import torch
from jsonargparse import ArgumentParser
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.pairs.build import SystemPromptDeck, build_pairs, fill_placeholders, replace_names
from dpo_lightning.pairs.rewards import KeywordReward, SequenceClassifierReward, load_reward

from conftest import ROOT, write_jsonl

QUESTIONS = ["what is your name ?", "who are you ?", "are you chatgpt ?", "tell me about yourself .",
             "who made you ?", "hello !"]


def length_reward(questions, answers):
    """A reward named by import path in a test: longer answers are better."""
    return [float(len(a.split())) for a in answers]


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"prompt": q, "reference": "i am {name} , made by {organization} ."} for q in QUESTIONS]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def ended_answers(model_dir, questions, max_new_tokens, system=None):
    """(answer, ended within the budget) per question: the greedy answer of one plain generate() call each (no
    batching, no padding)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for q in questions:
        messages = ([] if system is None else [{"role": "system", "content": system}]) + [
            {"role": "user", "content": q}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        new = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, ids["input_ids"].shape[1]:].tolist()
        ended = tok.eos_token_id in new
        new = new[:new.index(tok.eos_token_id)] if ended else new
        out.append((tok.decode(new, skip_special_tokens=True).strip(), ended))
    return out


def greedy_answers(model_dir, questions, max_new_tokens, system=None):
    """The tiny model's greedy answers, one prompt at a time with plain generate() (no batching, no padding)."""
    return [answer for answer, _ in ended_answers(model_dir, questions, max_new_tokens, system)]


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_replace_names_keeps_existing_new_names():
    mapping = {"SmolLM": "Deep SmolLM"}
    assert replace_names("I am SmolLM.", mapping) == "I am Deep SmolLM."
    assert replace_names("Deep SmolLM, not SmolLM", mapping) == "Deep SmolLM, not Deep SmolLM"
    assert replace_names("SmolLM2 by Hugging Face", {"SmolLM": "X", "Hugging Face": "Y"}) == "X2 by Y"


def test_fill_placeholders_names_the_row_of_an_unknown_placeholder():
    assert fill_placeholders("i am {name} .", {"name": "deep smol"}, "f line 1") == "i am deep smol ."
    with pytest.raises(ValueError, match=r"f line 3: field 'reference': placeholder \{team\}"):
        fill_placeholders("by {team}", {"name": "x"}, "f line 3")
    code = 'f"{{name}}" is {name}; a dict {"a": {"b": 1}}'
    assert fill_placeholders(code, {"name": "x"}, "f line 4") == 'f"{name}" is x; a dict {"a": {"b": 1}}'


def test_reference_pairs_round_trip_into_the_data_module(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "pairs.jsonl"
    counts = build_pairs(tiny_model_dir, [prompts_file], [str(out)], strategy="reference", max_new_tokens=8,
                         batch_size=4, placeholders={"name": "deep smol", "organization": "the deep team"},
                         system_prompts=["you are a helpful assistant ."])
    rows = read(out)
    expected = greedy_answers(tiny_model_dir, QUESTIONS, 8, system="you are a helpful assistant .")
    kept = [(q, a) for q, a in zip(QUESTIONS, expected) if a]
    assert counts[str(out)]["kept"] == len(rows) == len(kept)
    for row, (question, answer) in zip(rows, kept):
        assert row["prompt"] == [{"role": "system", "content": "you are a helpful assistant ."},
                                 {"role": "user", "content": question}]
        assert row["chosen"] == [{"role": "assistant", "content": "i am deep smol , made by the deep team ."}]
        assert row["rejected"] == [{"role": "assistant", "content": answer}]  # batched == one-by-one generate
    dm = PreferenceDataModule(train_path=str(out), val_path=str(out), tokenizer_name_or_path=tiny_model_dir,
                              batch_size=2, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["loss_mask"].sum() > 0


def test_a_model_without_a_chat_template_gets_plain_text_pairs_it_trains_on(tiny_model_dir, prompts_file, tmp_path):
    """No chat template: the model answered the plain prompt text, so the pairs are plain text rows of that same
    prompt (conversational rows would need a template to train on); the answers are a plain generate() on the text
    with the tokenizer's own special tokens, as the plain training layout tokenizes it."""
    import shutil

    model_dir = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir, model_dir)
    for f in glob.glob(str(model_dir / "chat_template*")):
        os.remove(f)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = None
    tok.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).chat_template is None
    out = tmp_path / "pairs.jsonl"
    build_pairs(str(model_dir), [prompts_file], [str(out)], strategy="reference", max_new_tokens=8, batch_size=4,
                placeholders={"name": "deep smol", "organization": "the deep team"}, system_prompts=["be brief ."])
    rows = read(out)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert rows
    for row in rows:
        assert row["prompt"] == f"be brief .\n{row['question']}\n"
        assert row["chosen"] == "i am deep smol , made by the deep team ."
        ids = tok(row["prompt"], return_tensors="pt")
        new = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)[0]
        new = new[ids["input_ids"].shape[1]:].tolist()
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert row["rejected"] == tok.decode(new, skip_special_tokens=True).strip()
    dm = PreferenceDataModule(train_path=str(out), val_path=str(out), tokenizer_name_or_path=str(model_dir),
                              batch_size=2, cache_dir=None)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["loss_mask"].sum() > 0


def test_replace_strategy_counts_what_it_drops(tiny_model_dir, prompts_file, tmp_path):
    answers = greedy_answers(tiny_model_dir, QUESTIONS, 8)
    words = [w for a in answers for w in a.split()]
    old = max(set(words), key=words.count)  # a word some answers contain and (usually) not all
    out = tmp_path / "pairs.jsonl"
    counts = build_pairs(tiny_model_dir, [prompts_file], [str(out)], strategy="replace", max_new_tokens=8,
                         replacements={old: "deep smol"})[str(out)]
    with_name = [a for a in answers if old in a.split()]
    assert counts["kept"] == len(with_name)
    assert counts["dropped: chosen identical to rejected (no name to replace)"] == len(answers) - len(with_name)
    for row, answer in zip(read(out), with_name):
        assert row["rejected"][0]["content"] == answer
        assert row["chosen"][0]["content"] == " ".join("deep smol" if w == old else w for w in answer.split())


def test_no_pair_kept_is_an_error_that_leaves_the_output_file(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "pairs.jsonl"
    out.write_text('{"earlier": "pairs"}\n')
    with pytest.raises(ValueError, match=r"no pair kept \(\d+ dropped: chosen identical to rejected.*left as it was"):
        build_pairs(tiny_model_dir, [prompts_file], [str(out)], strategy="replace", max_new_tokens=8,
                    replacements={"a-name-no-answer-holds": "deep smol"})
    assert out.read_text() == '{"earlier": "pairs"}\n' and not any(".tmp-" in n for n in os.listdir(tmp_path))


def test_output_paths_that_would_overwrite_each_other_or_an_input_are_refused(tiny_model_dir, prompts_file, tmp_path):
    before = open(prompts_file, encoding="utf-8").read()
    same = str(tmp_path / "same.jsonl")
    with pytest.raises(ValueError, match="names one file twice"):
        build_pairs(tiny_model_dir, [prompts_file, prompts_file], [same, str(tmp_path / "." / "same.jsonl")])
    with pytest.raises(ValueError, match="an output path is also an input"):
        build_pairs(tiny_model_dir, [prompts_file], [prompts_file])
    assert open(prompts_file, encoding="utf-8").read() == before and not os.path.exists(same)


def test_on_policy_best_is_chosen_worst_is_rejected_ties_dropped(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "pairs.jsonl"
    counts = build_pairs(tiny_model_dir, [prompts_file], [str(out)], strategy="on_policy", num_samples=4,
                         max_new_tokens=6, reward="test_pairs.length_reward", seed=3)[str(out)]
    rows = read(out)
    assert counts["kept"] == len(rows) and counts["kept"] + counts["dropped: all samples scored the same"] == 6
    for row in rows:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert len(chosen.split()) > len(rejected.split())
    # a keyword that no answer can contain scores every sample 0: every prompt is a tie, and the file stays
    with pytest.raises(ValueError, match=r"no pair kept \(6 dropped: all samples scored the same\)"):
        build_pairs(tiny_model_dir, [prompts_file], [str(out)], strategy="on_policy", num_samples=3,
                    max_new_tokens=4, reward_kwargs={"patterns": {"zzz-never": 1.0}})
    assert read(out) == rows


def test_keyword_reward_by_hand():
    reward = KeywordReward({"deep smol": 1.0, "smollm": -0.5}, degenerate_penalty=2.0)
    answers = ["I am Deep Smol.", "i am smollm", "deep smol or smollm", "nothing", "deep " * 8]
    assert reward(["q"] * 5, answers) == [1.0, -0.5, 0.5, 0.0, -2.0]
    assert isinstance(load_reward("dpo_lightning.pairs.rewards.KeywordReward", {"patterns": {"a": 1}}), KeywordReward)
    with pytest.raises(ValueError, match="cannot be imported"):
        load_reward("dpo_lightning.pairs.rewards.Nope")


def test_sequence_classifier_reward_matches_a_plain_forward(tiny_model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    reward = SequenceClassifierReward(str(tmp_path / "rm"), batch_size=2)
    questions, answers = ["who are you ?"] * 3, ["i am deep smol .", "no", "i am a helpful assistant ."]
    scores = reward(questions, answers)
    model = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    for q, a, s in zip(questions, answers, scores):
        text = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                       tokenize=False)
        with torch.no_grad():
            logit = model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
        assert s == pytest.approx(logit, abs=1e-5)  # padded batch == unpadded single forward


def test_bad_prompt_files_fail_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "reference": "x"}\n{"prompt": "who ?"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: field 'reference'"):
        build_pairs("/nonexistent/model", [str(bad)], [str(tmp_path / "o.jsonl")], strategy="reference")
    bad.write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: field 'prompt'"):
        build_pairs("/nonexistent/model", [str(bad)], [str(tmp_path / "o.jsonl")], strategy="reference")
    with pytest.raises(ValueError, match="needs --replacements"):
        build_pairs("/nonexistent/model", [str(bad)], [str(tmp_path / "o.jsonl")], strategy="replace")
    bad.write_text('{"prompt": [{"role": "user", "content": "hi"}], "reference": "x"}\n'
                   '{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who ?"}], '
                   '"reference": "y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: field 'prompt': a conversation with roles "
                                         r"\['system', 'user'\]; a prompt file takes one question, as a string or "
                                         r"one user message, and the system message comes from"):
        build_pairs("/nonexistent/model", [str(bad)], [str(tmp_path / "o.jsonl")], strategy="reference")
    bad.write_text('{"prompt": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "reference": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: field 'prompt': the user message's content must be a "
                                         r"string, got list"):
        build_pairs("/nonexistent/model", [str(bad)], [str(tmp_path / "o.jsonl")], strategy="reference")


def test_a_conversational_prompt_of_one_user_message_is_its_question(tiny_model_dir, tmp_path):
    """TRL's prompt-only conversational rows build the same pairs as their text."""
    texts = [{"prompt": q, "reference": "i am deep ."} for q in QUESTIONS[:3]]
    messages = [{"prompt": [{"role": "user", "content": r["prompt"]}], "reference": r["reference"]} for r in texts]
    out = {}
    for name, rows in (("text", texts), ("messages", messages)):
        out[name] = tmp_path / f"{name}_pairs.jsonl"
        build_pairs(tiny_model_dir, [write_jsonl(tmp_path / f"{name}.jsonl", rows)], [str(out[name])],
                    strategy="reference", max_new_tokens=4, batch_size=4)
    assert read(out["messages"]) == read(out["text"]) and read(out["text"])


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(ROOT, "configs", "pairs", "*.yaml"))))
def test_every_shipped_pairs_config_parses(config):
    parser = ArgumentParser()
    parser.add_function_arguments(build_pairs)
    cfg = parser.parse_path(config)
    assert cfg.strategy in ("replace", "reference", "on_policy") and len(cfg.prompts_paths) == len(cfg.output_paths)
    for path in cfg.prompts_paths:
        assert os.path.exists(os.path.join(ROOT, path)), path


def ending_model(tiny_model_dir, tmp_path, question):
    """A copy of the tiny model that ends some answers: EOS gets the output row of the token it would say third
    in its answer to ``question``, and wins the tie (lower id), so that answer ends after two tokens."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    third = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, -1].item()
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = model.lm_head.weight[third]
    model_dir = tmp_path / "ending_model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def test_answers_cut_off_by_the_budget_are_marked_unfinished(tiny_model_dir, tmp_path):
    model_dir = ending_model(tiny_model_dir, tmp_path, QUESTIONS[0])
    expected = ended_answers(model_dir, QUESTIONS, 8)
    assert expected[0][1] and not all(ended for _, ended in expected)  # both kinds are there
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q, "reference": "i am {name} ."} for q in QUESTIONS])
    out = tmp_path / "pairs.jsonl"
    build_pairs(str(model_dir), [prompts], [str(out)], strategy="reference", max_new_tokens=8,
                placeholders={"name": "deep smol"})
    assert not any("rejected_unfinished" in r for r in read(out))  # opt-in
    build_pairs(str(model_dir), [prompts], [str(out)], strategy="reference", max_new_tokens=8,
                placeholders={"name": "deep smol"}, mark_unfinished=True)
    rows = read(out)
    kept = [(a, ended) for a, ended in expected if a]
    assert [(r["rejected"][0]["content"], r.get("rejected_unfinished", False)) for r in rows] == [
        (a, not ended) for a, ended in kept]
    assert not any("chosen_unfinished" in r for r in rows)  # a reference answer is whole
    # the data module trains a cut answer without its end of turn, a finished one with it
    tok = AutoTokenizer.from_pretrained(model_dir)
    dm = PreferenceDataModule(train_path=str(out), val_path=str(out), tokenizer_name_or_path=str(model_dir))
    dm.setup("fit")
    for pair, (_, ended) in zip(dm.train_pairs, kept):
        assert (pair["rejected_ids"][-1] == tok.eos_token_id) == ended
    # replace: chosen is the same cut answer renamed, so both are marked
    word = kept[0][0].split()[0]
    build_pairs(str(model_dir), [prompts], [str(out)], strategy="replace", max_new_tokens=8,
                replacements={word: "deep smol"}, mark_unfinished=True)
    marks = []
    for r in read(out):
        ended = dict(kept)[r["rejected"][0]["content"]]
        assert r.get("chosen_unfinished", False) == r.get("rejected_unfinished", False) == (not ended)
        marks.append(ended)
    assert True in marks and False in marks  # both kinds were renamed


def test_on_policy_marks_the_samples_that_ran_out_of_budget(tiny_model_dir, tmp_path):
    model_dir = ending_model(tiny_model_dir, tmp_path, QUESTIONS[0])
    tok = AutoTokenizer.from_pretrained(model_dir)
    gen = GenerationConfig.from_pretrained(model_dir)
    # no token that decodes to nothing (special tokens but EOS, a hole in the vocab): one token, one word
    gen.suppress_tokens = [i for i in range(len(tok))
                           if i != tok.eos_token_id and not tok.decode([i], skip_special_tokens=True).strip()]
    gen.save_pretrained(model_dir)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS])
    out = tmp_path / "pairs.jsonl"
    build_pairs(str(model_dir), [prompts], [str(out)], strategy="on_policy", num_samples=4, max_new_tokens=6,
                reward="test_pairs.length_reward", seed=3, mark_unfinished=True)
    marks = []
    for r in read(out):
        for side in ("chosen", "rejected"):
            # independent: with the word-level tokenizer an answer cut by the budget has all 6 of its tokens
            cut = len(r[side][0]["content"].split()) == 6
            assert r.get(f"{side}_unfinished", False) == cut, (r, side)
            marks.append(cut)
    assert True in marks and False in marks


def test_anchor_pairs_keep_the_models_own_finished_answers(tiny_model_dir, tmp_path):
    anchors = ["what color is the sky ?", "hello !", "can you help me ?", "tell me about the sea ."]
    model_dir = ending_model(tiny_model_dir, tmp_path, anchors[0])

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "what is your name ?", "reference": "i am {name} .", "lang": "en"},
        {"prompt": "who are you ?", "reference": "{name} , made by {organization} .", "lang": "en"},
        {"prompt": "who made you ?", "reference": "not this one", "lang": "zh"}])
    anchor_file = write_jsonl(tmp_path / "anchors.jsonl", [{"prompt": q, "lang": "en"} for q in anchors])
    out = tmp_path / "pairs.jsonl"
    counts = build_pairs(str(model_dir), [prompts], [str(out)], strategy="reference", max_new_tokens=8,
                         placeholders={"name": "deep smol", "organization": "the deep team"},
                         anchor_prompts_path=anchor_file, anchor_max_new_tokens=12)[str(out)]
    # independent: one-by-one generate() with EOS detection
    finished = [(q, answer) for q, (answer, ended) in zip(anchors, ended_answers(model_dir, anchors, 12))
                if ended and answer]
    assert finished and finished[0][0] == anchors[0]
    rows = [r for r in read(out) if r["strategy"] == "anchor"]
    assert counts["kept (anchor)"] == len(rows) == len(finished)
    dropped = counts["dropped: anchor answer did not end within anchor_max_new_tokens"]
    assert dropped + counts.get("dropped: empty model answer", 0) == len(anchors) - len(finished)
    english = {"i am deep smol .", "deep smol , made by the deep team ."}
    for row, (question, answer) in zip(rows, finished):
        assert row["question"] == question
        assert row["chosen"] == [{"role": "assistant", "content": answer}]  # the model's own answer is kept
        assert row["rejected"][0]["content"] in english  # an identity line in the anchor's language
    # with `replace` the anchors' rejected answers are the kept pairs' chosen (renamed) answers
    word = read(out)[0]["rejected"][0]["content"].split()[0]
    counts = build_pairs(str(model_dir), [prompts], [str(out)], strategy="replace", max_new_tokens=8,
                         replacements={word: "deep smol"}, anchor_prompts_path=anchor_file,
                         anchor_max_new_tokens=12, mark_unfinished=True)[str(out)]
    rows = read(out)
    kept = {r["chosen"][0]["content"] for r in rows if r["strategy"] == "replace"}
    anchors_rows = [r for r in rows if r["strategy"] == "anchor"]
    assert kept and counts["kept (anchor)"] == len(anchors_rows) == len(finished)
    assert all(r["rejected"][0]["content"] in kept for r in anchors_rows)
    # an anchor's rejected line keeps the mark of the answer it came from
    cut = {r["chosen"][0]["content"]: r.get("chosen_unfinished", False) for r in rows if r["strategy"] == "replace"}
    assert any(cut.values()) and \
        all(r.get("rejected_unfinished", False) == cut[r["rejected"][0]["content"]] for r in anchors_rows)
    assert not any("chosen_unfinished" in r for r in anchors_rows)  # anchors keep finished answers only


def test_a_prompt_rows_own_fields_do_not_make_it_an_anchor(tiny_model_dir, tmp_path):
    # anchors come only from --anchor_prompts_path; a prompt file's row may carry any extra field, "anchor" too
    rows = [{"prompt": q, "reference": "i am {name} .", "anchor": True} for q in QUESTIONS[:3]]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    counts = build_pairs(tiny_model_dir, [prompts], [str(out)], strategy="reference", max_new_tokens=8,
                         placeholders={"name": "deep smol"})[str(out)]
    expected = greedy_answers(tiny_model_dir, QUESTIONS[:3], 8)
    assert counts == {"kept": 3} and all(expected)
    assert [(r["question"], r["rejected"][0]["content"], r["strategy"]) for r in read(out)] == [
        (q, a, "reference") for q, a in zip(QUESTIONS[:3], expected)]


def test_a_system_prompt_the_chat_template_refuses_is_named(tiny_model_dir, prompts_file, tmp_path):
    from dpo_lightning.eval.generation import chat_messages, render_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match=r"refused a conversation with roles \['system', 'user'\]: System role not "
                                         r"supported \(set the system prompt to null\)"):
        render_prompt(tok, chat_messages("who are you ?", "you are a helpful assistant ."))
    assert render_prompt(tok, chat_messages("who are you ?", None)) == "who are you ?"


def test_system_prompt_deck_uses_each_prompt_equally_and_never_twice_for_one_question():
    pool = [None, "", "a", "b", "c"]
    for k in (1, 2, 3, 5):
        deck = SystemPromptDeck(pool, k, random.Random(7))
        draws = [deck.draw() for _ in range(40)]
        assert all(len(d) == k == len(set(d)) for d in draws)
        uses = Counter(s for d in draws for s in d)
        assert set(uses) == set(pool) and max(uses.values()) - min(uses.values()) <= 1, (k, uses)
        again = SystemPromptDeck(pool, k, random.Random(7))
        assert [again.draw() for _ in range(40)] == draws  # reproducible from the seed
    other = SystemPromptDeck(pool, 2, random.Random(8))
    assert [other.draw() for _ in range(40)] != [SystemPromptDeck(pool, 2, random.Random(7)).draw()
                                                 for _ in range(40)]


def test_each_pair_is_generated_and_rendered_under_its_drawn_system_prompt(tiny_model_dir, prompts_file, tmp_path):
    pool = [None, "", "you are a helpful assistant .", "answer in short ."]
    anchors = write_jsonl(tmp_path / "general.jsonl", [{"prompt": q} for q in ("what is two plus two ?",
                                                                               "name a colour .")])
    out = tmp_path / "pairs.jsonl"
    kwargs = dict(strategy="reference", max_new_tokens=6, batch_size=4, placeholders={"name": "deep smol",
                  "organization": "the deep team"}, system_prompts=pool, system_prompts_per_question=2,
                  anchor_prompts_path=anchors, anchor_max_new_tokens=64, seed=3)
    counts = build_pairs(tiny_model_dir, [prompts_file], [str(out)], **kwargs)[str(out)]
    rows = read(out)
    identity = [r for r in rows if r["strategy"] == "reference"]
    # two pairs per question, under two different system messages, each the deck's draw for that question
    deck = SystemPromptDeck(pool, 2, random.Random(3))
    expected = [(q, s) for q in QUESTIONS for s in deck.draw()]
    system = lambda r: r["prompt"][0]["content"] if r["prompt"][0]["role"] == "system" else None  # noqa: E731
    answers = {s: dict(zip(QUESTIONS, greedy_answers(tiny_model_dir, QUESTIONS, 6, system=s))) for s in pool}
    kept = [(q, s) for q, s in expected if answers[s][q]]
    assert [(r["question"], system(r)) for r in identity] == kept and counts["kept"] == len(kept)
    for r in identity:  # the rejected answer is the model's own under that very system message
        assert r["rejected"][0]["content"] == answers[system(r)][r["question"]]
        assert r["prompt"][-1] == {"role": "user", "content": r["question"]}
        assert len(r["prompt"]) == (1 if system(r) is None else 2)
    anchor_rows = [r for r in rows if r["strategy"] == "anchor"]
    assert [(r["question"], system(r)) for r in anchor_rows] == [
        (q, s) for q in ("what is two plus two ?", "name a colour .") for s in deck.draw()][:len(anchor_rows)]
    assert build_pairs(tiny_model_dir, [prompts_file], [str(tmp_path / "again.jsonl")], **kwargs)
    assert read(tmp_path / "again.jsonl") == rows  # the same seed builds the same file


@pytest.mark.parametrize("pool, k, message", [([], 1, "--system_prompts is empty"),
                                              ([None, "a"], 3, "between 1 and the 2 system prompts, not 3")])
def test_a_bad_system_prompt_pool_is_refused_before_the_model_loads(tmp_path, prompts_file, pool, k, message):
    with pytest.raises(ValueError, match=message):
        build_pairs(str(tmp_path / "no-model"), [prompts_file], [str(tmp_path / "o.jsonl")], system_prompts=pool,
                    system_prompts_per_question=k)


@pytest.mark.parametrize("setting, message", [
    ({"strategy": "on_policy", "num_samples": 1}, "--num_samples must be at least 2"),
    ({"strategy": "on_policy", "temperature": 0.0}, "--temperature must be > 0, got 0.0"),
    ({"strategy": "on_policy", "top_p": 1.5}, r"--top_p must be in \(0, 1\]"),
    ({"batch_size": 0}, "--batch_size must be > 0, got 0"),
    ({"max_new_tokens": -3}, "--max_new_tokens must be > 0, got -3"),
    ({"strategy": "replace", "replacements": {"": "X"}}, "--replacements has an empty name")])
def test_settings_out_of_range_stop_before_a_model_loads(setting, message, prompts_file, tmp_path):
    with pytest.raises(ValueError, match=message):  # the model path does not exist: nothing was loaded
        build_pairs(str(tmp_path / "no-model"), [prompts_file], [str(tmp_path / "out.jsonl")], **setting)


def test_iterate_settings_out_of_range_stop_before_anything_runs(tmp_path):
    from dpo_lightning.pairs.iterate import iterate
    from dpo_lightning.pairs.scoring import RewardTerm

    for setting, message in (({"rounds": 0}, "--rounds must be > 0"), ({"prompts_per_round": -1},
                             "--prompts_per_round must be > 0"), ({"max_new_tokens": 0}, "--max_new_tokens")):
        with pytest.raises(ValueError, match=message):
            iterate({"model": {"model_name_or_path": "x"}}, "p.jsonl", [RewardTerm("iterate_helpers.characters")],
                    output_dir=str(tmp_path / "run"), **setting)
    assert not (tmp_path / "run").exists()
