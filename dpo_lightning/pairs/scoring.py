"""Scoring sampled answers with a weighted sum of rewards, and turning one prompt's scored samples into a pair.

A reward is either a batch function ``reward(questions, answers) -> list[float]`` (``rewards.py``: keywords, a
reward model) or a :class:`~dpo_lightning.pairs.verifiable.VerifiableReward` that checks one answer against its
prompt row. Every score is checked: a reward that raises or returns something other than one finite number per
answer is reported with the prompt's file and row, the question and the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..eval.generation import Answer
from .rewards import load_reward
from .verifiable import VerifiableReward

Row = tuple[str, dict[str, Any]]  # (file:line, prompt row)


@dataclass
class RewardTerm:
    """One reward of the weighted sum.

    Args:
        reward: import path of a reward class or function, e.g. ``dpo_lightning.pairs.rewards.KeywordReward`` or
            ``dpo_lightning.pairs.verifiable.FinalAnswer``.
        arguments: constructor arguments when ``reward`` is a class.
        weight: the term's weight in the sum.
        name: the term's name in records (default: the class or function name).
    """

    reward: str
    arguments: Optional[dict[str, Any]] = None
    weight: float = 1.0
    name: Optional[str] = None


@dataclass(frozen=True)
class Scored:
    """One answer with its total reward and each term's unweighted score (``length``: the length penalty)."""

    answer: Answer
    reward: float
    terms: dict[str, float] = field(default_factory=dict)


class RewardError(ValueError):
    """A reward failed on, or returned a bad score for, one answer; the message names the prompt and the answer."""


class WeightedReward:
    """``sum(weight * term) - length_penalty * answer tokens`` for each answer.

    Args:
        terms: the rewards and their weights.
        length_penalty: subtracted per answer token (0.001 takes 0.1 from a 100-token answer).
    """

    def __init__(self, terms: Sequence[RewardTerm], length_penalty: float = 0.0) -> None:
        if not terms:
            raise ValueError("no reward configured: give at least one reward term")
        self.names = [term.name or term.reward.rpartition(".")[2] for term in terms]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"reward names must differ: {self.names}; set 'name' on the repeated ones")
        reserved = {"reward"} | ({"length"} if length_penalty else set())  # the total, and the length penalty's term
        if taken := sorted(reserved & set(self.names)):
            raise ValueError(f"reward name {taken[0]!r} is taken by the records ('reward': the weighted sum, "
                             "'length': the length penalty); set another 'name' on that term")
        bad = [(name, term.weight) for name, term in zip(self.names, terms) if not math.isfinite(term.weight)]
        if bad or not math.isfinite(length_penalty):
            what = f"reward {bad[0][0]!r} has weight {bad[0][1]}" if bad else f"length_penalty is {length_penalty}"
            raise ValueError(f"{what}: weights must be finite numbers")
        self.terms = [(term, load_reward(term.reward, term.arguments)) for term in terms]  # checked first: cheap
        self.length_penalty = length_penalty

    def validate(self, rows: Sequence[Row]) -> None:
        """Check, before any sampling, that every prompt row has what the verifiable rewards read."""
        for _, reward in self.terms:
            if isinstance(reward, VerifiableReward):
                reward.validate(rows)

    def score(self, rows: Sequence[Row], answers: Sequence[Sequence[Answer]]) -> list[list[Scored]]:
        """Scores of each prompt's answers: ``answers[i]`` are the samples of ``rows[i]``."""
        flat = [(i, a) for i, samples in enumerate(answers) for a in samples]
        per_term = {name: self._term(reward, rows, flat, name) for name, (_, reward) in zip(self.names, self.terms)}
        weights = {name: term.weight for name, (term, _) in zip(self.names, self.terms)}
        out: list[list[Scored]] = [[] for _ in rows]
        for k, (i, answer) in enumerate(flat):
            terms = {name: values[k] for name, values in per_term.items()}
            total = sum(weights[name] * value for name, value in terms.items())
            if self.length_penalty:
                terms["length"] = float(answer.num_tokens)
                total -= self.length_penalty * answer.num_tokens
            out[i].append(Scored(answer, total, terms))
        return out

    @staticmethod
    def _term(reward: Any, rows: Sequence[Row], flat: Sequence[tuple[int, Answer]], name: str) -> list[float]:
        def failed(k: int, why: str) -> RewardError:
            where, row = rows[flat[k][0]]
            return RewardError(f"reward {name!r} {why} on the prompt at {where} ({_short(row['prompt'])}), answer "
                               f"{_short(flat[k][1].text)}")

        if isinstance(reward, VerifiableReward):
            values = []
            for k, (i, answer) in enumerate(flat):
                try:
                    values.append(reward.check_answer(answer, rows[i][1]))
                except Exception as error:  # noqa: BLE001 - reported with the prompt and answer it failed on
                    raise failed(k, f"raised {type(error).__name__}: {error}") from error
        else:
            questions, texts = [rows[i][1]["prompt"] for i, _ in flat], [a.text for _, a in flat]
            try:
                out = reward(questions, texts)
            except Exception as batch_error:  # noqa: BLE001 - find the answer it fails on, one at a time
                for k in range(len(flat)):
                    try:
                        reward([questions[k]], [texts[k]])
                    except Exception as error:  # noqa: BLE001
                        raise failed(k, f"raised {type(error).__name__}: {error}") from error
                raise RewardError(f"reward {name!r} raised {type(batch_error).__name__}: {batch_error} on a batch of "
                                  f"{len(flat)} answers, and on none of them alone") from batch_error
            try:
                values = list(out)
            except TypeError:
                raise RewardError(f"reward {name!r} returned {repr(out)[:120]} for {len(flat)} answers: a reward "
                                  "returns one score per answer, as a list") from None
            if len(values) != len(flat):
                raise RewardError(f"reward {name!r} returned {len(values)} scores for {len(flat)} answers")
        for k, value in enumerate(values):
            try:
                number = math.nan if isinstance(value, str) else float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise failed(k, f"returned {value!r}, not a finite number")
        return [float(v) for v in values]


def pick_pair(scored: Sequence[Scored], min_gap: float = 0.0) -> tuple[Optional[tuple[Scored, Scored]], Optional[str]]:
    """The best and worst of one prompt's non-empty answers as (chosen, rejected), or None and why not: fewer than
    two non-empty answers (an empty completion cannot train), all scored the same (or within ``min_gap``), or the
    two texts are the same. The first of equal scores wins, so the choice is reproducible."""
    scored = [s for s in scored if s.answer.text.strip()]
    if len(scored) < 2:
        return None, "dropped: empty model answer"
    best = max(range(len(scored)), key=lambda k: scored[k].reward)
    worst = min(range(len(scored)), key=lambda k: scored[k].reward)
    if scored[best].reward - scored[worst].reward <= min_gap:
        return None, "dropped: all samples scored the same" + (f" (within {min_gap})" if min_gap else "")
    if scored[best].answer.text == scored[worst].answer.text:
        return None, "dropped: chosen identical to rejected"
    return (scored[best], scored[worst]), None


def _short(text: str, width: int = 120) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= width else text[:width - 1] + "…")
