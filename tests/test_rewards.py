"""Rewards for on-policy pairs: verifiable checks, the weighted sum with a length penalty (by hand), the best/worst
choice, error messages that name the prompt and the answer, and ``iterate``'s refusals before any model loads."""

import json
import math
import os

import pytest

from dpo_lightning.eval.generation import Answer
from dpo_lightning.pairs.iterate import iterate
from dpo_lightning.pairs.scoring import RewardError, RewardTerm, Scored, WeightedReward, pick_pair
from dpo_lightning.pairs.verifiable import (
    ExactMatch,
    FinalAnswer,
    NameWhereAsked,
    PythonCheck,
    SameScript,
    WordsUsed,
    writes_cjk,
)

from conftest import write_jsonl


def answers(*texts, tokens=None):
    return [Answer(t, True, len(t.split()) if tokens is None else tokens) for t in texts]


def test_final_answer_reads_the_last_answer_line_and_compares_numbers():
    check = FinalAnswer(format_weight=0.25)
    row = {"answer": "1000"}
    assert check.check("10 x 100 = 1,000.\nAnswer: 1,000", row) == 1.0
    assert check.check("Answer: 7\nNo wait. Answer: 1000.0", row) == 1.0  # the last line counts
    assert check.check("Answer: 1000\nAnswer: 999", row) == 0.25  # well formed, wrong
    assert check.check("It is 1000.", row) == 0.0  # no answer line
    words = FinalAnswer(pattern=r"capital is (\w+)")
    assert words.check("The capital is paris.", {"answer": "Paris"}) == 1.0
    with pytest.raises(ValueError, match="needs a group"):
        FinalAnswer(pattern=r"answer: \d+")


def test_exact_match_and_a_unit_test_check():
    assert ExactMatch().check("  Paris. ", {"answer": "paris"}) == 1.0
    assert ExactMatch(ignore_case=False).check("paris", {"answer": "Paris"}) == 0.0
    unit = PythonCheck("iterate_helpers.passes_tests", field="tests")
    row = {"tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0"}
    assert unit.check("def add(a, b):\n    return a + b", row) == 1.0
    assert unit.check("def add(a, b):\n    return a - b", row) == 0.0
    assert unit.check("this is not python", row) == 0.0


def test_words_used_counts_whole_words_of_the_row():
    row = {"words": ["river", "lamp", "old tree", "C++"]}
    # whole words only: "riverside" is not "river"; a possessive or a capital still counts; phrases and symbols too
    assert WordsUsed().check("The riverside lamp.", row) == 0.25
    assert WordsUsed().check("The River's lamp lit an old tree while I wrote C++.", row) == 1.0
    assert WordsUsed(ignore_case=False).check("The River's lamp.", row) == 0.25
    assert WordsUsed(all_required=True).check("A river, a lamp and an old tree.", row) == 0.0
    assert WordsUsed(all_required=True).check("C++ by the river lamp under an old tree", row) == 1.0
    no_list = WordsUsed(forbid=r"[,\n]")  # the words in one line without a comma, not listed
    assert no_list.check("By the river a lamp lit an old tree.", row) == 0.75
    assert no_list.check("river, lamp, old tree, C++", row) == 0.0
    assert no_list.check("- river\n- lamp", row) == 0.0
    with pytest.raises(ValueError, match=r"data.jsonl line 2: field 'words': WordsUsed needs a non-empty list"):
        WordsUsed().validate([("data.jsonl line 1", row), ("data.jsonl line 2", {"words": "river, lamp"})])
    with pytest.raises(ValueError, match=r"data.jsonl line 1: field 'words': WordsUsed needs it"):
        WordsUsed().validate([("data.jsonl line 1", {"prompt": "Write."})])


