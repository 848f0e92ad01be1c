"""Freed host memory is reused on CPU: counted in page faults, not timed. Each case runs in its own process, since
the malloc settings hold for the whole process."""

import subprocess
import sys

import pytest

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
