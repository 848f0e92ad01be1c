"""Reward functions for on-policy pair building: ``reward(questions, answers) -> scores``, one float per answer.

Any callable with that signature can be named by import path in ``build-pairs --reward`` or an ``iterate`` reward
term; a class is built with its arguments. Two ship here: a keyword/regex reward and a ``transformers``
sequence-classification model; ``verifiable.py`` holds the rewards that check an answer against its prompt row.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Optional, Sequence

import torch

from ..eval.probes import degeneracy
from ..model.loading import load_tokenizer

RewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]


class KeywordReward:
    """Sum of the weights of the regular expressions an answer matches (each counted once).

    Args:
        patterns: regular expression -> weight, e.g. ``{"Deep SmolLM": 1.0, "Hugging ?Face": -1.0}``.
        ignore_case: match without regard to case.
        degenerate_penalty: subtracted from answers that :func:`dpo_lightning.eval.probes.degeneracy` flags.
    """

    def __init__(self, patterns: dict[str, float], ignore_case: bool = True, degenerate_penalty: float = 0.0) -> None:
        if not patterns:
            raise ValueError("KeywordReward needs at least one pattern")
        flags = re.IGNORECASE if ignore_case else 0
        self.patterns = [(re.compile(p, flags), float(w)) for p, w in patterns.items()]
        self.degenerate_penalty = degenerate_penalty

    def __call__(self, questions: Sequence[str], answers: Sequence[str]) -> list[float]:
        scores = []
        for answer in answers:
            score = sum(w for pattern, w in self.patterns if pattern.search(answer))
            if self.degenerate_penalty and degeneracy(answer) is not None:
                score -= self.degenerate_penalty
            scores.append(score)
        return scores


class SequenceClassifierReward:
    """Scores from a ``transformers`` sequence-classification reward model (one logit per text).

    Args:
        model_name_or_path: the reward model (a local directory or a hub id).
        label_index: which output logit is the reward.
        batch_size: texts scored per forward pass.
        max_length: longer question+answer texts are truncated to this many tokens.
        trust_remote_code: allow modelling code from the model repository to run.
    """

    def __init__(self, model_name_or_path: str, label_index: int = 0, batch_size: int = 16, max_length: int = 1024,
                 trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path, trust_remote_code=trust_remote_code).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label_index, self.batch_size, self.max_length = label_index, batch_size, max_length

    def _text(self, question: str, answer: str) -> str:
        if self.tokenizer.chat_template is not None:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"{question}\n{answer}"

    @torch.no_grad()
    def __call__(self, questions: Sequence[str], answers: Sequence[str]) -> list[float]:
        texts = [self._text(q, a) for q, a in zip(questions, answers)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length, add_special_tokens=False)
            logits = self.model(**enc).logits.float()
            scores.extend(logits[:, self.label_index].tolist())
        return scores


def import_attribute(import_path: str, what: str) -> Any:
    """The object at ``package.module.attribute``; a clear error when it cannot be imported."""
    module_name, _, attribute = import_path.rpartition(".")
    if not module_name:
        raise ValueError(f"{what} {import_path!r}: expected an import path like 'package.module.name'")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{what} {import_path!r} cannot be imported: {e}") from None


def load_reward(import_path: str, kwargs: Optional[dict[str, Any]] = None) -> RewardFn:
    """The reward named ``module.attribute``: a class is built with ``kwargs``, a function is used as is."""
    target = import_attribute(import_path, "reward")
    if isinstance(target, type):
        return target(**(kwargs or {}))
    if kwargs:
        raise ValueError(f"reward {import_path!r} is a function; reward_kwargs apply only to classes")
    return target
