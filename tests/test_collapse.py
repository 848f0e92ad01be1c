"""Collapse guard: a fit stops at the first validation whose probe figures cross a bound and keeps the checkpoint
of the last one that passed; DPO's falling-log-probs signature is warned about."""

import warnings
from pathlib import Path

import pytest
import torch

from dpo_lightning.training.collapse import CollapseGuard

from conftest import fit_tiny, scalar_tags, write_jsonl

# 6 training pairs, one a step, a validation (with its probes) every 2 steps: at steps 2, 4 and 6
EVERY_TWO_STEPS = ["--data.batch_size=1", "--trainer.val_check_interval=2", "--trainer.max_epochs=1",
                   "--trainer.accumulate_grad_batches=1", "--model.optimizer.lr=2e-2", "--export.enabled=false"]


def probes(tmp_path, max_new_tokens=12):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "who are you ?"}, {"prompt": "hello !"}])
    general = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "what color is the sky ?"},
                                                 {"prompt": "can you help me ?"}])
    return [f"--probes.prompts_path={questions}", "--probes.name=deep smol", f"--probes.general_path={general}",
            f"--probes.max_new_tokens={max_new_tokens}", "--probes.system_prompts=[null, '']"]


def last_step(run, name="last.ckpt"):
    path = run / "checkpoints" / name
    return torch.load(path, weights_only=True)["global_step"] if path.exists() else None


def test_the_first_validation_over_the_drift_bound_stops_the_fit_and_keeps_the_last_good_checkpoint(
        tiny_model_dir, pairs_jsonl, tmp_path):
    # an unguarded run measures the drift at each validation
    _, free = fit_tiny(tmp_path / "free", tiny_model_dir, pairs_jsonl, *EVERY_TWO_STEPS, *probes(tmp_path),
                       "--collapse_guard.enabled=false")
    values = [e.value for e in scalar_tags(free)[1].Scalars("val/probes/drift")]
    assert len(values) == 3 and last_step(free) == 6
    drift = list(zip([2, 4, 6], values))  # (global step of the validation, drift)
    # a bound between the highest drift so far and a later, higher one: the guard must stop exactly there
    j = next(j for j in range(1, len(drift)) if drift[j][1] > max(v for _, v in drift[:j]))
    bound = (max(v for _, v in drift[:j]) + drift[j][1]) / 2
    stop = (rf"collapse guard: at global step {drift[j][0]} the probes' drift {drift[j][1]:.4f} above its bound .*"
            rf"global step {drift[j - 1][0]}, the last whose probes passed: .*last_good\.ckpt")
    with pytest.raises(SystemExit, match=stop):
        fit_tiny(tmp_path / "guarded", tiny_model_dir, pairs_jsonl, *EVERY_TWO_STEPS, *probes(tmp_path),
                 f"--collapse_guard.max_drift={bound}")
    guarded = tmp_path / "guarded" / "lightning_logs" / "version_0"
    assert last_step(guarded, "last_good.ckpt") == drift[j - 1][0]
    assert [e.value for e in scalar_tags(guarded)[1].Scalars("val/probes/drift")] == values[:j + 1]


def test_degenerate_answers_at_the_first_validation_stop_before_any_checkpoint(tiny_model_dir, pairs_jsonl,
                                                                              tmp_path):
    # a random tiny model never ends an answer within 3 tokens: every answer is a runaway, rate 1.0
    with pytest.raises(SystemExit, match=r"at global step 2 the probes' degenerate rate 1\.0000 above its bound 0\.75"
                                         r".*No validation had passed yet: no checkpoint was kept"):
        fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, *EVERY_TWO_STEPS, *probes(tmp_path, max_new_tokens=3),
                 "--collapse_guard.max_degenerate_rate=0.75")
    assert last_step(tmp_path / "lightning_logs" / "version_0", "last_good.ckpt") is None
    # the same run without that bound (the default) trains to the end
    cli, _ = fit_tiny(tmp_path / "lifted", tiny_model_dir, pairs_jsonl, *EVERY_TWO_STEPS,
                      *probes(tmp_path, max_new_tokens=3))
    assert cli.trainer.global_step == 6


def test_reason_reads_the_worst_figures_against_each_bound():
    guard = CollapseGuard(max_degenerate_rate=0.5, max_drift=1.2)
    assert guard.reason({"val/probes/degenerate_rate": torch.tensor(0.5), "val/probes/drift": 1.2}) is None
    assert "degenerate rate 0.5100" in guard.reason({"val/probes/degenerate_rate": 0.51, "val/probes/drift": 1.0})
    assert "drift 1.3000" in guard.reason({"val/probes/degenerate_rate": 0.0, "val/probes/drift": 1.3})
    assert guard.reason({}) is None  # no probes ran
    assert CollapseGuard(max_degenerate_rate=None, max_drift=None).reason({"val/probes/drift": 9.0}) is None


def dpo_run(root, model_dir, data, *extra):
    """Fit without probes at a high learning rate, logging each batch; the collapse guard's warnings and the per-step
    (policy chosen log-prob, reference chosen log-prob, margin) read back from TensorBoard."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_tiny(root, model_dir, data, "--data.batch_size=1", "--trainer.max_epochs=4",
                 "--trainer.accumulate_grad_batches=1", "--trainer.limit_val_batches=0", "--export.enabled=false",
                 "--model.optimizer.lr=1e-1", "--model.loss.beta=0.1", "--collapse_guard.window=4",
                 "--collapse_guard.max_chosen_logp_fall=0.1", *extra)
    acc = scalar_tags(Path(root) / "lightning_logs" / "version_0")[1]
    policy, rewards, margins = ([e.value for e in acc.Scalars(f"train/{k}")]
                                for k in ("logps/chosen", "rewards/chosen", "rewards/margins"))
    steps = [(p, p - r / 0.1, m) for p, r, m in zip(policy, rewards, margins)]  # rewards = beta (policy - reference)
    return [str(w.message) for w in caught if "collapse guard" in str(w.message)], steps


def first_fall(steps, window=4, fall=0.1):
    """The first step (1-based) whose last ``window`` batches average to a chosen log-prob more than ``fall`` below
    the reference's with a positive margin, or None."""
    for end in range(window, len(steps) + 1):
        policy, reference, margin = (sum(v) / window for v in zip(*steps[end - window:end]))
        if policy < (1 + fall) * reference and margin > 0:
            return end
    return None


def test_falling_chosen_log_probs_warn_once_without_probes(tiny_model_dir, pairs_jsonl, tmp_path):
    # DPO alone at a high learning rate on a random model: the chosen log-probs fall below the reference's
    messages, steps = dpo_run(tmp_path / "dpo", tiny_model_dir, pairs_jsonl, "--model.loss.loss_type=sigmoid")
    step = first_fall(steps)
    assert step is not None and len(messages) == 1
    assert f"at global step {step} the chosen answers' log-prob" in messages[0] and "collapse signature" in messages[0]
    # with the NLL term on chosen the chosen answers do not fall: no warning
    messages, steps = dpo_run(tmp_path / "rpo", tiny_model_dir, pairs_jsonl, "--model.loss.loss_type=[sigmoid, sft]")
    assert first_fall(steps) is None and messages == []
