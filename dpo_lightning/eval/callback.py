"""``GenerationProbes``: at the end of each validation, answer probe questions greedily and log what they show."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Optional, Sequence

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from ..model.fsdp import is_fsdp
from .generation import chat_messages, render_prompt, system_label
from .probes import ProbeReport, answer_nll, base_general_answers, probe, read_general, read_questions


def worst(per_system: list[dict[str, float]]) -> dict[str, float]:
    """The worst figure over several system prompts: the lowest name rate, the highest degenerate rate and drift."""
    keys = [k for k in per_system[0] if k != "val/probes/general_nll"]
    pick = {"val/probes/name_rate": min}
    return {k: pick.get(k, max)(figures[k] for figures in per_system) for k in keys}


class GenerationProbes(Callback):
    """Log ``val/probes/{name_rate,degenerate_rate,drift}`` and the answers (TensorBoard text) after validation.

    With several system prompts each is probed on its own and logged under ``val/probes/system_<i>/`` (``i`` its
    place in the list); the top-level figures are then the worst over them: the lowest name rate, the highest
    degenerate rate and drift.

    ``drift`` is the policy's per-token NLL on the general answers divided by the base's, measured once: the
    reference model (held, the LoRA policy with its adapters off, or loaded from its path for that one pass; a
    fresh fit measures its policy before the first step instead, which has the reference's weights). General
    answers missing from the file are the base's own greedy answers. Runs on global rank 0 only (DDP; not for
    sharded strategies).

    Args:
        prompts_path: probe questions: JSON Lines rows with ``prompt``, or a text file with one per line;
            the probes are off when unset.
        name: the name answers should contain, e.g. ``Deep SmolLM``.
        general_path: JSON Lines general (non-identity) prompts, optional ``answer``; no drift when unset.
        system_prompts: system messages to ask the questions under; ``null`` = none (the chat template's
            default), ``""`` = an empty one.
        max_new_tokens: answer budget; an answer that does not end within it counts as degenerate.
        batch_size: prompts per generation batch.
        max_prompts: use only the first this many questions.
        log_answers: also log every question and answer as TensorBoard text.
    """

    def __init__(self, prompts_path: Optional[str] = None, name: str = "", general_path: Optional[str] = None,
                 system_prompts: Sequence[Optional[str]] = (None,), max_new_tokens: int = 128, batch_size: int = 64,
                 max_prompts: Optional[int] = None, log_answers: bool = True) -> None:
        if prompts_path and not name:
            raise ValueError("probes.name is required when probes.prompts_path is set")
        self.prompts_path, self.name, self.general_path = prompts_path, name, general_path
        if not system_prompts:
            raise ValueError("probes.system_prompts is empty; use [null] for the chat template's default")
        self.system_prompts = list(system_prompts)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.max_prompts, self.log_answers = max_prompts, log_answers
        self.questions: list[str] = []
        self.general_questions: list[str] = []
        self.general_answers: list[list[str]] = []  # the base's answers under each system prompt
        self.base_nll: list[Optional[float]] = []  # per system prompt
        self.last_reports: list[ProbeReport] = []  # per system prompt

    @property
    def enabled(self) -> bool:
        return bool(self.prompts_path)

    def _prepare(self, trainer: Trainer, pl_module: LightningModule, base: AbstractContextManager) -> None:
        """Read the questions and measure the base (the model that ``base`` yields) on the general answers, once."""
        if self.questions or not self.enabled:
            return
        self.questions = read_questions(self.prompts_path)[:self.max_prompts]
        self.base_nll = [None] * len(self.system_prompts)
        self.general_answers = [[] for _ in self.system_prompts]
        if self.general_path:
            tokenizer = trainer.datamodule.load_tokenizer()
            questions, answers = read_general(self.general_path)
            with base as model:
                for i, system in enumerate(self.system_prompts):
                    self.general_answers[i] = base_general_answers(model, tokenizer, questions, answers, system,
                                                                   self.max_new_tokens, self.batch_size)
                    self.base_nll[i] = answer_nll(model, tokenizer, questions, self.general_answers[i], system)
            self.general_questions = questions

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.enabled and is_fsdp(trainer):
            raise ValueError("probes: generation probes run on global rank 0 and need the whole model, which FSDP "
                             "shards; set probes.prompts_path to null and run `compare` on the exported model")
        if self.enabled and trainer.datamodule is not None:  # a refused system prompt fails now, not after training
            tokenizer = trainer.datamodule.load_tokenizer()
            for i, system in enumerate(self.system_prompts):
                try:
                    render_prompt(tokenizer, chat_messages("?", system))
                except ValueError as error:
                    raise ValueError(f"probes.system_prompts[{i}] ({system_label(system)}): {error}") from None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Before its first step the policy is the base (when it starts from the reference's weights): measure it
        # now rather than load the reference at the first validation. Not when the fit runs no validation (the
        # probes would not run) or resumes from a checkpoint (the policy is trained).
        reference = pl_module.reference
        fresh = trainer.ckpt_path is None and reference.path == reference.policy_path
        if trainer.is_global_zero and reference.model is None and fresh and trainer.limit_val_batches != 0:
            self._prepare(trainer, pl_module, nullcontext(pl_module.policy))

    @staticmethod
    def _figures(report: ProbeReport, base_nll: Optional[float]) -> dict[str, float]:
        values = {"val/probes/name_rate": report.name_rate, "val/probes/degenerate_rate": report.degenerate_rate}
        if report.general_nll is not None and base_nll:
            values["val/probes/general_nll"] = report.general_nll
            values["val/probes/drift"] = report.general_nll / base_nll
        return values

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        values = {}
        if trainer.is_global_zero:
            self._prepare(trainer, pl_module, pl_module.reference.open())
            tokenizer = trainer.datamodule.load_tokenizer()
            self.last_reports = [probe(pl_module.policy, tokenizer, self.questions, self.name, system,
                                       self.max_new_tokens, self.batch_size, self.general_questions,
                                       self.general_answers[i]) for i, system in enumerate(self.system_prompts)]
            per_system = [self._figures(report, base_nll) for report, base_nll in zip(self.last_reports,
                                                                                       self.base_nll)]
            values = dict(per_system[0]) if len(per_system) == 1 else worst(per_system)
            if len(per_system) > 1:
                values.update({f"val/probes/system_{i}/{k.split('/')[-1]}": v
                               for i, figures in enumerate(per_system) for k, v in figures.items()})
            for key, value in values.items():
                pl_module.log(key, value, rank_zero_only=True)
            rank_zero_info("[dpo_lightning] probes at step {}: {}".format(
                trainer.global_step, ", ".join(f"{k.removeprefix('val/probes/')} {v:.4f}" for k, v in values.items())))
            if self.log_answers and isinstance(trainer.logger, TensorBoardLogger):
                rows = ["| system prompt | question | answer | degenerate |", "|---|---|---|---|"] + [
                    f"| {system_label(system)} | {q} | {' '.join(a.text.split()).replace('|', '/')} | {d or ''} |"
                    for system, report in zip(self.system_prompts, self.last_reports)
                    for q, a, d in zip(report.questions, report.answers, report.degenerate)]
                trainer.logger.experiment.add_text("val/probes/answers", "\n".join(rows), trainer.global_step)
        trainer.strategy.barrier("generation_probes")
