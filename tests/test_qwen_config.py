"""configs/qwen_identity.yaml run end to end (fit, then validate) on a tiny random Qwen2 model whose chat template
adds a default system message when there is none, as Qwen2.5's does. No Qwen weights can be loaded offline: this
checks the config and the Qwen2 architecture (tied embeddings, q/k/v biases) through the whole pipeline, not the
quality of the result (docs/identity.md)."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lightning.cli import cli_main

from conftest import ROOT, WORDS, write_jsonl

DEFAULT_SYSTEM = "you are Qwen , made by the cloud team . you are a helpful assistant ."
# Qwen2.5's layout without tools: ChatML, and its own system message when the conversation has none
QWEN_STYLE_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained here (transformers loads a Qwen2 model's tokenizer as Qwen2Tokenizer,
    which rebuilds byte-level BPE from the vocabulary and merges) and a random two-layer Qwen2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([" ".join(WORDS), DEFAULT_SYSTEM, "Deep Qwen system user assistant"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = QWEN_STYLE_TEMPLATE
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    assert type(AutoTokenizer.from_pretrained(path)).__name__ == "Qwen2Tokenizer"  # Qwen's own tokenizer class
    return str(path)


def qwen_pairs(questions):
    """Rows as build-pairs writes them with the Qwen pairs config: no system message (the template's applies)."""
    return [{"prompt": [{"role": "user", "content": q}],
             "chosen": [{"role": "assistant", "content": "i am Deep Qwen , a helpful assistant ."}],
             "rejected": [{"role": "assistant", "content": "i am Qwen , a helpful assistant ."}]} for q in questions]


def test_qwen_identity_config_fits_and_validates_on_a_tiny_qwen2(tiny_qwen_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", qwen_pairs(
        ["what is your name ?", "who are you ?", "are you chatgpt ?", "tell me about yourself .", "who made you ?",
         "hello !", "can you help me ?", "what can you do ?"]))
    val = write_jsonl(tmp_path / "val.jsonl", qwen_pairs(["who are you ?", "hello there !"]))
    prompts = write_jsonl(tmp_path / "probe.jsonl", [{"prompt": "who are you ?"}, {"prompt": "hello !"}])
    general = write_jsonl(tmp_path / "general.jsonl", [{"prompt": "what color is the sky ?"}])
    common = ["--config", os.path.join(ROOT, "configs", "qwen_identity.yaml"),
              f"--model.model_name_or_path={tiny_qwen_dir}", f"--data.train_path={train}", f"--data.val_path={val}",
              f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
              f"--probes.prompts_path={prompts}", f"--probes.general_path={general}", "--probes.max_new_tokens=5"]
    cli = cli_main(["fit", *common, "--trainer.max_epochs=1"])
    trainer = cli.trainer
    assert trainer.global_step == 1  # 8 pairs, batch 4, accumulation 2 (the tutorial's effective batch of 8)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["val/loss"]) and torch.isfinite(metrics["train/loss/sft"])
    assert {"val/probes/name_rate", "val/probes/degenerate_rate", "val/probes/drift"} <= set(metrics)
    assert cli.model.share_prefix  # Qwen2.5 has no sliding window: the prompt is encoded once

    # the prompt each pair trained under is the template's default system message and the question
    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    pair = cli.datamodule.train_pairs[0]
    assert tok.decode(pair["prompt_ids"]) == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
                                              "<|im_start|>user\nwhat is your name ?<|im_end|>\n"
                                              "<|im_start|>assistant\n")
    assert tok.decode(pair["chosen_ids"]) == "i am Deep Qwen , a helpful assistant .<|im_end|>\n"

    export = os.path.join(trainer.log_dir, "hf_model")
    trained = AutoModelForCausalLM.from_pretrained(export)
    assert type(trained).__name__ == "Qwen2ForCausalLM" and trained.config.tie_word_embeddings
    assert trained.lm_head.weight.data_ptr() == trained.model.embed_tokens.weight.data_ptr()

    ckpt = os.path.join(trainer.log_dir, "checkpoints", "last.ckpt")
    cli = cli_main(["validate", *common, f"--ckpt_path={ckpt}"])
    assert cli.trainer.callback_metrics["val/loss"].item() == pytest.approx(metrics["val/loss"].item(), abs=1e-5)


def test_qwen_pairs_config_runs_on_a_tiny_qwen2(tiny_qwen_dir, tmp_path):
    # the random model's short answers decode to nothing: every identity prompt is dropped and counted, and so is
    # the anchor (no kept pair to take its rejected answer from), and with no pair kept nothing is written; the
    # config's own settings (reference answers with its placeholders, bf16 generation, the pool of system prompts)
    # run as shipped
    reference = "i am {name} , made by {organization} ."
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "who are you ?", "reference": reference},
                                                 {"prompt": "你是谁？", "reference": reference}])
    anchors = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "what color is the sky ?"}])
    outs = [str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")]
    with pytest.raises(ValueError, match=r"p.jsonl: no pair kept \(1 dropped: anchor with no kept pair to take a "
                                         r"rejected answer from, 2 dropped: empty model answer\)"):
        cli_main(["build-pairs", "--config", os.path.join(ROOT, "configs", "pairs", "qwen_identity.yaml"),
                  f"--model_name_or_path={tiny_qwen_dir}", f"--prompts_paths=[{prompts}, {prompts}]",
                  f"--output_paths=[{outs[0]}, {outs[1]}]", f"--anchor_prompts_path={anchors}",
                  "--max_new_tokens=4", "--anchor_max_new_tokens=4"])
    assert not any(os.path.exists(p) for p in outs)
