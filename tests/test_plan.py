"""`rlhf plan`: the memory arithmetic against numbers worked out by hand, and the shipped GPU configs.

(Comparing the estimates with measured peaks needs a GPU: CPU resident memory says nothing about CUDA
allocations. README, "Memory planner", says what has not been checked.)"""

from pathlib import Path

import pytest
from transformers import LlamaConfig

from rlhf import plan
from rlhf.cli import main
from rlhf.config import load_config

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")
QWEN_7B_SHAPE = str(REPO / "configs" / "model_shapes" / "qwen2.5-7b-instruct.json")

# A Llama small enough to count by hand: hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads, vocab 100.
TINY = LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def shape() -> plan.ModelShape:
    return plan.shape_from_config(TINY, "tiny")


def test_parameters_are_counted_exactly(shape):
    # per layer: q 64·64, k 64·32, v 64·32, o 64·64, gate/up/down 64·128 each = 36 864
    assert shape.linear_params == 2 * 36_864
    assert shape.embedding_params == shape.lm_head_params == 6_400
    assert shape.other_params == 2 * 2 * 64 + 64  # two RMSNorms per layer and the final one
    assert shape.params == 86_848
    assert (shape.head_dim, shape.kv_heads) == (16, 2)
    tied = plan.shape_from_config(LlamaConfig(**{**TINY.to_dict(), "tie_word_embeddings": True}), "tied")
    assert tied.lm_head_params == 0 and tied.params == 86_848 - 6_400


def test_weight_bytes_by_precision(shape):
    kept = (6_400 + 6_400 + 320) * 2  # embeddings, LM head, norms: never quantized
    assert plan.weight_bytes(shape, "none", 2) == 86_848 * 2
    assert plan.weight_bytes(shape, "none", 4) == 86_848 * 4
    # NF4: 0.5 byte + one 8-bit absmax per 64 weights + one float32 per 256 blocks: 36 864 + 1 152 + 18
    assert plan.weight_bytes(shape, "4bit", 2) == kept + 38_034
    # int8: 1 byte per weight + a float32 scale per output row (512 rows per layer)
    assert plan.weight_bytes(shape, "8bit", 2) == kept + 73_728 + 4 * 1_024
    # a classifier: a [64, 1] score head instead of the LM head
    assert plan.weight_bytes(shape, "none", 2, classifier=True) == (86_848 - 6_400 + 64) * 2


def test_lora_parameters(shape):
    config = load_config(SMOKE, ["lora.r=8"])
    # all-linear: Σ (in + out) per layer = 128 + 96 + 96 + 128 + 192 + 192 + 192 = 1 024
    assert plan.lora_params(shape, config) == 8 * 2 * 1_024
    assert plan.lora_inputs_per_layer(shape, config) == 6 * 64 + 128
    only_qv = load_config(SMOKE, ["lora.r=8", "lora.target_modules=[q_proj,v_proj]"])
    assert plan.lora_params(shape, only_qv) == 8 * 2 * (128 + 96)


def test_activations_kv_cache_and_logits(shape):
    # per token and layer, bf16: norms 2·(4+2)·64 = 768; attention 2·(3·64 + 2·32) + 4·4 = 528;
    # MLP 4·2·128 = 1 024; LoRA inputs 3 bytes × 512 features = 1 536
    per_layer = plan.layer_saved_bytes(shape, 2, lora_inputs=512, lora_input_bytes=3)
    assert per_layer == 768 + 528 + 1_024 + 1_536 == 3_856
    # 2 sequences of 8 tokens: all layers kept + final norm (16·6·64) + boolean mask (2·8·8)
    kept, workspace = plan.training_activations(shape, 2, 8, 2, per_layer, checkpointing=False, quantized=False)
    assert kept == 2 * 16 * 3_856 + 6_144 + 128
    assert workspace == 16 * 2 * (2 * 128 + 2 * 64)
    # checkpointing: each layer's input (16·2·64) + one layer recomputed
    kept, _ = plan.training_activations(shape, 2, 8, 2, per_layer, checkpointing=True, quantized=False)
    assert kept == 2 * 16 * 2 * 64 + 16 * 3_856 + 6_144 + 128
    # quantized: the largest weight (64·128) dequantized for the backward matmul
    _, workspace_4bit = plan.training_activations(shape, 2, 8, 2, per_layer, checkpointing=False, quantized=True)
    assert workspace_4bit == workspace + 64 * 128 * 2
    # KV cache: 3 sequences × 10 tokens × 2 layers × (K, V) × 2 heads × 16 × 2 bytes
    assert plan.kv_cache_bytes(shape, 3, 10, 2) == 7_680
    assert plan.sampling_bytes(shape, 3) == 3 * 100 * 12


