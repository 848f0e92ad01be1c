"""The identity experiment's question files keep their splits apart: no held-out question (validation, reporting,
fresh reporting) is trained on, no drift prompt is an anchor, the reporting drift prompts are in no other file, the
system prompts reported as unseen are in no pair config's pool, and every reference answer fills with each pair
config's placeholders (docs/identity.md)."""

import unicodedata
from pathlib import Path

import pytest
import yaml

from dpo_lightning.data.reading import read_prompt_rows
from dpo_lightning.pairs.build import fill_placeholders

from conftest import ROOT

REPO = Path(ROOT)
IDENTITY = REPO / "data" / "identity"
PAIR_CONFIGS = [REPO / "configs" / "pairs" / name for name in ("smollm2_identity.yaml", "qwen_identity.yaml")]
RUN_CONFIGS = [REPO / "configs" / name for name in ("smollm2_identity.yaml", "qwen_identity.yaml")]
TRAIN, VAL, REPORT, FRESH = ("prompts_train", "prompts_val", "prompts_report", "prompts_fresh")


def questions(name: str) -> list[str]:
    return [row["prompt"] for _, row in read_prompt_rows(str(IDENTITY / f"{name}.jsonl"))]


def key(text: str) -> str:
    """A question with case, width, spaces and punctuation ignored: 'Who are you?' == 'who are you'."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if ch.isalnum())


@pytest.mark.parametrize("name", [TRAIN, VAL, REPORT, FRESH])
def test_no_question_twice_in_a_file(name):
    keys = [key(q) for q in questions(name)]
    assert len(set(keys)) == len(keys), [q for q in questions(name) if keys.count(key(q)) > 1]


@pytest.mark.parametrize("held_out", [VAL, REPORT, FRESH])
def test_held_out_questions_are_never_trained_on(held_out):
    seen = {key(q) for q in questions(TRAIN)}
    if held_out in (REPORT, FRESH):  # the reporting splits are apart from validation too, and from each other
        seen |= {key(q) for q in questions(VAL)}
        seen |= {key(q) for q in questions(FRESH if held_out == REPORT else REPORT)}
    assert [q for q in questions(held_out) if key(q) in seen] == []


@pytest.mark.parametrize("drift_set", ["general", "general_report"])
def test_drift_prompts_are_not_anchors(drift_set):
    anchors = {key(q) for q in questions("general_train")}
    assert [q for q in questions(drift_set) if key(q) in anchors] == []


def test_the_reporting_drift_prompts_are_apart_from_every_other_file():
    report = questions("general_report")
    assert len({key(q) for q in report}) == len(report)
    elsewhere = {key(q) for name in ("general", "general_train", TRAIN, VAL, REPORT, FRESH) for q in questions(name)}
    assert [q for q in report if key(q) in elsewhere] == []
    rows = [row for _, row in read_prompt_rows(str(IDENTITY / "general_report.jsonl"))]
    assert {row["lang"] for row in rows} == {"en", "zh"}


@pytest.mark.parametrize("config", PAIR_CONFIGS, ids=lambda p: p.name)
def test_every_reference_answer_fills_and_names(config):
    settings = yaml.safe_load(config.read_text())
    placeholders = settings["placeholders"]
    for path in settings["prompts_paths"]:
        for where, row in read_prompt_rows(str(REPO / path)):
            assert "{name}" in row["reference"], where
            assert placeholders["name"] in fill_placeholders(row["reference"], placeholders, where)


@pytest.mark.parametrize("pairs, run", list(zip(PAIR_CONFIGS, RUN_CONFIGS)), ids=lambda p: p.name)
def test_reported_unseen_system_prompts_are_in_no_pair(pairs, run):
    """The probes' last two system prompts are reported as appearing in no training pair."""
    pool = yaml.safe_load(pairs.read_text())["system_prompts"]
    probed = yaml.safe_load(run.read_text())["probes"]["system_prompts"]
    assert probed[:2] == [None, ""] and set(probed[:2]) <= set(pool)
    assert [p for p in probed[2:] if p in pool] == []
