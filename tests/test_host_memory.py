"""Freed host memory is reused on CPU: counted in page faults, not timed. Each case runs in its own process, since
the malloc settings hold for the whole process."""

import ctypes
import subprocess
import sys

import pytest

from conftest import fit_tiny

ALLOCATE = """
import resource, sys, torch
from dpo_lightning.training.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.ones(16, 2**20)  # 64 MB: above glibc's largest mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16, 2**20)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", ALLOCATE, mode], capture_output=True, text=True, check=True)
    kept, count = out.stdout.split()
    return kept, int(count)


def test_large_blocks_are_reused_instead_of_faulted_in_again():
    kept, with_settings = faults("keep")
    if kept != "True":
        pytest.skip("not glibc: the settings do not apply")
    _, without = faults("default")
    assert without > 10 * 16_000 * 0.9  # each 64 MB block mapped anew: 16k pages of 4 kB, ten times
    assert with_settings < without / 4  # at most a block or two faulted in, not ten


def test_a_cpu_fit_applies_them(tiny_model_dir, monkeypatch):
    from lightning.pytorch import Trainer

    from dpo_lightning.training import module

    calls = []
    monkeypatch.setattr(module, "keep_freed_memory", lambda: calls.append(True))
    model = module.DPOModule(tiny_model_dir)
    model.trainer = Trainer(accelerator="cpu", logger=False)
    model.configure_model()
    assert calls == [True]


RELEASE = """
import sys, torch
from dpo_lightning.training.host_memory import ResidentBound, keep_freed_memory, resident_bytes
if not keep_freed_memory():
    print("skip"); sys.exit()
block = torch.ones(64, 2**20)  # 256 MB, taken from the heap, which keeps it once freed
del block
held = resident_bytes()
released = ResidentBound(limit=int(sys.argv[1])).check()
print(released, (held - resident_bytes()) / 2**20)
"""


def release(limit: int) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", RELEASE, str(limit)], capture_output=True, text=True, check=True)
    if out.stdout.strip() == "skip":
        pytest.skip("not glibc: the settings do not apply")
    released, freed_mb = out.stdout.split()
    return released, float(freed_mb)


def test_freed_memory_goes_back_only_above_the_bound():
    released, freed_mb = release(limit=1)  # any process is above one byte
    assert released == "True" and freed_mb > 200  # the kept 256 MB block left the process
    released, freed_mb = release(limit=2**50)
    assert released == "False" and abs(freed_mb) < 16


def test_a_cpu_fit_checks_the_bound_after_every_training_batch(tmp_path, tiny_model_dir, pairs_jsonl, monkeypatch):
    from dpo_lightning.training import host_memory, module

    if not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):
        pytest.skip("not glibc: the heap is not kept, so there is nothing to bound")
    bounds = []

    class Recorded(host_memory.ResidentBound):
        def __init__(self, processes: int = 1):
            super().__init__(limit=1, processes=processes)  # always above: every check releases
            bounds.append(self)

    monkeypatch.setattr(module, "ResidentBound", Recorded)
    cli, _ = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, "--trainer.max_epochs=2",
                      "--trainer.accumulate_grad_batches=2")
    batches = cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed
    assert batches >= 4 and len(bounds) == 1 and bounds[0].releases == batches
    default = host_memory.ResidentBound(processes=2)
    assert 0 < default.limit == int(host_memory.physical_bytes() * host_memory.RESIDENT_SHARE / 2)
