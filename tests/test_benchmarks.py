"""The parts of ``benchmarks/gpu_check.sh`` that run without a GPU: the synthetic inputs (generated pairs, the
word-level tokenizer, a random model of a known shape) and ``bench_vs_trl.py`` end to end on a tiny shape, every
side (ours, TRL, plain, the unique-token ceiling) reporting its figures."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import synthetic  # noqa: E402 - benchmarks/ is not a package


def test_generated_pairs_have_the_asked_lengths_and_are_reproducible(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    synthetic.generate(str(a), 5, question_words=(30, 40), answer_words=(50, 60))
    synthetic.generate(str(b), 5, question_words=(30, 40), answer_words=(50, 60))
    assert a.read_text() == b.read_text()
    for line in a.read_text().splitlines():
        row = json.loads(line)
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert 30 <= len(row["prompt"][1]["content"].split()) <= 40
        assert all(50 <= len(row[k][0]["content"].split()) <= 60 for k in ("chosen", "rejected"))


def test_random_model_and_its_tokenizer_load_as_written(tmp_path):
    path = synthetic.random_model("tiny", str(tmp_path / "m"))
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "qwen2" and model.config.hidden_size == synthetic.SHAPES["tiny"]["hidden_size"]
    tok = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    text = "You are a careful model. The reward of the policy"
    ids = tok(text)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == text.replace(".", " .").split()  # one token a word, none unknown
    assert max(ids) < model.config.vocab_size


@pytest.mark.slow
def test_bench_vs_trl_runs_every_side(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_vs_trl.py"), "--preset", "real",
                           "--model", "random:tiny", "--pairs", "generated:16:20-30:30-40", "--steps", "1",
                           "--sides", "ours,ours+budget+pack,trl,ceiling", "--workdir", str(tmp_path),
                           "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "ours/trl: speed" in proc.stdout and "ours/ceiling: speed" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"ours", "ours+budget+pack", "trl", "ceiling"}
    for name, r in results.items():  # one timed step of 2 x 2 pairs; batches by a token budget hold 4 on average
        assert (r["pairs"] == 4 or name == "ours+budget+pack" and r["pairs"] > 0) and r["seconds"] > 0
        assert r["peak_memory_gb"] > r["floor_gb"] > 0
        # on CPU the libraries hold memory of their own, below the peak above the floor; CUDA's allocator counts none
        assert r["peak_memory_gb"] - r["floor_gb"] > r["libraries_gb"] > 0 or torch.cuda.is_available()
    assert 0 <= results["ours"]["padding"] < 1


def test_bench_head_compares_the_linear_head_with_autograds_loop():
    """SmolLM2's head shape on 96 positions in chunks of 32: the linear head keeps no logits, autograd's loop keeps
    every chunk's (n, V) block, 96 x 49152 fp32 values at least, ten times what it keeps (the hidden states)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_head.py"), "--shapes",
                           "smollm2-135m", "--positions", "96", "--chunk_size", "32", "--repeats", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[1]: [float(x) for x in line.split()[2:]] for line in proc.stdout.splitlines()
            if line.startswith("smollm2-135m ") and line.split()[1] in ("linear", "autograd")}
    assert set(rows) == {"linear", "autograd"}
    assert rows["autograd"][1] >= 96 * 49152 * 4 / 2**30 * 0.999 > 10 * rows["linear"][1]  # kept GB
    assert "linear / autograd time" in proc.stdout
