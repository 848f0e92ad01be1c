"""``compare``: the before/after table of the identity experiment — base and trained model answer the same
questions side by side, with the target-name, degeneracy and drift figures of each."""

from __future__ import annotations

import gc
import json
import os
import shutil
import textwrap
import unicodedata
from typing import Any, Literal, Optional

from ..model.loading import default_device, load_causal_lm, load_tokenizer
from .generation import Answer, system_label
from .probes import ProbeReport, base_general_answers, probe, read_general, read_questions


def _char_width(ch: str) -> int:
    """Terminal columns of one character: 2 for East Asian wide and full-width ones (Chinese, Japanese...)."""
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 0 if unicodedata.combining(ch) else 1


def _width(text: str) -> int:
    return sum(_char_width(ch) for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(width - _width(text), 0)


def _wrap(text: str, width: int, max_lines: int) -> list[str]:
    """Greedy wrap by terminal columns: breaks at spaces, or between wide characters, or inside a word longer
    than a line; at most ``max_lines`` lines, the last ending in " …" when text is left over."""
    pieces: list[tuple[bool, str]] = []  # (a space before it, a word or one wide character)
    word, space = "", False
    for ch in text:
        if ch.isspace() or _char_width(ch) == 2:
            if word:
                pieces.append((space, word))
                word, space = "", False
            if ch.isspace():
                space = True
            else:
                pieces.append((space, ch))
                space = False
        else:
            word += ch
    if word:
        pieces.append((space, word))
    lines, line = [], ""
    for space, piece in pieces:
        joined = line + (" " if space and line else "") + piece
        if _width(joined) <= width:
            line = joined
            continue
        if line:
            lines.append(line)
        while _width(piece) > width:  # a word longer than a line: split it
            cut = next(i for i in range(len(piece), 0, -1) if _width(piece[:i]) <= width)
            lines.append(piece[:cut])
            piece = piece[cut:]
        line = piece
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and _width(last) > width - 2:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + " …"]
    return lines