def test_sft_estimate_is_the_sum_of_its_parts(shape):
    config = load_config(SMOKE, ["sft.batch_size=2", "sft.max_length=8", "lora.r=8", "lora.dropout=0.05"])
    estimate = plan.plan_trainer("sft", shape, config)
    per_layer = 3_856  # bf16 autocast, dropout: 3 bytes per LoRA input feature
    kept, workspace = plan.training_activations(shape, 2, 8, 2, per_layer, False, False)
    assert estimate.parts == {
        "weights": 86_848 * 2,
        "adapters": 16_384 * 4 * 4,  # float32 weights, gradients and two AdamW moments
        "activations": kept,
        "logits": 2 * 16 * 100 * 2 + 16 * 64 * 4,  # two LM-head tiles (smaller than 4096 × 32768) + hidden grads
        "workspace": workspace,
        "context": plan.CUDA_CONTEXT_BYTES,
    }
    assert estimate.total == sum(estimate.parts.values())
    assert estimate.checkpointing is False and estimate.flipped_total < estimate.total
    reward = plan.plan_trainer("reward", shape, config.model_copy(update={"reward": config.reward.model_copy(update={"batch_size": 1, "max_length": 8})}))
    assert reward.parts["logits"] == 0 and "chosen + rejected" in reward.note  # 2 sequences: the pair
    # reward trains with dropout off (RewardConfig.disable_dropout): 2 bytes per LoRA input feature, not 3
    assert plan.layer_saved_bytes(shape, 2, lora_inputs=512, lora_input_bytes=2) == 3_856 - 512
    assert reward.parts["activations"] == plan.training_activations(shape, 2, 8, 2, 3_856 - 512, False, False)[0]


def test_ppo_peak_is_the_largest_phase(shape):
    config = load_config(SMOKE, ["lora.r=8", "ppo.rollout_batch_size=4", "ppo.micro_batch_size=2", "ppo.max_new_tokens=6"])
    estimate = plan.plan_ppo(shape, config, prompt=10)
    assert estimate.parts["adapters"] == 16_384 * (16 * 2 + 4) + 2 * 64 * 4  # policy, value trainable; reward frozen
    rollout_logits = plan.sampling_bytes(shape, 4) + 4 * 4 * 6 * 100  # + every step's raw logits, float32
    scoring_logits = plan.PPO_LOGIT_BYTES_NO_GRAD * 2 * 6 * 100  # a micro-batch at a time
    update_logits = plan.PPO_LOGIT_BYTES_TRAIN * 2 * 6 * 100
    assert estimate.parts["logits"] in (rollout_logits, scoring_logits, update_logits)
    phase = estimate.note.split("peak in the ")[1].split(";")[0]
    assert phase in ("rollout", "scoring", "update")
    # A critic-free estimator has no value adapter, optimizer state or head.
    grpo = load_config(SMOKE, ["lora.r=8", "ppo.rollout_batch_size=4", "ppo.micro_batch_size=2", "ppo.max_new_tokens=6",
                               "ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=2"])
    assert plan.plan_ppo(shape, grpo, prompt=10).parts["adapters"] == 16_384 * (16 + 4) + 64 * 4


