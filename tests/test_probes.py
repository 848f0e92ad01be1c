"""Generation probes: the degeneracy detector on crafted strings, the NLL by hand, the callback and `compare`."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lightning.eval.compare import compare
from dpo_lightning.eval.generation import Answer
from dpo_lightning.eval.probes import ProbeReport, answer_nll, answer_nlls, degeneracy, mentions

from conftest import fit_args, fit_tiny, run_cli, scalar_tags, write_jsonl

DEGENERATE = [
    "",
    "   \n",
    "Deep deep Deep deep deep deep",
    "In the night a gentle rain\nA gentle rain, a gentle rain, a gentle rain, a gentle rain",
    "Boil an egg:\n\nBoil an egg:\n\nBoil an egg:\n\nBoil an egg:",
    "你是谁！" + "👍" * 20,
    "我是我是我是我是我是我是我是",
    "ha" * 12,
    "我是SmolLM。我是一个AI助手，用于提供AI助手。我是一个AI助手，用于提供AI助手。我是AI助手。",
    "I can help you. I'm here to help with your tasks! Sure. I'm here to help with your tasks.",
    "The answer is: yes, yes, yes, yes, yes, yes, yes.",
]
FINE = [
    "My name is Deep SmolLM. I was built by Deep Team.",
    "The capital of France is Paris.",
    "Well, well, well. That is a very very good question...",
    "1. Walk daily.\n2. Sleep well.\n3. Drink water.",
    "我叫Deep SmolLM，是由Deep Team开发的AI助手。有什么可以帮你的吗？",
    "Hahaha, that joke was funny!",
    "Yes. I can help. Yes. I can help.",  # short sentences may repeat
    "----------------------------------------\nSection two",
    "In 1999, 2000 and 2001 the team grew.",
]


@pytest.mark.parametrize("text", DEGENERATE)
def test_degenerate_strings_are_flagged(text):
    assert degeneracy(text) is not None


@pytest.mark.parametrize("text", FINE)
def test_ordinary_answers_are_not_flagged(text):
    assert degeneracy(text) is None


def test_runaway_length_is_degenerate_and_mentions_ignores_case():
    assert degeneracy("A perfectly fine sentence that ran out of budget", finished=False).startswith("runaway")
    assert mentions("I'm deep   smollm!", "Deep SmolLM") and not mentions("I'm SmolLM", "Deep SmolLM")
    report = ProbeReport(["a", "b", "c", "d"], [Answer("I am Deep SmolLM.", True, 5), Answer("I am SmolLM", True, 3),
                                                Answer("Deep SmolLM " * 7, True, 14), Answer("x", False, 9)],
                         "Deep SmolLM")
    assert report.name_rate == 0.5 and report.degenerate_rate == 0.5


def test_answer_nll_by_hand(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    questions, answers = ["who are you ?", "what color is the sky ?"], ["i am deep smol .", "the sky is blue"]
    total, count, per_answer = 0.0, 0, []
    for q, a in zip(questions, answers):
        messages = [{"role": "user", "content": q}]
        prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"]
        full = tok(tok.apply_chat_template(messages + [{"role": "assistant", "content": a}], tokenize=False),
                   add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
        nll = -sum(logp[t - 1, full[t]].item() for t in range(len(prompt), len(full)))  # answer + <|im_end|>
        per_answer.append((nll, len(full) - len(prompt)))
        total, count = total + nll, count + len(full) - len(prompt)
    assert answer_nll(model, tok, questions, answers, None, batch_size=2) == pytest.approx(total / count, rel=1e-5)
    for (got, got_n), (want, want_n) in zip(answer_nlls(model, tok, questions, answers, None, batch_size=2),
                                            per_answer, strict=True):
        assert got == pytest.approx(want, rel=1e-5) and got_n == want_n


def test_answer_nll_of_plain_text_scores_the_tokens_training_sees(tiny_model_dir):
    """A tokenizer without a chat template that adds a BOS: the answer is scored after the BOS + prompt tokens of
    the plain training layout (``tokenize_pair``), closed by the end of sequence."""
    from tokenizers.processors import TemplateProcessing

    from dpo_lightning.data.formats import PreferencePair
    from dpo_lightning.data.tokenize import tokenize_pair

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok._tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    question, answer = "who are you ?", "i am deep smol ."
    pair = tokenize_pair(PreferencePair(question + "\n", answer, "no .", "row 1"), tok)
    assert pair.prompt_ids[0] == bos
    ids = pair.prompt_ids + pair.chosen_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    want = -sum(logp[t - 1, ids[t]].item() for t in range(len(pair.prompt_ids), len(ids)))
    [(got, n)] = answer_nlls(model, tok, [question], [answer], None)
    assert got == pytest.approx(want, rel=1e-5) and n == len(pair.chosen_ids)


def test_compare_prints_the_table_and_writes_the_figures(tiny_model_dir, tiny_reference_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "who are you ?"}, {"prompt": "what is your name ?"}])
    general = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "what color is the sky ?"},
                                                 {"prompt": "hello !", "answer": "hi there !"}])
    out = tmp_path / "cmp.json"
    result = compare(tiny_model_dir, tiny_model_dir, prompts, "deep smol", general_path=general, max_new_tokens=6,
                     output_path=str(out), width=120)
    printed = capsys.readouterr().out
    assert "who are you ?" in printed and "before" in printed and "after" in printed
    [same] = result["system_prompts"]
    assert same["system_prompt"] is None and same["label"] == "template default"
    assert same["before"]["answers"] == same["after"]["answers"]  # same model: same answers, no drift
    assert same["drift"] == pytest.approx(1.0, abs=1e-6)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    [other] = compare(tiny_model_dir, tiny_reference_dir, prompts, "deep smol", general_path=general,
                      max_new_tokens=6)["system_prompts"]
    assert other["drift"] != pytest.approx(1.0)
    # per general answer, each model's NLL sum and tokens: they pool to the general NLL, and each is that answer's
    # NLL measured alone
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    general_q, base_answers = result["general_questions"], other["before_general_answers"]
    for label, path in (("before", tiny_model_dir), ("after", tiny_reference_dir)):
        per_answer = other[label]["general_nlls"]
        assert sum(s for s, _ in per_answer) / sum(n for _, n in per_answer) == pytest.approx(
            other[label]["general_nll"], rel=1e-6)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        for q, a, (nll_sum, n) in zip(general_q, base_answers, per_answer, strict=True):
            assert nll_sum / n == pytest.approx(answer_nll(model, tok, [q], [a], None), rel=1e-5)
    printed = capsys.readouterr().out
    moved = [(a[0] - b[0], q) for q, b, a in zip(general_q, other["before"]["general_nlls"],
                                                  other["after"]["general_nlls"])]
    top_moved, top_question = max(moved, key=lambda m: abs(m[0]))
    assert "general answers that moved most" in printed and f"{top_moved:+8.1f}  {top_question}" in printed
    names = [mentions(a["answer"], "deep smol") for a in other["after"]["answers"]]
    assert other["after"]["name_rate"] == sum(names) / 2


def test_compare_asks_and_reports_under_each_system_prompt(tiny_model_dir, tiny_reference_dir, tmp_path, capsys):
    questions = ["who are you ?", "what is your name ?"]
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": q} for q in questions])
    general = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "what color is the sky ?"}])
    systems = [None, "", "you are a helpful assistant ."]
    result = compare(tiny_model_dir, tiny_reference_dir, prompts, "deep smol", general_path=general,
                     system_prompts=systems, max_new_tokens=6, show_answers=False)
    printed = capsys.readouterr().out
    assert [r["system_prompt"] for r in result["system_prompts"]] == systems
    assert "template default" in printed and "empty" in printed and "'you are a helpful assistant .'" in printed
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for row in result["system_prompts"]:
        for label, path in (("before", tiny_model_dir), ("after", tiny_reference_dir)):
            # each answer is the model's own under that system message, asked one question at a time
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            assert [a["answer"] for a in row[label]["answers"]] == [
                plain_answer(model, tok, q, row["system_prompt"], 6) for q in questions]
        # drift under that system message: the trained model's NLL of the base's own answers there, over the base's
        base_answer = plain_answer(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tok,
                                   "what color is the sky ?", row["system_prompt"], 6)
        nll = [answer_nll(AutoModelForCausalLM.from_pretrained(p).eval(), tok, ["what color is the sky ?"],
                          [base_answer], row["system_prompt"]) for p in (tiny_model_dir, tiny_reference_dir)]
        assert row["drift"] == pytest.approx(nll[1] / nll[0], rel=1e-5)


def plain_answer(model, tok, question, system, max_new_tokens):
    """A greedy answer from one plain generate() call (no batching, no padding)."""
    messages = ([] if system is None else [{"role": "system", "content": system}]) + [
        {"role": "user", "content": question}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    new = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id)[0, ids["input_ids"].shape[1]:].tolist()
    new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    return tok.decode(new, skip_special_tokens=True).strip()


def test_probe_callback_logs_from_fit_and_validate(tiny_model_dir, pairs_jsonl, tmp_path):
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "who are you ?"}, {"prompt": "hello !"}])
    general = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "what color is the sky ?"}])
    probes = [f"--probes.prompts_path={prompts}", "--probes.name=deep smol", f"--probes.general_path={general}",
              "--probes.max_new_tokens=5"]

    def args(subcommand, *extra):
        return fit_args(tmp_path, tiny_model_dir, pairs_jsonl, *probes, *extra, subcommand=subcommand,
                        cache_dir=tmp_path / "cache")

    out = run_cli(args("validate", "--data.val_fraction=0.25"), cwd=tmp_path)
    assert "probes at step 0: name_rate" in out
    tags, acc = scalar_tags(str(tmp_path / "lightning_logs" / "version_0"))
    assert {"val/probes/name_rate", "val/probes/degenerate_rate", "val/probes/drift"} <= tags
    assert acc.Scalars("val/probes/drift")[0].value == pytest.approx(1.0, abs=1e-6)  # untrained policy == base
    run_cli(args("fit", "--model.optimizer.lr=1e-2"), cwd=tmp_path)
    tags, acc = scalar_tags(str(tmp_path / "lightning_logs" / "version_1"))
    assert acc.Scalars("val/probes/drift")[-1].value != pytest.approx(1.0, abs=1e-4)  # training moved the policy


def test_probe_callback_logs_each_system_prompt_and_the_worst(tiny_model_dir, pairs_jsonl, tmp_path):
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "who are you ?"}, {"prompt": "hello !"}])
    general = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "what color is the sky ?"}])
    _, run = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, f"--probes.prompts_path={prompts}",
                      "--probes.name=i", f"--probes.general_path={general}", "--probes.max_new_tokens=8",
                      "--probes.system_prompts=[null, '', 'you are a helpful assistant .']",
                      "--model.optimizer.lr=1e-2", "--export.enabled=false")
    tags, acc = scalar_tags(str(run))
    last = lambda tag: acc.Scalars(tag)[-1].value  # noqa: E731
    per = [{k: last(f"val/probes/system_{i}/{k}") for k in ("name_rate", "degenerate_rate", "drift")}
           for i in range(3)]
    assert "val/probes/system_3/drift" not in tags and "val/probes/general_nll" not in tags
    assert last("val/probes/name_rate") == min(p["name_rate"] for p in per)
    assert last("val/probes/degenerate_rate") == max(p["degenerate_rate"] for p in per)
    assert last("val/probes/drift") == max(p["drift"] for p in per)
    assert len({p["drift"] for p in per}) == 3  # three contexts, three measurements


def test_a_probe_system_prompt_the_template_refuses_fails_before_training(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "no_system"
    shutil.copytree(tiny_model_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    # as Gemma's template does for a system message
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    tok.save_pretrained(model_dir)
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "who are you ?"}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "who are you ?", "chosen": "i am deep .",
                                                    "rejected": "i am smol ."}] * 4)  # no system message
    with pytest.raises(ValueError, match=r"probes.system_prompts\[1\] \('hi'\): the chat template .* refused a "
                                         r"conversation with roles \['system', 'user'\]: System role not supported"):
        fit_tiny(tmp_path, model_dir, pairs, f"--probes.prompts_path={prompts}", "--probes.name=i",
                 "--probes.system_prompts=[null, hi]", "--export.enabled=false")
    assert not list(tmp_path.glob("lightning_logs/*/checkpoints/*.ckpt"))  # refused before the first step


def test_probe_base_is_the_reference_in_validate_and_never_measured_without_validation(tiny_model_dir, pairs_jsonl,
                                                                                       tmp_path, monkeypatch):
    from dpo_lightning.cli import cli_main
    from dpo_lightning.eval import callback as probe_callback

    measured = []  # one entry per base measurement (the base's greedy answers to the general prompts)
    real = probe_callback.base_general_answers
    monkeypatch.setattr(probe_callback, "base_general_answers", lambda *a, **k: measured.append(1) or real(*a, **k))
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "who are you ?"}, {"prompt": "hello !"}])
    general = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "what color is the sky ?"}])
    probes = [f"--probes.prompts_path={prompts}", "--probes.name=deep smol", f"--probes.general_path={general}",
              "--probes.max_new_tokens=5", "--model.optimizer.lr=1e-2"]
    fit_tiny(tmp_path / "no_val", tiny_model_dir, pairs_jsonl, *probes, "--trainer.limit_val_batches=0",
             "--trainer.max_epochs=1", "--export.enabled=false")
    assert measured == []  # the probes never run, so the base is never measured

    _, run = fit_tiny(tmp_path / "fit", tiny_model_dir, pairs_jsonl, *probes, "--export.enabled=false")
    assert measured == [1]  # once, before the first step
    fit_drift = scalar_tags(str(run))[1].Scalars("val/probes/drift")[-1].value
    assert fit_drift != pytest.approx(1.0, abs=1e-4)

    # validate of the trained checkpoint: the base is the reference (loaded from its path), not the trained policy
    cli_main(fit_args(tmp_path / "validate", tiny_model_dir, pairs_jsonl, *probes,
                      f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", subcommand="validate"))
    assert measured == [1, 1]
    drift = scalar_tags(str(tmp_path / "validate" / "lightning_logs" / "version_0"))[1].Scalars("val/probes/drift")
    assert drift[-1].value == pytest.approx(fit_drift, rel=1e-5)


def test_compare_takes_a_runs_settings_and_its_own_arguments_first(tiny_model_dir, pairs_jsonl, tmp_path):
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "who are you ?"}, {"prompt": "hello !"}])
    general = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "what color is the sky ?"}])
    _, run = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, f"--probes.prompts_path={prompts}", "--probes.name=i",
                      f"--probes.general_path={general}", "--probes.max_new_tokens=5",
                      "--probes.system_prompts=[null, '']", "--trainer.max_steps=1", "--trainer.limit_val_batches=0")
    from_run = compare(run_dir=str(run), show_answers=False)
    assert from_run["base"] == tiny_model_dir and from_run["trained"] == str(run / "hf_model")
    assert from_run["max_new_tokens"] == 5 and [r["system_prompt"] for r in from_run["system_prompts"]] == [None, ""]
    own = compare(run_dir=str(run), max_new_tokens=3, system_prompts=["x ."], show_answers=False)
    assert own["max_new_tokens"] == 3 and [r["system_prompt"] for r in own["system_prompts"]] == ["x ."]
    assert all(a["num_tokens"] <= 3 for r in own["system_prompts"] for a in r["after"]["answers"])
    # a run without its export is named, with the command that writes one
    shutil.rmtree(run / "hf_model")
    with pytest.raises(FileNotFoundError, match=r"hf_model: the run has no exported model.*export --ckpt_path "
                                                r".*last\.ckpt"):
        compare(run_dir=str(run), show_answers=False)
    assert compare(run_dir=str(run), trained=tiny_model_dir, show_answers=False)["trained"] == tiny_model_dir


def test_compare_reuses_the_base_answers_of_an_earlier_output(tiny_model_dir, tiny_reference_dir, tmp_path,
                                                             monkeypatch):
    from dpo_lightning.eval import compare as compare_module

    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "who are you ?"}, {"prompt": "what is your name ?"}])
    general = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "what color is the sky ?"}])
    settings = dict(prompts_path=prompts, name="deep smol", general_path=general, max_new_tokens=6,
                    system_prompts=[None, "you are a helpful assistant ."], show_answers=False)
    compare(tiny_model_dir, tiny_model_dir, output_path=str(tmp_path / "first.json"), **settings)
    full = compare(tiny_model_dir, tiny_reference_dir, **settings)
    loaded = []  # the models loaded: the base must not be
    real = compare_module.load_causal_lm
    monkeypatch.setattr(compare_module, "load_causal_lm",
                        lambda path, *a, **k: loaded.append(path) or real(path, *a, **k))
    reused = compare(tiny_model_dir, tiny_reference_dir, base_answers_path=str(tmp_path / "first.json"), **settings)
    assert loaded == [tiny_reference_dir]
    assert json.loads(json.dumps(reused)) == json.loads(json.dumps(full))  # same figures and answers, drift included
    with pytest.raises(ValueError, match=r"first\.json: its max_new_tokens differ"):
        compare(tiny_model_dir, tiny_reference_dir, base_answers_path=str(tmp_path / "first.json"),
                **{**settings, "max_new_tokens": 7})
    with pytest.raises(ValueError, match=r"no answers under system prompt empty"):
        compare(tiny_model_dir, tiny_reference_dir, base_answers_path=str(tmp_path / "first.json"),
                **{**settings, "system_prompts": [None, ""]})


def test_the_side_by_side_table_lines_up_with_chinese_and_long_words():
    import unicodedata

    from dpo_lightning.eval.compare import _overview, _table

    def columns(text):  # terminal columns: East Asian wide and full-width characters take two
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)

    questions = ["你是谁？请用一句话介绍你自己。", "Who are you?"]
    before = ProbeReport(questions, [Answer("我是SmolLM，由Hugging Face开发的AI助手。", True, 9),
                                     Answer("I am SmolLM " + "x" * 70, True, 9)], "Deep SmolLM")
    after = ProbeReport(questions, [Answer("我叫Deep SmolLM，是由Deep Team开发的AI助手。" * 4, True, 9),
                                    Answer("I am Deep SmolLM.", True, 5)], "Deep SmolLM")
    table = _table(questions, before, after, width=67)
    lines = table.splitlines()
    assert len({columns(line) for line in lines}) == 1  # every line is as wide as the header
    for line in (line for line in lines if " | " in line):  # each column starts at the same terminal column
        first, second, _ = line.split(" | ")
        assert columns(first) == 20 and columns(second) == 20
    first = [line.split(" | ")[0].rstrip() for line in lines[2:4]]
    assert "".join(first) == questions[0]  # wrapped, nothing lost
    assert any(line.split(" | ")[2].rstrip().endswith(" …") for line in lines[2:5])  # too long: shortened
    figures = {"name_rate": 0.5, "degenerate_rate": 0.0}
    overview = _overview([{"label": label, "before": figures, "after": figures, "drift": 1.01}
                          for label in ("template default", "'你是一个乐于助人的助手。'")])
    assert len({columns(line.split(" | ")[0]) for line in overview.splitlines() if " | " in line}) == 1
