"""model.reference.precompute_ref_log_probs: the same training as the reference-forward path, a cache reused across
runs, and no reference model held during the steps."""

import functools
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dpo_lightning.data.collate import REF_KEY
from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.model.loading import load_causal_lm
from dpo_lightning.model.prefix_sharing import shared_prefix_logps
from dpo_lightning.training import reference_cache

from conftest import TB_METRICS, dpo_module, fit_tiny, scalar_tags

TOL = 1e-5  # absolute, logged metrics; reference log-probs come from differently padded batches


def test_precomputed_reference_trains_exactly_like_the_reference_forward(tiny_model_dir, tiny_reference_dir,
                                                                          pairs_jsonl, tmp_path, monkeypatch,
                                                                          model_loads):
    def fit(name, reference_dir, *extra):
        return fit_tiny(tmp_path / name, tiny_model_dir, pairs_jsonl, *extra, reference_dir=reference_dir,
                        cache_dir=tmp_path / "cache")

    _, plain_dir = fit("plain", tiny_reference_dir, "--model.reference.precompute_ref_log_probs=false")
    assert model_loads == [tiny_model_dir, tiny_reference_dir]
    model_loads.clear()
    layouts = []
    real_pass = reference_cache.compute_reference_logps
    monkeypatch.setattr(reference_cache, "compute_reference_logps",
                        lambda *a, **k: layouts.append(k["logps_fn"].func.__name__) or real_pass(*a, **k))
    cli, pre_dir = fit("pre", tiny_reference_dir, "--model.reference.precompute_ref_log_probs=true",
                       "--model.reference.precompute_batch_size=3")
    assert model_loads == [tiny_model_dir, tiny_reference_dir]  # the reference, for the one pass
    assert layouts == ["shared_prefix_logps"] * 2  # train and val, prompt encoded once (prefix sharing default)
    assert cli.model.reference.model is None  # ... and released: no reference during the steps
    assert len(os.listdir(tmp_path / "cache" / "ref_logps")) == 2  # train and val

    _, plain = scalar_tags(str(plain_dir))
    _, pre = scalar_tags(str(pre_dir))
    for stage in ("train", "val"):  # 2 shuffled epochs: the log-probs follow their pairs
        for m in TB_METRICS:
            a, b = plain.Scalars(f"{stage}/{m}"), pre.Scalars(f"{stage}/{m}")
            assert [s.value for s in b] == pytest.approx([s.value for s in a], abs=TOL), (stage, m)
    assert abs(plain.Scalars("val/rewards/margins")[-1].value) > 1e-3
    a = load_file(plain_dir / "hf_model" / "model.safetensors")
    b = load_file(pre_dir / "hf_model" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    # a second run finds the cache and never loads the reference
    model_loads.clear()
    _, again_dir = fit("again", tiny_reference_dir, "--model.reference.precompute_ref_log_probs=true")
    assert model_loads == [tiny_model_dir]
    _, again = scalar_tags(str(again_dir))
    assert [s.value for s in again.Scalars("train/loss")] == pytest.approx(
        [s.value for s in pre.Scalars("train/loss")], abs=TOL)

    # other settings (here the reference itself) give a new cache entry, not a stale hit
    fit("other_ref", tiny_model_dir, "--model.reference.precompute_ref_log_probs=true", "--trainer.max_steps=1")
    assert len(os.listdir(tmp_path / "cache" / "ref_logps")) == 4


def test_a_batch_without_reference_log_probs_is_refused(tiny_model_dir, pairs_jsonl):
    dm = PreferenceDataModule(train_path=pairs_jsonl, tokenizer_name_or_path=tiny_model_dir, cache_dir=None)
    dm.setup("fit")
    model = dpo_module(tiny_model_dir, precompute_ref_log_probs=True)
    model.policy = load_causal_lm(tiny_model_dir, dropout=False)  # the reference was never loaded
    with pytest.raises(RuntimeError, match="without reference log-probs"):
        model.pair_logps(dm.collator(dm.train_pairs[:2]))
    batch = dm.collator([{**p, "ref_logps": [-1.0, -2.0]} for p in dm.train_pairs[:2]])
    assert batch["ref_logps"].tolist() == [-1.0, -1.0, -2.0, -2.0]  # chosen rows then rejected rows
    x, _ = model.pair_logps(batch)
    assert x.reference_chosen_logps.tolist() == [-1.0, -1.0] and x.reference_rejected_logps.tolist() == [-2.0, -2.0]
    assert REF_KEY == "ref_logps"
    assert torch.is_tensor(x.policy_chosen_logps)


def test_reference_pass_with_a_shared_prompt_equals_the_plain_layout(tiny_model_dir, pairs_jsonl):
    # the precompute pass in the prefix-sharing layout against the plain (2B, T) layout, in fp64
    dm = PreferenceDataModule(train_path=pairs_jsonl, tokenizer_name_or_path=tiny_model_dir, batch_size=3,
                              cache_dir=None)
    dm.setup("fit")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").double().eval()
    run = functools.partial(reference_cache.compute_reference_logps, model, dm.train_pairs, dm.collator, 3,
                            torch.device("cpu"), progress=False)
    plain, shared = run(), run(logps_fn=shared_prefix_logps)
    assert plain.shape == (len(dm.train_pairs), 2)
    torch.testing.assert_close(shared, plain, rtol=1e-6, atol=1e-6)  # the models keep rotary in fp32
    assert (plain[:, 0] - plain[:, 1]).abs().max() > 1e-3  # chosen and rejected differ: not a vacuous match


def test_ld_alpha_weighs_the_cached_reference_and_keys_its_own_entry(tiny_model_dir, tiny_reference_dir,
                                                                    pairs_jsonl, tmp_path):
    from lightning.pytorch import Trainer

    cache, counts, values = tmp_path / "cache", [], []
    for ld_alpha in (None, 0.3, 0.3):
        dm = PreferenceDataModule(train_path=pairs_jsonl, val_path=pairs_jsonl, tokenizer_name_or_path=tiny_model_dir,
                                  batch_size=4, cache_dir=str(cache))
        model = dpo_module(tiny_model_dir, reference_name_or_path=tiny_reference_dir, ld_alpha=ld_alpha)
        Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=tmp_path).validate(model, datamodule=dm, verbose=False)
        counts.append(len(os.listdir(cache / "ref_logps")))
        values.append(torch.tensor([p[REF_KEY] for p in dm.val_pairs]))
    assert counts[1] == 2 * counts[0] and counts[2] == counts[1]  # a new entry for 0.3, then reused
    assert torch.equal(values[1], values[2])
    # the weighted values: no larger than the plain sums in magnitude, smaller where one response is longer
    assert (values[1].abs() <= values[0].abs() + 1e-6).all() and (values[1] != values[0]).any()


