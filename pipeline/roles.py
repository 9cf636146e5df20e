"""The four roles of RLHF as views of one backbone: what lets a 7B pipeline fit on one GPU.

One copy of the merged SFT backbone carries LoRA adapters:
- policy: the trainable `policy` adapter (zero-initialised, so at step 0 it equals the reference);
- reference: the backbone with adapters disabled, which is the SFT model (merged, never the pre-SFT base);
- reward: the frozen `reward` adapter and score head from the reward stage, read where the reward model
  was trained to read (rlhf.reward.readout);
- value: the trainable `value` adapter and value head, initialised from the reward model (from zero with
  an external reward model, whose weights do not fit this backbone).
Every log-prob comes from the model's own logits (its forward, with Gemma 2's softcapping or Cohere's
logit scale) through rlhf.generation.sampling_scores.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from peft import get_peft_model

from rlhf.chat_format import ChatFormat
from rlhf.generation import CACHE_ARGUMENT, Sampling, sampling_scores, shared_prefix_cache, transformer_body
from rlhf.models import peft_lora_config
from rlhf.ppo_math import entropy_from_logits, logprobs_from_logits
from rlhf.reward.readout import attach_reward_adapter
from rlhf.rollout import Rollout, reward_inputs

TRAINABLE_ADAPTERS = ("policy", "value")


def build_actor_critic(backbone, reward_dir: Path, config, external: bool = False, critic: bool = True):
    """Wrap the backbone with the policy, value (when there is a `critic`) and, unless the reward model is
    external, reward adapters; return it with the value head and the reward head (None where absent)."""
    model = get_peft_model(backbone, peft_lora_config(config.lora), adapter_name="policy")
    value_head = None
    if critic:
        hidden = backbone.config.get_text_config().hidden_size
        value_head = torch.nn.Linear(hidden, 1, bias=False).to(next(backbone.parameters()).device)
    if external:
        if critic:  # nothing to start the critic from: a fresh adapter and a head that says 0
            model.add_adapter("value", peft_lora_config(config.lora))
            torch.nn.init.zeros_(value_head.weight)
        return model, value_head, None
    reward_head = attach_reward_adapter(model, reward_dir, names=("reward", "value") if critic else ("reward",))
    if critic:
        with torch.no_grad():
            value_head.weight.copy_(reward_head.weight)
    return model, value_head, reward_head


class Roles:
    """Forward passes for each role: the same backbone with a different adapter switched on."""

    def __init__(self, model, value_head, reward_head, trainable, chat: ChatFormat):
        self.model, self.value_head, self.reward_head, self.trainable = model, value_head, reward_head, trainable
        self.chat = chat

    def use(self, adapter: str) -> None:
        # PEFT's set_adapter also flips requires_grad: freeze everything, then re-enable what we train.
        self.model.base_model.set_adapter(adapter, inference_mode=True)
        for parameter in self.trainable:
            parameter.requires_grad_(True)

    @property
    def _body(self):
        """The transformer body, without the LM head (the value and reward heads read its hidden states)."""
        return transformer_body(self.model)

    def _from_last_prompt_token(self, module, rollout: Rollout, **kwargs):
        """module's output from each row's last prompt token on (T + 1 positions). A prompt that several rows
        share (K samples per prompt) goes through the backbone once, its keys and values copied to those rows;
        in the update's forwards with gradients, so the gradient still reaches the prompt positions."""
        start = rollout.context_length - 1
        cache = shared_prefix_cache(self.model, rollout.input_ids, rollout.attention_mask, rollout.position_ids, rollout.context_length)
        if cache is None:
            output = module(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                            position_ids=rollout.position_ids, use_cache=False, **kwargs)
            return output, start
        output = module(input_ids=rollout.input_ids[:, start:], attention_mask=rollout.attention_mask,
                        position_ids=rollout.position_ids[:, start:], **{CACHE_ARGUMENT: cache}, **kwargs)
        return output, 0

    def _response_logits(self, rollout: Rollout) -> torch.Tensor:
        """[B, T, V]: the model's own logits for each response token, from its forward (so with whatever
        it does after the LM head: Gemma 2's final softcapping, Cohere's and Granite's logit scaling).
        Hidden state t predicts token t+1: only the last T + 1 positions go through the LM head (with a
        49k vocabulary, the prompt's logits would cost more than the backbone)."""
        output, _ = self._from_last_prompt_token(self.model, rollout, logits_to_keep=rollout.responses.shape[1] + 1)
        return output.logits[:, :-1]

    def policy_logprobs(self, rollout: Rollout, sampling: Sampling):
        """([B, T] log-probs of the response tokens under the sampling distribution, [B, T] its entropy):
        the update's forward."""
        self.use("policy")
        scores = sampling_scores(self._response_logits(rollout), sampling)
        with torch.no_grad():  # logged, not trained on: no [B, T, V] softmax kept for the backward
            entropy = entropy_from_logits(scores.detach())
        return logprobs_from_logits(scores, rollout.responses), entropy

    def sampled_logprobs(self, rollout: Rollout, sampling: Sampling, adapter: str | None) -> torch.Tensor:
        """[B, T] log-probs of the response tokens under the distribution that `adapter` (None: adapters off,
        the SFT model) samples from: what generate_rollout returns with the tokens, for tokens sampled
        elsewhere (a vLLM engine)."""
        if adapter is not None:
            self.use(adapter)
        with self.model.disable_adapter() if adapter is None else contextlib.nullcontext():
            scores = sampling_scores(self._response_logits(rollout), sampling)
        return logprobs_from_logits(scores, rollout.responses)

    def reference_logprobs(self, rollout: Rollout, sampling: Sampling) -> torch.Tensor:
        """[B, T] log-probs of the response tokens under the reference's full distribution at the sampling
        temperature (never truncated: see rlhf.stages.ppo's docstring)."""
        with self.model.disable_adapter():  # the merged SFT model itself
            scores = sampling_scores(self._response_logits(rollout), Sampling(sampling.temperature))
        return logprobs_from_logits(scores, rollout.responses)

    def values(self, rollout: Rollout) -> torch.Tensor:
        """[B, T]: the value of the state before each response token."""
        self.use("value")
        output, start = self._from_last_prompt_token(self._body, rollout)
        hidden = output.last_hidden_state[:, start:-1]
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def scores(self, rollout: Rollout) -> torch.Tensor:
        """[B]: the reward adapter's score of each response, read as the reward model was trained to read
        it: at the last token of prompt + response + (the end of turn, when finished)."""
        self.use("reward")
        inputs = reward_inputs(rollout, self.chat)
        output, start = self._from_last_prompt_token(self._body, inputs)
        last = start + inputs.mask.sum(1).long()  # the column context_length + length − 1
        at_last = output.last_hidden_state[torch.arange(last.shape[0]), last]
        return self.reward_head(at_last.to(self.reward_head.weight.dtype)).squeeze(-1).float()

    @property
    def trained_adapters(self) -> list[str]:
        """The trainable adapters this backbone carries: policy, and value when there is a critic."""
        return [name for name in TRAINABLE_ADAPTERS if name in self.model.peft_config]

    def weights_checksum(self) -> float:
        """A fingerprint of the trained weights, to check that every process ended with the same ones."""
        return float(sum(p.detach().double().sum() + p.detach().double().abs().sum() * 1e-3 for p in self.trainable))

    def value_head_weight(self) -> torch.Tensor:
        return self.value_head.weight.detach().float().cpu().contiguous()
