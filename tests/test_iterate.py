"""``iterate``: rounds of sample, score, pair, fit through the command line on a tiny model; round 2 samples from
round 1's export; the reference choice; a run killed mid-round resumes to the uninterrupted result; the record."""

import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import PAIRS, ROOT, run_cli, scalar_tags, write_jsonl

HERE = os.path.dirname(os.path.abspath(__file__))
ROUNDS = 2


def iterate_config(tmp_path, model_dir, marker, **settings) -> str:
    """An iterate YAML: 8 prompts, 4 held-out ones, a character-count reward plus a verifiable one, the tiny fit."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q, "answer": "deep"} for q, _, _ in PAIRS])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": q, "answer": "smol"} for q in
                                                         ("hello there ?", "who made it ?", "what is the sea ?",
                                                          "can you answer my questions ?")])
    fit = {"model": {"model_name_or_path": model_dir,
                     "optimizer": {"class_path": "dpo_lightning.training.optim.AdamW", "init_args": {"lr": 1e-2}}},
           "data": {"val_fraction": 0.25, "batch_size": 2, "max_length": 128, "max_prompt_length": 64,
                    "cache_dir": None},
           "trainer": {"accelerator": "cpu", "max_epochs": 2, "log_every_n_steps": 1, "enable_progress_bar": False,
                       "callbacks": [{"class_path": "iterate_helpers.KillOnce",
                                      "init_args": {"marker": str(marker), "round_dir": "round_2", "step": 2}}]},
           "checkpoint": {"every_n_train_steps": 1},
           "probes": {"prompts_path": held_out, "name": "deep", "max_new_tokens": 8}}
    config = {"fit": fit, "prompts_path": prompts, "eval_prompts_path": held_out, "rounds": ROUNDS,
              "num_samples": 3, "max_new_tokens": 8, "length_penalty": 0.01, "seed": 3,
              "system_prompts": [None, "you are a helpful assistant ."],
              "rewards": [{"reward": "iterate_helpers.characters"},
                          {"reward": "dpo_lightning.pairs.verifiable.FinalAnswer", "weight": 5.0,
                           "arguments": {"pattern": "(deep|smol)"}}], **settings}
    path = tmp_path / "iterate.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def iterate_cli(config, output_dir, check=True):
    args = ["iterate", "--config", config, f"--output_dir={output_dir}"]
    if check:
        return run_cli(args, cwd=ROOT, extra_path=HERE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((ROOT, HERE))}
    return subprocess.run([sys.executable, "-m", "dpo_lightning", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def expected_reward(text, row_answer, num_tokens):
    """The weighted sum, computed here: characters + 5 x (last 'deep'/'smol' is the row's answer) - 0.01/token."""
    found = re.findall("(deep|smol)", text, re.IGNORECASE)
    final = bool(found) and found[-1].lower() == row_answer
    return len(text) + 5.0 * final - 0.01 * num_tokens


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, tmp_path_factory):
    """Two rounds through the command line, uninterrupted, reference = the initial model."""
    tmp = tmp_path_factory.mktemp("iterate_straight")
    config = iterate_config(tmp, tiny_model_dir, tmp / "no-kill")
    out = tmp / "run"
    printed = iterate_cli(config, out)
    return config, out, printed


