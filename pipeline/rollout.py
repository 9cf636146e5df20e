"""A rollout: prompts and the responses sampled for them, as the ppo and evaluate stages use them.

`generate_rollout` samples with the policy adapter (or with adapters off: the SFT model) on the shared
backbone of rlhf.roles, cuts each response after its first EOS, and keeps the log-probs of the sampled
tokens under the distribution they were drawn from. The rest of this module cuts a rollout into
micro-batches and reads it back as text or as reward-model inputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessor

from rlhf.chat_format import ChatFormat
from rlhf.generation import Sampling, generate, left_pad, sampling_scores
from rlhf.ppo_math import logprobs_from_logits, truncate_after_eos

if TYPE_CHECKING:
    from rlhf.roles import Roles
    from rlhf.vllm_engine import VllmEngine


@dataclass(frozen=True)
class Rollout:
    """B rows of a left-padded prompt (P = `context_length` columns) followed by a sampled response
    (T columns, padded after its end).

    input_ids, attention_mask, position_ids: [B, P + T]; position ids count real tokens only.
    mask: [B, T] float, 1 on the response tokens the update trains on (a row whose sampling had to be
    repaired is all 0). finished: [B] bool, the response ended with an EOS. logprobs: [B, T], each
    sampled token's log-prob under the distribution it was drawn from (0 outside the mask).
    repaired: rows whose logits were non-finite; prompt_tokens: real prompt tokens in the batch.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    context_length: int
    mask: torch.Tensor
    finished: torch.Tensor
    logprobs: torch.Tensor | None = None
    repaired: int = 0
    prompt_tokens: int = 0

    @property
    def responses(self) -> torch.Tensor:
        """[B, T] the sampled tokens."""
        return self.input_ids[:, self.context_length :]

    def rows(self, rows: torch.Tensor) -> Rollout:
        """These rows, without the left-padding columns they all share: a micro-batch of short prompts
        runs on short sequences. Position ids count real tokens, so nothing else changes."""
        shared = int((self.context_length - self.attention_mask[rows, : self.context_length].sum(1)).min())
        return replace(
            self,
            input_ids=self.input_ids[rows, shared:],
            attention_mask=self.attention_mask[rows, shared:],
            position_ids=self.position_ids[rows, shared:],
            context_length=self.context_length - shared,
            mask=self.mask[rows],
            finished=self.finished[rows],
            logprobs=None if self.logprobs is None else self.logprobs[rows],
            repaired=0,
            prompt_tokens=0,
        )


class RepairNonFinite(LogitsProcessor):
    """Sampling fails on inf/nan/negative probabilities ("probability tensor contains either inf, nan
    or element < 0"). Rows with non-finite scores are repaired (nan → -inf; a row with nothing finite
    left allows every token) and counted, and their samples are left out of the update."""

    def __init__(self):
        self.bad_rows: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)
        if bad.any():
            scores = torch.nan_to_num(scores, nan=float("-inf"), posinf=torch.finfo(scores.dtype).max)
            empty = torch.isneginf(scores).all(dim=-1)
            scores[empty] = 0.0
            self.bad_rows = bad if self.bad_rows is None else self.bad_rows | bad
        return scores


@torch.no_grad()
def generate_rollout(
    roles: Roles, batch: list[list[int]], *, max_new_tokens: int, sampling: Sampling, adapter: str | None = "policy"
) -> Rollout:
    """Prompts (token ids) + responses sampled with `adapter` on (None: adapters off, the SFT model), cut
    after the first EOS of any kind, with the log-probs of the response tokens under the distribution they
    were drawn from (rlhf.generation.sampling_scores)."""
    chat = roles.chat
    pad = chat.tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad(batch, pad, next(roles.model.parameters()).device)
    width = prompt_ids.shape[1]
    guard = RepairNonFinite()
    roles.use(adapter or "policy")
    with roles.model.disable_adapter() if adapter is None else contextlib.nullcontext():
        output = generate(roles.model, chat, prompt_ids, prompt_mask, sampling, max_new_tokens, first=(guard,), with_logits=True)
    # PPO's old log-probs come from the logits the tokens were sampled from (generate's raw logits, the
    # model's own), which saves one forward per rollout; one step at a time, so no [B, T, V] tensor is built.
    responses = output.sequences[:, width:]
    logprobs = torch.stack(
        [logprobs_from_logits(sampling_scores(step_logits, sampling), responses[:, t]) for t, step_logits in enumerate(output.logits)],
        dim=1,
    )
    return assemble_rollout(chat, prompt_ids, prompt_mask, responses, logprobs, guard.bad_rows)


def assemble_rollout(chat: ChatFormat, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor,
                     logprobs: torch.Tensor, bad_rows: torch.Tensor | None = None) -> Rollout:
    """A Rollout from [B, W] left-padded prompts, [B, T] sampled tokens and their [B, T] log-probs, whichever
    engine sampled them: responses cut after their first EOS, `bad_rows` ([B] bool: sampled from repaired
    scores) kept out of the update."""
    responses, mask, finished = truncate_after_eos(responses, list(chat.eos_ids), chat.tokenizer.pad_token_id)
    if bad_rows is not None:  # a repaired sample is not the policy's: keep it out of the update
        mask = mask * (~bad_rows).float().unsqueeze(1)
    logprobs = torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))  # repaired rows may hold nan
    attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)
    return Rollout(
        input_ids=torch.cat([prompt_ids, responses], dim=1),
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0),
        context_length=prompt_ids.shape[1],
        mask=mask,
        finished=finished,
        logprobs=logprobs,
        repaired=int(bad_rows.sum().item()) if bad_rows is not None else 0,
        prompt_tokens=int(prompt_mask.sum().item()),
    )


