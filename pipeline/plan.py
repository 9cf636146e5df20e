"""`rlhf plan`: the estimated peak GPU memory of each stage, from the model's config.json alone.

No weights are loaded. The model is built on PyTorch's meta device (shapes without storage) to count its
parameters exactly, layer by layer; everything else is arithmetic on the config's shapes and the stage's
batch and sequence lengths. Units: bytes throughout; the table prints GiB (2**30 bytes), and a GPU sold as
"24 GB" has 24 GiB.

What each stage's peak is made of (per process: with launch.num_processes > 1 every GPU holds all of it):
- weights: a bitsandbytes-quantized model keeps its decoder's linear layers in 4 bits (NF4 + double-
  quantized block constants, ~0.516 bytes per parameter) or 8 bits (+ a float32 scale per row); its
  embeddings, LM head, norms and biases stay at the compute dtype. Generation stages load unquantized.
- adapters: LoRA weights with their gradients and AdamW's two moments (float32; bfloat16 when TRL trains
  a quantized model); ppo adds its frozen reward adapter.
- activations: what the backward pass keeps, per decoder layer and token, counted tensor by tensor
  (`layer_saved_bytes`); with gradient checkpointing only each layer's input, plus one layer recomputed;
  then a workspace for the gradients in flight.
- logits: [tokens, vocab] float32 tensors. sft: TRL's chunked LM-head loss (tiles of 4096 tokens by
  32768 classes, never the whole [B, T, V]); ppo: every sampled step's raw logits while it samples a
  rollout, then the log-softmax over a micro-batch's response positions while it scores and updates.
- KV cache: batch × (prompt + new tokens) × layers × 2 (K and V) × kv_heads × head_dim × dtype bytes.
- CUDA context: the driver context and kernels that torch loads, outside the allocator (~0.75 GiB).
Not counted: allocator fragmentation, DeepSpeed ZeRO sharding (it lowers the figures), judge models, and
the evaluate and export stages.
The figures have not been compared with measured GPU peaks yet (no GPU on the reference machine);
bench/plan_vs_measured.py does that, and on the CPU compares them with resident memory (README).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.config import EMBEDDED_MODEL, TINY_MODEL, PipelineConfig
from rlhf.errors import UserError

GiB = 2**30
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
"""4-bit NF4 with double quantization: half a byte per weight, one 8-bit absmax per 64-weight block, and a
float32 constant per 256 blocks."""
INT8_ROW_SCALE_BYTES = 4
"""LLM.int8(): one byte per weight plus a float32 scale per output row."""
LM_HEAD_TILE = (4096, 32768)
"""TRL's chunked log-prob kernel: [tokens, classes] of one LM-head tile (trl.kernels.chunked_logprob)."""
PPO_LOGIT_BYTES_SAMPLED = 4
"""Per response token and vocabulary entry of a rollout: generate's float32 raw logits of every step, kept
until the rollout's log-probs are read from them."""
PPO_LOGIT_BYTES_NO_GRAD = 8
"""The same while ppo scores a micro-batch with the reference: the float32 scaled logits and their log-softmax."""
PPO_LOGIT_BYTES_TRAIN = 16
"""The same in the update, with a graph: the scaled logits and their log-softmax (kept for the backward
pass, 8), the entropy's softmax in flight (4, no graph), and the gradient of the logits (4)."""


# --- the model's shape --------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a decoder-only model's config, with exact parameter counts."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    embedding_params: int
    lm_head_params: int
    """0 when the LM head is tied to the input embeddings."""
    linears: tuple[Linear, ...]
    """The decoder's linear layers (the LM head excluded): what bitsandbytes quantizes and LoRA can adapt."""
    other_params: int
    """Norms and biases: kept at the compute dtype."""

    @property
    def params(self) -> int:
        return self.embedding_params + self.lm_head_params + self.linear_params + self.other_params

    @property
    def linear_params(self) -> int:
        return sum(layer.in_features * layer.out_features for layer in self.linears)