def test_two_rounds_end_to_end(straight_run, tiny_model_dir):
    from dpo_lightning.eval.generation import chat_messages, generate_answers, render_prompt
    from dpo_lightning.model.loading import load_causal_lm, load_tokenizer

    config, out, printed = straight_run
    records = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[1]["policy"] == tiny_model_dir and records[2]["policy"] == str(out / "round_1" / "hf_model")
    assert "round 2 | samples reward" in printed
    settings = yaml.safe_load(open(config))
    rows = {r["prompt"]: r for r in read_jsonl(settings["prompts_path"])}
    for r in (1, 2):
        round_dir = out / f"round_{r}"
        samples = read_jsonl(round_dir / "samples.jsonl")
        assert len(samples) == len(PAIRS) and all(len(s["answers"]) == 3 for s in samples)
        # round r's samples are those of a plain generate() from the model it says it sampled, with seed + r
        model_path = records[r]["policy"]
        tokenizer, model = load_tokenizer(model_path), load_causal_lm(model_path, "float32")
        prompts = [render_prompt(tokenizer, chat_messages(s["prompt"], s["system"])) for s in samples]
        again = generate_answers(model, tokenizer, prompts, max_new_tokens=8, num_return_sequences=3,
                                 do_sample=True, seed=3 + r)
        for s, answers in zip(samples, again):
            assert [(a["text"], a["finished"], a["num_tokens"]) for a in s["answers"]] == \
                [(a.text, a.finished, a.num_tokens) for a in answers]
            for a in s["answers"]:
                assert a["reward"] == pytest.approx(expected_reward(a["text"], rows[s["prompt"]]["answer"],
                                                                    a["num_tokens"]))
        # the pairs: best and worst sample of each prompt whose rewards differ
        pairs = read_jsonl(round_dir / "pairs.jsonl")
        by_prompt = {s["prompt"]: s for s in samples}
        for pair in pairs:
            answers = by_prompt[pair["question"]]["answers"]
            best = max(answers, key=lambda a: a["reward"])
            worst = min(answers, key=lambda a: a["reward"])
            assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == (best["text"], worst["text"])
        assert records[r]["pairs"] == len(pairs) and records[r]["usable_share"] == len(pairs) / len(PAIRS)
        rewards = [a["reward"] for s in samples for a in s["answers"]]
        assert records[r]["samples"]["reward_mean"] == pytest.approx(sum(rewards) / len(rewards))
        assert records[r]["samples"]["reward_max"] == max(rewards)
        # the round's DPO metrics are its TensorBoard values; its held-out figure is the mean of eval.jsonl
        _, acc = scalar_tags(round_dir)
        assert records[r]["fit"]["val/loss"] == pytest.approx(acc.Scalars("val/loss")[-1].value)
        evaluated = read_jsonl(round_dir / "eval.jsonl")
        assert records[r]["eval"]["reward_mean"] == pytest.approx(sum(e["reward"] for e in evaluated) / 4)
    # round 2 sampled from a model that differs from the initial one
    base_tok, base = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir, "float32")
    s2 = read_jsonl(out / "round_2" / "samples.jsonl")
    from_base = generate_answers(base, base_tok, [render_prompt(base_tok, chat_messages(s["prompt"], s["system"]))
                                                  for s in s2], max_new_tokens=8, num_return_sequences=3,
                                 do_sample=True, seed=5)
    assert [[a.text for a in answers] for answers in from_base] != [[a["text"] for a in s["answers"]] for s in s2]
    # the record in TensorBoard, one point per round, and the plot
    tags, acc = scalar_tags(out / "record")
    assert {"round/samples/reward_mean", "round/usable_share", "round/pairs", "round/eval/reward_mean",
            "round/fit/train/rewards/accuracies", "round/fit/val/loss", "round/fit/val/probes/name_rate"} <= tags
    _, round_2 = scalar_tags(out / "round_2")
    assert records[2]["fit"]["val/probes/name_rate"] == round_2.Scalars("val/probes/name_rate")[-1].value
    assert [e.step for e in acc.Scalars("round/eval/reward_mean")] == [0, 1, 2]
    assert [e.value for e in acc.Scalars("round/pairs")] == [records[1]["pairs"], records[2]["pairs"]]
    assert "round/plot" in acc.Tags()["images"]
    from PIL import Image

    assert Image.open(out / "rounds.png").size[0] >= 360


def test_a_rerun_with_fewer_rounds_keeps_the_later_rounds_in_the_record(straight_run):
    config, out, _ = straight_run
    before = (out / "rounds.json").read_text()
    printed = run_cli(["iterate", "--config", config, f"--output_dir={out}", "--rounds=1"], cwd=ROOT, extra_path=HERE)
    assert "its record keeps round 2 of an earlier run" in printed
    assert (out / "rounds.json").read_text() == before


