"""How a model's chat template frames a conversation, in token ids: the one place that tokenizes prompts
and renders (prompt, response) pairs for a reward model.

- `prompt_ids`: a conversation up to the assistant's turn, as every stage that samples or scores sees it.
- `end_of_turn`: what the template writes after a finished assistant reply (ChatML: `<|im_end|>\\n`;
  Llama 3: `<|eot_id|>`; Mistral: `</s>`; Gemma: `<end_of_turn>\\n`).
- `eos_ids`: every token that ends a reply: the tokenizer's EOS, the generation config's list (Qwen2.5 and
  Llama 3 have several) and the end-of-turn token itself.
- `reward_ids`: a reward model's input for one response: the prompt, the response, and the end of turn only
  when the response finished; a response cut at the length limit is rendered unfinished, with nothing
  appended. A reward model reads its score at the last token of this sequence everywhere: TRL's
  RewardTrainer gets these ids, and so do the preferences judge, ppo and evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.errors import UserError

Conversation = list[dict[str, str]]
SENTINEL = "RLHFSENTINEL"
"""An assistant reply for probing the template: one plain word, which no template trims or escapes."""
PROBE: Conversation = [{"role": "user", "content": "Hi"}]


@dataclass(frozen=True)
class ChatFormat:
    tokenizer: object
    end_of_turn: tuple[int, ...]
    eos_ids: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer, model=None) -> ChatFormat:
        """The format of `tokenizer`'s chat template; `model` adds its generation config's EOS ids."""
        end_of_turn = end_of_turn_ids(tokenizer)
        eos = [tokenizer.eos_token_id]
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos += configured if isinstance(configured, list) else [configured]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        if end_of_turn and end_of_turn[0] in special:  # <|im_end|> ends a turn even where eos_token is another
            eos.append(end_of_turn[0])
        return cls(tokenizer, tuple(end_of_turn), tuple(dict.fromkeys(i for i in eos if i is not None)))

    def prompt_ids(self, messages: Conversation) -> list[int]:
        return prompt_ids(self.tokenizer, messages)

    def reward_ids(self, prompt: Conversation, response: str, finished: bool) -> list[int]:
        """The reward model's input for a response given as text (how preference pairs are stored)."""
        prompt_tokens = self.prompt_ids(prompt)
        return self.assemble(prompt_tokens, self.response_ids(prompt, prompt_tokens, response), finished)

    def assemble(self, prompt_tokens: list[int], response_tokens: list[int], finished: bool) -> list[int]:
        """prompt + response (without its EOS) + the end of turn when finished: the one reward input."""
        content = list(response_tokens)
        if content and content[-1] in self.eos_ids:
            content = content[:-1]
        return [*prompt_tokens, *content, *(self.end_of_turn if finished else ())]

    def response_ids(self, prompt: Conversation, prompt_tokens: list[int], response: str) -> list[int]:
        """A response's tokens as they follow the prompt in context (SentencePiece tokenizers add a space to
        the start of a text tokenized alone); alone only when the context does not tokenize as a prefix."""
        text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        together = self.tokenizer(text + response, add_special_tokens=False)["input_ids"]
        if together[: len(prompt_tokens)] == prompt_tokens:
            return list(together[len(prompt_tokens) :])
        return list(self.tokenizer(response, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer, messages: Conversation) -> list[int]:
    """A conversation's tokens up to and including the assistant's generation prompt."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens the chat template writes after an assistant reply, as tokenized in context."""
    prompt = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*PROBE, {"role": "assistant", "content": SENTINEL}], tokenize=False)
    if not full.startswith(prompt + SENTINEL):
        raise UserError(
            f"{tokenizer.name_or_path}: the chat template does not render an assistant reply right after its "
            "generation prompt (expected render(prompt + reply) to start with render(prompt, add_generation_prompt) + reply)"
        )
    head = tokenizer(prompt + SENTINEL, add_special_tokens=False)["input_ids"]
    whole = tokenizer(full, add_special_tokens=False)["input_ids"]
    if whole[: len(head)] == head:
        return list(whole[len(head) :])
    return list(tokenizer(full[len(prompt + SENTINEL) :], add_special_tokens=False)["input_ids"])


PAD_PREFERENCE = ("pad", "unk", "reserved", "unused", "control", "placeholder")


def safe_pad_token(tokenizer) -> str | None:
    """A pad token that a reward model's readout cannot mistake for the end of a finished reply.

    A sequence-classification model reads its score at the last token that is not padding. When the pad
    token is the last token of the end of turn (Llama 3 and Mistral pad with their EOS, which ends a turn),
    every finished reply would be read one token early. Returns the tokenizer's own pad token when it is
    safe, its EOS when it has none and that is safe, else an unused special token (one with "pad" in its
    name first); None when there is none."""
    last = end_of_turn_ids(tokenizer)[-1:] or [None]
    for candidate in (tokenizer.pad_token, tokenizer.eos_token):
        if candidate is not None and tokenizer.convert_tokens_to_ids(candidate) != last[0]:
            return candidate
    probe = tokenizer.apply_chat_template([*PROBE, {"role": "assistant", "content": SENTINEL}], tokenize=True, return_dict=True)
    used = set(probe["input_ids"]) | {tokenizer.eos_token_id, tokenizer.bos_token_id, last[0]}
    spare = [t.content for i, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special and i not in used]
    for word in PAD_PREFERENCE:
        for token in spare:
            if word in token.lower():
                return token
    return spare[0] if spare else None