def shape_from_config(config, name: str, trust_remote_code: bool = False) -> ModelShape:
    """Count a transformers config's parameters on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        raise UserError(f"{name}: not a causal LM that transformers can build ({str(e).splitlines()[0]})") from None
    text = config.get_text_config()
    heads = text.num_attention_heads
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight is embedding
    linears = tuple(
        Linear(module_name, module.in_features, module.out_features)
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    )
    total = sum(p.numel() for p in model.parameters())  # counts a tied weight once
    lm_head = 0 if tied else head.weight.numel()
    shape = ModelShape(
        name=name,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        embedding_params=embedding.numel(),
        lm_head_params=lm_head,
        linears=linears,
        other_params=0,
    )
    other = total - shape.embedding_params - lm_head - shape.linear_params
    return ModelShape(**{**shape.__dict__, "other_params": other})


def load_shape(name_or_path: str, model_config: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of a model named as in `model.name_or_path`, from its config.json only.

    `model_config`: a config.json file (or a folder with one) to use instead, e.g. for a hub id on a
    machine without network (configs/model_shapes/ has some)."""
    from transformers import AutoConfig

    if model_config is not None:
        if not Path(model_config).exists():
            raise UserError(f"--model-config: {model_config}: file not found")
        source, kwargs = model_config, {}
    elif name_or_path == TINY_MODEL:
        from rlhf.models import resolve_model

        source, kwargs = resolve_model(name_or_path), {}  # built in a second, no download
    elif name_or_path == EMBEDDED_MODEL:
        source, kwargs = _embedded_model_config()
    elif Path(name_or_path).is_dir():
        source, kwargs = name_or_path, {}
    else:  # a hub id: its config.json from the Hugging Face cache, else downloaded (a few KB)
        source, kwargs = name_or_path, {}
        try:
            config = AutoConfig.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code, local_files_only=True
            )
            return shape_from_config(config, name_or_path, trust_remote_code)
        except OSError:
            pass  # not in the cache
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot read the config of '{name_or_path}' ({str(e).strip().splitlines()[0]}): offline, pass "
            "--model-config PATH to its config.json (configs/model_shapes/ has some)"
        ) from None
    return shape_from_config(config, name_or_path, trust_remote_code)


def _embedded_model_config() -> tuple[str, dict]:
    """The embedded model's config: from its materialized cache, else from the GGUF file's metadata."""
    from rlhf.models import cache_dir, embedded_gguf

    cached = cache_dir() / "models" / EMBEDDED_MODEL
    if (cached / ".complete").exists():
        return str(cached), {}
    gguf = embedded_gguf()
    return str(gguf.parent), {"gguf_file": gguf.name}


# --- the pieces of an estimate ------------------------------------------------------------------


def compute_bytes(config: PipelineConfig) -> int:
    """Bytes per activation and unquantized weight. `auto` is planned as bfloat16: a GPU that supports it."""
    return 4 if config.model.dtype == "float32" else 2


def weight_bytes(shape: ModelShape, quantization: str, dtype_bytes: int, classifier: bool = False) -> int:
    """The model's weights on the GPU. classifier: a sequence classifier (no LM head; a [hidden, 1] score)."""
    head = shape.hidden if classifier else shape.lm_head_params
    kept = (shape.embedding_params + head + shape.other_params) * dtype_bytes  # never quantized
    if quantization == "4bit":
        return int(kept + shape.linear_params * NF4_BYTES_PER_PARAM)
    if quantization == "8bit":
        return kept + shape.linear_params + INT8_ROW_SCALE_BYTES * sum(layer.out_features for layer in shape.linears)
    return kept + shape.linear_params * dtype_bytes


def lora_targets(shape: ModelShape, target_modules) -> list[Linear]:
    """The linear layers LoRA adapts: `all-linear` (PEFT: every one but the output layer) or by name."""
    if target_modules == "all-linear":
        return list(shape.linears)
    return [layer for layer in shape.linears if layer.name.rsplit(".", 1)[-1] in set(target_modules)]