def test_greedy_sample_adds_the_policys_greedy_answer_to_each_group(straight_run, tiny_model_dir, tmp_path):
    """With greedy_sample the samples are the plain run's, plus the greedy answer last; the pairs are picked over
    all of them, and the record and the round's log line count the pairs the greedy answer is chosen and rejected
    in."""
    from dpo_lightning.eval.generation import chat_messages, generate_answers, render_prompt
    from dpo_lightning.model.loading import load_causal_lm, load_tokenizer

    _, straight, _ = straight_run
    config = iterate_config(tmp_path, tiny_model_dir, tmp_path / "no-kill", greedy_sample=True, rounds=1)
    out = tmp_path / "run"
    printed = iterate_cli(config, out)
    samples = read_jsonl(out / "round_1" / "samples.jsonl")
    plain = read_jsonl(straight / "round_1" / "samples.jsonl")
    tokenizer, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir, "float32")
    greedy = generate_answers(model, tokenizer, [render_prompt(tokenizer, chat_messages(s["prompt"], s["system"]))
                                                 for s in samples], max_new_tokens=8)
    rows = {r["prompt"]: r for r in read_jsonl(yaml.safe_load(open(config))["prompts_path"])}
    for s, p, (g,) in zip(samples, plain, greedy):
        assert (s["prompt"], s["system"]) == (p["prompt"], p["system"])
        assert s["answers"][:3] == p["answers"]
        last = s["answers"][3]
        assert (last["text"], last["finished"], last["num_tokens"], last["greedy"]) == \
            (g.text, g.finished, g.num_tokens, True)
        assert last["reward"] == pytest.approx(expected_reward(g.text, rows[s["prompt"]]["answer"], g.num_tokens))
        assert not any("greedy" in a for a in s["answers"][:3])
    pairs = read_jsonl(out / "round_1" / "pairs.jsonl")
    by_prompt = {s["prompt"]: s for s in samples}
    chosen = rejected = 0
    for pair in pairs:
        answers = by_prompt[pair["question"]]["answers"]
        best, worst = max(answers, key=lambda a: a["reward"]), min(answers, key=lambda a: a["reward"])
        assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == (best["text"], worst["text"])
        chosen += best["text"] == answers[3]["text"]
        rejected += worst["text"] == answers[3]["text"]
    record = json.loads((out / "rounds.json").read_text())[1]
    assert record["greedy"] == {"greedy_chosen": chosen, "greedy_rejected": rejected}
    assert f"greedy answer chosen {chosen}, rejected {rejected}" in printed
    assert record["pairs"] == len(pairs) and chosen + rejected > 0
    assert json.loads((out / "iterate.json").read_text())["greedy_sample"] is True


def first_step_loss(round_dir):
    _, acc = scalar_tags(round_dir)
    return acc.Scalars("train/loss")[0].value


def test_reference_choice(straight_run, tiny_model_dir, tmp_path):
    """Round 2 starts from round 1's export: against the initial model its step-0 loss is not ln 2; against the
    previous policy (the same weights) it is. The second run trains LoRA adapters: round 1's are merged into its
    export, and round 2's reference (fresh adapters switched off) is that merged model."""
    config, out, _ = straight_run
    assert first_step_loss(out / "round_1") == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first_step_loss(out / "round_2") - math.log(2)) > 1e-3
    assert yaml.safe_load((out / "round_2" / "fit.yaml").read_text())["model"]["reference"][
        "model_name_or_path"] == tiny_model_dir
    previous = iterate_config(tmp_path, tiny_model_dir, tmp_path / "no-kill", reference="previous")
    settings = yaml.safe_load(open(previous))
    settings["fit"]["model"]["lora"] = {"use_peft": True, "lora_r": 4, "lora_alpha": 8}
    open(previous, "w").write(yaml.safe_dump(settings))
    iterate_cli(previous, tmp_path / "run")
    assert first_step_loss(tmp_path / "run" / "round_2") == pytest.approx(math.log(2), abs=1e-5)
    merged = load_file(tmp_path / "run" / "round_1" / "hf_model" / "model.safetensors")
    assert not any("lora" in name for name in merged)  # plain weights: the adapters were merged
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(merged[name], base[name]) for name in base)  # and they moved the weights
    assert yaml.safe_load((tmp_path / "run" / "round_2" / "fit.yaml").read_text())["model"]["reference"][
        "model_name_or_path"] == str(tmp_path / "run" / "round_1" / "hf_model")


