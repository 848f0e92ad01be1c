"""Verifiable rewards: a check of one answer against its prompt row (exact match, a final answer found by a regular
expression, the words a prompt asks for, a new name where the row asks who the model is, an answer in the question's
script, or any Python function such as a unit test), scoring ``weight`` when it passes.

Each is named by import path in a reward list (``iterate --rewards``, ``build-pairs --reward``) and reads the
expected value from a field of the prompt row, e.g. ``{"prompt": "What is 17 + 25?", "answer": "42"}``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Sequence

from ..eval.generation import Answer
from ..eval.probes import degeneracy
from .rewards import import_attribute


class VerifiableReward:
    """Base class: :meth:`check` scores one answer's text given its prompt row; :meth:`validate` checks the rows
    first; :meth:`check_answer` is what the scorer calls, for rewards that also read whether the answer finished.

    Args:
        field: the prompt row's field holding what the answer is checked against (None: no field needed).
    """

    field: Optional[str] = "answer"

    def validate(self, rows: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Raise naming the file, row and field when a prompt row lacks what :meth:`check` reads."""
        if self.field is None:
            return
        for where, row in rows:
            if row.get(self.field) is None:
                raise ValueError(f"{where}: field {self.field!r}: {type(self).__name__} needs it in every prompt row")

    def check(self, answer: str, row: dict[str, Any]) -> float:
        raise NotImplementedError

    def check_answer(self, answer: Answer, row: dict[str, Any]) -> float:
        """The score of one generated answer: :meth:`check` of its text."""
        return self.check(answer.text, row)


def _normal(text: str, ignore_case: bool) -> str:
    text = " ".join(str(text).split()).strip(" .!。")
    return text.lower() if ignore_case else text


def _number(text: str) -> Optional[float]:
    try:
        return float(str(text).replace(",", "").replace(" ", ""))
    except ValueError:
        return None


class ExactMatch(VerifiableReward):
    """1 when the whole answer equals the row's ``field`` (whitespace runs and end punctuation ignored), else 0.

    Args:
        field: the row field holding the expected answer.
        ignore_case: compare without regard to case.
    """

    def __init__(self, field: str = "answer", ignore_case: bool = True) -> None:
        self.field, self.ignore_case = field, ignore_case

    def check(self, answer: str, row: dict[str, Any]) -> float:
        return float(_normal(answer, self.ignore_case) == _normal(row[self.field], self.ignore_case))


class FinalAnswer(VerifiableReward):
    """1 when the last match of ``pattern`` in the answer (its first group) equals the row's ``field``; numbers are
    compared as numbers (``1,000`` = ``1000.0``). 0 when it differs or nothing matches; ``format_weight`` is given
    for a match with a wrong value (the answer kept the format).

    Args:
        pattern: regular expression whose first group is the final answer, e.g. ``Answer:\\s*(-?[\\d,.]+)``.
        field: the row field holding the expected answer.
        format_weight: the score of a well-formed but wrong final answer.
        ignore_case: match and compare without regard to case.
    """

    def __init__(self, pattern: str = r"answer\s*[:：]\s*\$?\s*(-?[\d,]*\.?\d+)", field: str = "answer",
                 format_weight: float = 0.0, ignore_case: bool = True) -> None:
        self.regex = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        if self.regex.groups < 1:
            raise ValueError(f"FinalAnswer pattern {pattern!r} needs a group around the answer, e.g. '(-?\\d+)'")
        self.field, self.format_weight, self.ignore_case = field, format_weight, ignore_case

    def check(self, answer: str, row: dict[str, Any]) -> float:
        found = self.regex.findall(answer)
        if not found:
            return 0.0
        last = found[-1][0] if isinstance(found[-1], tuple) else found[-1]
        got, expected = _number(last), _number(row[self.field])
        if got is not None and expected is not None:
            right = math.isclose(got, expected, rel_tol=0.0, abs_tol=1e-9)
        else:
            right = _normal(last, self.ignore_case) == _normal(row[self.field], self.ignore_case)
        return 1.0 if right else self.format_weight


class PythonCheck(VerifiableReward):
    """The score of a Python function ``check(answer: str, row: dict) -> bool | float`` named by import path,
    e.g. one that runs the row's unit tests against the code in the answer.

    Args:
        function: import path ``package.module.function``.
        field: a row field the function needs (checked in every row before sampling), or None.
    """

    def __init__(self, function: str, field: Optional[str] = None) -> None:
        self.function: Callable[[str, dict[str, Any]], Any] = import_attribute(function, "check function")
        self.field = field

    def check(self, answer: str, row: dict[str, Any]) -> float:
        return float(self.function(answer, row))