def engine_rollout(engine: VllmEngine, batch: list[list[int]], *, max_new_tokens: int, sampling: Sampling, seed: int,
                   device, lora=None) -> Rollout:
    """generate_rollout's Rollout, sampled by a vLLM engine (rlhf.vllm_engine): `logprobs` are the engine's
    (its numerics, not the trainer's: see `with_trainer_logprobs`)."""
    chat = engine.chat
    samples = engine.sample(batch, sampling, max_new_tokens, seed, lora=lora)
    width = max(1, max(len(s.token_ids) for s in samples))
    pad = chat.tokenizer.pad_token_id
    responses = torch.tensor([s.token_ids + [pad] * (width - len(s.token_ids)) for s in samples], device=device)
    logprobs = torch.tensor([s.logprobs + [0.0] * (width - len(s.logprobs)) for s in samples], device=device)
    prompt_ids, prompt_mask = left_pad(batch, pad, device)
    return assemble_rollout(chat, prompt_ids, prompt_mask, responses, logprobs)


def with_trainer_logprobs(rollout: Rollout, trainer_logprobs: torch.Tensor) -> tuple[Rollout, torch.Tensor]:
    """An engine-sampled rollout with the trainer's own [B, T] log-probs as its old log-probs, and the
    engine's [B, T] beside them. A row holding a token that the trainer's truncated (top-k / top-p)
    distribution does not keep (log-prob −inf: the two numerics disagree at the nucleus edge) is kept out of
    the update and counted in `repaired`, as a repaired sample is."""
    mask = rollout.mask
    outside = (~torch.isfinite(trainer_logprobs) & mask.bool()).any(1)
    mask = mask * (~outside).float().unsqueeze(1)
    context = rollout.context_length
    attention_mask = torch.cat([rollout.attention_mask[:, :context], mask.long()], dim=1)
    keep = mask.bool()
    return replace(
        rollout,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0),
        mask=mask,
        logprobs=torch.where(keep, trainer_logprobs, torch.zeros_like(trainer_logprobs)),
        repaired=rollout.repaired + int(outside.sum().item()),
    ), torch.where(keep, rollout.logprobs, torch.zeros_like(rollout.logprobs))


def by_prompt_length(rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
    """`rows` ordered by prompt length, so that micro-batches cut from them share most of their padding."""
    lengths = rollout.attention_mask[rows, : rollout.context_length].sum(1).cpu()
    return rows[torch.argsort(lengths, stable=True)]


def in_micro_batches(forward, rollout: Rollout, size: int) -> torch.Tensor:
    """forward(micro-batch) over the whole rollout, `size` rows of similar prompt length at a time,
    in the rollout's row order: scoring peaks at one micro-batch's activations and logits."""
    order = by_prompt_length(rollout, torch.arange(rollout.input_ids.shape[0]))
    outputs = torch.cat([forward(rollout.rows(rows)) for rows in order.split(size)])
    return torch.empty_like(outputs).index_copy_(0, order.to(outputs.device), outputs)


def decode_responses(chat: ChatFormat, rollout: Rollout) -> list[str]:
    """Each response as text, without its EOS and the padding after it."""
    texts = []
    for ids, length in zip(rollout.responses.tolist(), rollout.mask.sum(1).long().tolist()):
        tokens = ids[:length]
        if tokens and tokens[-1] in chat.eos_ids:
            tokens = tokens[:-1]
        texts.append(chat.tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return texts


def reward_sequences(rollout: Rollout, chat: ChatFormat) -> list[list[int]]:
    """Each row's reward-model input (rlhf.chat_format.ChatFormat.assemble) from its sampled tokens."""
    context = rollout.context_length
    sequences = []
    for ids, attention, length, finished in zip(
        rollout.input_ids.tolist(), rollout.attention_mask.tolist(), rollout.mask.sum(1).long().tolist(),
        rollout.finished.tolist(),
    ):
        prompt = [token for token, real in zip(ids[:context], attention[:context]) if real]
        sequences.append(chat.assemble(prompt, ids[context : context + length], finished))
    return sequences


def reward_inputs(rollout: Rollout, chat: ChatFormat) -> Rollout:
    """Each row's reward-model input (`reward_sequences`: the prompt, the response without its EOS, the end of
    turn when finished) in the rollout's own layout: the same left-padded prompt columns, then the rest of the
    sequence right-padded, `mask` on it. The score is read at column context_length + mask.sum(1) − 1; rows
    that share a prompt share its columns, so its forward can be shared (rlhf.roles.Roles)."""
    context = rollout.context_length
    lengths = rollout.attention_mask[:, :context].sum(1).tolist()
    tails = [sequence[length:] for sequence, length in zip(reward_sequences(rollout, chat), lengths)]
    width, pad = max(len(t) for t in tails), chat.tokenizer.pad_token_id
    device = rollout.input_ids.device
    tail_ids = torch.tensor([t + [pad] * (width - len(t)) for t in tails], dtype=torch.long, device=device).reshape(len(tails), width)
    tail_mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tails], dtype=torch.long, device=device).reshape(len(tails), width)
    attention_mask = torch.cat([rollout.attention_mask[:, :context], tail_mask], dim=1)
    return replace(
        rollout,
        input_ids=torch.cat([rollout.input_ids[:, :context], tail_ids], dim=1),
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0),
        mask=tail_mask.float(),
        logprobs=None,
    )