def trained_steps(round_dir):
    return torch.load(round_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


def expected_steps(num_pairs, epochs=2, batch_size=2, val_fraction=0.25):
    """Optimizer steps of a fit on ``num_pairs`` pairs, by hand: the val share held out, batches rounded up."""
    train = num_pairs - max(1, round(num_pairs * val_fraction))
    return epochs * math.ceil(train / batch_size)


def test_accumulated_pairs_train_each_round_on_every_round_so_far(straight_run, tiny_model_dir, tmp_path):
    """``train_pairs: accumulated``: round 1 is the straight run's; round 2 trains on round 1's pairs followed by
    its own (read from the files, counted in the record, and as many steps as that many pairs take)."""
    _, straight, _ = straight_run
    config = iterate_config(tmp_path, tiny_model_dir, tmp_path / "no-kill", train_pairs="accumulated")
    out = tmp_path / "run"
    printed = iterate_cli(config, out)
    records = json.loads((out / "rounds.json").read_text())
    first, second = (read_jsonl(out / f"round_{r}" / "pairs.jsonl") for r in (1, 2))
    assert first == read_jsonl(straight / "round_1" / "pairs.jsonl")  # same samples, same pairs
    assert read_jsonl(out / "round_2" / "train_pairs.jsonl") == first + second
    assert read_jsonl(out / "round_1" / "train_pairs.jsonl") == first
    assert yaml.safe_load((out / "round_2" / "fit.yaml").read_text())["data"]["train_path"] == \
        str(out / "round_2" / "train_pairs.jsonl")
    assert [r.get("train_pairs") for r in records] == [None, len(first), len(first) + len(second)]
    assert [r["pairs"] for r in records[1:]] == [len(first), len(second)]
    assert f"trained on {len(first) + len(second)} pairs" in printed
    for r, n in ((1, len(first)), (2, len(first) + len(second))):
        assert trained_steps(out / f"round_{r}") == expected_steps(n)
    assert trained_steps(straight / "round_2") == expected_steps(len(second))  # the default: its own pairs only
    _, acc = scalar_tags(out / "record")
    assert [e.value for e in acc.Scalars("round/train_pairs")] == [len(first), len(first) + len(second)]


def test_killed_mid_round_resumes_to_the_uninterrupted_result(straight_run, tiny_model_dir, tmp_path):
    _, straight, _ = straight_run
    marker = tmp_path / "kill"
    marker.write_text("")
    config = iterate_config(tmp_path, tiny_model_dir, marker)  # the straight run's settings, the kill armed
    out = tmp_path / "run"
    killed = iterate_cli(config, out, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    round_2 = out / "round_2"
    assert (round_2 / "samples.jsonl").exists() and not (round_2 / "round.json").exists()
    assert torch.load(round_2 / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    sampled_at = (round_2 / "samples.jsonl").stat().st_mtime_ns

    printed = iterate_cli(config, out)
    assert f"round 2: fit, resuming from {round_2 / 'checkpoints' / 'last.ckpt'}" in printed
    assert (round_2 / "samples.jsonl").stat().st_mtime_ns == sampled_at  # reused, not sampled again
    a, b = [json.loads((d / "rounds.json").read_text()) for d in (straight, out)]
    assert len(a) == len(b) == 3
    for record_a, record_b in zip(a, b):
        for key in ("samples", "pairs", "usable_share", "dropped", "eval"):
            assert record_b.get(key) == record_a.get(key)
        assert record_b.get("fit", {}) == pytest.approx(record_a.get("fit", {}), abs=1e-5)
    for r in (1, 2):  # the same samples (the prompt files lie in different folders)
        assert [{**s, "where": None} for s in read_jsonl(out / f"round_{r}" / "samples.jsonl")] == \
            [{**s, "where": None} for s in read_jsonl(straight / f"round_{r}" / "samples.jsonl")]
    weights_a = load_file(straight / "round_2" / "hf_model" / "model.safetensors")
    weights_b = load_file(round_2 / "hf_model" / "model.safetensors")
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(ROOT, "configs", "iterate_*.yaml"))))
def test_shipped_iterate_config_parses_and_its_rewards_score(config, tmp_path, monkeypatch):
    from dpo_lightning.cli import DPOLightningCLI
    from dpo_lightning.data.datamodule import PreferenceDataModule
    from dpo_lightning.data.reading import read_prompt_files
    from dpo_lightning.pairs.scoring import RewardTerm, WeightedReward
    from dpo_lightning.training.module import DPOModule

    run_cli(["iterate", "--config", config, "--print_config"], cwd=ROOT)
    settings = yaml.safe_load(open(config))
    fit = tmp_path / "fit.yaml"
    fit.write_text(yaml.safe_dump(settings["fit"]))
    cli = DPOLightningCLI(DPOModule, PreferenceDataModule, run=False, auto_configure_optimizers=False,
                          args=["--config", str(fit), "--data.train_path=pairs.jsonl", "--trainer.logger=false"])
    assert cli.model.policy is None
    reward = WeightedReward([RewardTerm(**term) for term in settings["rewards"]],
                            settings.get("length_penalty", 0.0))
    monkeypatch.chdir(ROOT)  # the config's paths are relative to the repository
    for key in ("prompts_path", "eval_prompts_path"):
        reward.validate(read_prompt_files(settings[key])[1])
    if os.path.basename(config) == "iterate_arithmetic.yaml":  # a right result outweighs the requested form
        from dpo_lightning.eval.generation import Answer

        texts = ["7 - 4 = 3\nAnswer: 3", "7 - 4 = 3", "Answer: 7", "It is three."]
        scored = reward.score([("row", {"prompt": "What is 7 - 4?", "answer": "3"})],
                              [[Answer(t, True, 5) for t in texts]])[0]
        assert [s.reward for s in scored] == pytest.approx([1.05, 1.0, 0.05, 0.0])
    if os.path.basename(config) == "iterate_words.yaml":  # the share of the words used, less 0.002 a token
        from dpo_lightning.eval.generation import Answer

        row = {"prompt": "Write one sentence that uses all of these words: a1, b2, c3.", "words": ["a1", "b2", "c3"]}
        texts = ["a1 b2 c3.", "a1 and b2.", "a1, b2, c3.", "a1\nb2\nc3", "Nothing."]
        scored = reward.score([("row", row)], [[Answer(t, True, 10) for t in texts]])[0]
        assert [s.reward for s in scored] == pytest.approx([1 - 0.02, 2 / 3 - 0.02, -0.02, -0.02, -0.02])
        assert [s.terms["all_used"] for s in scored] == [1.0, 0.0, 0.0, 0.0, 0.0]
    if os.path.basename(config) == "iterate_identity.yaml":  # the name where asked, not elsewhere, and no loop
        from dpo_lightning.eval.generation import Answer

        rows = [("q", {"prompt": "Who are you?", "reference": "I'm {name}."}), ("g", {"prompt": "What is rain?"})]
        texts = ["I'm Deep SmolLM.", "I'm SmolLM.", "I'm Deep SmolLM, " + "Deep SmolLM, " * 6]
        scored = reward.score(rows, [[Answer(t, True, 10) for t in texts]] * 2)
        assert [s.reward for s in scored[0]] == pytest.approx([1 - 0.02, -0.02, -0.02])
        assert [s.reward for s in scored[1]] == pytest.approx([-0.02, 1 - 0.02, -1.02])
        with open(os.path.join(ROOT, "configs", "pairs", "smollm2_identity.yaml")) as f:
            assert settings["system_prompts"] == yaml.safe_load(f)["system_prompts"]  # the pairs' pool