def lora_params(shape: ModelShape, config: PipelineConfig) -> int:
    """A: [r, in], B: [out, r] for every adapted layer."""
    targets = lora_targets(shape, config.lora.target_modules)
    return sum(config.lora.r * (t.in_features + t.out_features) for t in targets)


def lora_inputs_per_layer(shape: ModelShape, config: PipelineConfig) -> float:
    """Σ in_features of the adapted layers in one decoder layer (each keeps its own copy of its input)."""
    return sum(t.in_features for t in lora_targets(shape, config.lora.target_modules)) / shape.layers


def layer_saved_bytes(shape: ModelShape, dtype_bytes: int, lora_inputs: float, lora_input_bytes: float) -> float:
    """Bytes one decoder layer keeps for the backward pass, per token (Llama-style: RMSNorm, attention
    with grouped KV heads through SDPA, gated MLP)."""
    b, hidden, inter = dtype_bytes, shape.hidden, shape.intermediate
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * (4 + b) * hidden  # two RMSNorms: the float32 upcast of the input, the normalized output
    # q after RoPE, K and V, the attention output and its contiguous copy for o_proj; float32 logsumexp per head
    attention = b * (3 * q_width + 2 * kv_width) + 4 * shape.heads
    mlp = 4 * b * inter  # gate, up, act(gate), act(gate)·up
    return norms + attention + mlp + lora_input_bytes * lora_inputs


def training_activations(
    shape: ModelShape,
    sequences: int,
    length: int,
    dtype_bytes: int,
    per_layer: float,
    checkpointing: bool,
    quantized: bool,
) -> tuple[int, int]:
    """(activations kept for the backward pass, workspace in flight during it) for [sequences, length]."""
    tokens = sequences * length
    if checkpointing:  # each layer keeps its input; one layer at a time is recomputed in full
        kept = shape.layers * tokens * dtype_bytes * shape.hidden + tokens * per_layer
    else:
        kept = shape.layers * tokens * per_layer
    kept += tokens * (4 + dtype_bytes) * shape.hidden  # the final norm
    kept += sequences * length * length  # the boolean [B, 1, T, T] attention mask SDPA gets with padding
    # Gradients of the widest activations (gate and up, the residual stream) and, for a quantized layer,
    # its weight dequantized for the backward matmul.
    workspace = tokens * dtype_bytes * (2 * shape.intermediate + 2 * shape.hidden)
    if quantized:
        workspace += max(t.in_features * t.out_features for t in shape.linears) * dtype_bytes
    return int(kept), int(workspace)


def forward_transient(shape: ModelShape, tokens: int, dtype_bytes: int, lora_cast: bool) -> int:
    """The largest set of live tensors in one layer of a forward pass without a graph: residual and
    normed hidden states, gate, up and their product; plus the float32 copy of the MLP's input that a
    float32 LoRA adapter on a 16-bit model makes."""
    live = tokens * dtype_bytes * (2 * shape.hidden + 3 * shape.intermediate)
    return int(live + (tokens * 4 * shape.intermediate if lora_cast else 0))


def kv_cache_bytes(shape: ModelShape, batch: int, length: int, dtype_bytes: int) -> int:
    return batch * length * shape.layers * 2 * shape.kv_heads * shape.head_dim * dtype_bytes


def sampling_bytes(shape: ModelShape, batch: int) -> int:
    """Float32 next-token scores, processed scores and probabilities of one decoding step."""
    return batch * shape.vocab * 4 * 3


# --- stages -------------------------------------------------------------------------------------


