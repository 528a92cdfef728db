"""unlock.convert: a real GGUF (written here from the tiny Qwen2 target, float32) back into an HF folder.

The round trip HF -> GGUF -> convert_gguf -> HF must give the same logits, the same vocabulary and a config
with both RoPE keys; the conversion must be idempotent and must never clobber a folder it did not write.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from unlock.convert import MARKER, convert_gguf

# HF parameter name -> GGUF tensor name, for the Qwen2 layout llama.cpp uses.
TOP_LEVEL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
PER_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in TOP_LEVEL:
        return TOP_LEVEL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.<i>.<rest>
    return f"blk.{layer}.{PER_LAYER[rest]}"


def write_qwen2_gguf(model_dir: Path, path: Path) -> None:
    """A float32 GGUF of an HF Qwen2 folder: weights unquantized, byte-level BPE vocabulary and merges."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = model.config
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer_json["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tokenizer_json["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    for name, tensor in model.state_dict().items():
        writer.add_tensor(gguf_name(name), tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_target_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.F32.gguf"
    write_qwen2_gguf(tiny_target_model, path)
    return path


def test_round_trip_keeps_weights_vocabulary_and_rope(tiny_target_model, tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "converted")

    assert out == tmp_path / "converted"
    config = json.loads((out / "config.json").read_text())
    original = json.loads((tiny_target_model / "config.json").read_text())
    theta = original["rope_parameters"]["rope_theta"]
    assert config["rope_theta"] == theta
    assert config["rope_parameters"]["rope_theta"] == theta
    assert config["rope_parameters"]["rope_type"] == "default"
    assert "quantization_config" not in config
    assert list(out.glob("*.safetensors")), "no safetensors weights written"

    ids = torch.tensor([[1, 17, 42, 99, 150, 7, 3, 250]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_target_model, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    # Every original token keeps its id (transformers' Qwen2 GGUF reader may add `<|endoftext|>` on top).
    converted_vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    original_vocab = AutoTokenizer.from_pretrained(tiny_target_model).get_vocab()
    assert {t: converted_vocab.get(t) for t in original_vocab} == original_vocab
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def test_second_call_reuses_the_finished_folder(tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "converted")
    marker_mtime = (out / MARKER).stat().st_mtime_ns
    weights = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert convert_gguf(tiny_gguf, out) == out
    assert (out / MARKER).stat().st_mtime_ns == marker_mtime
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == weights


def test_refuses_a_folder_it_did_not_write(tiny_gguf, tmp_path):
    foreign = tmp_path / "someone-elses-model"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")

    with pytest.raises(FileExistsError, match="not a finished conversion"):
        convert_gguf(tiny_gguf, foreign)
    assert (foreign / "config.json").read_text() == "{}"


def test_missing_gguf_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        convert_gguf(tmp_path / "nowhere.gguf", tmp_path / "out")