def test_iterate_report_paired_sign_test(tmp_path, capsys):
    """``scripts/iterate_report.py --paired``: the discordant counts of two runs' last rounds, and the sign test
    against a count over every outcome of that many fair coin flips."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import iterate_report

    for n, k in [(0, 0), (1, 0), (7, 3), (10, 1), (12, 6)]:
        outcomes = [bin(i).count("1") for i in range(2 ** n)]  # heads in each sequence of n flips
        extreme = sum(min(h, n - h) <= k for h in outcomes) / 2 ** n
        assert math.isclose(iterate_report.sign_test(k, n - k), extreme), (n, k)
    # a against b: only a 3 prompts, only b 1, both 1; c against d: only c 0, only d 2
    right = {"a": [1, 1, 1, 0, 0, 1], "b": [1, 0, 0, 0, 1, 0], "c": [0, 0, 0, 0, 0, 1], "d": [1, 0, 0, 0, 1, 1]}
    for name, values in right.items():
        os.makedirs(tmp_path / name / "round_2")
        (tmp_path / name / "rounds.json").write_text(json.dumps([{"round": 0}, {"round": 1}, {"round": 2}]))
        write_jsonl(tmp_path / name / "round_2" / "eval.jsonl",
                    [{"where": f"held.jsonl line {i + 1}", "terms": {"right": v}} for i, v in enumerate(values)])
    assert iterate_report.paired([str(tmp_path / n) for n in "abcd"], "right") == (3, 3)
    printed = capsys.readouterr().out
    assert "a round 2 4, b round 2 2; only the first 3, only the second 1, sign test p = 0.625" in printed
    assert "c round 2 1, d round 2 3; only the first 0, only the second 2, sign test p = 0.500" in printed
    assert "pooled over 2 comparisons: only the first 3, only the second 3, sign test p = 1.000" in printed
    # a graded term (a share): prompts where each run scores higher, ties left out; e against f: 2 higher, 1 lower
    used = {"e": [0.5, 1 / 3, 1.0, 0.0], "f": [1 / 6, 0.0, 1.0, 0.5]}
    for name, values in used.items():
        os.makedirs(tmp_path / name / "round_1")
        (tmp_path / name / "rounds.json").write_text(json.dumps([{"round": 0}, {"round": 1}]))
        write_jsonl(tmp_path / name / "round_1" / "eval.jsonl",
                    [{"where": f"held.jsonl line {i + 1}", "terms": {"used": v}} for i, v in enumerate(values)])
    assert iterate_report.paired([str(tmp_path / "e"), str(tmp_path / "f")], "used") == (2, 1)
    assert ("e round 1 mean 0.458, f round 1 mean 0.417; higher on the first 2, on the second 1, sign test p = 1.000"
            in capsys.readouterr().out)


def test_arithmetic_held_out_problems_are_never_sampled():
    """The demo's held-out file shares no problem (operation and operands) and no phrasing with the sampled one."""
    def problems(name):
        rows = [json.loads(line) for line in open(os.path.join(ROOT, "data", "arithmetic", name), encoding="utf-8")]
        found = [re.search(r"(\d+) ([+\-×]) (\d+)", r["prompt"]) for r in rows]
        phrasings = {r["prompt"].replace(m.group(0), "{}") for r, m in zip(rows, found)}
        return [m.groups() for m in found], phrasings

    (train, train_phrasings), (held_out, held_out_phrasings) = problems("train.jsonl"), problems("heldout.jsonl")
    assert len(set(train)) == len(train) == 256 and len(set(held_out)) == len(held_out) == 233
    assert not set(train) & set(held_out)
    assert not train_phrasings & held_out_phrasings and len(held_out_phrasings) == 2