def test_a_fit_without_validation_leaves_the_val_reference_pass_to_a_later_validate(tiny_model_dir,
                                                                                      tiny_reference_dir,
                                                                                      pairs_jsonl, tmp_path):
    from lightning.pytorch import Trainer

    def trainer(**args):
        return Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                       enable_checkpointing=False, default_root_dir=tmp_path, **args)

    def run(fn, **trainer_args):
        dm = PreferenceDataModule(train_path=pairs_jsonl, val_path=pairs_jsonl, tokenizer_name_or_path=tiny_model_dir,
                                  batch_size=4, cache_dir=None)
        model = dpo_module(tiny_model_dir, reference_name_or_path=tiny_reference_dir)
        getattr(trainer(**trainer_args), fn)(model, datamodule=dm)
        return model, dm

    key = REF_KEY
    model, dm = run("fit", max_steps=1, limit_val_batches=0)
    assert all(key in p for p in dm.train_pairs) and not any(key in p for p in dm.val_pairs)
    metrics = trainer().validate(model, datamodule=dm, verbose=False)[0]  # the val pass now, reference loaded again
    assert model.reference.model is None and "val/loss" in metrics
    _, fresh = run("validate")  # the val pass of a validate on its own
    assert [p[key] for p in dm.val_pairs] == [p[key] for p in fresh.val_pairs]
    _, with_val = run("fit", max_steps=1)  # a fit with validation computes both splits up front
    assert [p[key] for p in with_val.val_pairs] == [p[key] for p in fresh.val_pairs]