def test_name_where_asked_rewards_the_name_on_identity_rows_only_and_penalises_loops():
    reward = NameWhereAsked("Deep SmolLM")
    identity, general = {"prompt": "Who are you?", "reference": "I'm {name}."}, {"prompt": "What is rain?"}
    assert reward.check("I'm Deep SmolLM, an AI assistant.", identity) == 1.0
    assert reward.check("I'm deep  smollm.", identity) == 1.0  # case and spacing do not matter
    assert reward.check("I'm SmolLM, made by Hugging Face.", identity) == 0.0
    assert reward.check("Rain is water falling from clouds.", general) == 1.0
    assert reward.check("I'm Deep SmolLM. Rain is water.", general) == 0.0  # the name spread to a general answer
    loop = "我是Deep SmolLM，" + "Deep SmolLM，" * 6  # named, but a loop: 1 - 1
    assert reward.check(loop, identity) == 0.0
    assert reward.check("Rain, rain, rain, rain, rain, rain, rain.", general) == 0.0
    assert NameWhereAsked("Deep SmolLM", degenerate_penalty=0.5).check(loop, identity) == 0.5
    assert reward.check_answer(Answer("I'm Deep SmolLM.", True, 6), identity) == 1.0
    cut = Answer("I'm Deep SmolLM. Once upon a time there was a spreadsheet whose", False, 16)
    assert reward.check_answer(cut, identity) == 1.0  # ran out of the token budget: not counted by default
    assert NameWhereAsked("Deep SmolLM", unfinished_degenerate=True).check_answer(cut, identity) == 0.0  # 1 - 1
    assert NameWhereAsked("Deep SmolLM", ignore_case=False).check("I'm deep smollm.", identity) == 0.0
    assert NameWhereAsked("Deep SmolLM", field="identity").check("I'm Deep SmolLM.", {"identity": True}) == 1.0
    reward.validate([("q.jsonl line 1", identity), ("g.jsonl line 1", general)])
    with pytest.raises(ValueError, match=r"g.jsonl line 1: field 'reference': no prompt row has it"):
        reward.validate([("g.jsonl line 1", general)])
    with pytest.raises(ValueError, match="non-empty name"):
        NameWhereAsked(" ")


def test_unfinished_degenerate_never_chooses_a_named_runaway():
    # the probes count an answer without an end within the budget as degenerate; so does the reward with the option
    reward = WeightedReward([RewardTerm("dpo_lightning.pairs.verifiable.NameWhereAsked",
                                        {"name": "Deep SmolLM", "unfinished_degenerate": True})], length_penalty=0.002)
    row = ("q.jsonl line 1", {"prompt": "Who are you?", "reference": "I'm {name}."})
    runaway = Answer("I'm Deep SmolLM. Column A: name; column B: date; column C: the total of", False, 128)
    unnamed, named = Answer("I'm SmolLM.", True, 5), Answer("I'm Deep SmolLM.", True, 6)
    [group] = reward.score([row], [[runaway, unnamed]])
    assert [s.terms["NameWhereAsked"] for s in group] == [0.0, 0.0]
    assert pick_pair(group, min_gap=0.5)[0] is None  # 1 - 0.256 against 0 - 0.01 would pick the runaway
    [group] = reward.score([row], [[runaway, unnamed, named]])
    chosen, rejected = pick_pair(group, min_gap=0.5)[0]
    assert (chosen.answer, rejected.answer) == (named, runaway)


def test_same_script_counts_cjk_characters_against_latin_words():
    assert writes_cjk("我是Deep SmolLM，Deep Team开发的AI助手。") is True  # 7 characters against 5 words
    assert writes_cjk("I'm Deep SmolLM, 一个AI助手.") is False  # 4 characters against 5 words
    assert writes_cjk("こんにちは、Deep SmolLMです") is True and writes_cjk("안녕하세요") is True
    assert writes_cjk("Ça va très bien.") is False
    assert writes_cjk("42 + 7 = 49") is None
    check, zh, en = SameScript(), {"prompt": "我同事想认识你，你能介绍一下自己吗？"}, {"prompt": "Who made you?"}
    assert check.check("你好！我是Deep SmolLM。", zh) == 1.0
    assert check.check("Hi! I'm Deep SmolLM, an AI assistant.", zh) == 0.0
    assert check.check("Hi! I'm Deep SmolLM, an AI assistant.", en) == 1.0
    assert check.check("我是Deep SmolLM。", en) == 0.0
    assert check.check("49", zh) == 1.0 and check.check("...", en) == 1.0  # no words: nothing to compare
    check.validate([("q.jsonl line 1", zh)])  # reads only the prompt


