"""Synthetic inputs for the benchmarks, made on the spot with no download: conversational pairs of chosen lengths,
a word-level tokenizer over their words, and randomly initialised models of real models' shapes.

    python benchmarks/synthetic.py pairs /tmp/pairs.jsonl --n 64
    python benchmarks/synthetic.py model qwen2.5-0.5b /tmp/qwen-shape
"""

from __future__ import annotations

import argparse
import json
import os
import random

WORDS = ("the of and to in is that it for as with was on be by this are or his from at which but have an they not "
         "you were her all she there would their we him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such like "
         "our over man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people how too little state good very make world still own see "
         "men work long get here between both life being under never day same another know while last might us "
         "great old year off come since against go came right used take three model train data answer question "
         "reason result value number system language learning gradient memory token sequence batch layer weight "
         "loss reward policy reference preference chosen rejected sample function matrix vector compute").split()
SYSTEM = "You are a careful assistant. Answer the question clearly and completely, and explain your reasoning."
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Shapes of real models, for random weights: the compute and memory of a step, without the checkpoint.
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def text(rnd: random.Random, words: int) -> str:
    out = [rnd.choice(WORDS) for _ in range(words)]
    for i in range(0, words, rnd.randint(12, 20)):
        out[i] = out[i].capitalize()
    return " ".join(out) + "."


def generate(path: str, n: int, seed: int = 0, question_words: tuple[int, int] = (100, 140),
             answer_words: tuple[int, int] = (150, 210)) -> None:
    """``n`` conversational pairs (TRL's prompt/chosen/rejected message lists): a system prompt, a question of
    ``question_words`` words, two answers of ``answer_words`` words (uniform in each range; seeded, so the same
    file every time). With SmolLM2's tokenizer a word is about 1.25 tokens."""
    rnd = random.Random(seed)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for _ in range(n):
            prompt = [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": text(rnd, rnd.randint(*question_words))}]
            chosen, rejected = (text(rnd, rnd.randint(*answer_words)) for _ in range(2))
            f.write(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "assistant", "content": rejected}]}) + "\n")
    os.replace(tmp, path)


def word_tokenizer():
    """A word-level tokenizer over :data:`WORDS` (and their capitalised forms) with a ChatML template: one token
    per word or punctuation mark, ids below 600."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    words = sorted(set(WORDS) | {w.capitalize() for w in WORDS} | set(SYSTEM.replace(".", " ").replace(",", " ")
                                                                            .split()))
    vocab = {tok: i for i, tok in enumerate(specials + ["system", "user", "assistant", ".", ",", "?", "!"] + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


def random_model(shape: str, out_dir: str, seed: int = 0) -> str:
    """A Qwen2 model of ``shape`` (:data:`SHAPES`) with random weights, saved to ``out_dir`` (reused when already
    there), and :func:`word_tokenizer` in ``out_dir/tokenizer``; returns ``out_dir``. The tokenizer has a folder of
    its own: ``AutoTokenizer`` given a folder with a Qwen2 config loads any tokenizer there as Qwen2's BPE."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tok = word_tokenizer()
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    Qwen2ForCausalLM(config).save_pretrained(out_dir + ".tmp")
    tok.save_pretrained(os.path.join(out_dir + ".tmp", "tokenizer"))
    os.replace(out_dir + ".tmp", out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pairs = commands.add_parser("pairs", help="write generated pairs")
    pairs.add_argument("path")
    pairs.add_argument("--n", type=int, default=64)
    model = commands.add_parser("model", help="write a random model of a known shape")
    model.add_argument("shape", choices=sorted(SHAPES))
    model.add_argument("out_dir")
    args = parser.parse_args()
    if args.command == "pairs":
        generate(args.path, args.n)
    else:
        random_model(args.shape, args.out_dir)


if __name__ == "__main__":
    main()
