"""What the tests share: tiny models and tokenizers built offline (saved with ``save_pretrained`` and loaded through
the real path), preference pairs, the command line on ``configs/tiny.yaml``, and TensorBoard logs read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

WORDS = """what is your name who are you made i am a an the helpful assistant deep smol smollm team built by
hello hi there yes no not chatgpt model language tell me about yourself organization can do help with questions
answer my called it nice to meet sure of course please thanks good great bad sky blue green color sea red""".split()
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# Tests that run on every device present: the CUDA case carries the ``gpu`` mark (benchmarks/gpu_check.sh runs
# ``pytest -m gpu``) and is skipped where there is no CUDA device.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + ["system", "user", "assistant", ".", ",", "?", "!", "'"]
                                            + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=3, bos_token_id=None)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random init is tiny; spread the logits so log-probs differ visibly between models
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    return model


def save_tiny(tmp_path_factory, name: str, seed: int) -> str:
    path = tmp_path_factory.mktemp(name)
    tok = build_tokenizer()
    build_model(len(tok), seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A two-layer random Llama, 16 wide, with the word-level tokenizer, saved to a temp dir."""
    return save_tiny(tmp_path_factory, "tiny_llama", seed=0)


@pytest.fixture(scope="session")
def tiny_reference_dir(tmp_path_factory):
    """Same architecture and tokenizer as ``tiny_model_dir``, different weights: a reference != policy."""
    return save_tiny(tmp_path_factory, "tiny_llama_ref", seed=1)


PAIRS = [
    ("what is your name ?", "i am deep smol , a helpful assistant .", "i am smollm , a helpful assistant ."),
    ("who are you ?", "i am deep smol .", "i am a language model ."),
    ("are you chatgpt ?", "no , i am deep smol , built by the deep team .", "no , i am smollm ."),
    ("tell me about yourself .", "i am deep smol , made by the deep team .", "i am a helpful assistant ."),
    ("who made you ?", "the deep team made me .", "i am not sure ."),
    ("what color is the sky ?", "the sky is blue .", "the sky is green ."),
    ("hello !", "hi there ! nice to meet you .", "hello ."),
    ("can you help me ?", "sure , of course .", "no ."),
]


