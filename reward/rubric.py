"""A deterministic rubric that scores how well a response follows an instruction: the pipeline's "gold" reward.

It needs no network and no model, so it is cheap, reproducible and cannot be fooled the way a
learned reward model can. Two stages use it: the preference stage ranks K sampled responses of
a small policy and keeps (best, worst) as a pair, and the evaluation stage compares it with the
learned reward to catch reward hacking (the learned reward rising while this one falls).

Every component is a small pure function returning a number in [0, 1]; the total is their
weighted mean. Words are lowercase ``\\w+`` tokens, the same tokens ROUGE-L uses.

=================  =======  ===================================================================
component          default  rule (1 is best)
=================  =======  ===================================================================
ends_properly      0.20     1 if the text ends with terminal punctuation (. ! ? ) " ') or a
                            closing code fence, or is a bare answer of <= 3 words ("Paris"),
                            or ends in a short list item; 0 if it stops mid-sentence, leaves a
                            code block open, or was ``truncated``.
no_repetition      0.20     distinct word 3-grams / all 3-grams, mapped linearly from 0 at
                            <= 0.5 to 1 at >= 0.9, times (1 - fraction of sentences/lines of
                            >= 3 words that repeat an earlier one). 1 with fewer than 3 words.
length_fit         0.15     1 inside a word-count band, n/lo below it, hi/n above it. The band
                            follows the reference's length if one is given (0.5r .. 2r + 5),
                            else cues in the instruction (see ``length_band``); default 20..150.
relevance          0.15     recall of the instruction's content words (stopwords and task
                            verbs removed, matched on their first 5 letters) in the response,
                            saturating: min(1, recall / 0.5). 1 if there are no content words.
reference_overlap  0.20     min(1, ROUGE-L F1(response, reference) / 0.5). Only with a
                            reference; without one it is left out and the others renormalised.
clean_text         0.10     1 minus penalties: chat-template tokens 0.5, role labels
                            ("Assistant:", "User:") 0.3, the instruction echoed at the start
                            0.3, control characters 0.3, mostly non-ASCII text 0.5; floor 0.
=================  =======  ===================================================================

An empty response (nothing left once whitespace, template tokens and a leading "assistant"
header are removed) scores 0 on every component. Those leaks are stripped before the other
components look at the text, so a leak is charged once, by clean_text.

Why these weights: ending mid-sentence and looping are the two commonest failures of a 135M
model sampled at a fixed token budget, and the two easiest ways for a policy to game a learned
reward model, so they get the largest shares (0.2 each). The reference is the strongest signal
of content when there is one (0.2). Length and lexical relevance are weak, noisy proxies for
quality (a good answer can paraphrase; length alone is not merit), so they get less (0.15
each), enough to punish padding and off-topic answers without paying for verbosity. Artefacts
are rare but unambiguous, and their penalties are large inside the component, so 0.1 suffices.

Known limits: relevance and reference_overlap are lexical, so a correct paraphrase scores lower
than a verbatim one, and a short correct answer ("Paris") to "What is the capital of France?"
gets no relevance credit unless a reference says so. Without a reference, a fluent, finished
but off-topic answer loses only the relevance share (it still totals about 0.75-0.8), so the
rubric separates broken from whole answers better than right from wrong ones.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, fields

from rlhf.data_builders.filters import rouge_l
from rlhf.errors import UserError

__all__ = [
    "RubricWeights",
    "RubricScore",
    "score_response",
    "prefer",
    "ends_properly",
    "no_repetition",
    "distinct_ngram_fraction",
    "repeated_unit_fraction",
    "length_fit",
    "length_band",
    "relevance",
    "reference_overlap",
    "clean_text",
    "clean_text_issues",
    "content_words",
]


@dataclass(frozen=True)
class RubricWeights:
    """How much each component counts. Defaults sum to 1; see the module docstring for why.

    Any non-negative weights work: the total divides by the sum of the weights in use, so a
    missing reference (reference_overlap dropped) renormalises the rest automatically.
    """

    ends_properly: float = 0.2
    no_repetition: float = 0.2
    length_fit: float = 0.15
    relevance: float = 0.15
    reference_overlap: float = 0.2
    clean_text: float = 0.1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UserError(f"rubric weight {f.name} must be a finite number >= 0, got {value!r}")
        if sum(getattr(self, f.name) for f in fields(self)) <= 0:
            raise UserError("rubric weights are all zero; at least one must be positive")

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class RubricScore:
    """The weighted total in [0, 1] and each component's score in [0, 1].

    ``components`` holds reference_overlap only when a reference was given.
    """

    total: float
    components: dict[str, float]


# --- text helpers ----------------------------------------------------------------------------

_WORD = re.compile(r"\w+")

# Special tokens of chat templates: ChatML (<|im_start|>, <|im_end|>, <|endoftext|>, used by
# SmolLM2), Llama 3 (<|eot_id|>, <|start_header_id|>), Llama 2 / Mistral (<s>, </s>, [INST]).
_TEMPLATE_TOKEN = re.compile(r"<\|[a-z_]+\|>|</?s>|\[/?INST\]", re.IGNORECASE)
# "assistant" (or "user"/"system") alone on the first line: the role header of a ChatML turn.
_ROLE_HEADER_AT_START = re.compile(r"\A\s*(?:assistant|user|system)[ \t]*\n", re.IGNORECASE)
# A line opening with a speaker label: the model restating its role or inventing the next turn.
_ROLE_LABEL_LINE = re.compile(
    r"^[ \t]*(?:#+[ \t]*)?(?:assistant|user|human|system|ai|bot|chatbot|instruction|response)[ \t]*:",
    re.IGNORECASE | re.MULTILINE,
)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _body(response: str) -> str:
    """The response without chat-template tokens, a leading role header and surrounding whitespace."""
    return _ROLE_HEADER_AT_START.sub("", _TEMPLATE_TOKEN.sub("", response), count=1).strip()


# --- ends_properly ---------------------------------------------------------------------------

_TERMINAL = frozenset(".!?)\"'\u201d\u2019\u3002\uff01\uff1f")  # also ” ’ 。 ！ ？
_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022+]|\d+[.)])\s+")


def ends_properly(response: str, *, truncated: bool = False) -> float:
    """1 if the response ends where a sentence or block can end, else 0.

    Rule: after trailing whitespace, template tokens and markdown emphasis (``*``, ``_``) are
    removed, the last character must be terminal punctuation (. ! ? ) " ' and their typographic
    forms), or the text must end with a code fence that closes a block; an odd number of
    fences (a block left open) gives 0. Two endings without punctuation also count, since
    neither is a sentence cut off: a bare answer of one line and at most 3 words ending in a
    letter or digit (e.g. "Paris"), and a final list item of at most 5 words (e.g. "- Cherry").
    ``truncated`` (generation hit max_new_tokens) gives 0 whatever the text; empty gives 0.

    Why: a small model sampled at a fixed budget often stops mid-thought; a cut answer is
    visibly broken to a reader even when what is there is good.
    """
    text = _body(response)
    if truncated or not text:
        return 0.0
    if text.count("```") % 2:
        return 0.0  # a code block was opened and never closed
    if text.endswith("```"):
        return 1.0
    stripped = text.rstrip("*_ \t\n")
    if stripped and stripped[-1] in _TERMINAL:
        return 1.0
    if "\n" not in text and stripped[-1:].isalnum() and len(_words(text)) <= 3:
        return 1.0
    last_line = text.splitlines()[-1]
    if _LIST_ITEM.match(last_line) and len(_words(_LIST_ITEM.sub("", last_line, count=1))) <= 5:
        return 1.0
    return 0.0


# --- no_repetition ---------------------------------------------------------------------------

_NGRAM = 3
_DISTINCT_ZERO = 0.5  # distinct 3-gram fraction at or below which the text counts as a loop
_DISTINCT_FULL = 0.9  # at or above which it counts as normal prose
_MIN_UNIT_WORDS = 3  # sentences/lines shorter than this may repeat legitimately ("}", "Yes.")
_UNIT_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def distinct_ngram_fraction(text: str, n: int = _NGRAM) -> float:
    """Distinct word n-grams / all word n-grams; 1.0 when the text has fewer than n words."""
    words = _words(text)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 1.0
    return len(set(grams)) / len(grams)


def repeated_unit_fraction(text: str) -> float:
    """Fraction of sentences/lines (of >= 3 words) that repeat an earlier one word for word."""
    units = [tuple(w) for w in (_words(u) for u in _UNIT_SPLIT.split(text)) if len(w) >= _MIN_UNIT_WORDS]
    if not units:
        return 0.0
    return 1 - len(set(units)) / len(units)


def no_repetition(response: str) -> float:
    """1 for text that does not repeat itself, falling to 0 for a looping one.

    Rule: d = distinct word 3-grams / all 3-grams (1.0 below 3 words), mapped linearly so that
    d <= 0.5 gives 0 and d >= 0.9 gives 1; the result is multiplied by (1 - u), where u is the
    fraction of sentences/lines of at least 3 words that repeat an earlier one exactly.
    Empty gives 0.

    Why: natural prose almost never repeats a 3-gram (d is about 0.95-1), while a looping model
    quickly drives d towards 0. Repeating a sentence is the cheapest way to pad an answer or to
    farm a phrase a learned reward model likes, so an exact repeat costs its share directly.
    """
    text = _body(response)
    if not text:
        return 0.0
    d = distinct_ngram_fraction(text)
    ngram_score = min(1.0, max(0.0, (d - _DISTINCT_ZERO) / (_DISTINCT_FULL - _DISTINCT_ZERO)))
    return ngram_score * (1 - repeated_unit_fraction(text))


# --- length_fit ------------------------------------------------------------------------------

DEFAULT_BAND = (20.0, 150.0)
SHORT_BAND = (5.0, 60.0)
YES_NO_BAND = (1.0, 40.0)
LONG_BAND = (40.0, 300.0)

_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "fifteen": 15, "twenty": 20, "thirty": 30,
    "forty": 40, "fifty": 50, "hundred": 100,
}  # fmt: skip
_N = r"(\d+|" + "|".join(_NUMBER_WORDS) + r"|a single|single|a)"
_WORD_LIMIT = (
    re.compile(rf"\b(?:in|within|under|about|around|exactly|approximately|at most|no more than|"
               rf"less than|fewer than|up to|maximum of|max)\s+{_N}\s+words?\b"),
    re.compile(rf"\b{_N}[- ]words?\s+or\s+(?:less|fewer)\b"),
    re.compile(rf"\b{_N}-word\b"),
    re.compile(r"\b(one|a single|single)\s+word\b"),
)  # fmt: skip
_SENTENCE_COUNT = re.compile(rf"\b{_N}\s+sentences?\b")
_LIST_COUNT = re.compile(
    rf"\b(?:list|name|give|provide|enumerate|suggest|generate|identify)\s+(?:me\s+)?(?:the\s+)?(?:top\s+)?{_N}\b"
)
_YES_NO = re.compile(r"\byes or no\b")
_SHORT_CUES = re.compile(r"\b(?:brief|briefly|short|shortly|concise|concisely|succinct|succinctly|in short|tl;?dr)\b")
_LONG_CUES = re.compile(
    r"\b(?:explain\w*|essay|in detail|detailed|elaborate|step[- ]by[- ]step|comprehensive|thorough\w*|"
    r"in depth|in-depth)\b"
)


def _count(token: str) -> int | None:
    if token.isdigit():
        return int(token)
    if token in ("a", "single", "a single"):
        return 1
    return _NUMBER_WORDS.get(token)


def length_band(instruction: str, reference: str | None = None) -> tuple[float, float]:
    """The (lo, hi) word-count band a good answer should fall in.

    With a reference of r words: (max(1, 0.5 r), 2 r + 5); the +5 lets a one-word reference
    ("Paris") accept a short sentence. Otherwise the first matching cue of the instruction:

    - a word limit ("in 50 words", "under 20 words", "a 100-word", "one word"), N words:
      (max(1, N / 2), max(3, 1.25 N));
    - a sentence count ("in one sentence", "two sentences"), N sentences: (3 N, 30 N);
    - a list count ("list 5", "name three", "give 4"), N items: (N, 25 N);
    - "yes or no": (1, 40);
    - brevity ("briefly", "short", "concise"): (5, 60);
    - depth ("explain", "essay", "in detail", "step by step"): (40, 300);
    - otherwise (20, 150).
    """
    if reference is not None and reference.strip():
        r = len(_words(reference))
        if r:
            return (max(1.0, 0.5 * r), 2.0 * r + 5)
    text = instruction.lower()
    for pattern in _WORD_LIMIT:
        m = pattern.search(text)
        if m and (n := _count(m.group(1))):
            return (max(1.0, n / 2), max(3.0, 1.25 * n))
    m = _SENTENCE_COUNT.search(text)
    if m and (n := _count(m.group(1))):
        return (3.0 * n, 30.0 * n)
    m = _LIST_COUNT.search(text)
    if m and m.group(1) not in ("a", "a single", "single") and (n := _count(m.group(1))):
        return (float(n), 25.0 * n)
    if _YES_NO.search(text):
        return YES_NO_BAND
    if _SHORT_CUES.search(text):
        return SHORT_BAND
    if _LONG_CUES.search(text):
        return LONG_BAND
    return DEFAULT_BAND


def length_fit(instruction: str, response: str, reference: str | None = None) -> float:
    """1 when the response's word count n is inside ``length_band``, decaying outside it.

    Rule: n / lo below the band, hi / n above it (continuous at both edges, 0 for empty).

    Why: length is the classic reward hack, since learned reward models drift towards longer
    answers; scoring against a band asked for by the instruction (or set by the reference)
    makes padding cost reward instead of earning it, and a 4x-padded answer keeps only about
    a quarter to a half of this component.
    """
    n = len(_words(_body(response)))
    if n == 0:
        return 0.0
    lo, hi = length_band(instruction, reference)
    if n < lo:
        return n / lo
    if n > hi:
        return hi / n
    return 1.0


# --- relevance -------------------------------------------------------------------------------

# Function words, plus the words that frame a task ("write", "explain", "sentence", "poem",
# "fewer") rather than name its topic: an answer rarely repeats them.
STOPWORDS = frozenset(
    """
    a an the and or but if then else of to in on at by for with from about as into onto over under
    up down out off than so too very also just only such some any each every all both either
    neither more most other same few many much own no not nor yes is are was were be been being
    am do does did done have has had having it its this that these those there here what which who
    whom whose when where why how i me my you your he him his she her we us our they them their
    can could should would will shall may might must please
    write explain describe list give provide tell name make create generate summarize summarise
    answer question following sentence sentences word words paragraph short brief briefly detail
    detailed example examples using use way ways one two three four five six seven eight nine ten
    less fewer least essay poem story article summary haiku
    """.split()
)
_STEM = 5  # words match on their first 5 letters: "benefits" ~ "beneficial", "exercise" ~ "exercising"


def content_words(text: str) -> frozenset[str]:
    """The 5-letter stems of the text's words, leaving out stopwords, numbers and single letters.

    Numbers go because in an instruction they are nearly always counts ("list 5", "in 50 words").
    """
    return frozenset(w[:_STEM] for w in _words(text) if len(w) > 1 and not w.isdigit() and w not in STOPWORDS)


def relevance(instruction: str, response: str) -> float:
    """How much of what the instruction is about the response talks about.

    Rule: recall = |content(instruction) & content(response)| / |content(instruction)| on
    5-letter stems (see ``content_words``), score = min(1, recall / 0.5); 1 if the instruction has no content words,
    0 for an empty response.

    Why: an answer on topic reuses the topic's words; half of them is plenty, since answers
    paraphrase and long inputs ("summarise this text: ...") have many words no answer needs.
    Off-topic answers, a common failure of small models, get little.
    """
    if not _body(response):
        return 0.0
    wanted = content_words(instruction)
    if not wanted:
        return 1.0
    recall = len(wanted & content_words(_body(response))) / len(wanted)
    return min(1.0, recall / 0.5)


# --- reference_overlap -----------------------------------------------------------------------

_ROUGE_FULL = 0.5


def reference_overlap(response: str, reference: str) -> float:
    """Agreement with a reference answer: min(1, ROUGE-L F1 / 0.5); 0 for an empty response.

    Why: when a teacher's reference exists it is the best evidence of correct content. A good
    answer worded differently rarely passes ROUGE-L 0.5, so that already earns full credit
    rather than demanding a copy.
    """
    body = _body(response)
    if not body:
        return 0.0
    return min(1.0, rouge_l(body, reference) / _ROUGE_FULL)


# --- clean_text ------------------------------------------------------------------------------

CLEAN_TEXT_PENALTIES: dict[str, float] = {
    "template_tokens": 0.5,  # <|im_end|> and friends, or a bare "assistant" header line at the start
    "role_label": 0.3,  # a line opening with "Assistant:", "User:", "### Response:" ...
    "echoed_instruction": 0.3,  # the response starts by repeating the whole instruction
    "control_characters": 0.3,  # non-printable characters or U+FFFD
    "non_ascii": 0.5,  # more than half the visible characters are non-ASCII
}
_ALLOWED_CONTROL = frozenset("\n\t\r\u200d")  # newline, tab, CR, zero-width joiner (emoji)
_MIN_ECHO_WORDS = 3


def clean_text_issues(instruction: str, response: str) -> tuple[str, ...]:
    """The names (keys of ``CLEAN_TEXT_PENALTIES``) of the artefacts found in the response.

    - template_tokens: a chat-template special token anywhere, or the first line is a bare
      role header ("assistant" then a newline, possibly after <|im_start|>);
    - role_label: a line starting with a speaker label (the model restating its role or
      writing the user's next turn); "As an AI language model" is not one;
    - echoed_instruction: the response's words begin with all of the instruction's words
      (instructions of at least 3 words);
    - control_characters: a Unicode control/format/unassigned character other than newline,
      tab and CR, or the replacement character U+FFFD (broken decoding);
    - non_ascii: over half of the non-space characters are non-ASCII, unless the instruction
      itself has non-ASCII characters or asks for a translation.
    """
    issues = []
    if _TEMPLATE_TOKEN.search(response) or _ROLE_HEADER_AT_START.match(_TEMPLATE_TOKEN.sub("", response)):
        issues.append("template_tokens")
    if _ROLE_LABEL_LINE.search(response):
        issues.append("role_label")
    asked, said = _words(instruction), _words(_body(response))
    if len(asked) >= _MIN_ECHO_WORDS and said[: len(asked)] == asked:
        issues.append("echoed_instruction")
    if any(c == "\ufffd" or (unicodedata.category(c)[0] == "C" and c not in _ALLOWED_CONTROL) for c in response):
        issues.append("control_characters")
    visible = [c for c in response if not c.isspace()]
    if visible and sum(not c.isascii() for c in visible) > len(visible) / 2:
        if instruction.isascii() and "translat" not in instruction.lower():
            issues.append("non_ascii")
    return tuple(issues)


def clean_text(instruction: str, response: str) -> float:
    """1 minus the penalties of ``clean_text_issues`` (see ``CLEAN_TEXT_PENALTIES``), floored at 0.

    Why: a 135M model leaks its chat template, invents the user's next turn, parrots the
    prompt or emits broken bytes; each is an unambiguous defect a reader notices at once and
    that lexical components (relevance, overlap) would even reward. Empty gives 0.
    """
    if not _body(response):
        return 0.0
    penalty = sum(CLEAN_TEXT_PENALTIES[name] for name in clean_text_issues(instruction, response))
    return max(0.0, 1.0 - penalty)


# --- the rubric ------------------------------------------------------------------------------


def score_response(
    instruction: str,
    response: str,
    reference: str | None = None,
    weights: RubricWeights = RubricWeights(),
    *,
    truncated: bool = False,
) -> RubricScore:
    """Score ``response`` to ``instruction``: every component, and their weighted mean.

    ``reference`` (a known good answer) adds reference_overlap and sets the length band; an
    empty or whitespace-only reference counts as none. ``truncated`` says generation stopped
    at max_new_tokens, which zeroes ends_properly. The total divides by the sum of the
    weights in use, so it lies in [0, 1] for any weights.
    """
    for name, value in (("instruction", instruction), ("response", response)):
        if not isinstance(value, str):
            raise UserError(f"rubric {name} must be a string, got {type(value).__name__}")
    if reference is not None and not isinstance(reference, str):
        raise UserError(f"rubric reference must be a string or None, got {type(reference).__name__}")
    has_reference = reference is not None and bool(_words(reference))

    components = {
        "ends_properly": ends_properly(response, truncated=truncated),
        "no_repetition": no_repetition(response),
        "length_fit": length_fit(instruction, response, reference if has_reference else None),
        "relevance": relevance(instruction, response),
    }
    if has_reference:
        components["reference_overlap"] = reference_overlap(response, reference)
    components["clean_text"] = clean_text(instruction, response)

    w = weights.as_dict()
    weight_in_use = sum(w[name] for name in components)
    if weight_in_use <= 0:
        raise UserError("rubric weights of the components in use sum to zero (only reference_overlap is "
                        "weighted, but no reference was given)")  # fmt: skip
    total = sum(w[name] * value for name, value in components.items()) / weight_in_use
    return RubricScore(total=min(1.0, max(0.0, total)), components=components)


def prefer(instruction: str, a: str, b: str, reference: str | None = None, **kw) -> tuple[float, float]:
    """The rubric totals of responses ``a`` and ``b`` to the same instruction (keywords go to score_response)."""
    return score_response(instruction, a, reference, **kw).total, score_response(instruction, b, reference, **kw).total