@dataclass
class Estimate:
    stage: str
    parts: dict[str, int] = field(default_factory=dict)
    """Component → bytes (weights, adapters, activations, logits, kv cache, workspace, context)."""
    note: str = ""
    checkpointing: bool | None = None
    """Gradient checkpointing as configured; None for stages without a backward pass."""
    flipped_total: int | None = None
    """The peak with gradient checkpointing switched the other way."""

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def plan_generation(
    stage: str, shape: ModelShape, config: PipelineConfig, batch: int, prompt: int, new: int
) -> Estimate:
    """A stage that samples from an unquantized model (the teacher, the SFT model for preferences)."""
    b = compute_bytes(config)
    return Estimate(
        stage,
        {
            "weights": weight_bytes(shape, "none", b),
            "activations": forward_transient(shape, batch * prompt, b, lora_cast=False),
            "logits": sampling_bytes(shape, batch),
            "kv cache": kv_cache_bytes(shape, batch, prompt + new, b),
            "context": CUDA_CONTEXT_BYTES,
        },
        note=f"{batch} prompts × ({prompt} + {new} new) tokens",
    )


def plan_trainer(stage: str, shape: ModelShape, config: PipelineConfig, checkpointing: bool | None = None) -> Estimate:
    """sft or reward: LoRA (QLoRA) through a TRL trainer, under bf16 autocast on a 16-bit or quantized model."""
    settings = config.sft if stage == "sft" else config.reward
    checkpointing = settings.gradient_checkpointing if checkpointing is None else checkpointing
    b, quantization = compute_bytes(config), config.model.quantization
    quantized = quantization != "none"
    classifier = stage == "reward"
    # RewardTrainer runs chosen and rejected through one forward: twice the batch.
    sequences = settings.batch_size * (2 if classifier else 1)
    autocast = b == 2 or quantized
    # LoRA input kept for its backward: under autocast a 16-bit copy (+ the dropout mask); in float32, the
    # dropout output and mask (nothing when dropout is 0: the input itself is kept already). The reward
    # stage trains with dropout off (RewardConfig.disable_dropout): on the CPU in float32, counting it
    # made reward's estimate 1.6 times its measured peak (bench/plan_vs_measured.py).
    dropout = config.lora.dropout > 0 and not classifier
    lora_bytes = (2 + dropout) if autocast else (5 if dropout else 0)
    per_layer = layer_saved_bytes(shape, b, lora_inputs_per_layer(shape, config), lora_bytes)
    activations, workspace = training_activations(
        shape, sequences, settings.max_length, b, per_layer, checkpointing, quantized
    )
    adapter_dtype = 2 if quantized else 4  # TRL keeps QLoRA's adapters in bfloat16; PEFT's default is float32
    trainable = lora_params(shape, config) + (shape.hidden if classifier else 0)
    adapters = trainable * adapter_dtype * 4  # weights, gradients, AdamW's two moments
    if config.launch.num_processes > 1:
        adapters += trainable * adapter_dtype  # DDP's gradient buckets
    tokens = sequences * settings.max_length
    # sft: two LM-head tiles (the forward's, the backward's recomputation), the hidden states' float32 gradient
    tile = min(tokens, LM_HEAD_TILE[0]) * min(shape.vocab, LM_HEAD_TILE[1]) * b
    logits = 0 if classifier else 2 * tile + tokens * shape.hidden * 4
    estimate = Estimate(
        stage,
        {
            "weights": weight_bytes(shape, quantization, b, classifier),
            "adapters": adapters,
            "activations": activations,
            "logits": logits,
            "workspace": workspace,
            "context": CUDA_CONTEXT_BYTES,
        },
        note=f"{sequences} × {settings.max_length} tokens" + (" (chosen + rejected)" if classifier else ""),
        checkpointing=checkpointing,
    )
    if checkpointing == settings.gradient_checkpointing:  # as configured: also say what the other way costs
        estimate.flipped_total = plan_trainer(stage, shape, config, not checkpointing).total
    return estimate