def _table(questions: list[str], before: ProbeReport, after: ProbeReport, width: int) -> str:
    col = max(20, (width - 7) // 3)
    lines = [f"{'question':<{col}} | {'before':<{col}} | {'after':<{col}}", "-" * (3 * col + 6)]
    for i, question in enumerate(questions):
        cells = []
        for text, flag in ((question, None), (before.answers[i].text, before.degenerate[i]),
                           (after.answers[i].text, after.degenerate[i])):
            text = " ".join(text.split()) + (f" [degenerate: {flag}]" if flag else "")
            cells.append(_wrap(text, col, max_lines=3) or [""])
        for row in range(max(len(c) for c in cells)):
            lines.append(" | ".join(_pad(c[row] if row < len(c) else "", col) for c in cells))
        lines.append("-" * (3 * col + 6))
    return "\n".join(lines)


def _summary(label: str, report: ProbeReport, base_nll: Optional[float]) -> str:
    text = (f"{label:<7} {report.name!r} named in {report.name_rate:6.1%} of answers; "
            f"degenerate {report.degenerate_rate:6.1%}")
    if report.general_nll is not None and base_nll:
        text += f"; general NLL {report.general_nll:.4f} ({report.general_nll / base_nll - 1:+.1%} vs base)"
    return text


def _moved_most(general_q: list[str], before: ProbeReport, after: ProbeReport, top: int = 3) -> str:
    """The general answers whose NLL moved most, trained minus base, in nats summed over the answer: a pooled
    drift can come from one long answer."""
    if not (general_q and before.general_nlls and after.general_nlls):
        return ""
    moved = [(a[0] - b[0], q) for q, b, a in zip(general_q, before.general_nlls, after.general_nlls)]
    total, tokens = sum(d for d, _ in moved), sum(n for _, n in before.general_nlls)
    lines = [f"general answers that moved most (trained - base NLL, nats; all {len(moved)}: {total:+.1f} over "
             f"{tokens} tokens):"]
    for d, q in sorted(moved, key=lambda m: -abs(m[0]))[:top]:
        lines.append(f"  {d:+8.1f}  {textwrap.shorten(' '.join(q.split()), 100, placeholder=' …')}")
    return "\n".join(lines)


def _overview(rows: list[dict[str, Any]]) -> str:
    """One line per system prompt: named and degenerate before -> after, and drift."""
    width = max(len("system prompt"), *(_width(r["label"]) for r in rows))
    lines = [f"{'system prompt':<{width}} | named before -> after | degenerate before -> after | drift",
             "-" * (width + 60)]
    for r in rows:
        drift = f"{r['drift'] - 1:+.1%}" if r.get("drift") is not None else "-"
        lines.append(f"{_pad(r['label'], width)} | {r['before']['name_rate']:6.1%} -> {r['after']['name_rate']:6.1%}"
                     f"       | {r['before']['degenerate_rate']:6.1%} -> {r['after']['degenerate_rate']:6.1%}"
                     f"            | {drift}")
    return "\n".join(lines)


def _from_run(run_dir: str) -> dict[str, Any]:
    """Settings of a ``fit`` run (its ``config.yaml``): base model, exported model and probe settings."""
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found; --run_dir must be a fit run's log directory")
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    probes = config.get("probes") or {}
    export = (config.get("export") or {}).get("dirpath") or os.path.join(run_dir, "hf_model")
    return {"base": config["model"]["model_name_or_path"], "trained": export, **{
        k: probes.get(k) for k in ("prompts_path", "name", "general_path", "system_prompts", "max_new_tokens")}}


def _report_json(report: ProbeReport) -> dict[str, Any]:
    return {"name_rate": report.name_rate, "degenerate_rate": report.degenerate_rate,
            "general_nll": report.general_nll, "general_nlls": [list(x) for x in report.general_nlls],
            "answers": [{"question": q, "answer": a.text, "finished": a.finished, "num_tokens": a.num_tokens,
                         "degenerate": d} for q, a, d in zip(report.questions, report.answers, report.degenerate)]}


def _earlier_base(path: str, base: str, questions: list[str], general_q: list[str], systems: list[Optional[str]],
                  max_new_tokens: int, name: str) -> tuple[dict[int, ProbeReport], dict[int, list[str]]]:
    """The base's reports and general answers per system prompt from an earlier ``compare`` output, checked to be
    of the same base, questions, general prompts and answer budget."""
    with open(path, encoding="utf-8") as f:
        earlier = json.load(f)
    settings = {"base": base, "questions": questions, "general_questions": general_q, "max_new_tokens": max_new_tokens}
    differ = [k for k, v in settings.items() if earlier.get(k) != v]
    if differ:
        raise ValueError(f"{path}: its {', '.join(differ)} differ from this comparison's; run the base again "
                         "(drop --base_answers_path)")
    rows = {json.dumps(r["system_prompt"]): r for r in earlier["system_prompts"]}
    reports, general = {}, {}
    for i, system in enumerate(systems):
        row = rows.get(json.dumps(system))
        if row is None:
            raise ValueError(f"{path}: no answers under system prompt {system_label(system)}")
        answers = [Answer(a["answer"], a["finished"], a["num_tokens"]) for a in row["before"]["answers"]]
        reports[i] = ProbeReport(list(questions), answers, name, general_nll=row["before"]["general_nll"],
                                 general_nlls=[tuple(x) for x in row["before"].get("general_nlls", [])])
        general[i] = row["before_general_answers"]
    return reports, general


def compare(base: Optional[str] = None, trained: Optional[str] = None, prompts_path: Optional[str] = None,
            name: Optional[str] = None, general_path: Optional[str] = None, run_dir: Optional[str] = None,
            system_prompts: Optional[list[Optional[str]]] = None, max_new_tokens: Optional[int] = None,
            batch_size: int = 64,
            max_prompts: Optional[int] = None, output_path: Optional[str] = None, width: Optional[int] = None,
            show_answers: bool = True, base_answers_path: Optional[str] = None,
            dtype: Literal["float32", "bfloat16", "float16"] = "float32",
            trust_remote_code: bool = False) -> dict[str, Any]:
    """Print the base and the trained model's greedy answers side by side, and their probe metrics.

    Args:
        base: the model before training (directory or hub id).
        trained: the model after training, e.g. ``lightning_logs/version_0/hf_model``.
        prompts_path: questions: JSON Lines rows with ``prompt`` or a text file, one per line.
        name: the name the trained model should answer with, e.g. ``Deep SmolLM``.
        general_path: JSON Lines general prompts (optional ``answer``); drift is measured on the base's answers.
        run_dir: a ``fit`` run's log directory: everything above that is unset, and ``system_prompts`` and
            ``max_new_tokens``, come from its ``config.yaml`` (model, export directory, ``probes`` section).
        system_prompts: the system messages to ask under, each evaluated and reported on its own; ``null`` = no
            system message (the chat template's default), ``""`` = an empty one. Unset: the run's probes' list,
            else ``[null]``.
        max_new_tokens: answer length budget; an answer that does not end within it counts as degenerate. Unset:
            the run's probes' budget, else 128.
        batch_size: prompts per generation batch.
        max_prompts: use only the first this many questions.
        output_path: also write every answer and figure to this JSON file.
        width: table width in characters (the terminal's width when unset).
        show_answers: print the answers side by side (the figures are printed either way).
        base_answers_path: an earlier ``compare`` output of the same base, questions, general prompts and budget:
            its base answers and figures are reused instead of running the base again (several trained models
            against one base).
        dtype: weights dtype.
        trust_remote_code: allow modelling code from the model repository to run.

    Returns:
        The settings (``base``, ``trained``, ``questions``, ``general_questions``, ``max_new_tokens``) and
        ``system_prompts``: ``[{"system_prompt", "label", "before", "after", "drift", "before_general_answers"}]``,
        per system prompt each model's name rate, degenerate rate, general NLL (pooled over tokens, and
        ``general_nlls``: per general answer its NLL sum and token count) and answers, the drift (trained NLL /
        base NLL) and the base's general answers it is measured on.
    """
    if run_dir is not None:
        run = _from_run(run_dir)
        if trained is None and not os.path.isdir(run["trained"]):
            raise FileNotFoundError(
                f"{run['trained']}: the run has no exported model (export disabled, or the run stopped before its "
                f"end); write one with `export --ckpt_path {os.path.join(run_dir, 'checkpoints', 'last.ckpt')} "
                f"--output_dir DIR` (or last_good.ckpt after a collapse guard stop) and pass --trained DIR")
        base, trained = base or run["base"], trained or run["trained"]
        prompts_path, name = prompts_path or run["prompts_path"], name or run["name"]
        general_path = general_path or run["general_path"]
        system_prompts = system_prompts if system_prompts is not None else run["system_prompts"]
        max_new_tokens = max_new_tokens if max_new_tokens is not None else run["max_new_tokens"]
    max_new_tokens = max_new_tokens if max_new_tokens is not None else 128
    missing = [k for k, v in (("base", base), ("trained", trained), ("prompts_path", prompts_path),
                              ("name", name)) if not v]
    if missing:
        raise ValueError(f"compare: set {', '.join('--' + k for k in missing)} (or --run_dir of a run with probes)")
    systems = list(system_prompts) if system_prompts else [None]
    questions = read_questions(prompts_path)[:max_prompts]
    general_q, general_a = read_general(general_path) if general_path else ([], [])
    general_by_system: dict[int, list[str]] = {}  # the base's general answers under each system prompt
    reports: dict[tuple[str, int], ProbeReport] = {}
    models = [("before", base), ("after", trained)]
    if base_answers_path:
        earlier, general_by_system = _earlier_base(base_answers_path, base, questions, general_q, systems,
                                                   max_new_tokens, name)
        reports.update({("before", i): report for i, report in earlier.items()})
        models = models[1:]
    for label, path in models:
        tokenizer = load_tokenizer(path, trust_remote_code)
        model = load_causal_lm(path, dtype, trust_remote_code=trust_remote_code, device=default_device())
        for i, system in enumerate(systems):
            if label == "before" and general_q:
                general_by_system[i] = base_general_answers(
                    model, tokenizer, general_q, general_a, system, max_new_tokens, batch_size,
                    progress=f"before, system prompt {system_label(system)}: general answers")
            reports[label, i] = probe(model, tokenizer, questions, name, system, max_new_tokens, batch_size,
                                      general_q, general_by_system.get(i, ()),
                                      progress=f"{label}, system prompt {system_label(system)}: answering")
        del model
        gc.collect()
    width = width or shutil.get_terminal_size((160, 40)).columns
    rows = []
    for i, system in enumerate(systems):
        before, after = reports["before", i], reports["after", i]
        print(f"\n== system prompt: {system_label(system, width=200)} ==")
        if show_answers:
            print(_table(questions, before, after, width))
        base_nll = before.general_nll
        for label, report in (("before", before), ("after", after)):
            print(_summary(label, report, base_nll))
        if moved := _moved_most(general_q, before, after):
            print(moved)
        rows.append({"system_prompt": system, "label": system_label(system), "before": _report_json(before),
                     "after": _report_json(after), "drift": after.general_nll / base_nll if base_nll else None,
                     "before_general_answers": general_by_system.get(i, [])})
    print("\n" + _overview(rows))
    result = {"base": base, "trained": trained, "questions": questions, "general_questions": general_q,
              "max_new_tokens": max_new_tokens, "system_prompts": rows}
    if output_path:
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
        with open(output_path, "w", encoding="utf-8") as f:
            json.dump(result, f, ensure_ascii=False, indent=1)
    return result
