"""model.packing: several [prompt, chosen, rejected] pairs in one row give the plain layout's log-probs and
gradients, in a fit, under DDP and across a resume."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.losses import sequence_logps
from dpo_lightning.model.logprobs import response_logps
from dpo_lightning.model.packing import first_fit, place_pairs, row_layout
from dpo_lightning.model.prefix_sharing import VERIFIED_MODEL_TYPES, block_mask, choose_layout, shared_prefix_logps
from dpo_lightning.training.throughput import layout_counts

from conftest import (
    DEVICES,
    LONG_AND_SHORT,
    ROOT,
    TB_METRICS,
    assert_resume_equals_straight_run,
    fit_args,
    fit_tiny,
    run_cli,
    scalar_tags,
    tiny_architecture,
    tiny_of_type,
)


def test_worked_example_layout():
    batch = PreferenceCollator(pad_token_id=0)([
        {"prompt_ids": [11, 12], "chosen_ids": [21], "rejected_ids": [31]},
        {"prompt_ids": [13], "chosen_ids": [22], "rejected_ids": [33]}])
    layout = row_layout(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], packing=True, row_tokens=8)
    assert layout.input_ids.tolist() == [[11, 12, 21, 31, 13, 22, 33]]  # 7 positions; rows of 4 would take 8
    assert layout.position_ids.tolist() == [[0, 1, 2, 2, 0, 1, 1]]
    assert layout.mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0, 0],
                                               [1, 1, 0, 0, 0, 0, 0],
                                               [1, 1, 1, 0, 0, 0, 0],
                                               [1, 1, 0, 1, 0, 0, 0],  # r0: its prompt and itself
                                               [0, 0, 0, 0, 1, 0, 0],  # pair b sees nothing of pair a
                                               [0, 0, 0, 0, 1, 1, 0],
                                               [0, 0, 0, 0, 1, 0, 1]]  # s0: q0 and itself, not d0
    # (row, column whose hidden state predicts, token, response): chosen of pair i is i, its rejected 2 + i
    scored = list(zip(layout.rows.tolist(), layout.cols.tolist(), layout.targets.tolist(), layout.out_index.tolist()))
    assert scored == [(0, 1, 21, 0), (0, 1, 31, 2), (0, 4, 22, 1), (0, 4, 33, 3)]
    assert layout.tokens.tolist() == [1, 1, 1, 1]
    # pairs of equal length: one pair per row (8 positions either way), as prefix sharing lays them out
    equal = PreferenceCollator(pad_token_id=0)([
        {"prompt_ids": [11, 12], "chosen_ids": [21], "rejected_ids": [31]},
        {"prompt_ids": [13], "chosen_ids": [22], "rejected_ids": [33, 34]}])
    alone = row_layout(equal["input_ids"], equal["attention_mask"], equal["loss_mask"], packing=True, row_tokens=8)
    assert alone.input_ids.tolist() == [[11, 12, 21, 31], [13, 22, 33, 34]]


def mixed_batch(model_dir, pairs_jsonl):
    """All eight pairs of ``pairs_jsonl`` in one batch, not grouped by length."""
    dm = PreferenceDataModule(train_path=pairs_jsonl, tokenizer_name_or_path=model_dir, batch_size=8,
                              group_by_length=False, cache_dir=None)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_first_fit_places_the_longest_pairs_first_and_keeps_the_layout_with_fewer_positions():
    # widths 5, 9, 4, 3, 6 into rows of 10: 9 -> row 0; 6 -> row 1; 5 -> row 1 is full (11), row 2; 4 -> row 1 at 6;
    # 3 -> row 2 at 5: 3 rows x 10 = 30 positions
    assert first_fit([5, 9, 4, 3, 6], 10) == [(2, 0), (0, 0), (1, 6), (2, 5), (1, 0)]
    assert first_fit([5, 9, 4, 3, 6], 9) == [(2, 0), (0, 0), (2, 5), (1, 6), (1, 0)]  # 9 | 6 3 | 5 4: 27 positions
    assert place_pairs([5, 9, 4, 3, 6], 10) == first_fit([5, 9, 4, 3, 6], 9)  # 27 < 30
    # 9 1 | 6 4 | 5 3: 30 positions, against 9 | 6 3 | 5 4 | 1: 36
    assert place_pairs([5, 9, 4, 3, 6, 1], 10) == first_fit([5, 9, 4, 3, 6, 1], 10)
    assert place_pairs([4, 9, 5], None) == [(1, 5), (0, 0), (1, 0)]  # rows as long as the longest pair
    assert place_pairs([5, 9], 4) == [(1, 0), (0, 0)]  # a row is never shorter than the longest pair


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("plain_head", [True, False])
@pytest.mark.parametrize("row_tokens", [None, 80, 1000])
def test_packed_logps_and_gradients_equal_the_plain_path(tiny_model_dir, pairs_jsonl, implementation, plain_head,
                                                         row_tokens, device):
    batch = mixed_batch(tiny_model_dir, pairs_jsonl)
    inputs = tuple(batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
    rows = row_layout(*inputs, packing=True, row_tokens=row_tokens).input_ids.shape[0]
    assert rows < batch["input_ids"].shape[0] // 2 or row_tokens is None  # several pairs share a row
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation).double()
    model.to(device)
    if not plain_head:  # as a soft-capping model: both paths go through the full logits
        model.config.final_logit_softcapping = 30.0
    results = []
    for fn in (response_logps, choose_layout([model], False, packing=True, row_tokens=row_tokens)):
        model.zero_grad()
        out = fn(model, *inputs, chunk_size=7, token_stats=True, ld_alpha=0.3)
        weights = torch.linspace(1, 2, out.logps.shape[0], dtype=out.logps.dtype, device=device)
        (out.logps * weights).sum().backward()
        results.append((out, [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (packed, packed_grads) = results
    assert torch.allclose(packed.logps, plain.logps, atol=1e-6)
    assert torch.allclose(packed.unweighted_logps, plain.unweighted_logps, atol=1e-6)
    assert torch.allclose(packed.logit_sums, plain.logit_sums, atol=1e-6)
    for a, b in zip(packed.stats, plain.stats):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(plain_grads, packed_grads):
        assert torch.allclose(a, b, atol=1e-6 * a.abs().max().item())


def test_block_mask_holds_the_packed_mask_and_skips_other_pairs_blocks():
    """The block mask FlexAttention gets: its mask function gives the dense mask at every position, and blocks in
    which no query attends any key (another pair's segment, padding) are not visited."""
    segments = [(40, 30, 50), (20, 60, 30), (70, 10, 20), (10, 20, 10)]  # prompt, chosen, rejected
    input_ids, attention_mask, loss_mask = [], [], []
    width = max(p + max(c, r) for p, c, r in segments)
    for side in (1, 2):
        for prompt, chosen, rejected in segments:
            length = prompt + (chosen, rejected)[side - 1]
            input_ids.append([3] * prompt + [side] * (length - prompt) + [0] * (width - length))
            attention_mask.append([1] * length + [0] * (width - length))
            loss_mask.append([0] * prompt + [1] * (length - prompt) + [0] * (width - length))
    layout = row_layout(*(torch.tensor(x) for x in (input_ids, attention_mask, loss_mask)), packing=True,
                        row_tokens=256)
    rows, _, length, _ = layout.mask.shape
    assert rows < len(segments)  # several pairs share a row
    blocks = block_mask(layout.mask)
    b, q, k = torch.meshgrid(torch.arange(rows), torch.arange(length), torch.arange(length), indexing="ij")
    assert torch.equal(blocks.mask_mod(b, torch.zeros_like(b), q, k), layout.mask[:, 0])
    visited = blocks.to_dense()  # (R, 1, query blocks, key blocks) 1 where the kernel computes a block
    size = blocks.BLOCK_SIZE[0]
    padded = torch.nn.functional.pad(layout.mask[:, 0], (0, -length % size, 0, -length % size))
    any_attended = padded.unflatten(1, (-1, size)).unflatten(3, (-1, size)).any(dim=(2, 4))  # (R, qb, kb)
    assert torch.equal(visited[:, 0].bool(), any_attended)
    assert visited.sum() < visited.numel()  # some blocks skipped


@pytest.mark.gpu
def test_flex_attention_block_masks_give_the_plain_paths_logps_and_gradients(tiny_model_dir, pairs_jsonl):
    """Packed rows under ``flex_attention``, the mask handed over as a block mask, against the plain layout under
    SDPA, on CUDA in fp32 (on CPU FlexAttention has no backward pass)."""
    batch = mixed_batch(tiny_model_dir, pairs_jsonl)
    inputs = tuple(batch[k].cuda() for k in ("input_ids", "attention_mask", "loss_mask"))
    results = []
    for implementation, fn in (("sdpa", response_logps), ("flex_attention", None)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation).cuda()
        fn = fn or choose_layout([model], False, packing=True)
        assert fn is response_logps or fn.func is shared_prefix_logps  # flex_attention is not refused
        out = fn(model, *inputs, chunk_size=7)
        (out.logps * torch.linspace(1, 2, out.logps.shape[0], device="cuda")).sum().backward()
        results.append((out.logps.detach(), [p.grad for p in model.parameters()]))
    (plain, plain_grads), (flex, flex_grads) = results
    torch.testing.assert_close(flex, plain, rtol=1e-5, atol=1e-4)
    for a, b in zip(plain_grads, flex_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["qwen2", "qwen2_mixed", "mistral", "gemma3", "gemma3_mixed"])
def test_other_architectures_and_sliding_windows_equal_the_plain_path_when_packed(name, implementation):
    # pairs of 15 and 12 tokens in one row of 27 against a window of 4: the window bites inside each pair, and
    # positions restart, so the second pair's window is its own
    batch = PreferenceCollator(pad_token_id=0)(LONG_AND_SHORT)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert row_layout(*inputs, packing=True, row_tokens=27).input_ids.shape == (1, 27)
    model = tiny_architecture(name, window=4)
    results = []
    for packing in (False, True):
        model.set_attn_implementation(implementation if packing else "sdpa")
        model.zero_grad()
        fn = choose_layout([model], False, packing=True, row_tokens=27) if packing else response_logps
        out = fn(model, *inputs, chunk_size=5)
        (out.logps * torch.linspace(1, 2, 4, dtype=torch.float64)).sum().backward()
        results.append((out.logps.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (packed, packed_grads) = results
    assert torch.isfinite(plain).all()
    assert torch.allclose(packed, plain, atol=1e-6), (packed, plain)
    for a, b in zip(plain_grads, packed_grads):
        assert torch.allclose(a, b, atol=1e-6 * a.abs().max().item())


@pytest.mark.parametrize("model_type", sorted(VERIFIED_MODEL_TYPES))
def test_every_verified_model_type_gives_the_plain_layouts_logps_when_packed(model_type):
    model = tiny_of_type(model_type)
    batch = PreferenceCollator(pad_token_id=0)(LONG_AND_SHORT)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with torch.no_grad():
        full = sequence_logps(model(input_ids=inputs[0], attention_mask=inputs[1]).logits, inputs[0], inputs[2])
        packed = shared_prefix_logps(model, *inputs, packing=True, row_tokens=27)
    assert torch.allclose(packed.logps, full, atol=1e-4)


def test_telemetry_counts_the_packed_rows(tiny_model_dir, pairs_jsonl):
    batch = mixed_batch(tiny_model_dir, pairs_jsonl)
    for row_tokens in (None, 80, 1000):
        layout = row_layout(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], packing=True,
                            row_tokens=row_tokens)
        pairs, tokens, filled, positions = layout_counts(batch["attention_mask"], batch["loss_mask"], True, True,
                                                         row_tokens).tolist()
        real = int((layout.input_ids != 0).sum())  # the word-level tokenizer's pad id is 0 and never a token here
        assert (pairs, tokens, filled, positions) == (8, real, real, layout.input_ids.numel())


def test_packed_fit_starts_at_ln2_and_logs_the_plain_runs_metrics(tiny_model_dir, pairs_jsonl, tmp_path):
    metrics = []
    for packing in ("false", "true"):
        cli, log_dir = fit_tiny(tmp_path / packing, tiny_model_dir, pairs_jsonl, f"--model.packing={packing}",
                                "--model.packing_row_tokens=80", "--data.batch_size=6", "--data.group_by_length=false",
                                "--export.enabled=false", "--trainer.max_epochs=1")
        assert cli.model.packs == (packing == "true")
        metrics.append({k: v.item() for k, v in cli.trainer.callback_metrics.items()
                        if k.startswith(("val/", "train/"))})
        _, acc = scalar_tags(log_dir)
        assert acc.Scalars("train/loss")[0].value == pytest.approx(0.693147, abs=1e-5)  # policy = reference
        metrics[-1]["padding"] = sum(s.value for s in acc.Scalars("throughput/padding_share"))
    assert metrics[0].keys() == metrics[1].keys() and "val/rewards/margins" in metrics[0]
    padding = metrics[0].pop("padding"), metrics[1].pop("padding")
    assert metrics[1] == pytest.approx(metrics[0], abs=1e-5)
    assert padding[1] < padding[0]  # the packed rows hold less padding than one shared row per pair


def test_packed_ddp_fit_equals_one_plain_process(tiny_model_dir, pairs_jsonl, tmp_path):
    runs = {}
    for key, world, per_device, packing in (("plain", 1, 4, "false"), ("packed", 2, 2, "true")):
        run_dir = tmp_path / key
        os.makedirs(run_dir)
        run_cli(fit_args(run_dir, tiny_model_dir, pairs_jsonl, f"--data.batch_size={per_device}",
                         f"--trainer.devices={world}", "--trainer.strategy=" + ("ddp" if world > 1 else "auto"),
                         f"--model.packing={packing}", "--model.packing_row_tokens=200",
                         "--data.group_by_length=false",
                         "--model.reference.precompute_ref_log_probs=true", cache_dir=run_dir / "cache"),
                cwd=run_dir, extra_path=os.path.join(ROOT, "tests"))
        runs[key] = scalar_tags(str(run_dir / "lightning_logs" / "version_0"))[1]
    for m in TB_METRICS:
        for stage in ("train", "val"):
            a, b = runs["plain"].Scalars(f"{stage}/{m}"), runs["packed"].Scalars(f"{stage}/{m}")
            assert [s.step for s in a] == [s.step for s in b], (stage, m)
            assert [s.value for s in b] == pytest.approx([s.value for s in a], abs=1e-5), (stage, m)


def test_killed_packed_run_resumes_to_the_same_weights(tiny_model_dir, pairs_jsonl, tmp_path):
    run = ["--data.val_fraction=0.25", "--data.batch_size=3", "--trainer.max_epochs=2", "--trainer.limit_val_batches=1",
           "--model.optimizer.lr=1e-2", "--checkpoint.every_n_train_steps=1", "--model.packing=true",
           "--model.packing_row_tokens=200", "--data.group_by_length=false"]
    assert_resume_equals_straight_run(tmp_path, tiny_model_dir, pairs_jsonl, run, 3)  # 2 batches an epoch
