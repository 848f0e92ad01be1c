"""``iterate``: on-policy DPO in rounds, the tutorial's second method repeated, as iterative DPO does.

Each round: sample ``num_samples`` answers per prompt from the current policy, score them with the weighted rewards
(``scoring.py``), keep the best and the worst of each prompt as a pair, train on the pairs with the ``fit`` command
(its sections come from the same YAML), export, and evaluate greedy answers to held-out prompts with the same
rewards. Round ``r + 1`` samples from round ``r``'s export.

Everything lands in ``output_dir``::

    iterate.json            the settings (a rerun with other settings is refused)
    rounds.json, rounds.png the round-by-round record and its plot; record/ holds it for TensorBoard
    round_0/round.json      the initial model's held-out evaluation
    round_<r>/samples.jsonl the scored samples          pairs.jsonl   the pairs
              fit.yaml      the round's fit config      checkpoints/, TensorBoard events, hf_model/ (the export)
              eval.jsonl    held-out answers            round.json    the round's record
              train_pairs.jsonl  with ``train_pairs: accumulated``, the pairs of this round and every earlier one

A killed run resumes when the same command runs again: finished rounds and a round's samples and pairs are reused,
and a fit resumes from its last checkpoint (set ``checkpoint.every_n_train_steps`` in the fit sections to keep one
mid-epoch). Samples are drawn with seed ``seed + round``, so a rerun draws the same answers.

With LoRA, each round's export merges its adapters, and the next round trains fresh adapters on the merged model
(``model.lora.lora_export: adapter`` is refused).
"""

from __future__ import annotations

import gc
import glob
import inspect
import json
import os
import random
import shutil
import tempfile
import time
from typing import Any, Literal, Optional, Sequence, Union

from ..atomic import atomic_open
from ..data.reading import read_prompt_files, read_prompt_rows
from ..eval.generation import chat_messages, generate_answers, render_prompt
from ..eval.probes import degeneracy
from ..model.loading import default_device, load_causal_lm, load_tokenizer
from .build import SystemPromptDeck
from .checks import check_sampling
from .round_fit import check_fit_config, fit_sections, run_fit, write_fit_config
from .round_pairs import accumulate_pairs, write_pairs
from .rounds import print_round, read_json, write_record
from .scoring import RewardTerm, WeightedReward


