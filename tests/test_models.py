"""Model loading: reserved names, unknown models, QLoRA on the CPU."""

from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from rlhf.config import ModelConfig, LoraConfig
from rlhf.errors import UserError
from rlhf.models import load_causal_lm, load_tokenizer, peft_lora_config, resolve_model


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
