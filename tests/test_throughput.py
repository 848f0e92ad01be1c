"""Throughput telemetry: the counts behind pairs/s, tokens/s and the padding share, checked by hand and against the
shared layout; the model FLOPs; and the tags a real fit writes to TensorBoard, read back."""

import warnings

import pytest
import torch

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.model.prefix_sharing import shared_layout
from dpo_lightning.training.throughput import ThroughputTelemetry, compute_dtype, flops_per_token, layout_counts

from conftest import fit_tiny, scalar_tags

PAIRS = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
         {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}]


def test_layout_counts_by_hand():
    batch = PreferenceCollator(pad_token_id=0)(PAIRS)
    # pair tokens: (3 + 2 + 1) + (2 + 1 + 2) = 11. Plain rows: 5, 3, 4, 4 tokens in a 4 x 5 batch.
    assert layout_counts(batch["attention_mask"], batch["loss_mask"], shared=False).tolist() == [2, 11, 16, 20]
    # shared rows: 6 and 5 tokens, padded to 6
    assert layout_counts(batch["attention_mask"], batch["loss_mask"], shared=True).tolist() == [2, 11, 11, 12]


def test_shared_positions_are_the_layout_that_runs():
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(5):
        p, c, r = (int(n) for n in torch.randint(1, 9, (3,), generator=generator))
        pairs.append({"prompt_ids": list(range(1, p + 1)), "chosen_ids": [20] * c, "rejected_ids": [30] * r})
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    layout = shared_layout(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    n, tokens, filled, positions = layout_counts(batch["attention_mask"], batch["loss_mask"], shared=True).tolist()
    assert positions == layout.input_ids.numel()
    assert tokens == filled == sum(len(q["prompt_ids"]) + len(q["chosen_ids"]) + len(q["rejected_ids"]) for q in pairs)
    assert n == 5


def test_flops_per_token_counts_trained_and_frozen_weights():
    policy = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))  # 15 + 8 parameters
    module = torch.nn.Module()
    module.policy = policy
    assert flops_per_token(module) == 6 * 23
    policy[0].requires_grad_(False)  # a frozen base: forward and the activations' gradients only
    assert flops_per_token(module) == 6 * 8 + 4 * 15


def test_a_run_whose_end_is_slower_than_its_start_warns_with_the_hosts_figures():
    telemetry = ThroughputTelemetry()
    telemetry._host_start = (0, 1)
    steps = [{"pairs": 4, "tokens": 400, "step_time": 4.0}] * 10 + [{"pairs": 4, "tokens": 400, "step_time": 6.0}] * 10
    telemetry.history = steps[:10] + [{"pairs": 4, "tokens": 400, "step_time": 5.0}] * 5 + steps[10:]
    with pytest.warns(UserWarning, match=r"the last 10 steps ran 1.5x slower than the first 10 .*load average"):
        telemetry.on_train_end(None, None)
    telemetry.history = steps[:10] * 2  # steady: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        telemetry.on_train_end(None, None)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="peak_tflops"):
        ThroughputTelemetry(peak_tflops=0)
    assert compute_dtype("bf16-mixed") == torch.bfloat16 and compute_dtype("32-true") == torch.float32


def test_fit_logs_throughput_each_step(tiny_model_dir, pairs_jsonl, tmp_path):
    """Two pairs a batch, two batches a step: per step, pairs/s x step time is 4 pairs, and over the epoch the
    tokens add up to the training pairs' own tokens."""
    cli, log_dir = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, "--trainer.max_epochs=1",
                            "--trainer.accumulate_grad_batches=2", "--data.val_fraction=0.25")
    tags, acc = scalar_tags(log_dir)
    names = ("pairs_per_sec", "tokens_per_sec", "padding_share", "step_time")
    assert {f"throughput/{n}" for n in names} <= tags
    assert "throughput/mfu" not in tags  # no known peak on CPU
    series = {n: [e.value for e in acc.Scalars(f"throughput/{n}")] for n in names}
    train = cli.datamodule.train_pairs
    steps = -(-len(train) // 4)
    assert [e.step for e in acc.Scalars("throughput/step_time")] == list(range(steps))
    pairs = [p * t for p, t in zip(series["pairs_per_sec"], series["step_time"])]
    expected_pairs = [4] * (len(train) // 4) + ([len(train) % 4] if len(train) % 4 else [])
    assert pairs == pytest.approx(expected_pairs, rel=1e-4)
    tokens = sum(k * t for k, t in zip(series["tokens_per_sec"], series["step_time"]))
    own = sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in train)
    assert tokens == pytest.approx(own, rel=1e-4)
    assert all(0.0 <= s < 1.0 for s in series["padding_share"])
    assert {"pairs/s", "tok/s"} <= set(cli.trainer.progress_bar_metrics)


def test_mfu_is_logged_with_a_configured_peak(tiny_model_dir, pairs_jsonl, tmp_path):
    cli, log_dir = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, "--trainer.max_epochs=1",
                            "--throughput.peak_tflops=0.001")
    _, acc = scalar_tags(log_dir)
    per_token = flops_per_token(cli.model)
    for mfu, tokens in zip(acc.Scalars("throughput/mfu"), acc.Scalars("throughput/tokens_per_sec")):
        assert mfu.value == pytest.approx(per_token * tokens.value / 1e9, rel=1e-4)