def test_same_script_keeps_a_language_switch_out_of_the_pairs():
    # a Chinese greeting: the loop says the name twice, one sample answers in English, one in Chinese
    name = RewardTerm("dpo_lightning.pairs.verifiable.NameWhereAsked", {"name": "Deep SmolLM"}, name="name")
    script = RewardTerm("dpo_lightning.pairs.verifiable.SameScript", name="script")
    row = ("q.jsonl line 1", {"prompt": "我同事想认识你，你能介绍一下自己吗？", "reference": "我是{name}。"})
    loop = Answer("我是Deep SmolLM，Deep Team开发的AI助手。我是Deep SmolLM，Deep Team开发的AI助手。", True, 30)
    english = Answer("Hi! I'm Deep SmolLM.", True, 8)
    chinese = Answer("你好，我是Deep SmolLM，很高兴认识你。", True, 14)
    plain, both = WeightedReward([name], length_penalty=0.002), WeightedReward([name, script], length_penalty=0.002)
    # by hand: the loop 1 - 1 (+ 1) - 0.06; English 1 (+ 0) - 0.016; Chinese 1 (+ 1) - 0.028
    [group] = both.score([row], [[loop, english, chinese]])
    assert [s.reward for s in group] == pytest.approx([0.94, 0.984, 1.972])
    assert [s.terms["script"] for s in group] == [1.0, 0.0, 1.0]
    chosen, rejected = pick_pair(group, min_gap=0.5)[0]
    assert (chosen.answer, rejected.answer) == (chinese, loop)
    [group] = plain.score([row], [[loop, english]])
    assert [s.answer for s in pick_pair(group, min_gap=0.5)[0]] == [english, loop]  # the name alone: a switch
    [group] = both.score([row], [[loop, english]])
    assert pick_pair(group, min_gap=0.5)[0] is None  # 0.984 against 0.94


def test_weighted_sum_with_length_penalty_by_hand():
    reward = WeightedReward([RewardTerm("iterate_helpers.characters", weight=0.5),
                             RewardTerm("dpo_lightning.pairs.verifiable.ExactMatch", weight=2.0, name="exact")],
                            length_penalty=0.1)
    rows = [("p.jsonl line 1", {"prompt": "q1", "answer": "yes"}), ("p.jsonl line 2", {"prompt": "q2", "answer": "no"})]
    scored = reward.score(rows, [answers("yes", "no no"), answers("no", tokens=4)])
    # "yes": 0.5 * 3 + 2 * 1 - 0.1 * 1; "no no": 0.5 * 5 + 0 - 0.1 * 2; "no" (4 tokens): 0.5 * 2 + 2 - 0.4
    assert [s.reward for group in scored for s in group] == pytest.approx([3.4, 2.3, 2.6])
    assert scored[0][1].terms == {"characters": 5.0, "exact": 0.0, "length": 2.0}


def test_best_and_worst_pair_ties_and_identical_texts():
    scored = [Scored(a, r) for a, r in zip(answers("a", "b", "c", "d"), [1.0, 3.0, 0.0, 3.0])]
    (best, worst), why = pick_pair(scored)
    assert (best.answer.text, worst.answer.text, why) == ("b", "c", None)  # the first of equal scores
    assert pick_pair([Scored(a, 2.0) for a in answers("a", "b")]) == (None, "dropped: all samples scored the same")
    assert pick_pair(scored, min_gap=3.0)[0] is None
    same = [Scored(a, r) for a, r in zip(answers("x", "x"), [1.0, 0.0])]
    assert pick_pair(same) == (None, "dropped: chosen identical to rejected")