def iterate(fit: Union[str, dict], prompts_path: Union[str, list[str]], rewards: list[RewardTerm], rounds: int = 2,
            output_dir: str = "lightning_logs/iterate", reference: Literal["initial", "previous"] = "initial",
            train_pairs: Literal["round", "accumulated"] = "round",
            prompts_per_round: Optional[int] = None, num_samples: int = 4, temperature: float = 1.0,
            top_p: float = 1.0, greedy_sample: bool = False, max_new_tokens: int = 128, batch_size: int = 16,
            system_prompts: Sequence[Optional[str]] = (None,), length_penalty: float = 0.0, min_reward_gap: float = 0.0,
            mark_unfinished: bool = False, eval_prompts_path: Optional[str] = None,
            eval_system_prompt: Optional[str] = None, seed: int = 0,
            dtype: Literal["float32", "bfloat16", "float16"] = "float32",
            initial_model: Optional[str] = None) -> list[dict[str, Any]]:
    """Iterative on-policy DPO: rounds of sample, score, pair, fit, export, evaluate.

    Args:
        fit: the ``fit`` sections (``model``, ``data``, ``trainer``, ``probes``, ...) as in a ``fit --config`` file,
            or the path of such a file. ``model.model_name_or_path`` is the initial policy; ``iterate`` sets each
            round's policy, reference, training pairs, log directory, checkpoints and export.
        prompts_path: JSON Lines prompt rows (``prompt``, plus the fields verifiable rewards read, e.g. ``answer``),
            or a list of such files, read as one (e.g. identity questions and general ones).
        rewards: the weighted reward terms summed into each answer's score.
        rounds: how many rounds (raising it and rerunning continues a finished run; lowering it keeps the
            later rounds in the record).
        output_dir: where the rounds, their models and the record are written.
        reference: ``initial``: the initial model is every round's reference; ``previous``: the policy the round
            starts from (iterative DPO's choice).
        train_pairs: ``round``: each round trains on the pairs it sampled; ``accumulated``: on those and the pairs
            of every earlier round (sampled from the earlier policies), so round ``r`` trains on all ``r`` rounds'
            pairs.
        prompts_per_round: prompts sampled per round, taken in turn from the shuffled prompt file (all prompts
            every round when unset).
        num_samples: answers sampled per prompt (at least 2).
        temperature: sampling temperature.
        top_p: nucleus sampling threshold.
        greedy_sample: add the policy's greedy answer to each prompt's ``num_samples`` samples (last in the group,
            marked ``"greedy": true`` in ``samples.jsonl``). The probes and ``compare`` decode greedily; a loop or
            a missing name that shows only in the greedy answer is otherwise never rejected.
        max_new_tokens: answer length budget for sampling and evaluation.
        batch_size: prompts per generation batch.
        system_prompts: system messages the prompts are asked under, one drawn per prompt and round so each is used
            about equally often (``null`` = the chat template's default).
        length_penalty: subtracted from an answer's reward per token.
        min_reward_gap: a prompt gives a pair only when its best and worst rewards differ by more than this.
        mark_unfinished: train answers that ran out of ``max_new_tokens`` without an end of turn (as build-pairs).
        eval_prompts_path: held-out prompt rows (never sampled for training) answered greedily after each round and
            scored with the same rewards; round 0 is the initial model.
        eval_system_prompt: the system message of the held-out evaluation.
        seed: seed of the prompt order, the system-prompt draws and the samples (``seed + round``).
        dtype: weights dtype for sampling and evaluation.
        initial_model: the initial policy (e.g. an earlier ``fit``'s ``hf_model`` export), in place of the fit
            section's ``model.model_name_or_path``.
    """
    fit_config = fit_sections(fit, initial_model)
    initial = fit_config["model"]["model_name_or_path"]
    trust = bool(fit_config["model"].get("trust_remote_code", False))
    check_sampling(rounds=rounds, num_samples=num_samples, temperature=temperature, top_p=top_p,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, prompts_per_round=prompts_per_round)
    if not list(system_prompts):
        raise ValueError("--system_prompts is empty; use [null] for the chat template's default")
    scorer = WeightedReward(rewards, length_penalty)
    paths, rows = read_prompt_files(prompts_path)
    scorer.validate(rows)
    eval_rows = read_prompt_rows(eval_prompts_path) if eval_prompts_path else []
    scorer.validate(eval_rows)
    shared = {r["prompt"].strip() for _, r in rows} & {r["prompt"].strip() for _, r in eval_rows}
    if shared:
        raise ValueError(f"{eval_prompts_path}: {len(shared)} prompts are also in {', '.join(paths)} (e.g. "
                         f"{sorted(shared)[0]!r}); held-out prompts must never be sampled for training")
    settings = {k: v for k, v in locals().items() if k in SETTINGS}
    settings["fit"], settings["rewards"] = fit_config, [vars(term) for term in rewards]
    if not os.path.exists(os.path.join(output_dir, "round_1", "fit_done.json")):
        with tempfile.TemporaryDirectory() as scratch:  # a bad fit section fails before the folder is claimed
            check_fit_config(write_fit_config(fit_config, scratch, initial, initial), shown="the fit section")
    _claim(output_dir, settings)

    order = random.Random(seed).sample(range(len(rows)), len(rows))
    per_round = prompts_per_round or len(rows)
    records = [_round_zero(output_dir, initial, eval_rows, scorer, max_new_tokens, batch_size, eval_system_prompt,
                           dtype, trust)]
    write_record(output_dir, records)
    for r in range(1, rounds + 1):
        round_dir = os.path.join(output_dir, f"round_{r}")
        record = read_json(os.path.join(round_dir, "round.json"))
        if record is None:
            started = time.time()
            policy = initial if r == 1 else os.path.join(output_dir, f"round_{r - 1}", "hf_model")
            ref = initial if reference == "initial" else policy
            os.makedirs(round_dir, exist_ok=True)
            train_file = "train_pairs.jsonl" if train_pairs == "accumulated" else "pairs.jsonl"
            fit_path = write_fit_config(fit_config, round_dir, policy, ref, train_file)
            start = (r - 1) * per_round  # the next prompts of the seeded order, wrapping around
            picked = [rows[order[(start + k) % len(rows)]] for k in range(min(per_round, len(rows)))]
            samples, sample_stats = _samples(round_dir, r, policy, picked, scorer, system_prompts, seed, num_samples,
                                             temperature, top_p, greedy_sample, max_new_tokens, batch_size, dtype,
                                             trust)
            counts = write_pairs(round_dir, samples, min_reward_gap, mark_unfinished, load_tokenizer(policy, trust))
            trained = accumulate_pairs(output_dir, r) if train_pairs == "accumulated" else counts["kept"]
            metrics = run_fit(round_dir, fit_path, r)
            export = os.path.join(round_dir, "hf_model")
            record = {"round": r, "policy": policy, "reference": ref, "export": export, "samples": sample_stats,
                      "prompts": len(picked), "pairs": counts["kept"], "train_pairs": trained,
                      "usable_share": counts["kept"] / max(1, len(picked)),
                      "dropped": {k: v for k, v in counts.items() if k.startswith("dropped")},
                      **({"greedy": {k: counts[k] for k in ("greedy_chosen", "greedy_rejected")}}
                         if greedy_sample else {}),
                      "fit": metrics,
                      "eval": _evaluate(round_dir, export, eval_rows, scorer, max_new_tokens, batch_size,
                                        eval_system_prompt, dtype, trust),
                      "seconds": round(time.time() - started, 1)}
            with atomic_open(os.path.join(round_dir, "round.json"), encoding="utf-8") as f:
                json.dump(record, f, indent=2, ensure_ascii=False)
        records.append(record)
        write_record(output_dir, records)
        print_round(record)
    later = rounds + 1  # rounds an earlier, longer run finished stay in the record
    while (record := read_json(os.path.join(output_dir, f"round_{later}", "round.json"))) is not None:
        records.append(record)
        later += 1
    if len(records) > rounds + 1:
        write_record(output_dir, records)
        kept = f"round {rounds + 1}" if later == rounds + 2 else f"rounds {rounds + 1}-{later - 1}"
        print(f"[dpo_lightning] {output_dir}: its record keeps {kept} of an earlier run", flush=True)
    return records