def test_the_arithmetic_files_are_what_their_script_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_prompts", os.path.join(ROOT, "data", "arithmetic",
                                                                               "make_prompts.py"))
    make_prompts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_prompts)
    make_prompts.main(str(tmp_path))
    for name in ("train.jsonl", "heldout.jsonl"):
        with open(tmp_path / name, "rb") as written, open(os.path.join(ROOT, "data", "arithmetic", name), "rb") as f:
            assert written.read() == f.read(), name
    # the harder mixes: the kinds' counts, no problem both sampled and held out, each answer the problem's result
    mixes = {"half": {"small": (128, 120), "two_digit": (128, 120)}, "two_digit": {"two_digit": (256, 240)}}
    for mix, counts in mixes.items():
        make_prompts.main(str(tmp_path / mix), mix=mix)
        files = {name: [json.loads(line) for line in (tmp_path / mix / name).read_text().splitlines()]
                 for name in ("train.jsonl", "heldout.jsonl")}
        problems = {}
        for k, name in enumerate(("train.jsonl", "heldout.jsonl")):
            kinds = [row["kind"] for row in files[name]]
            assert {kind: kinds.count(kind) for kind in set(kinds)} == {kind: n[k] for kind, n in counts.items()}
            problems[name] = set()
            for row in files[name]:
                a, op, b = re.search(r"(\d+) ([+\-×]) (\d+)", row["prompt"]).groups()
                assert int(row["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
                smallest, largest = sorted((int(a), int(b)))
                assert largest <= 20 if row["kind"] == "small" else 10 <= smallest and largest <= 99, row
                problems[name].add((a, op, b))
            assert len(problems[name]) == len(files[name]), (mix, name)
        assert not problems["train.jsonl"] & problems["heldout.jsonl"], mix
    with pytest.raises(ValueError, match="mix 'hard'"):
        make_prompts.main(str(tmp_path / "hard"), mix="hard")


def test_the_word_files_are_what_their_script_writes(tmp_path):
    """Six distinct words of the script's list per prompt, the prompt asking exactly those words; no set asked twice,
    none both sampled and held out, and no held-out phrasing among the sampled ones."""
    spec = importlib.util.spec_from_file_location("make_word_prompts", os.path.join(ROOT, "data", "words",
                                                                                    "make_prompts.py"))
    make_prompts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_prompts)
    make_prompts.main(str(tmp_path))
    sets, phrasings = {}, {}
    for name, count in (("train.jsonl", 256), ("heldout.jsonl", 200)):
        with open(tmp_path / name, "rb") as written, open(os.path.join(ROOT, "data", "words", name), "rb") as f:
            assert written.read() == f.read(), name
        rows = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        assert len(rows) == count
        for row in rows:
            words = row["words"]
            assert len(set(words)) == len(words) == 6 and set(words) <= set(make_prompts.WORDS)
            assert row["prompt"].endswith(": " + ", ".join(words) + ". Do not use any commas.")
        sets[name] = {frozenset(row["words"]) for row in rows}
        phrasings[name] = {row["prompt"].rsplit(":", 1)[0] for row in rows}
        assert len(sets[name]) == count, name
    assert not sets["train.jsonl"] & sets["heldout.jsonl"]
    assert not phrasings["train.jsonl"] & phrasings["heldout.jsonl"] and len(phrasings["heldout.jsonl"]) == 2


def test_a_last_epoch_without_a_logged_step_gives_the_latest_logged_figures(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from dpo_lightning.pairs.round_fit import fit_metrics
    from dpo_lightning.pairs.rounds import write_record

    writer = SummaryWriter(str(tmp_path / "log"))  # as Lightning logs: `epoch` beside each logged step
    for step, epoch, loss in ((0, 0, 0.9), (1, 0, 0.7), (2, 1, None), (3, 1, None)):  # epoch 1 logged no loss
        writer.add_scalar("epoch", epoch, step)
        if loss is not None:
            writer.add_scalar("train/loss", loss, step)
    writer.close()
    assert fit_metrics(str(tmp_path / "log")) == {"train/loss": pytest.approx(0.8)}
    # a record written by a run that gave NaN is drawn without it, not a crash
    write_record(str(tmp_path), [{"round": 0, "eval": {"reward_mean": 1.0}},
                                 {"round": 1, "eval": {"reward_mean": 2.0}, "fit": {"train/loss": math.nan}}])
    assert os.path.getsize(tmp_path / "rounds.png") > 0


def test_iterate_report_breaks_held_out_figures_down_by_a_field_of_the_prompt_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    import iterate_report

    held = tmp_path / "held.jsonl"  # a blank line counts: the answers name their rows by the file's line numbers
    rows = [{"prompt": f"q{i}", "kind": kind} for i, kind in enumerate(["easy", "hard", "hard", "easy"])]
    held.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    lines = [1, 2, 4, 5]
    run = tmp_path / "run"
    (run / "rounds.json").parent.mkdir()
    (run / "rounds.json").write_text(json.dumps([{"round": 0}, {"round": 1}]))
    for number, right in ((0, [1, 0, 0, 0]), (1, [1, 1, 0, 1])):  # lines 1 and 4 are easy, 2 and 3 hard
        os.makedirs(run / f"round_{number}")
        write_jsonl(run / f"round_{number}" / "eval.jsonl", [{"where": f"{held} line {line}",
                                                              "terms": {"right": v, "form": 1.0}}
                                                             for line, v in zip(lines, right)])
    got = iterate_report.by_field([str(run)], "kind")
    assert got == {("run", 0, "easy"): {"form": 1.0, "right": 0.5}, ("run", 0, "hard"): {"form": 1.0, "right": 0.0},
                   ("run", 1, "easy"): {"form": 1.0, "right": 1.0}, ("run", 1, "hard"): {"form": 1.0, "right": 0.5}}
    assert "run round 1, kind hard (2): form 1.000, right 0.500" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="line 1: no field 'level'"):
        iterate_report.by_field([str(run)], "level")