class WordsUsed(VerifiableReward):
    """The share of the row's ``field`` words that the answer uses, each as a whole word (``river`` counts in "the
    river's bank", not in "riverside"); with ``all_required`` 1 only when it uses every one, else 0. For prompts
    such as "Write one sentence that uses all of these words: ...".

    Args:
        field: the row field holding the words, a list of strings.
        ignore_case: match without regard to case.
        all_required: score 1 for all the words and 0 otherwise, instead of the share.
        forbid: a regular expression the answer must not match (e.g. ``[,\\n]``: no comma, one line, so the words
            cannot simply be listed); an answer that matches scores 0.
    """

    def __init__(self, field: str = "words", ignore_case: bool = True, all_required: bool = False,
                 forbid: Optional[str] = None) -> None:
        self.field, self.ignore_case, self.all_required = field, ignore_case, all_required
        self.forbid = re.compile(forbid) if forbid else None

    def validate(self, rows: Sequence[tuple[str, dict[str, Any]]]) -> None:
        super().validate(rows)
        for where, row in rows:
            words = row[self.field]
            if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"{where}: field {self.field!r}: WordsUsed needs a non-empty list of words, got "
                                 f"{words!r}")

    def check(self, answer: str, row: dict[str, Any]) -> float:
        if self.forbid is not None and self.forbid.search(answer):
            return 0.0
        flags = re.IGNORECASE if self.ignore_case else 0
        words = row[self.field]
        used = sum(re.search(rf"(?<!\w){re.escape(w.strip())}(?!\w)", answer, flags) is not None for w in words)
        if self.all_required:
            return float(used == len(words))
        return used / len(words)


class NameWhereAsked(VerifiableReward):
    """1 for an answer that says ``name`` to an identity question, or that leaves it out of any other answer; minus
    ``degenerate_penalty`` for a degenerate answer (:func:`dpo_lightning.eval.probes.degeneracy`: a loop such as
    "Deep SmolLM, Deep SmolLM, ...", and with ``unfinished_degenerate`` a sampled answer that runs out of the token
    budget, as the probes count it). An identity question is a row that has ``field``: in the identity prompt files
    each question carries its ``reference`` answer, a general question (where the name must not spread) has none.
    For on-policy rounds on identity and general prompts together (``configs/iterate_identity.yaml``).

    Args:
        name: the new name, e.g. ``Deep SmolLM``.
        field: the row field that marks an identity question.
        ignore_case: match the name without regard to case.
        degenerate_penalty: subtracted from degenerate answers.
        unfinished_degenerate: count an answer without an end within the sampling budget as degenerate. A round
            then also pairs a finished answer against one that runs on where both are right or both wrong.
    """

    def __init__(self, name: str, field: str = "reference", ignore_case: bool = True,
                 degenerate_penalty: float = 1.0, unfinished_degenerate: bool = False) -> None:
        if not name.strip():
            raise ValueError("NameWhereAsked needs a non-empty name")
        self.name, self.field, self.ignore_case = name, field, ignore_case
        self.degenerate_penalty, self.unfinished_degenerate = degenerate_penalty, unfinished_degenerate
        self._wanted = _normal(name, ignore_case)  # the name as answers are compared, once

    def validate(self, rows: Sequence[tuple[str, dict[str, Any]]]) -> None:
        if rows and not any(row.get(self.field) is not None for _, row in rows):
            raise ValueError(f"{rows[0][0]}: field {self.field!r}: no prompt row has it, so no row is an identity "
                             "question for NameWhereAsked; give the identity prompt file, or the field that marks "
                             "its rows")

    def check(self, answer: str, row: dict[str, Any], finished: bool = True) -> float:
        said = self._wanted in _normal(answer, self.ignore_case)
        right = said if row.get(self.field) is not None else not said
        return float(right) - (self.degenerate_penalty if degeneracy(answer, finished) is not None else 0.0)

    def check_answer(self, answer: Answer, row: dict[str, Any]) -> float:
        return self.check(answer.text, row, answer.finished or not self.unfinished_degenerate)


# Han, kana and hangul: one character is one word of a CJK text
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")


def writes_cjk(text: str) -> Optional[bool]:
    """Whether ``text`` is mostly Chinese, Japanese or Korean: at least half its words are CJK characters, each
    counted as a word, against Latin-alphabet words ("我是Deep SmolLM，Deep Team开发的AI助手。": 7 against 5, so
    CJK). None for a text with neither (digits, symbols)."""
    cjk, latin = len(_CJK.findall(text)), len(_LATIN_WORD.findall(text))
    return None if cjk + latin == 0 else cjk >= latin


class SameScript(VerifiableReward):
    """1 when the answer is written in the question's script, CJK or Latin (:func:`writes_cjk`), else 0; 1 when
    either has no words. The question is the row's ``prompt``; no other field is read.

    Beside :class:`NameWhereAsked` at the same weight, an answer in the other script is as wrong as one without the
    name: a right English answer to a Chinese question ties with a Chinese loop (no pair, where the name alone pairs
    them and teaches a change of language as the way out of a loop) and loses to a right Chinese answer."""

    field = None

    def check(self, answer: str, row: dict[str, Any]) -> float:
        asked, answered = writes_cjk(row["prompt"]), writes_cjk(answer)
        return float(asked is None or answered is None or asked == answered)
