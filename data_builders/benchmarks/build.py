"""Writes the project's two local lm-eval tasks' data, deterministically: `python data_builders/benchmarks/build.py`.

- rlhf_word_relations.jsonl: multiple choice, 4 choices: antonyms, synonyms and category membership of common
  English words; fields `question`, `choices` (list of 4 words), `label` (index of the right one).
- rlhf_arithmetic.jsonl: a numeric answer to generate: sums, differences and products of small integers;
  fields `question`, `answer` (the number, as text).
The files are committed; tests/test_benchmark.py checks that they are what this script writes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SEED = 16

ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("open", "closed"),
    ("full", "empty"), ("early", "late"), ("strong", "weak"), ("rich", "poor"), ("high", "low"), ("wet", "dry"),
    ("hard", "soft"), ("young", "old"), ("loud", "quiet"), ("clean", "dirty"), ("thick", "thin"), ("true", "false"),
    ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("above", "below"), ("inside", "outside"), ("first", "last"),
    ("begin", "end"), ("heavy", "light"), ("long", "short"), ("near", "far"), ("up", "down"), ("day", "night"),
    ("friend", "enemy"), ("alive", "dead"), ("cheap", "expensive"), ("safe", "dangerous"), ("easy", "difficult"),
    ("good", "bad"), ("love", "hate"), ("remember", "forget"), ("sweet", "sour"), ("wide", "narrow"),
]
SYNONYMS = [
    ("big", "large"), ("small", "tiny"), ("happy", "glad"), ("fast", "quick"), ("begin", "start"), ("end", "finish"),
    ("smart", "clever"), ("angry", "mad"), ("easy", "simple"), ("rich", "wealthy"), ("shut", "close"),
    ("buy", "purchase"), ("help", "assist"), ("choose", "pick"), ("gift", "present"), ("job", "work"),
    ("quiet", "silent"), ("scared", "afraid"), ("sick", "ill"), ("correct", "right"), ("speak", "talk"),
    ("look", "see"), ("below", "under"), ("often", "frequently"), ("maybe", "perhaps"), ("stone", "rock"),
    ("road", "street"), ("shout", "yell"), ("tired", "sleepy"), ("answer", "reply"),
]
CATEGORIES = {
    # No word of two categories (orange, lemon, peach and plum are colors too).
    "fruit": ["apple", "banana", "grape", "mango", "pear", "kiwi", "melon", "pineapple", "coconut", "papaya"],
    "animal": ["dog", "cat", "horse", "lion", "tiger", "rabbit", "mouse", "bear", "wolf", "sheep"],
    "color": ["red", "blue", "green", "yellow", "purple", "black", "white", "brown", "pink", "gray"],
    "vehicle": ["car", "bus", "train", "bicycle", "truck", "boat", "airplane", "motorcycle", "taxi", "tram"],
    "tool": ["hammer", "saw", "wrench", "screwdriver", "drill", "shovel", "pliers", "axe", "chisel", "rake"],
    "musical instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp", "banjo", "oboe"],
}


def word_relations(rng: random.Random) -> list[dict]:
    rows = []
    words = sorted({w for pair in ANTONYMS + SYNONYMS for w in pair})
    for relation, pairs in (("the opposite of", ANTONYMS), ("the same as", SYNONYMS)):
        for word, answer in pairs:
            # Distractors: never a word linked to this one by any chain of antonyms and synonyms ("tiny" is no
            # distractor for the opposite of "big": big - small - tiny).
            related = _linked(word)
            distractors = rng.sample([w for w in words if w not in related], 3)
            rows.append(_choice_row(f'Which word means {relation} "{word}"?', answer, distractors, rng))
    for category, members in CATEGORIES.items():
        others = [w for c, m in CATEGORIES.items() if c != category for w in m]
        for member in members[:7]:
            rows.append(_choice_row(f"Which of these is a {category}?", member, rng.sample(others, 3), rng))
    return rows


def _linked(word: str) -> set[str]:
    linked, todo = {word}, [word]
    while todo:
        current = todo.pop()
        for pair in ANTONYMS + SYNONYMS:
            if current in pair:
                for other in pair:
                    if other not in linked:
                        linked.add(other)
                        todo.append(other)
    return linked


def _choice_row(question: str, answer: str, distractors: list[str], rng: random.Random) -> dict:
    choices = [*distractors]
    label = rng.randrange(4)
    choices.insert(label, answer)
    return {"question": question, "choices": choices, "label": label}


def arithmetic(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(40):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"question": f"What is {a} + {b}?", "answer": str(a + b)})
    for _ in range(40):
        a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
        rows.append({"question": f"What is {a} - {b}?", "answer": str(a - b)})
    for _ in range(40):
        a, b = rng.randint(2, 9), rng.randint(2, 19)
        rows.append({"question": f"What is {a} times {b}?", "answer": str(a * b)})
    rng.shuffle(rows)
    return rows


def build() -> dict[str, str]:
    """File name → the JSONL text it holds."""
    rng = random.Random(SEED)
    data = {"rlhf_word_relations.jsonl": word_relations(rng), "rlhf_arithmetic.jsonl": arithmetic(rng)}
    return {name: "".join(json.dumps(row) + "\n" for row in rows) for name, rows in data.items()}


if __name__ == "__main__":
    for name, text in build().items():
        (HERE / name).write_text(text)
        print(f"{HERE / name}: {text.count(chr(10))} rows")
