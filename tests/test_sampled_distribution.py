"""The log-probs describe the distribution tokens were sampled from: no processor from the model's own
generation config, every EOS id, top-k / top-p in both, and the model's own logits (softcapping)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

from rlhf.chat_format import ChatFormat
from rlhf.config import LoraConfig, ModelConfig
from rlhf.generation import Sampling, generate_chat, sampling_scores
from rlhf.models import load_causal_lm, load_tokenizer, peft_lora_config, resolve_model
from rlhf.ppo_math import logprobs_from_logits
from rlhf.roles import Roles
from rlhf.rollout import generate_rollout

CHATS = [[{"role": "user", "content": text}] for text in ("write a short tip", "name a colour", "hello", "give two reasons")]


def policy_roles(path: Path) -> Roles:
    backbone = load_causal_lm(str(path), ModelConfig(name_or_path=str(path), dtype="float32"))
    tokenizer = load_tokenizer(str(path))
    torch.manual_seed(0)
    model = get_peft_model(backbone, peft_lora_config(LoraConfig(r=4, alpha=8)), adapter_name="policy").eval()
    return Roles(model, None, None, [], ChatFormat.of(tokenizer, backbone))


def prompts(roles: Roles) -> list[list[int]]:
    return [roles.chat.prompt_ids(c) for c in CHATS]


def forward_logits(roles: Roles, rollout: dict) -> torch.Tensor:
    with torch.no_grad():
        return roles._response_logits(rollout).float()


@pytest.fixture
def model_with_its_own_generation_config(tmp_path) -> Path:
    """The tiny model, with a generation config that asks for repetition_penalty 1.1, no_repeat_ngram_size 3
    and a second EOS id: the token greedy decoding emits third for the first prompt."""
    path = Path(shutil.copytree(resolve_model("tiny-random-llama"), tmp_path / "model"))
    roles = policy_roles(path)
    rollout = generate_rollout(roles, prompts(roles)[:1], max_new_tokens=6, sampling=Sampling(0.0))
    second_eos = int(rollout.input_ids[0, rollout.context_length + 2])
    assert second_eos not in roles.chat.eos_ids
    config = json.loads((path / "generation_config.json").read_text())
    config |= {"repetition_penalty": 1.1, "no_repeat_ngram_size": 3, "eos_token_id": [config["eos_token_id"], second_eos]}
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


def test_the_models_generation_config_does_not_reshape_sampling(model_with_its_own_generation_config):
    roles = policy_roles(model_with_its_own_generation_config)
    second_eos = roles.chat.eos_ids[-1]
    batch = prompts(roles)
    greedy = generate_rollout(roles, batch, max_new_tokens=24, sampling=Sampling(0.0))
    context, mask = greedy.context_length, greedy.mask
    # Every greedy token is the argmax of the policy's own logits: no repetition penalty, no n-gram ban.
    argmax = forward_logits(roles, greedy).argmax(-1)
    responses = greedy.input_ids[:, context:]
    assert torch.equal(torch.where(mask.bool(), argmax, responses), responses)
    # ... while the model's own config does change greedy decoding (so the check above could fail).
    ids, attention = greedy.input_ids[:, :context], greedy.attention_mask[:, :context]
    with torch.no_grad():
        merged = roles.model.get_base_model().generate(input_ids=ids, attention_mask=attention, max_new_tokens=24, do_sample=False)
    assert not torch.equal(merged[:, context : context + 24][:, :8], responses[:, :8])
    # Sampling stops at either EOS: the first prompt ends at its third token, the second EOS id.
    assert greedy.finished[0] and mask[0].sum() == 3 and responses[0, 2] == second_eos
    assert all(responses[0, 3:] == roles.chat.tokenizer.pad_token_id)
    # generate_chat (teacher, preferences) stops there too and calls the reply finished.
    reply = generate_chat(roles.model, roles.chat.tokenizer, CHATS[:1], max_new_tokens=24)[0]
    assert reply.finished


def test_old_logprobs_are_a_fresh_forwards_and_step_one_kl_is_zero(model_with_its_own_generation_config):
    roles = policy_roles(model_with_its_own_generation_config)
    torch.manual_seed(1)
    sampling = Sampling(0.7)
    rollout = generate_rollout(roles, prompts(roles), max_new_tokens=16, sampling=sampling)
    mask = rollout.mask
    with torch.no_grad():
        fresh, _ = roles.policy_logprobs(rollout, sampling)
        reference = roles.reference_logprobs(rollout, sampling)
    assert torch.allclose(rollout.logprobs, fresh * mask, atol=1e-4)
    kl = ((rollout.logprobs - reference) * mask).sum(1)
    assert kl.abs().max() < 1e-4


@pytest.mark.parametrize("top_p, top_k", [(0.9, 0), (1.0, 5), (0.9, 5)])
def test_truncated_sampling_logprobs_are_of_the_truncated_distribution(top_p, top_k):
    """With top-p / top-k, old and new log-probs are those of the renormalized truncated distribution the
    tokens came from; the reference's stay those of the full distribution (ppo.py's docstring)."""
    roles = policy_roles(Path(resolve_model("tiny-random-llama")))
    sampling = Sampling(1.0, top_p, top_k)
    torch.manual_seed(2)
    rollout = generate_rollout(roles, prompts(roles) * 4, max_new_tokens=12, sampling=sampling)
    mask = rollout.mask.bool()
    tokens = rollout.input_ids[:, rollout.context_length :]
    logits = forward_logits(roles, rollout)
    truncated = logprobs_from_logits(sampling_scores(logits, sampling), tokens)
    full = logprobs_from_logits(logits, tokens)
    assert torch.isfinite(truncated[mask]).all()  # every sampled token is inside the kept set
    assert torch.allclose(rollout.logprobs[mask], truncated[mask], atol=1e-4)
    with torch.no_grad():
        new, _ = roles.policy_logprobs(rollout, sampling)
        reference = roles.reference_logprobs(rollout, sampling)
    assert torch.allclose(new[mask], truncated[mask], atol=1e-4)
    assert torch.allclose(reference[mask], full[mask], atol=1e-4)
    gain = truncated[mask] - full[mask]  # −log(kept mass): renormalizing gives every kept token probability
    assert gain.min() > -1e-5 and gain.mean() > 0.01
    if top_k:
        rank = (logits > logits.gather(-1, tokens.unsqueeze(-1))).sum(-1)
        assert rank[mask].max() < top_k


def test_a_token_outside_the_nucleus_has_ratio_zero_and_no_gradient():
    from rlhf.ppo_math import ppo_policy_loss

    logprobs = torch.tensor([[float("-inf"), -1.0]], requires_grad=True)
    old = torch.tensor([[-2.0, -1.0]])
    loss, clipfrac, approxkl = ppo_policy_loss(logprobs, old, torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), 0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(approxkl)
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 1] != 0


@pytest.fixture(scope="module")
def softcapped_model(tmp_path_factory) -> Path:
    """A Gemma-2-shaped model (softcapped logits, alternating sliding-window layers) on the tiny tokenizer."""
    tiny = Path(resolve_model("tiny-random-llama"))
    tokenizer = load_tokenizer(str(tiny))
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=16, query_pre_attn_scalar=16,
        final_logit_softcapping=3.0, attn_logit_softcapping=50.0, initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gemma2") / "model"
    Gemma2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_softcapped_logits_reach_every_logprob_path(softcapped_model):
    roles = policy_roles(softcapped_model)
    sampling = Sampling(1.0)
    torch.manual_seed(3)
    rollout = generate_rollout(roles, prompts(roles), max_new_tokens=20, sampling=sampling)
    mask = rollout.mask
    with torch.no_grad():
        forward, _ = roles.policy_logprobs(rollout, sampling)
        reference = roles.reference_logprobs(rollout, sampling)
        plain = AutoModelForCausalLM.from_pretrained(softcapped_model).eval()
        context = rollout.context_length
        logits = plain(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                       position_ids=rollout.position_ids).logits[:, context - 1 : -1]
        uncapped = plain.lm_head(plain.model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                                             position_ids=rollout.position_ids).last_hidden_state)[:, context - 1 : -1]
    tokens = rollout.input_ids[:, context:]
    assert torch.allclose(rollout.logprobs, forward * mask, atol=1e-4)
    assert torch.allclose(reference * mask, forward * mask, atol=1e-4)
    assert torch.allclose(forward * mask, logprobs_from_logits(logits, tokens) * mask, atol=1e-4)
    # Without the model's softcapping (the LM head alone, as ppo computed it before) they differ.
    assert ((logprobs_from_logits(uncapped, tokens) - forward) * mask).abs().max() > 0.1