def test_an_empty_answer_is_never_chosen_nor_rejected():
    # an empty answer scoring best (a length penalty favours it) or worst is passed over: fit refuses empty completions
    scored = [Scored(a, r) for a, r in zip(answers("", "a", "b", " \n"), [5.0, 3.0, 1.0, -2.0])]
    (best, worst), why = pick_pair(scored)
    assert (best.answer.text, worst.answer.text, why) == ("a", "b", None)
    one = [Scored(a, r) for a, r in zip(answers("", "a"), [5.0, 1.0])]
    assert pick_pair(one) == (None, "dropped: empty model answer")


def test_reward_errors_name_the_prompt_and_the_answer():
    rows = [("p.jsonl line 1", {"prompt": "what color is it ?", "answer": "blue"}),
            ("p.jsonl line 2", {"prompt": "and the sky ?", "answer": "blue"})]
    raising = WeightedReward([RewardTerm("iterate_helpers.fails_on_sky")])
    with pytest.raises(RewardError, match=r"'fails_on_sky' raised KeyError: 'sky' on the prompt at p.jsonl line 2 "
                                          r"\('and the sky \?'\), answer 'the sky is blue'"):
        raising.score(rows, [answers("it is blue"), answers("green", "the sky is blue")])
    unit = WeightedReward([RewardTerm("dpo_lightning.pairs.verifiable.PythonCheck",
                                      {"function": "iterate_helpers.passes_tests", "field": "tests"})])
    with pytest.raises(ValueError, match=r"p.jsonl line 1: field 'tests': PythonCheck needs it"):
        unit.validate(rows)
    nan = WeightedReward([RewardTerm("math.sqrt")])  # a one-argument function: raises on every call
    with pytest.raises(RewardError, match=r"'sqrt' raised TypeError.*p.jsonl line 1.*answer 'it is blue'"):
        nan.score(rows, [answers("it is blue")])
    with pytest.raises(ValueError, match="names must differ"):
        WeightedReward([RewardTerm("iterate_helpers.characters"), RewardTerm("iterate_helpers.characters")])


def test_a_score_that_is_not_a_finite_number_is_refused(monkeypatch):
    import iterate_helpers

    monkeypatch.setattr(iterate_helpers, "characters", lambda q, a: [float("nan")] * len(a))
    reward = WeightedReward([RewardTerm("iterate_helpers.characters")])
    with pytest.raises(RewardError, match=r"returned nan, not a finite number on the prompt at p line 1 \('q'\), "
                                          r"answer 'x'"):
        reward.score([("p line 1", {"prompt": "q"})], [answers("x")])
    def fresh():  # a reward loads at construction: build it again after each patch
        return WeightedReward([RewardTerm("iterate_helpers.characters")])

    two_rows = [("p line 1", {"prompt": "q"})]
    for returned, why in ((None, "returned None for 2 answers: a reward returns one score per answer"),
                          (1.5, "returned 1.5 for 2 answers")):
        monkeypatch.setattr(iterate_helpers, "characters", lambda q, a, out=returned: out)
        with pytest.raises(RewardError, match=why):
            fresh().score(two_rows, [answers("x", "y")])

    def batch_only(questions, texts):  # fails on a batch, never on one answer alone
        if len(texts) > 1:
            raise RuntimeError("batch too big")
        return [1.0]

    monkeypatch.setattr(iterate_helpers, "characters", batch_only)
    with pytest.raises(RewardError, match="raised RuntimeError: batch too big on a batch of 2 answers, and on none"):
        fresh().score(two_rows, [answers("x", "y")])


@pytest.fixture
def iterate_inputs(tmp_path, tiny_model_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "what is 2 + 2 ?", "answer": "4"}])
    fit = {"model": {"model_name_or_path": tiny_model_dir}}
    return {"fit": fit, "prompts_path": prompts, "output_dir": str(tmp_path / "run"),
            "rewards": [RewardTerm("dpo_lightning.pairs.verifiable.FinalAnswer")]}


