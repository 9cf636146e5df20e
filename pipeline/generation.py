"""Batched, seeded chat generation with a local model: used by the teacher, judges and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Generation:
    text: str
    finished: bool
    """False when it stopped at max_new_tokens before the end-of-sequence token."""


class SampleByInverseCdf(LogitsProcessor):
    """Draws the next token from softmax(scores) itself and hands generate() a score row that is 0 at
    that token and -inf elsewhere, for generate's greedy step to take.

    Why not generate's own sampling: torch.multinomial draws one exponential variate per vocabulary
    entry, 19 ms per step for 16 rows of SmolLM2's 49k vocabulary on a 2-core CPU (a tenth of a
    decode step); inverse-CDF sampling needs one uniform per row (0.5 ms). Same distribution: the
    token is the first whose cumulative probability exceeds a uniform draw (float64 sums)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cdf = torch.softmax(scores.double(), dim=-1).cumsum(dim=-1)
        if not torch.isfinite(cdf[:, -1]).all():  # as torch.multinomial refuses them
            raise ValueError("sampling: the next-token scores of a row are nan or all -inf")
        draw = torch.rand(scores.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, draw, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


def decoding(temperature: float, top_p: float = 1.0, top_k: int = 0, first: tuple = ()) -> dict:
    """generate() arguments: greedy at temperature 0, else sampling at `temperature` with top-k (0: off)
    and top-p (1: off), in the order transformers applies them. The model's own generation config
    (SmolLM2's asks for top_k=50) is overridden, not merged. `first`: logits processors to run before."""
    processors = list(first)
    if temperature > 0:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1:
            processors.append(TopPLogitsWarper(top_p))
        processors.append(SampleByInverseCdf())
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None, logits_processor=LogitsProcessorList(processors))


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
    description: str = "generating",
) -> list[Generation]:
    """The assistant's reply to each conversation, in order.

    Prompts are sorted by length so each left-padded batch wastes little, and the sampler is
    reseeded per batch so a result depends only on (seed, prompts, settings), not on earlier calls.
    """
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[Generation] = [Generation("", False)] * len(prompts)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    device = next(model.parameters()).device
    try:
        with tqdm(total=len(prompts), desc=description, unit="reply") as progress:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                inputs = tokenizer(
                    [prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                torch.manual_seed(seed + start)
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    **decoding(temperature, top_p, top_k),
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                finished = (new_tokens == tokenizer.eos_token_id).any(dim=1).tolist()
                texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for i, text, done in zip(batch, texts, finished):
                    replies[i] = Generation(text.strip(), done)
                progress.update(len(batch))
    finally:
        tokenizer.padding_side = padding_side
    return replies


def prompt_lengths(tokenizer, conversations: list[Conversation]) -> list[int]:
    """Tokens of each conversation as a prompt (chat template and generation prompt), as generation sees it."""
    return [
        len(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for c in conversations
    ]
