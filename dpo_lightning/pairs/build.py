"""``build-pairs``: preference pairs from a model's own answers, written as JSON Lines the data module reads.

Three strategies (the tutorial's correction and on-policy methods, plus one for models that rarely say their name):

- ``replace``: rejected = the model's greedy answer; chosen = the same answer with names replaced
  (``replacements``). Pairs where nothing was replaced are dropped and counted.
- ``reference``: chosen = the prompt file's ``reference`` answer with ``{name}``-style placeholders filled in;
  rejected = the model's greedy answer.
- ``on_policy``: ``num_samples`` sampled answers per prompt, scored by a reward function; best = chosen,
  worst = rejected; ties dropped.

Each output row is TRL's conversational format with an explicit prompt:
``{"prompt": [messages], "chosen": [assistant], "rejected": [assistant], "question": ..., "strategy": ...}``.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from typing import Any, Literal, Optional, Sequence

from ..atomic import atomic_open
from ..data.reading import read_prompt_rows
from ..eval.generation import chat_messages, generate_answers, render_prompt, system_label
from ..model.loading import default_device, load_causal_lm, load_tokenizer
from .checks import check_outputs, check_sampling
from .scoring import RewardTerm, WeightedReward, pick_pair

Strategy = Literal["replace", "reference", "on_policy"]


def replace_names(text: str, replacements: dict[str, str]) -> str:
    """Replace each old name by its new one in one pass; text that already has the new name is kept as is
    (``SmolLM -> Deep SmolLM`` leaves "Deep SmolLM" alone instead of making "Deep Deep SmolLM")."""
    if not replacements:
        return text
    keys = sorted(set(replacements) | set(replacements.values()), key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(k) for k in keys))
    return pattern.sub(lambda m: replacements.get(m.group(0), m.group(0))
                       if m.group(0) not in replacements.values() else m.group(0), text)


def fill_placeholders(template: str, values: dict[str, str], where: str) -> str:
    """``template`` with ``{key}`` replaced by ``values[key]``; an unknown placeholder is an error. ``{{key}}``
    stays as the literal text ``{key}``; other braces are left alone."""
    def sub(match: re.Match) -> str:
        if match.group(1) is not None:  # escaped
            return "{" + match.group(1) + "}"
        key = match.group(2)
        if key not in values:
            raise ValueError(f"{where}: field 'reference': placeholder {{{key}}} has no value; "
                             f"set it in --placeholders (known: {sorted(values)}), or write {{{{{key}}}}} for the "
                             "text itself")
        return values[key]
    return re.sub(r"\{\{(\w+)\}\}|\{(\w+)\}", sub, template)


def build_pairs(model_name_or_path: str, prompts_paths: list[str], output_paths: list[str],
                strategy: Strategy = "reference", replacements: Optional[dict[str, str]] = None,
                placeholders: Optional[dict[str, str]] = None, system_prompts: Sequence[Optional[str]] = (None,),
                system_prompts_per_question: int = 1, same_system_prompt: bool = True,
                generation_system_prompt: Optional[str] = None,
                max_new_tokens: int = 64, batch_size: int = 16, num_samples: int = 4, temperature: float = 1.0,
                top_p: float = 1.0, reward: str = "dpo_lightning.pairs.rewards.KeywordReward",
                reward_kwargs: Optional[dict[str, Any]] = None, seed: int = 0,
                dtype: Literal["float32", "bfloat16", "float16"] = "float32", trust_remote_code: bool = False,
                anchor_prompts_path: Optional[str] = None, anchor_max_new_tokens: int = 192,
                mark_unfinished: bool = False) -> dict[str, Counter]:
    """Build preference pairs from a model's own answers, by name replacement, reference answer or reward.

    Args:
        model_name_or_path: the model whose answers become rejected (or are scored, for ``on_policy``).
        prompts_paths: JSON Lines files of rows with ``prompt`` (and ``reference`` for that strategy).
        output_paths: one output JSON Lines file per prompts file.
        strategy: ``replace``, ``reference`` or ``on_policy``.
        replacements: old -> new name for ``replace``, e.g. ``{"SmolLM": "Deep SmolLM"}``.
        placeholders: values for ``{placeholders}`` in reference answers, e.g. ``{"name": "Deep SmolLM"}``.
        system_prompts: the system messages pairs are rendered under. Each question (anchors included) takes
            ``system_prompts_per_question`` different ones, drawn by ``seed`` so that each is used about equally
            often; one pair per question and system message. ``null`` = no system message, so the chat template's
            default applies; ``""`` = an empty system message (no instructions, for templates that add a default).
            A varied pool makes the new identity hold whatever system prompt it is later asked under
            (docs/identity.md); the default, one ``null``, trains in the template's context only.
        system_prompts_per_question: how many of ``system_prompts`` each question is rendered under (at most their
            number).
        same_system_prompt: generate each answer under its pair's system message (train in the context you
            generated in).
        generation_system_prompt: the system message for generation when ``same_system_prompt`` is false
            (None = the template's default), as the tutorial does.
        max_new_tokens: answer length budget.
        batch_size: prompts per generation batch.
        num_samples: answers sampled per prompt for ``on_policy``.
        temperature: sampling temperature for ``on_policy``.
        top_p: nucleus sampling threshold for ``on_policy``.
        reward: import path of the reward for ``on_policy``: a class, built with ``reward_kwargs``, a function
            ``f(questions, answers) -> list[float]``, or a verifiable reward checking each answer against its prompt
            row (``pairs/verifiable.py``). Several weighted rewards and rounds: ``iterate``.
        reward_kwargs: constructor arguments of the reward class.
        seed: sampling seed.
        dtype: weights dtype for generation.
        trust_remote_code: allow modelling code from the model repository to run.
        anchor_prompts_path: JSON Lines general (off-topic) prompts, optional ``lang``. Each adds an anchor pair
            to the first output file: chosen = the model's own answer, rejected = the chosen answer of a random
            pair of that file in the same language (e.g. the new identity line). They teach the model to keep
            answering other questions as before rather than with the new identity line (measured: docs/identity.md).
        anchor_max_new_tokens: answer budget for anchor prompts; anchors whose answer does not end within it are
            dropped (a cut answer as chosen would teach stopping mid-sentence).
        mark_unfinished: mark answers that ran out of ``max_new_tokens`` as ``rejected_unfinished`` (with
            ``replace`` also ``chosen_unfinished``), so they train without an end of turn (``data/formats.py``). Off by
            default, as in TRL: in the identity demo it did not make the result hold across more data orders
            (docs/identity.md).
    """
    if len(prompts_paths) != len(output_paths):
        raise ValueError(f"--prompts_paths has {len(prompts_paths)} files but --output_paths has {len(output_paths)}")
    check_sampling(max_new_tokens=max_new_tokens, batch_size=batch_size, anchor_max_new_tokens=anchor_max_new_tokens,
                   system_prompts_per_question=system_prompts_per_question,
                   **({"num_samples": num_samples, "temperature": temperature, "top_p": top_p}
                      if strategy == "on_policy" else {}))
    if replacements and "" in replacements:
        raise ValueError("--replacements has an empty name to replace: it would insert the replacement between every "
                         "two characters")
    check_outputs(output_paths, [*prompts_paths, *([anchor_prompts_path] if anchor_prompts_path else [])])
    if strategy == "replace" and not replacements:
        raise ValueError("strategy 'replace' needs --replacements, e.g. '{\"SmolLM\": \"Deep SmolLM\"}'")
    if same_system_prompt and generation_system_prompt is not None:
        raise ValueError("--generation_system_prompt is set but --same_system_prompt is true; set it to false "
                         "to generate under a different system prompt than the pairs use")
    pool = list(system_prompts)
    if not pool:
        raise ValueError("--system_prompts is empty; use [null] for the chat template's default")
    if not 1 <= system_prompts_per_question <= len(pool):
        raise ValueError(f"--system_prompts_per_question must be between 1 and the {len(pool)} system prompts, "
                         f"not {system_prompts_per_question}")
    scorer = WeightedReward([RewardTerm(reward, reward_kwargs)]) if strategy == "on_policy" else None
    all_rows = [read_prompt_rows(p) for p in prompts_paths]  # every input is checked before the model loads
    if scorer is not None:
        scorer.validate([row for rows in all_rows for row in rows])
    anchor_rows = read_prompt_rows(anchor_prompts_path) if anchor_prompts_path else []
    references: dict[str, str] = {}  # filled reference answer by row location
    if strategy == "reference":
        for rows in all_rows:
            for where, row in rows:
                if not isinstance(row.get("reference"), str):
                    raise ValueError(f"{where}: field 'reference': strategy 'reference' needs a reference answer")
                references[where] = fill_placeholders(row["reference"], placeholders or {}, where)
    tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
    model = load_causal_lm(model_name_or_path, dtype, trust_remote_code=trust_remote_code, device=default_device())
    counts: dict[str, Counter] = {}

    def rendered(items: list[tuple[str, dict, Optional[str]]]) -> list[str]:
        """The prompt each (where, row, system message) item is answered under."""
        return [render_prompt(tokenizer, chat_messages(row["prompt"], system if same_system_prompt
                                                       else generation_system_prompt)) for _, row, system in items]

    rng = random.Random(seed)
    deck = SystemPromptDeck(pool, system_prompts_per_question, random.Random(seed))  # its own stream: the
    # anchors' draws stay the same whatever the pool

    def expand(rows: list[tuple[str, dict]]) -> list[tuple[str, dict, Optional[str]]]:
        """One (where, row, system message) item per pair: each row under its drawn system messages."""
        return [(where, row, system) for where, row in rows for system in deck.draw()]

    identity_lines: list[tuple[Optional[str], str, bool]] = []  # (lang, chosen, unfinished): first file's kept pairs
    for index, (path, rows, out_path) in enumerate(zip(prompts_paths, all_rows, output_paths)):
        items = expand(rows)  # (where, row, system message) per pair
        sampled = strategy == "on_policy"
        answers = generate_answers(model, tokenizer, rendered(items),
                                   max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   num_return_sequences=num_samples if sampled else 1, do_sample=sampled,
                                   temperature=temperature, top_p=top_p, seed=seed,
                                   progress=f"answering {os.path.basename(path)}")
        scored = scorer.score([(where, row) for where, row, _ in items], answers) if sampled else [None] * len(items)
        counter: Counter = Counter()
        by_system: Counter = Counter()  # kept pairs per system message
        out_rows = []
        for (where, row, system), candidates, samples in zip(items, answers, scored):
            question, texts = row["prompt"], [a.text for a in candidates]
            cut = [mark_unfinished and not a.finished for a in candidates]  # ran out of budget: no end of turn
            if strategy == "replace":
                rejected, chosen = texts[0], replace_names(texts[0], replacements or {})
                rejected_cut = chosen_cut = cut[0]
            elif strategy == "reference":
                rejected, chosen = texts[0], references[where]
                rejected_cut, chosen_cut = cut[0], False
            else:
                pair, why = pick_pair(samples)
                if pair is None:
                    counter[why] += 1
                    continue
                chosen, rejected = pair[0].answer.text, pair[1].answer.text
                chosen_cut, rejected_cut = [mark_unfinished and not s.answer.finished for s in pair]
            drop = _drop_reason(chosen, rejected, answer=rejected, strategy=strategy)
            if drop:
                counter[drop] += 1
                continue
            out_rows.append(pair_row(question, system, chosen, rejected, strategy, chosen_cut, rejected_cut,
                                     plain_prompt(tokenizer, question, system)))
            counter["kept"] += 1
            by_system[system] += 1
            identity_lines.append((row.get("lang"), chosen, chosen_cut))
        # anchors go to the first output, after its identity pairs
        anchors = expand(anchor_rows) if index == 0 else []
        anchor_answers = generate_answers(model, tokenizer, rendered(anchors),
                                          max_new_tokens=anchor_max_new_tokens, batch_size=batch_size,
                                          progress="answering anchor prompts") if anchors else []
        # keep the model's own answer over an identity line
        for (where, row, system), candidates in zip(anchors, anchor_answers):
            lines = [(c, cut) for lang, c, cut in identity_lines if lang == row.get("lang")] or \
                [(c, cut) for _, c, cut in identity_lines]
            if not lines:
                counter["dropped: anchor with no kept pair to take a rejected answer from"] += 1
                continue
            (rejected, rejected_cut), chosen = rng.choice(lines), candidates[0].text
            drop = _drop_reason(chosen, rejected, answer=chosen, strategy="anchor", finished=candidates[0].finished)
            if drop:
                counter[drop] += 1
                continue
            out_rows.append(pair_row(row["prompt"], system, chosen, rejected, "anchor",
                                     rejected_unfinished=rejected_cut,
                                     prompt_text=plain_prompt(tokenizer, row["prompt"], system)))
            counter["kept (anchor)"] += 1
            by_system[system] += 1
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counter.items()))
        if not out_rows:  # an empty file would replace whatever pairs out_path holds
            raise ValueError(f"{path}: no pair kept ({summary or 'no prompts'}); {out_path} is left as it was")
        with atomic_open(out_path, encoding="utf-8") as f:  # a half-written file never replaces a good one
            for r in out_rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"[dpo_lightning] {out_path}: {len(items) + len(anchors)} prompts -> {summary or 'nothing'}")
        if len(pool) > 1:
            print("[dpo_lightning]   kept pairs per system prompt: " + "; ".join(
                f"{by_system[sp]} {system_label(sp)}" for sp in dict.fromkeys(pool)))
        counts[out_path] = counter
    return counts


class SystemPromptDeck:
    """Draws ``k`` different system messages at a time from ``pool``, each used about equally often: the draws
    walk through shuffled copies of the pool, reshuffled when a copy runs out (reproducible from ``rng``)."""

    def __init__(self, pool: Sequence[Optional[str]], k: int, rng: random.Random) -> None:
        self.pool, self.k, self.rng = list(pool), k, rng
        self.stack: list[int] = []

    def draw(self) -> list[Optional[str]]:
        picked: list[int] = []
        while len(picked) < self.k:
            # the top of the current copy, skipping what this draw already holds; a fresh copy goes underneath
            fresh = [i for i in self.stack if i not in picked]
            if not fresh:
                self.stack = self.rng.sample(range(len(self.pool)), len(self.pool)) + self.stack
                continue
            self.stack.remove(fresh[-1])
            picked.append(fresh[-1])
        return [self.pool[i] for i in picked]


def _drop_reason(chosen: str, rejected: str, answer: str, strategy: str, finished: bool = True) -> Optional[str]:
    """Why a pair is not kept (``answer`` is the model's own answer in it), or None. ``finished``: an anchor's
    answer ended within its budget (a cut answer as chosen would teach stopping mid-sentence)."""
    if not answer.strip():
        return "dropped: empty model answer"
    if not finished:
        return "dropped: anchor answer did not end within anchor_max_new_tokens"
    if chosen == rejected:
        return "dropped: chosen identical to rejected" + (" (no name to replace)" if strategy == "replace" else "")
    return None


def plain_prompt(tokenizer: Any, question: str, system_prompt: Optional[str]) -> Optional[str]:
    """The prompt as text for a tokenizer without a chat template (pairs then train in the plain layout on this
    text, under ``system_prompt``); None when the tokenizer has a template (pairs stay conversational)."""
    return render_prompt(tokenizer, chat_messages(question, system_prompt)) if tokenizer.chat_template is None \
        else None


def pair_row(question: str, system_prompt: Optional[str], chosen: str, rejected: str, kind: str,
             chosen_unfinished: bool = False, rejected_unfinished: bool = False,
             prompt_text: Optional[str] = None) -> dict:
    """One output row: conversational, or plain text with ``prompt_text`` as its prompt (a model without a chat
    template, whose prompts were answered as that text). An answer cut off by its budget is marked
    ``*_unfinished`` (``data/formats.py``): it trains without an end of turn, so the DPO term does not push down
    ending mid-sentence, and an NLL term on a cut chosen does not teach it."""
    if prompt_text is None:
        row = {"prompt": chat_messages(question, system_prompt), "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}]}
    else:
        row = {"prompt": prompt_text, "chosen": chosen, "rejected": rejected}
    row.update({"question": question, "strategy": kind})
    if chosen_unfinished:
        row["chosen_unfinished"] = True
    if rejected_unfinished:
        row["rejected_unfinished"] = True
    return row
