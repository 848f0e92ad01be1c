"""Two CPU processes (gloo) against one: same logged metrics on the same global batch, distinct shards, and only
one process writing caches and exports."""

import json
import os

import pytest

from conftest import ROOT, TB_METRICS, fit_args, run_cli, scalar_tags

TOL = 1e-5  # absolute, on every logged metric: fp32 sums over different groupings of the same pairs


def test_ddp_fit_equals_one_process_on_the_same_global_batch(tiny_model_dir, tiny_reference_dir, pairs_jsonl,
                                                             tmp_path):
    runs = {}
    # global batch 2 pairs per step in all three; the last one precomputes the reference log-probs, each rank its
    # share, gathered so that every rank has all of them
    plain = ["--model.reference.precompute_ref_log_probs=false"]
    for key, world, per_device, extra in ((1, 1, 2, plain), (2, 2, 1, plain),
                                          ("pre", 2, 1, ["--model.reference.precompute_ref_log_probs=true"])):
        run_dir = tmp_path / f"run{key}"
        os.makedirs(run_dir)
        run_cli(fit_args(run_dir, tiny_model_dir, pairs_jsonl, f"--data.batch_size={per_device}",
                         f"--trainer.devices={world}", "--trainer.strategy=" + ("ddp" if world > 1 else "auto"),
                         "--trainer.callbacks+=ddp_recorder.RecordRank",
                         f"--trainer.callbacks.out_dir={run_dir / 'record'}", *extra,
                         reference_dir=tiny_reference_dir, cache_dir=run_dir / "cache"),
                cwd=run_dir, extra_path=os.path.join(ROOT, "tests"))
        _, acc = scalar_tags(str(run_dir / "lightning_logs" / "version_0"))
        records = [json.loads((run_dir / "record" / f"rank{r}.json").read_text()) for r in range(world)]
        runs[key] = (acc, records)

    (acc1, (one,)), (acc2, ranks) = runs[1], runs[2]
    for acc in (acc2, runs["pre"][0]):
        for m in TB_METRICS:
            for stage in ("train", "val"):
                a, b = acc1.Scalars(f"{stage}/{m}"), acc.Scalars(f"{stage}/{m}")
                assert [s.step for s in a] == [s.step for s in b], (stage, m)
                assert [s.value for s in b] == pytest.approx([s.value for s in a], abs=TOL), (stage, m)
    assert abs(acc1.Scalars("val/rewards/margins")[-1].value - acc1.Scalars("val/rewards/margins")[0].value) > 1e-3

    # each step, the two ranks train on disjoint halves of the pairs the single process trains on together
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == len(one["batches"]) == 6  # 3 steps x 2 epochs
    for single, r0, r1 in zip(one["batches"], ranks[0]["batches"], ranks[1]["batches"]):
        assert (single["epoch"], single["step"]) == (r0["epoch"], r0["step"]) == (r1["epoch"], r1["step"])
        assert not set(map(tuple, r0["chosen"])) & set(map(tuple, r1["chosen"]))
        assert sorted(r0["chosen"] + r1["chosen"]) == sorted(single["chosen"])
    for epoch in (0, 1):
        seen = [tuple(row) for b in ranks[0]["batches"] + ranks[1]["batches"] if b["epoch"] == epoch
                for row in b["chosen"]]
        assert len(seen) == len(set(seen)) == 6  # every training pair once per epoch, across the two ranks

    # only rank 0 wrote the tokenized cache (one table: the val fraction is an index set over it) and the exported
    # model; rank 1 memory-mapped the same table
    assert len(ranks[0]["data_written"]) == 1 and ranks[1]["data_written"] == []
    assert ranks[0]["tables"] == ranks[1]["tables"]
    assert [p.name for p in (tmp_path / "run2" / "cache" / "tokenized").iterdir()] == \
        [os.path.basename(ranks[0]["data_written"][0])]
    assert ranks[0]["export_written"] and ranks[1]["export_written"] == []
    pre = runs["pre"][1]
    assert len(pre[0]["data_written"]) == 1 and pre[1]["data_written"] == []
