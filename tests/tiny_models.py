"""Tiny random-weight HF models with their own tokenizers, built offline inside the tests.

Each model is a real HF folder (config, safetensors, tokenizer, chat template) that transformers, `unlock`
and vLLM all load. Different vocabularies and sizes let the tests exercise cross-tokenizer transfer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

CORPUS = [
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "Answer: Let's think step by step. Tom starts with 3 apples and buys 5, so 3 + 5 = 8.",
    "Solve the following problem and finish with the final answer.",
    "Reason step by step before giving the final answer.",
    "A train travels 60 miles in 2 hours. What is its speed in miles per hour?",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.",
    "Mary had a little lamb whose fleece was white as snow, "
    "and everywhere that Mary went the lamb was sure to go.",
    "There are 12 eggs in a dozen. If Sara uses 4 eggs, how many are left? 12 - 4 = 8.",
    "The final answer is 42. The sum of 17 and 25 equals 42.",
    "user assistant system hello world numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    architecture: str  # "qwen2" | "llama"
    hidden_size: int
    num_layers: int
    vocab_size: int
    seed: int


# Two families, two sizes, two vocabularies: a source and a target for cross-model transfer.
SOURCE = TinySpec("llama", hidden_size=128, num_layers=6, vocab_size=400, seed=1)
TARGET = TinySpec("qwen2", hidden_size=64, num_layers=4, vocab_size=300, seed=2)


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(spec: TinySpec, out_dir: Path) -> Path:
    """Write a random-weight model folder for `spec` to `out_dir` (float32) and return it."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tokenizer = make_tokenizer(spec.vocab_size)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 2,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.hidden_size // 32,  # head_dim 32: a size vLLM's CPU attention supports
        num_key_value_heads=max(1, spec.hidden_size // 64),
        max_position_embeddings=1024,
        # A wide init gives peaked logits, so greedy choices are not decided by float rounding.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    config = (LlamaConfig if spec.architecture == "llama" else Qwen2Config)(**common)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