def plan_ppo(shape: ModelShape, config: PipelineConfig, prompt: int, checkpointing: bool | None = None) -> Estimate:
    """One backbone (quantized as configured) with policy, reward and (with gae) value adapters; the peak
    phase of a step: the rollout (sampling), the scoring forwards, or the update."""
    settings = config.ppo
    checkpointing = settings.gradient_checkpointing if checkpointing is None else checkpointing
    b, quantization = compute_bytes(config), config.model.quantization
    new, length = settings.max_new_tokens, prompt + settings.max_new_tokens
    rollout, micro = settings.rollout_batch_size, settings.micro_batch_size
    lora_cast = b == 2  # float32 adapters on a 16-bit model copy their input to float32
    adapter = lora_params(shape, config)
    critic = settings.advantage_estimator == "gae"  # the critic-free estimators have no value adapter or head
    trained = 2 if critic else 1
    resident = {
        "weights": weight_bytes(shape, quantization, b),
        # policy (and value): float32 weights, gradients, AdamW moments; reward: frozen float32 weights; heads
        "adapters": adapter * 16 * trained + adapter * 4 + trained * shape.hidden * 4,
    }
    phases = {
        "rollout": {
            "activations": forward_transient(shape, rollout * prompt, b, lora_cast),
            "logits": sampling_bytes(shape, rollout) + PPO_LOGIT_BYTES_SAMPLED * rollout * new * shape.vocab,
            "kv cache": kv_cache_bytes(shape, rollout, length, b),
        },
        "scoring": {  # reference, value and reward forwards, a micro-batch at a time
            # one layer's live tensors, and the final hidden states every role's head reads
            "activations": forward_transient(shape, micro * length, b, lora_cast) + micro * length * shape.hidden * b,
            "logits": PPO_LOGIT_BYTES_NO_GRAD * micro * new * shape.vocab,
        },
    }
    # The update keeps one forward of a micro-batch at a time: the policy's loss goes backward before
    # the value's forward.
    per_layer = layer_saved_bytes(shape, b, lora_inputs_per_layer(shape, config), 4 if lora_cast else 0)
    quantized = quantization != "none"
    activations, workspace = training_activations(shape, micro, length, b, per_layer, checkpointing, quantized)
    phases["update"] = {
        "activations": activations,
        "logits": PPO_LOGIT_BYTES_TRAIN * micro * new * shape.vocab,
        "workspace": workspace,
    }
    peak_phase = max(phases, key=lambda name: sum(phases[name].values()))
    parts = {**resident, **phases[peak_phase], "context": CUDA_CONTEXT_BYTES}
    estimate = Estimate(
        "ppo",
        parts,
        note=f"peak in the {peak_phase}; rollout {rollout} × {length} tokens, micro-batch {micro}",
        checkpointing=checkpointing,
    )
    if checkpointing == settings.gradient_checkpointing:  # as configured: also say what the other way costs
        estimate.flipped_total = plan_ppo(shape, config, prompt, not checkpointing).total
    return estimate


def plan_memory(config: PipelineConfig, shape: ModelShape, prompt_tokens: int, teacher_shape=None) -> list[Estimate]:
    """Every GPU stage's estimate, in pipeline order. teacher_shape: the local teacher's shape when it is
    another model than `model.name_or_path` (None: not known, or the same)."""
    estimates = []
    teacher = config.instructions.teacher
    if teacher.kind == "openai":
        estimates.append(Estimate("instructions", note="teacher served over HTTP: no local model"))
    else:
        teacher_model = teacher_shape or shape
        batch, new = teacher.batch_size, teacher.max_new_tokens
        estimates.append(plan_generation("instructions", teacher_model, config, batch, prompt_tokens, new))
    estimates.append(plan_trainer("sft", shape, config))
    preferences = config.preferences
    if preferences.source == "import":
        estimates.append(Estimate("preferences", note="imported: no model"))
    else:
        batch, new = preferences.batch_size, preferences.max_new_tokens
        estimate = plan_generation("preferences", shape, config, batch, prompt_tokens, new)
        if preferences.judge != "rubric":
            estimate.note += f"; the {preferences.judge} judge is not counted"
        estimates.append(estimate)
    if config.reward.model:
        estimates.append(Estimate("reward", note="external reward model: not estimated"))
    else:
        estimates.append(plan_trainer("reward", shape, config))
    estimates.append(plan_ppo(shape, config, prompt_tokens))
    return estimates


