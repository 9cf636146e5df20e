"""Self-instruct style filters that decide whether a generated instruction joins the pool.

The rules follow the self-instruct paper: drop instructions that are too short or too long,
that ask for things a text model cannot do (images, audio, browsing), that start oddly,
that repeat or closely paraphrase an instruction already in the pool, or whose output is
empty or stuck in a loop.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

# In the order InstructionFilter checks them: cheap checks first, ROUGE-L against the pool last.
DROP_REASONS: tuple[str, ...] = (
    "too_short",
    "too_long",
    "bad_start",
    "unsupported_task",
    "empty_output",
    "degenerate_output",
    "duplicate",
    "similar",
)

# Tasks that need eyes, ears or a browser, which a text-only model can only pretend to do.
DEFAULT_BLOCKED_WORDS: tuple[str, ...] = (
    "image", "images", "picture", "pictures", "photo", "graph", "graphs", "chart", "plot",
    "draw", "drawing", "diagram", "flowchart", "video", "audio", "music", "sound", "file",
    "files", "map", "maps", "url", "website", "link", "browse",
)

# An output that repeats one 3-word sequence more than this many times is a looping model.
_DEGENERATE_NGRAM = 3
_DEGENERATE_MAX_REPEATS = 4


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure (beta=1) between two texts, over lowercase word tokens.

    With LCS the length of the longest common subsequence of the two token lists,
    precision = LCS / len(candidate) and recall = LCS / len(reference), so
    F = 2 * precision * recall / (precision + recall) = 2 * LCS / (len(candidate) + len(reference)).

    Example: candidate "the cat sat", reference "the cat is on the mat".
    The LCS is "the cat" (2 tokens), so F = 2 * 2 / (3 + 6) = 4 / 9 ≈ 0.444.
    """
    return _rouge_l_of_tokens(_words(candidate), _words(reference))


def _rouge_l_of_tokens(candidate: list[str], reference: list[str]) -> float:
    if not candidate or not reference:
        return 0.0
    return 2 * _lcs_length(candidate, reference) / (len(candidate) + len(reference))


def _lcs_length(a: list[str], b: list[str]) -> int:
    # Classic dynamic programme, keeping only the previous row: previous[j] is the LCS of
    # the tokens of `a` seen so far and b[:j].
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b, start=1):
            if token_a == token_b:
                current.append(previous[j - 1] + 1)
            else:
                current.append(max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass
class InstructionFilter:
    min_words: int = 3
    max_words: int = 150
    max_rouge: float = 0.7
    blocked_words: tuple[str, ...] = DEFAULT_BLOCKED_WORDS

    def drop_reason(self, instruction: str, output: str, pool: list[str]) -> str | None:
        """None to keep the (instruction, output) pair, else the name of the first rule it breaks."""
        return (
            self._instruction_shape_reason(instruction)
            or self.output_drop_reason(output)
            or self._pool_reason(instruction, pool)
        )

    def instruction_drop_reason(self, instruction: str, pool: list[str]) -> str | None:
        """The instruction rules alone, to discard a candidate before paying the teacher for an answer."""
        return self._instruction_shape_reason(instruction) or self._pool_reason(instruction, pool)

    def output_drop_reason(self, output: str) -> str | None:
        """The output rules alone: "empty_output" or "degenerate_output", else None."""
        if not output.strip():
            return "empty_output"
        if _is_looping(output):
            return "degenerate_output"
        return None

    def _instruction_shape_reason(self, instruction: str) -> str | None:
        instruction = instruction.strip()
        word_count = len(instruction.split())
        if word_count < self.min_words or word_count == 0:
            return "too_short"
        if word_count > self.max_words:
            return "too_long"
        first_character = instruction[0]
        if first_character in string.punctuation or not first_character.isascii():
            return "bad_start"
        if not set(_words(instruction)).isdisjoint(word.lower() for word in self.blocked_words):
            return "unsupported_task"
        return None

    def _pool_reason(self, instruction: str, pool: list[str]) -> str | None:
        # Last because it compares against the whole pool, ROUGE-L quadratically so.
        normalised = _normalise(instruction)
        if any(_normalise(existing) == normalised for existing in pool):
            return "duplicate"
        instruction_words = _words(instruction)
        if any(self._too_similar(instruction_words, _words(existing)) for existing in pool):
            return "similar"
        return None

    def _too_similar(self, instruction_words: list[str], existing_words: list[str]) -> bool:
        # The LCS is at most the shorter length, which bounds the score without the
        # quadratic LCS; most pool entries are ruled out by this alone.
        shorter = min(len(instruction_words), len(existing_words))
        total_length = len(instruction_words) + len(existing_words)
        best_possible_score = 2 * shorter / total_length if total_length else 0.0
        if best_possible_score < self.max_rouge:
            return False
        return _rouge_l_of_tokens(instruction_words, existing_words) >= self.max_rouge


def _is_looping(output: str) -> bool:
    words = _words(output)
    ngrams = Counter(tuple(words[i : i + _DEGENERATE_NGRAM]) for i in range(len(words) - _DEGENERATE_NGRAM + 1))
    return bool(ngrams) and max(ngrams.values()) > _DEGENERATE_MAX_REPEATS