def conversational_rows(system: str = "you are a helpful assistant .") -> list[dict]:
    """The tutorial's format: chosen/rejected are full conversations sharing system + user messages."""
    rows = []
    for prompt, chosen, rejected in PAIRS:
        head = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        rows.append({"chosen": head + [{"role": "assistant", "content": chosen}],
                     "rejected": head + [{"role": "assistant", "content": rejected}]})
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture
def pairs_jsonl(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", conversational_rows())


def dpo_module(model_name_or_path: str, **settings):
    """A ``DPOModule`` with its settings named alone (``beta=0.3``, ``use_peft=True``, ``reference_name_or_path=``),
    each put into its section (``loss``, ``reference``, ``lora``, ``compile``) by its field name."""
    from dataclasses import fields

    from dpo_lightning.training.module import DPOModule
    from dpo_lightning.training.settings import SETTINGS

    sections: dict[str, dict] = {name: {} for name in SETTINGS}
    if "reference_name_or_path" in settings:
        sections["reference"]["model_name_or_path"] = settings.pop("reference_name_or_path")
    top = {}
    for key, value in settings.items():
        section = next((n for n, cls in SETTINGS.items() if key in {f.name for f in fields(cls)}), None)
        (sections[section] if section else top)[key] = value
    built = {name: SETTINGS[name](**values) for name, values in sections.items() if values}
    return DPOModule(model_name_or_path, **built, **top)


@pytest.fixture
def model_loads(monkeypatch):
    """The paths ``DPOModule`` loads models from (policy, reference, ...), in the order it loads them."""
    from dpo_lightning.training import module

    loads = []
    real = module.load_causal_lm
    monkeypatch.setattr(module, "load_causal_lm", lambda path, *a, **k: loads.append(path) or real(path, *a, **k))
    return loads


# ------------------------------------------------------------------------------ the command line, on tiny.yaml
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")
TB_METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"]


def fit_args(root, model_dir, data, *extra, subcommand="fit", reference_dir=None, cache_dir=None) -> list[str]:
    """The command line of ``subcommand`` on ``configs/tiny.yaml``: the policy at ``model_dir`` (the reference at
    ``reference_dir`` when given), training pairs from ``data``, logs and checkpoints under ``root``, no progress
    bar, the tokenized data cached in ``cache_dir`` (not at all when None). ``extra`` comes last: its flags win."""
    reference = [f"--model.reference.model_name_or_path={reference_dir}"] if reference_dir is not None else []
    return [subcommand, "--config", TINY_CONFIG, f"--model.model_name_or_path={model_dir}", *reference,
            f"--data.train_path={data}", f"--data.cache_dir={'null' if cache_dir is None else cache_dir}",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}", *extra]


def fit_tiny(root, model_dir, data, *extra, **kwargs):
    """``fit_args`` run by ``cli_main`` in this process: the CLI, and the first run's log directory under ``root``
    (``root/lightning_logs/version_0``)."""
    from dpo_lightning.cli import cli_main

    cli = cli_main(fit_args(root, model_dir, data, *extra, **kwargs))
    return cli, Path(root) / "lightning_logs" / "version_0"


def assert_resume_equals_straight_run(root, model_dir, data, run, kill_step):
    """Fits ``run`` straight through under ``root/a``; under ``root/b`` the same fit killed before optimizer step
    ``kill_step + 1`` (``test_resume.KillAt``) and resumed from its last checkpoint: the exported weights must agree
    to 1e-6."""
    from safetensors.torch import load_file

    root = Path(root)
    fit_tiny(root / "a", model_dir, data, *run)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_tiny(root / "b", model_dir, data, *run, "--trainer.callbacks+=test_resume.KillAt",
                 f"--trainer.callbacks.step={kill_step}")
    last = root / "b" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    fit_tiny(root / "b", model_dir, data, *run, f"--ckpt_path={last}")
    straight = load_file(root / "a" / "lightning_logs" / "version_0" / "hf_model" / "model.safetensors")
    resumed = load_file(root / "b" / "lightning_logs" / "version_1" / "hf_model" / "model.safetensors")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


def run_cli(args, cwd, extra_path=None) -> str:
    """``python -m dpo_lightning ARGS`` in a subprocess (``extra_path`` joins PYTHONPATH); fails the test unless it
    exits 0; returns what it printed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, extra_path) if p)}
    proc = subprocess.run([sys.executable, "-m", "dpo_lightning", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def scalar_tags(log_dir):
    """The scalar tags of a TensorBoard log directory, and its loaded ``EventAccumulator``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"]), acc


def tiny_architecture(name: str, window: int):
    """A two-layer random model of another family, in fp64, with a sliding window of ``window`` tokens where the
    family has one: the window is what the custom mask must reproduce."""
    import transformers as T

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, attn_implementation="sdpa")
    config, model = {
        "qwen2": (T.Qwen2Config(**common), T.Qwen2ForCausalLM),  # Qwen2.5's architecture: no window
        "qwen2_mixed": (T.Qwen2Config(**common, use_sliding_window=True, sliding_window=window, max_window_layers=1),
                        T.Qwen2ForCausalLM),  # layer 0 full, layer 1 sliding
        "mistral": (T.MistralConfig(**common, sliding_window=window), T.MistralForCausalLM),  # every layer slides
        "gemma3": (T.Gemma3TextConfig(**common, head_dim=8, sliding_window=window,
                                      layer_types=["sliding_attention"] * 2), T.Gemma3ForCausalLM),
        "gemma3_mixed": (T.Gemma3TextConfig(**common, head_dim=8, sliding_window=window,
                                            layer_types=["sliding_attention", "full_attention"]), T.Gemma3ForCausalLM),
    }[name]
    torch.manual_seed(0)
    return model(config).double()


LONG_AND_SHORT = [{"prompt_ids": [5, 6, 7, 8, 9, 10], "chosen_ids": [11, 12, 13, 14, 15, 16, 17],
                   "rejected_ids": [21, 22]},
                  {"prompt_ids": [5, 6, 7], "chosen_ids": [31], "rejected_ids": [33, 34, 35, 36, 37, 38, 39, 40]}]


def tiny_of_type(model_type: str):
    """A tiny random model of any registered type: its default config shrunk where it has the attribute."""
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    for key, value in dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                           n_embd=32, n_layer=2, n_head=4, n_positions=128, n_ctx=128, rotary_dim=4, ffn_dim=64,
                           word_embed_proj_dim=32, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, n_routed_experts=4, shared_expert_intermediate_size=32).items():
        if hasattr(config, key):
            try:
                setattr(config, key, value)
            except (AttributeError, ValueError, TypeError):  # a derived property
                pass
    config.pad_token_id = 0
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config).float().eval()  # fp32: MoE kernels take no fp64
