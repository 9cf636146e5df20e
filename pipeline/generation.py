"""Batched, seeded chat generation with a local model: used by the teacher, judges and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Generation:
    text: str
    finished: bool
    """False when it stopped at max_new_tokens before the end-of-sequence token."""


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
        with tqdm(total=len(prompts), desc=description, unit="prompt") as progress:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                inputs = tokenizer(
                    [prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                torch.manual_seed(seed + start)
                sampling = temperature > 0
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=sampling,
                    temperature=temperature if sampling else None,
                    top_p=top_p if sampling else None,
                    top_k=top_k if sampling else None,
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
