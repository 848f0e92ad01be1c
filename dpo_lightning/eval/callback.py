"""``GenerationProbes``: at the end of each validation, answer probe questions greedily and log what they show."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from ..model.fsdp import is_fsdp
from .probes import ProbeReport, answer_nll, base_general_answers, probe, read_general, read_questions


class GenerationProbes(Callback):
    """Log ``val/probes/{name_rate,degenerate_rate,drift}`` and the answers (TensorBoard text) after validation.

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
        system_prompt: system message for the questions; None = the chat template's default.
        max_new_tokens: answer budget; an answer that does not end within it counts as degenerate.
        batch_size: prompts per generation batch.
        max_prompts: use only the first this many questions.
        log_answers: also log every question and answer as TensorBoard text.
    """

    def __init__(self, prompts_path: Optional[str] = None, name: str = "", general_path: Optional[str] = None,
                 system_prompt: Optional[str] = None, max_new_tokens: int = 128, batch_size: int = 64,
                 max_prompts: Optional[int] = None, log_answers: bool = True) -> None:
        if prompts_path and not name:
            raise ValueError("probes.name is required when probes.prompts_path is set")
        self.prompts_path, self.name, self.general_path = prompts_path, name, general_path
        self.system_prompt, self.max_new_tokens, self.batch_size = system_prompt, max_new_tokens, batch_size
        self.max_prompts, self.log_answers = max_prompts, log_answers
        self.questions: list[str] = []
        self.general: tuple[list[str], list[str]] = ([], [])
        self.base_nll: Optional[float] = None
        self.last_report: Optional[ProbeReport] = None

    @property
    def enabled(self) -> bool:
        return bool(self.prompts_path)

    def _prepare(self, trainer: Trainer, pl_module: LightningModule, base: AbstractContextManager) -> None:
        """Read the questions and measure the base (the model that ``base`` yields) on the general answers, once."""
        if self.questions or not self.enabled:
            return
        self.questions = read_questions(self.prompts_path)[:self.max_prompts]
        if self.general_path:
            tokenizer = trainer.datamodule.tokenizer
            questions, answers = read_general(self.general_path)
            with base as model:
                answers = base_general_answers(model, tokenizer, questions, answers, self.system_prompt,
                                               self.max_new_tokens, self.batch_size)
                self.base_nll = answer_nll(model, tokenizer, questions, answers, self.system_prompt)
            self.general = (questions, answers)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.enabled and is_fsdp(trainer):
            raise ValueError("probes: generation probes run on global rank 0 and need the whole model, which FSDP "
                             "shards; set probes.prompts_path to null and run `compare` on the exported model")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Before its first step the policy is the base (when it starts from the reference's weights): measure it
        # now rather than load the reference at the first validation. Not when the fit runs no validation (the
        # probes would not run) or resumes from a checkpoint (the policy is trained).
        reference = pl_module.reference
        fresh = trainer.ckpt_path is None and reference.path == reference.policy_path
        if trainer.is_global_zero and reference.model is None and fresh and trainer.limit_val_batches != 0:
            self._prepare(trainer, pl_module, nullcontext(pl_module.policy))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        values = {}
        if trainer.is_global_zero:
            self._prepare(trainer, pl_module, pl_module.reference.open())
            report = probe(pl_module.policy, trainer.datamodule.tokenizer, self.questions, self.name,
                           self.system_prompt, self.max_new_tokens, self.batch_size, *self.general)
            self.last_report = report
            values = {"val/probes/name_rate": report.name_rate, "val/probes/degenerate_rate": report.degenerate_rate}
            if report.general_nll is not None and self.base_nll:
                values["val/probes/general_nll"] = report.general_nll
                values["val/probes/drift"] = report.general_nll / self.base_nll
            for key, value in values.items():
                pl_module.log(key, value, rank_zero_only=True)
            rank_zero_info("[dpo_lightning] probes at step {}: {}".format(
                trainer.global_step, ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in values.items())))
            if self.log_answers and isinstance(trainer.logger, TensorBoardLogger):
                rows = ["| question | answer | degenerate |", "|---|---|---|"] + [
                    f"| {q} | {' '.join(a.text.split()).replace('|', '/')} | {d or ''} |"
                    for q, a, d in zip(report.questions, report.answers, report.degenerate)]
                trainer.logger.experiment.add_text("val/probes/answers", "\n".join(rows), trainer.global_step)
        trainer.strategy.barrier("generation_probes")