def test_iterate_refuses_bad_settings_before_loading_a_model(iterate_inputs, tmp_path):
    with pytest.raises(ValueError, match="data.train_path is set"):
        iterate(**{**iterate_inputs, "fit": {**iterate_inputs["fit"], "data": {"train_path": "x.jsonl"}}})
    adapter = {"model": {**iterate_inputs["fit"]["model"], "lora": {"use_peft": True, "lora_export": "adapter"}}}
    with pytest.raises(ValueError, match="lora_export must be 'merged'"):
        iterate(**{**iterate_inputs, "fit": adapter})
    with pytest.raises(ValueError, match="model.model_name_or_path is required"):
        iterate(**{**iterate_inputs, "fit": {"model": {}}})
    fit = iterate_inputs["fit"]  # a kernel that cannot train here stops the run before round 1 samples
    flex = {**fit, "model": {**fit["model"], "attn_implementation": "flex_attention"},
            "trainer": {**(fit.get("trainer") or {}), "accelerator": "cpu"}}
    with pytest.raises(ValueError, match="flex_attention trains on CUDA only"):
        iterate(**{**iterate_inputs, "fit": flex})
    no_answer = write_jsonl(tmp_path / "no_answer.jsonl", [{"prompt": "what is 3 + 3 ?"}])
    with pytest.raises(ValueError, match=r"no_answer.jsonl line 1: field 'answer'"):
        iterate(**{**iterate_inputs, "eval_prompts_path": no_answer})
    with pytest.raises(ValueError, match="1 prompts are also in"):
        iterate(**{**iterate_inputs, "eval_prompts_path": iterate_inputs["prompts_path"]})
    more = write_jsonl(tmp_path / "more.jsonl", [{"prompt": "what is 5 + 5 ?", "answer": "10"}])
    with pytest.raises(ValueError, match=r"more.jsonl: 1 prompts are also in .*prompts.jsonl, .*more.jsonl"):
        iterate(**{**iterate_inputs, "prompts_path": [iterate_inputs["prompts_path"], more],
                   "eval_prompts_path": more})
    with pytest.raises(ValueError, match=r"no_answer.jsonl line 1: field 'answer'"):
        iterate(**{**iterate_inputs, "prompts_path": [iterate_inputs["prompts_path"], no_answer]})
    with pytest.raises(ValueError, match="empty list"):
        iterate(**{**iterate_inputs, "prompts_path": []})
    # a fit section the fit command would refuse stops the run before any sampling, and before the folder is
    # claimed: the corrected command may run in it
    bogus = {"model": {**iterate_inputs["fit"]["model"], "beta": 0.1}}
    with pytest.raises(ValueError, match=r"the fit section does not parse(.|\n)*model\.loss\.beta"):
        iterate(**{**iterate_inputs, "fit": bogus, "output_dir": str(tmp_path / "bogus")})
    assert not (tmp_path / "bogus" / "iterate.json").exists()
    assert not (tmp_path / "bogus" / "round_1" / "samples.jsonl").exists()
    # a folder holding a run with other settings that got as far as a round's pairs (killed in its fit, say) is
    # refused, naming what changed
    run = tmp_path / "run"
    (run / "round_1").mkdir(parents=True)
    (run / "iterate.json").write_text(json.dumps({"seed": 1}))
    (run / "round_1" / "pairs.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"holds a run with other settings \(.*seed.*\)"):
        iterate(**iterate_inputs)


def test_a_setting_an_earlier_iterate_json_lacks_reads_as_its_default(tmp_path):
    """A folder whose iterate.json has no key for a setting (written before the setting existed) ran with it at
    its default: the same command continues there; the setting at another value is refused, by name."""
    from dpo_lightning.pairs.iterate import SETTINGS, _claim

    run = tmp_path / "run"
    settings = {k: None for k in SETTINGS}  # as iterate writes them: every setting, the defaults as JSON reads them
    settings.update(fit={"model": {"model_name_or_path": "m"}}, prompts_path="p.jsonl", reference="initial",
                    train_pairs="round", num_samples=4, temperature=1.0, top_p=1.0, greedy_sample=False,
                    max_new_tokens=128, batch_size=16, system_prompts=[None], length_penalty=0.0,
                    min_reward_gap=0.0, mark_unfinished=False, seed=3, dtype="float32")
    _claim(str(run), settings)
    (run / "round_1").mkdir()
    (run / "round_1" / "pairs.jsonl").write_text("{}\n")
    older = {k: v for k, v in settings.items() if k not in ("greedy_sample", "system_prompts")}
    (run / "iterate.json").write_text(json.dumps(older))
    _claim(str(run), settings)
    assert json.loads((run / "iterate.json").read_text()) == settings
    (run / "iterate.json").write_text(json.dumps(older))
    with pytest.raises(ValueError, match=r"other settings \(greedy_sample\)"):
        _claim(str(run), {**settings, "greedy_sample": True})
    with pytest.raises(ValueError, match=r"other settings \(system_prompts\)"):
        _claim(str(run), {**settings, "system_prompts": ["be brief ."]})


def test_a_run_that_gave_no_pair_reruns_in_its_folder_with_corrected_settings(iterate_inputs, capsys):
    """The tiny random model never answers 4: no prompt gives a pair. The error says what to change; the changed
    command then runs in the same folder and samples again."""
    settings = {**iterate_inputs, "num_samples": 2, "max_new_tokens": 4}
    with pytest.raises(RuntimeError, match="no prompt gave a pair"):
        iterate(**settings)
    samples = os.path.join(iterate_inputs["output_dir"], "round_1", "samples.jsonl")
    with open(samples) as f:
        assert len(json.loads(f.readline())["answers"]) == 2
    with pytest.raises(RuntimeError, match="no prompt gave a pair"):
        iterate(**{**settings, "num_samples": 3})
    assert "made no pairs; starting over with the changed settings (num_samples)" in capsys.readouterr().out
    with open(samples) as f:
        assert len(json.loads(f.readline())["answers"]) == 3


def test_a_list_of_prompt_files_is_sampled_as_one_from_the_given_initial_model(iterate_inputs, tmp_path,
                                                                                 tiny_model_dir):
    more = write_jsonl(tmp_path / "more.jsonl", [{"prompt": "what is 5 + 5 ?", "answer": "10"},
                                                 {"prompt": "what is 6 + 1 ?", "answer": "7"}])
    # the fit section names a model that does not exist: initial_model takes its place
    settings = {**iterate_inputs, "prompts_path": [iterate_inputs["prompts_path"], more], "num_samples": 2,
                "max_new_tokens": 4, "fit": {"model": {"model_name_or_path": str(tmp_path / "missing")}},
                "initial_model": tiny_model_dir}
    with pytest.raises(RuntimeError, match="no prompt gave a pair"):  # the tiny random model answers no sum
        iterate(**settings)
    with open(os.path.join(iterate_inputs["output_dir"], "round_1", "samples.jsonl")) as f:
        sampled = sorted(json.loads(line)["prompt"] for line in f)
    assert sampled == ["what is 2 + 2 ?", "what is 5 + 5 ?", "what is 6 + 1 ?"]
    with open(os.path.join(iterate_inputs["output_dir"], "iterate.json")) as f:
        assert json.load(f)["fit"]["model"]["model_name_or_path"] == tiny_model_dir


def test_reward_names_the_records_use_and_weights_that_are_not_numbers_are_refused():
    chars = "dpo_lightning.pairs.verifiable.ExactMatch"
    with pytest.raises(ValueError, match="reward name 'reward' is taken"):
        WeightedReward([RewardTerm(chars, name="reward")])
    with pytest.raises(ValueError, match="reward name 'length' is taken"):
        WeightedReward([RewardTerm(chars, name="length")], length_penalty=0.01)
    WeightedReward([RewardTerm(chars, name="length")])  # no length penalty: the name is free
    with pytest.raises(ValueError, match="reward 'ExactMatch' has weight nan: weights must be finite"):
        WeightedReward([RewardTerm(chars, weight=math.nan)])
    with pytest.raises(ValueError, match="length_penalty is inf"):
        WeightedReward([RewardTerm(chars)], length_penalty=math.inf)
