"""What ``build-pairs`` and ``iterate`` refuse before a model loads: settings out of range, and output files that
would replace each other or an input."""

from __future__ import annotations

import os
from typing import Optional, Sequence


def check_sampling(**settings: Optional[float]) -> None:
    """Refuse, before any model loads, a count, budget or sampling setting out of range, naming each: counts and
    budgets > 0, ``num_samples`` at least 2 (a pair needs two answers), ``top_p`` in (0, 1]. None is not checked."""
    problems = []
    for key, value in settings.items():
        if value is None:
            continue
        if key == "num_samples" and value < 2:
            problems.append(f"--num_samples must be at least 2 (a pair needs two answers), got {value}")
        elif key == "top_p" and not 0 < value <= 1:
            problems.append(f"--top_p must be in (0, 1], got {value}")
        elif key not in ("num_samples", "top_p") and not value > 0:
            problems.append(f"--{key} must be > 0, got {value}")
    if problems:
        raise ValueError("; ".join(problems))


def check_outputs(output_paths: Sequence[str], input_paths: Sequence[str]) -> None:
    """Refuse an output path named twice, or one that is also an input (the pairs would replace the prompts)."""
    outputs = [os.path.realpath(p) for p in output_paths]
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"--output_paths names one file twice ({list(output_paths)}): the second would replace "
                         "the first")
    inputs = {os.path.realpath(p) for p in input_paths}
    if clash := [p for p, real in zip(output_paths, outputs) if real in inputs]:
        raise ValueError(f"{clash[0]}: an output path is also an input; the pairs would replace the prompts")