# what a resumed run must share (the batch size too: it decides which random numbers each sampled answer draws)
SETTINGS = ("fit", "prompts_path", "reference", "train_pairs", "prompts_per_round", "num_samples", "temperature",
            "top_p", "greedy_sample", "max_new_tokens", "batch_size", "system_prompts", "length_penalty",
            "min_reward_gap", "mark_unfinished", "eval_prompts_path", "eval_system_prompt", "seed", "dtype")


def _defaults() -> dict[str, Any]:
    """The ``SETTINGS`` that have a default in ``iterate``'s signature, at that default."""
    parameters = inspect.signature(iterate).parameters
    return {k: parameters[k].default for k in SETTINGS if parameters[k].default is not inspect.Parameter.empty}


def _claim(output_dir: str, settings: dict[str, Any]) -> None:
    """Record the settings in ``output_dir``; refuse a directory that holds a run with other settings."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "iterate.json")
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they read back
    earlier = read_json(path)
    if earlier is not None:  # a setting the file lacks (it predates the setting) ran at the setting's default
        earlier = {**json.loads(json.dumps(_defaults())), **earlier}
    if earlier is not None and earlier != settings:
        changed = sorted(k for k in set(earlier) | set(settings) if earlier.get(k) != settings.get(k))
        rounds = [d for d in glob.glob(os.path.join(glob.escape(output_dir), "round_*")) if os.path.isdir(d)]
        if any(os.path.exists(os.path.join(d, "pairs.jsonl")) for d in rounds):
            raise ValueError(f"{output_dir} holds a run with other settings ({', '.join(changed)}); use another "
                             "--output_dir or remove it")
        # no round got as far as its pairs (e.g. none gave one): only samples to lose, so the command starts over
        for stale in rounds:
            shutil.rmtree(stale)
        print(f"[dpo_lightning] {output_dir}: its run made no pairs; starting over with the changed settings "
              f"({', '.join(changed)})", flush=True)
    with atomic_open(path, encoding="utf-8") as f:
        json.dump(settings, f, indent=2, ensure_ascii=False)


def _load(path: str, dtype: str, trust: bool) -> tuple[Any, Any]:
    return load_tokenizer(path, trust), load_causal_lm(path, dtype, trust_remote_code=trust, device=default_device())


def _samples(round_dir: str, r: int, policy: str, picked: list[tuple[str, dict]], scorer: WeightedReward,
             system_prompts: Sequence[Optional[str]], seed: int, num_samples: int, temperature: float, top_p: float,
             greedy: bool, max_new_tokens: int, batch_size: int, dtype: str,
             trust: bool) -> tuple[list[dict], dict[str, Any]]:
    """The round's scored samples (with ``greedy``, the greedy answer last in each group): read back when a run
    already wrote them, else sampled from ``policy``."""
    path = os.path.join(round_dir, "samples.jsonl")
    if not os.path.exists(path):
        tokenizer, model = _load(policy, dtype, trust)
        deck = SystemPromptDeck(list(system_prompts), 1, random.Random(seed * 1000 + r))
        systems = [deck.draw()[0] for _ in picked]
        prompts = [render_prompt(tokenizer, chat_messages(row["prompt"], system))
                   for (_, row), system in zip(picked, systems)]
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   num_return_sequences=num_samples, do_sample=True, temperature=temperature,
                                   top_p=top_p, seed=seed + r, progress=f"round {r}: sampling from {policy}")
        if greedy:
            greedy_answers = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                              batch_size=batch_size, progress=f"round {r}: greedy answers")
            answers = [group + extra for group, extra in zip(answers, greedy_answers)]
        del model
        gc.collect()
        scored = scorer.score(picked, answers)
        with atomic_open(path, encoding="utf-8") as f:
            for (where, row), system, group in zip(picked, systems, scored):
                f.write(json.dumps({"where": where, "prompt": row["prompt"], "system": system, "answers": [
                    {"text": s.answer.text, "finished": s.answer.finished, "num_tokens": s.answer.num_tokens,
                     "reward": s.reward, "terms": s.terms, **({"greedy": True} if k == num_samples else {})}
                    for k, s in enumerate(group)]}, ensure_ascii=False) + "\n")
    with open(path, encoding="utf-8") as f:
        samples = [json.loads(line) for line in f]
    rewards = [a["reward"] for s in samples for a in s["answers"]]
    terms = [a["terms"] for s in samples for a in s["answers"]]
    stats = {"answers": len(rewards), "reward_mean": sum(rewards) / len(rewards), "reward_min": min(rewards),
             "reward_max": max(rewards), "terms": {k: sum(t[k] for t in terms) / len(terms) for k in terms[0]}}
    return samples, stats


def _evaluate(round_dir: str, model_path: str, rows: list[tuple[str, dict]], scorer: WeightedReward,
              max_new_tokens: int, batch_size: int, system_prompt: Optional[str], dtype: str,
              trust: bool) -> dict[str, float]:
    """Greedy answers of ``model_path`` to the held-out rows, scored with the rewards (``eval.jsonl``)."""
    if not rows:
        return {}
    tokenizer, model = _load(model_path, dtype, trust)
    prompts = [render_prompt(tokenizer, chat_messages(row["prompt"], system_prompt)) for _, row in rows]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               progress=f"evaluating {model_path}")
    del model
    gc.collect()
    scored = [group[0] for group in scorer.score(rows, answers)]
    with atomic_open(os.path.join(round_dir, "eval.jsonl"), encoding="utf-8") as f:
        for (where, row), s in zip(rows, scored):
            f.write(json.dumps({"where": where, "prompt": row["prompt"], "answer": s.answer.text,
                                "finished": s.answer.finished, "reward": s.reward, "terms": s.terms},
                               ensure_ascii=False) + "\n")
    n = len(scored)
    result = {"reward_mean": sum(s.reward for s in scored) / n,
              "degenerate_rate": sum(degeneracy(s.answer.text, s.answer.finished) is not None for s in scored) / n}
    for name in scored[0].terms:
        result[f"{name}_mean"] = sum(s.terms[name] for s in scored) / n
    return result


def _round_zero(output_dir: str, initial: str, eval_rows: list[tuple[str, dict]], scorer: WeightedReward,
                max_new_tokens: int, batch_size: int, system_prompt: Optional[str], dtype: str,
                trust: bool) -> dict[str, Any]:
    round_dir = os.path.join(output_dir, "round_0")
    record = read_json(os.path.join(round_dir, "round.json"))
    if record is None:
        os.makedirs(round_dir, exist_ok=True)
        record = {"round": 0, "policy": initial, "eval": _evaluate(round_dir, initial, eval_rows, scorer,
                                                                   max_new_tokens, batch_size, system_prompt,
                                                                   dtype, trust)}
        with atomic_open(os.path.join(round_dir, "round.json"), encoding="utf-8") as f:
            json.dump(record, f, indent=2, ensure_ascii=False)
    print_round(record)
    return record

