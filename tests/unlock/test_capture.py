"""Decoder-layer discovery across families, and last-token capture on real (tiny) HF models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unlock.capture import capture_last_token, encode, load_model
from unlock.layers import find_decoder_layers


def tiny_config(family: str):
    import transformers as tf

    common = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2
    )
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=2)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=16)
    config_class = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[family]
    return config_class(**common, num_key_value_heads=1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3", "gpt2"])
def test_finds_the_decoder_layers_of_each_family(family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config(family))
    layers = find_decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == 3
    assert all("Block" in type(layer).__name__ or "DecoderLayer" in type(layer).__name__ for layer in layers)


class Wrapper(nn.Module):
    """A multimodal-style nesting: language_model.layers, plus an unrelated vision ModuleList."""

    def __init__(self):
        super().__init__()
        self.language_model = nn.Module()
        self.language_model.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(4)])
        self.vision_tower = nn.Module()
        self.vision_tower.blocks = nn.ModuleList([nn.Linear(2, 2)])


def test_nested_language_model_layers_and_overrides():
    model = Wrapper()
    assert find_decoder_layers(model) is model.language_model.layers
    assert find_decoder_layers(model, "vision_tower.blocks") is model.vision_tower.blocks
    model.unlock_layers_path = "vision_tower.blocks"
    assert find_decoder_layers(model) is model.vision_tower.blocks
    with pytest.raises(ValueError, match="names nothing"):
        find_decoder_layers(model, "no.such.path")
    with pytest.raises(ValueError, match="names Linear"):
        find_decoder_layers(model, "vision_tower.blocks.0")


def test_ambiguous_or_missing_layers_say_how_to_fix_it():
    model = Wrapper()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([nn.Linear(2, 2)])  # a second candidate
    with pytest.raises(
        ValueError, match=r"found \['language_model.layers', 'model.layers'\].*unlock_layers_path"
    ):
        find_decoder_layers(model)
    with pytest.raises(ValueError, match="found none"):
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2)))


PROMPTS = [
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?\nAnswer:\n",
    "hello world\n",
    "A train travels 60 miles in 2 hours.\n",
]


@pytest.fixture(scope="module")
def target(tiny_target_model):
    return load_model(str(tiny_target_model), device="cpu")


@torch.no_grad()
def test_capture_is_the_layer_output_not_the_final_norm(target):
    acts = capture_last_token(target, PROMPTS[:1])
    assert acts.shape == (1, target.num_layers, target.hidden_size) and acts.dtype == torch.float32
    ids = torch.tensor([encode(target.tokenizer, PROMPTS[0])])
    out = target.model(input_ids=ids, output_hidden_states=True)
    states = out.hidden_states  # embeddings, then after each layer; the last one after the final norm
    for layer in range(target.num_layers - 1):
        torch.testing.assert_close(acts[0, layer], states[layer + 1][0, -1], rtol=1e-5, atol=1e-5)
    last = acts[0, -1]
    assert not torch.allclose(last, states[-1][0, -1], atol=1e-3)  # the final norm is not applied ...
    torch.testing.assert_close(
        target.model.model.norm(last), states[-1][0, -1], rtol=1e-5, atol=1e-5
    )  # ... here


def test_batched_left_padded_capture_equals_one_prompt_at_a_time(target):
    lengths = {len(encode(target.tokenizer, p)) for p in PROMPTS}
    assert len(lengths) == 3  # different lengths, so the batch really is padded
    batched = capture_last_token(target, PROMPTS, batch_size=3)
    alone = torch.cat([capture_last_token(target, [p]) for p in PROMPTS])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)


def test_bfloat16_capture(tiny_target_model, target):
    bf16 = load_model(str(tiny_target_model), dtype="bfloat16", device="cpu")
    acts = capture_last_token(bf16, PROMPTS[:2], batch_size=2)
    assert acts.dtype == torch.float32
    reference = capture_last_token(target, PROMPTS[:2], batch_size=2)
    assert ((acts - reference).norm() / reference.norm()) < 0.1


def test_nan_activations_are_refused(tiny_target_model):
    broken = load_model(str(tiny_target_model), device="cpu")
    with torch.no_grad():
        broken.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(
        ValueError, match=r"non-finite activations .* at decoder layer 1 for prompts \[0, 1\]"
    ):
        capture_last_token(broken, PROMPTS[:2])


def test_builtin_templates_have_the_papers_structure():
    from unlock.templates import ANSWER_CLOSE, ANSWER_OPEN, BUILTIN_TEMPLATES, render

    direct, cot = BUILTIN_TEMPLATES["direct"], BUILTIN_TEMPLATES["cot"]
    for template in (direct, cot):
        assert template.count("{question}") == 1 and ANSWER_OPEN in template and ANSWER_CLOSE in template
        assert "\nQuestion: {question}\n" in template and template.endswith("\n")
    assert direct.endswith("\nAnswer:\n") and cot.endswith("\nAnswer: Let's think step by step.\n")
    assert render(direct, "What is {x}?").endswith(
        "Question: What is {x}?\nAnswer:\n"
    )  # braces stay as they are


def test_template_files_and_chat_wrapping(tmp_path, target):
    from unlock.capture import format_prompts
    from unlock.templates import load_template

    path = tmp_path / "mine.txt"
    path.write_text("Q: {question}\nA:\n", encoding="utf-8")
    assert load_template(str(path)) == "Q: {question}\nA:\n"
    [wrapped] = format_prompts(target.tokenizer, ["2+2?"], load_template(str(path)), chat=True)
    assert wrapped == "<|user|>\nQ: 2+2?\nA:\n\n<|assistant|>\n"  # the tiny models' chat template
    plain = encode(target.tokenizer, wrapped, chat=False)
    assert encode(target.tokenizer, wrapped, chat=True) == list(
        target.tokenizer(wrapped, add_special_tokens=False).input_ids
    )
    assert len(plain) >= len(encode(target.tokenizer, wrapped, chat=True))
    target.tokenizer.chat_template, saved = None, target.tokenizer.chat_template
    try:
        with pytest.raises(ValueError, match="has no chat template"):
            format_prompts(target.tokenizer, ["2+2?"], "{question}", chat=True)
    finally:
        target.tokenizer.chat_template = saved