def test_sizes():
    assert plan.parse_size("24GB") == plan.parse_size("24GiB") == plan.parse_size("24") == 24 * 2**30
    assert plan.parse_size("24576MiB") == 24 * 2**30
    with pytest.raises(plan.UserError, match="--gpu-mem"):
        plan.parse_size("lots")


def test_7b_qlora_config_fits_24gb_with_gradient_checkpointing():
    config = load_config(REPO / "configs" / "qwen2.5-7b-qlora-24gb.yaml")
    shape = plan.load_shape(config.model.name_or_path, QWEN_7B_SHAPE)
    assert shape.params == 7_615_616_512  # Qwen2.5-7B: 7.62B
    estimates = plan.plan_memory(config, shape, prompt_tokens=512)
    assert [e.stage for e in estimates] == ["instructions", "sft", "preferences", "reward", "ppo"]
    for estimate in estimates:
        assert estimate.total <= 24 * plan.GiB, (estimate.stage, estimate.total / plan.GiB)
    training = [e for e in estimates if e.checkpointing is not None]
    assert [e.stage for e in training] == ["sft", "reward", "ppo"] and all(e.checkpointing for e in training)
    # without checkpointing sft's and reward's activations (4 × 1024 tokens) would not fit; ppo's update
    # keeps one forward of a 2 × 704-token micro-batch at a time, which would
    sft, reward, ppo = training
    assert sft.flipped_total > 24 * plan.GiB and reward.flipped_total > 24 * plan.GiB
    assert ppo.flipped_total > ppo.total + 8 * plan.GiB


def test_plan_command(capsys):
    assert main(["plan", SMOKE, "--gpu-mem", "8GB"]) == 0
    out = capsys.readouterr().out
    assert "fits 8 GB" in out and "peak over all stages" in out
    for stage in ("instructions", "sft", "preferences", "reward", "ppo"):
        assert f"\n{stage} " in out


def test_hub_model_offline_without_a_config_is_one_line(capsys):
    # HF_HUB_OFFLINE is set for the tests (conftest), and no cache holds this id
    assert main(["plan", SMOKE, "model.name_or_path=rlhf-tests/no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read the config of 'rlhf-tests/no-such-model'") and "--model-config" in err
    assert "\n" not in err
    assert main(["plan", SMOKE, "model.name_or_path=rlhf-tests/no-such-model", "--model-config", QWEN_7B_SHAPE]) == 0


@pytest.mark.parametrize(
    "name, params",
    # the published parameter counts of these models
    [
        ("qwen2.5-7b-instruct", 7_615_616_512),
        ("qwen2.5-0.5b-instruct", 494_032_768),
        ("llama-2-7b", 6_738_415_616),
        ("smollm2-135m-instruct", 134_515_008),  # as the embedded model, dequantized, counts itself
    ],
)
def test_shipped_model_shapes(name, params):
    shape = plan.load_shape("unused", str(REPO / "configs" / "model_shapes" / f"{name}.json"))
    assert shape.params == params


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)  # unknown keys and wrong types are errors
    if config.launch.accelerate_config:
        assert (REPO / config.launch.accelerate_config).is_file()


def test_gpu_configs_say_what_they_promise():
    qlora = load_config(REPO / "configs" / "qwen2.5-7b-qlora-24gb.yaml")
    assert qlora.model.name_or_path == "Qwen/Qwen2.5-7B-Instruct" and qlora.model.quantization == "4bit"
    assert qlora.sft.gradient_checkpointing and qlora.reward.gradient_checkpointing and qlora.ppo.gradient_checkpointing
    multi = load_config(REPO / "configs" / "qwen2.5-7b-multi-gpu.yaml")
    assert multi.launch.num_processes == 4 and multi.launch.accelerate_config == "configs/accelerate/ddp.yaml"
    small = load_config(REPO / "configs" / "qwen2.5-0.5b.yaml")
    assert small.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and small.model.quantization == "none"