# --- output -------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'24GB', '24GiB', '24G', '80' (GiB) or '24576MiB' → bytes. GPU memory comes in binary units, so
    GB means GiB here."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([GgMm]i?[Bb]?)?\s*", text)
    if not match:
        raise UserError(f"--gpu-mem: '{text}' is not a size like 24GB or 24576MiB")
    unit = (match.group(2) or "G")[0].upper()
    return int(float(match.group(1)) * (GiB if unit == "G" else 2**20))


COLUMNS = ("weights", "adapters", "activations", "logits", "kv cache", "workspace", "context")


def format_table(estimates: list[Estimate], gpu_bytes: int) -> str:
    """One row per stage (GiB), the peak, whether it fits, and the peak with checkpointing flipped."""
    size = f"{gpu_bytes / GiB:g} GB"
    header = ["stage", *COLUMNS, "peak", f"fits {size}", "grad ckpt", "other ckpt"]
    rows = []
    for e in estimates:
        if not e.parts:
            rows.append([e.stage, *["-"] * len(COLUMNS), "-", "-", "-", "-"])
            continue
        ckpt = "-" if e.checkpointing is None else ("on" if e.checkpointing else "off")
        flipped = "-" if e.flipped_total is None else f"{'off' if e.checkpointing else 'on'}: {_gib(e.flipped_total)}"
        cells = [_gib(e.parts[c]) if c in e.parts else "-" for c in COLUMNS]
        rows.append([e.stage, *cells, _gib(e.total), "yes" if e.total <= gpu_bytes else "NO", ckpt, flipped])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    def line(cells) -> str:  # the stage name left-aligned, numbers right-aligned
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [line(r) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counted = [e for e in estimates if e.parts]
    if counted:
        top = max(counted, key=lambda e: e.total)
        verdict = "fits" if top.total <= gpu_bytes else "does NOT fit"
        lines.append(f"\npeak over all stages: {_gib(top.total)} GiB ({top.stage}): {verdict} in {size}")
    notes = [f"  {e.stage}: {e.note}" for e in estimates if e.note]
    return "\n".join([*lines, "notes:", *notes]) if notes else "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def describe(shape: ModelShape, config: PipelineConfig, prompt_tokens: int) -> str:
    """The header above the table: the model and the planning assumptions."""
    dtype = "bfloat16" if config.model.dtype == "auto" else config.model.dtype
    targets = len(lora_targets(shape, config.lora.target_modules))
    quant = {"none": "not quantized", "4bit": "4-bit NF4 (QLoRA)", "8bit": "8-bit"}[config.model.quantization]
    return (
        f"model {shape.name}: {_count(shape.params)} parameters, {shape.layers} layers, hidden {shape.hidden}, "
        f"vocab {shape.vocab}; {dtype}, {quant}; LoRA r={config.lora.r} on {targets} "
        f"layers ({_count(lora_params(shape, config))} parameters per adapter)\n"
        f"estimated peak GPU memory per process, GiB; training sequences at their max_length (batches pad to\n"
        f"their longest example: the worst case); prompts assumed {prompt_tokens} tokens (--prompt-tokens)"
    )


def plan_report(
    config: PipelineConfig, gpu_mem: str = "24GB", model_config: str | None = None, prompt_tokens: int = 512
) -> str:
    """What `rlhf plan` prints: the model, the assumptions, and the table."""
    if prompt_tokens <= 0:
        raise UserError(f"--prompt-tokens: expected a positive number of tokens, got {prompt_tokens}")
    gpu_bytes = parse_size(gpu_mem)
    trust = config.model.trust_remote_code
    shape = load_shape(config.model.name_or_path, model_config, trust)
    teacher = config.instructions.teacher
    teacher_shape = None
    if teacher.kind == "local" and teacher.model and teacher.model != config.model.name_or_path:
        teacher_shape = load_shape(teacher.model, None, trust)
    estimates = plan_memory(config, shape, prompt_tokens, teacher_shape)
    return describe(shape, config, prompt_tokens) + "\n\n" + format_table(estimates, gpu_bytes)
