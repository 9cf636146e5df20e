"""The one reward-model readout: a score read at the last token of `ChatFormat.reward_ids` (the prompt, the
response, and the end of turn only when the response finished).

TRL's RewardTrainer trains on these ids (the reward stage tokenizes the pairs itself), and every score the
pipeline uses is read at the same position of the same tokens:
- `classifier_scores`: a sequence-classification model (the standalone `reward/model`, an external reward
  model, the preferences judge), right-padded as in training, read by the model itself at its last
  non-pad token; rlhf.models.load_tokenizer picks a pad token that is never that last token;
- the ppo and evaluate stages read the reward adapter's hidden state at the last token of the same sequences
  on their shared backbone (rlhf.roles.Roles.scores, the sequences laid out by rlhf.rollout.reward_inputs),
  the adapter and score head loaded by `attach_reward_adapter`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.chat_format import ChatFormat

Conversation = list[dict[str, str]]


@dataclass
class RewardModel:
    """A sequence-classification reward model with its own tokenizer and chat template."""

    model: object
    chat: ChatFormat
    batch_size: int = 8

    @classmethod
    def load(cls, name_or_path: str, model_config, key: str, batch_size: int = 8) -> RewardModel:
        from rlhf.models import load_reward_model, load_tokenizer, resolve_model

        path = resolve_model(name_or_path, key)
        tokenizer = load_tokenizer(path, model_config.trust_remote_code)
        model = load_reward_model(path, model_config, tokenizer).eval()
        return cls(model, ChatFormat.of(tokenizer), batch_size)

    def scores(self, prompts: list[Conversation], responses: list[str], finished: list[bool]) -> list[float]:
        sequences = [self.chat.reward_ids(p, r, f) for p, r, f in zip(prompts, responses, finished)]
        return classifier_scores(self.model, self.chat.tokenizer.pad_token_id, sequences, self.batch_size)


@torch.no_grad()
def classifier_scores(model, pad_id: int, sequences: list[list[int]], batch_size: int = 8) -> list[float]:
    """A sequence-classification model's score of each token sequence, batched and right-padded with
    `pad_id` as TRL's RewardTrainer pads (the model reads at the last token that is not `pad_id`)."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = last_token_batch(sequences[start : start + batch_size], pad_id, device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        scores += logits[:, 0].float().tolist()
    return scores


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded [B, L] input_ids, attention_mask and position_ids, and [B] `last`: each row's last token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    last: torch.Tensor


def last_token_batch(sequences: list[list[int]], pad_id: int, device) -> TokenBatch:
    """The sequences as one right-padded batch."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([list(s) + [pad_id] * (width - len(s)) for s in sequences], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)
    last = torch.tensor([len(s) - 1 for s in sequences], device=device)
    return TokenBatch(ids, mask, (mask.cumsum(1) - 1).clamp(min=0), last)


def read_external_reward_model(reward_dir: Path) -> str | None:
    """The reward model the reward stage used as is (its `external.json`), or None when it trained one."""
    path = reward_dir / "external.json"
    return json.loads(path.read_text())["model"] if path.is_file() else None


def attach_reward_adapter(model, reward_dir: Path, names=("reward",)) -> torch.nn.Linear:
    """Add the reward stage's LoRA to a peft model under each of `names` (frozen, dropout off); return its
    score head. The one loader of the trained reward adapter (ppo's roles, evaluate's proxy reward)."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = LoraConfig.from_pretrained(reward_dir / "adapter")
    lora = LoraConfig(r=saved.r, lora_alpha=saved.lora_alpha, lora_dropout=0.0, target_modules=saved.target_modules, task_type="CAUSAL_LM")
    weights = load_file(reward_dir / "adapter" / "adapter_model.safetensors")
    score_weight = weights.pop("base_model.model.score.weight")
    for name in names:
        model.add_adapter(name, lora)
        result = set_peft_model_state_dict(model, weights, adapter_name=name)
        if result.unexpected_keys:
            raise RuntimeError(f"reward adapter does not fit the backbone: {result.unexpected_keys[:3]}")
    device = next(model.parameters()).device
    head = torch.nn.Linear(score_weight.shape[1], 1, bias=False).to(device)
    with torch.no_grad():
        head.weight.copy_(score_weight)
    return head.requires_grad_(False)
