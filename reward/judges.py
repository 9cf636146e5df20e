"""Judges that decide which of a model's responses is better, for building preference pairs.

- `RubricJudge`: the deterministic rubric (reward/rubric.py), the pipeline's gold reward.
- `RewardModelJudge`: an existing sequence-classification reward model, read as every reward model is
  (rlhf.reward.readout).
- `LLMJudge`: a teacher model asked for a pairwise verdict, in both orders to cancel position bias.
The first two score each response; the LLM judge compares two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlhf.reward.readout import RewardModel
from rlhf.reward.rubric import score_response

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Candidate:
    prompt: Conversation
    response: str
    finished: bool = True
    reference: str | None = None

    @property
    def instruction(self) -> str:
        return self.prompt[-1]["content"]


class RubricJudge:
    def scores(self, candidates: list[Candidate]) -> list[float]:
        return [
            score_response(c.instruction, c.response, c.reference, truncated=not c.finished).total for c in candidates
        ]


class RewardModelJudge:
    """Scores with a reward model that has its own tokenizer and template (rlhf.reward.readout)."""

    def __init__(self, reward_model: RewardModel):
        self.reward_model = reward_model

    @classmethod
    def load(cls, name_or_path: str, model_config, batch_size: int = 8) -> RewardModelJudge:
        return cls(RewardModel.load(name_or_path, model_config, "preferences.judge_model", batch_size))

    def scores(self, candidates: list[Candidate]) -> list[float]:
        return self.reward_model.scores(
            [c.prompt for c in candidates], [c.response for c in candidates], [c.finished for c in candidates]
        )


JUDGE_PROMPT = """Which response follows the instruction better? Consider correctness, helpfulness and completeness.

Instruction:
{instruction}

Response A:
{a}

Response B:
{b}

Answer with one letter: A or B."""


class LLMJudge:
    """Pairwise verdicts from a teacher (`complete(conversations, ...)`), asked in both orders.

    A pair counts only when both orders agree; a disagreement is position bias or a coin flip: a tie."""

    def __init__(self, teacher, temperature: float = 0.0, max_new_tokens: int = 8, seed: int = 0):
        self.teacher, self.temperature, self.max_new_tokens, self.seed = teacher, temperature, max_new_tokens, seed

    def verdicts(self, pairs: list[tuple[Candidate, Candidate]]) -> list[int | None]:
        """For each (a, b): 0 when a is better, 1 when b is better, None for a tie."""
        prompts = []
        for a, b in pairs:
            prompts.append(JUDGE_PROMPT.format(instruction=a.instruction, a=a.response, b=b.response))
            prompts.append(JUDGE_PROMPT.format(instruction=a.instruction, a=b.response, b=a.response))
        replies = self.teacher.complete(
            [[{"role": "user", "content": p}] for p in prompts],
            temperature=self.temperature,
            top_p=1.0,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
        )
        results: list[int | None] = []
        for i in range(0, len(replies), 2):
            first, swapped = parse_verdict(replies[i]), parse_verdict(replies[i + 1])
            # In the swapped order "A" names the second response.
            if first is not None and swapped is not None and first == 1 - swapped:
                results.append(first)
            else:
                results.append(None)
        return results


def parse_verdict(reply: str) -> int | None:
    """0 for A, 1 for B, None when the reply names neither or both."""
    letters = set(re.findall(r"\b([AB])\b", reply))
    if len(letters) != 1:
        return None
    return 0 if letters == {"A"} else 1
