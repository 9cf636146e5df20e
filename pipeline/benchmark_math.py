"""What fine-tuning cost on a benchmark: intervals and the forgetting measures, on plain numbers.

Per task and metric, with A a model's score (accuracy, exact match, ...) and se its standard error as
lm-evaluation-harness reports it:
- the 95 % interval: A ± CI, CI = 1.96 · se (a normal approximation to the mean over items);
- Ability Augmentation ΔA = A_FT − A_base (positive: the fine-tuned model gained);
- Forgetting Rate FR = (1 − A_FT / A_base) × 100 % (positive: the share of the base score lost); undefined
  when A_base = 0, and then reported as None with the reason;
- Knowledge Loss ΔK = A_base − A_FT ± sqrt(CI_base² + CI_FT²), the ± term the half-width of the difference's
  95 % interval when the two scores' errors are independent;
- the intervals separate when A_base ± CI_base and A_FT ± CI_FT do not overlap (a stricter test than ΔK's ±
  term excluding 0: it asks each interval to clear the other).
"base" and "FT" are the earlier and the later model of a comparison: base → SFT, base → PPO, SFT → PPO.
No torch and no lm_eval here: `rlhf report` reads finished runs with it instantly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z95 = 1.96
"""The standard normal quantile of a two-sided 95 % interval."""

COMPARISONS = (("base", "sft"), ("base", "ppo"), ("sft", "ppo"))
"""(earlier, later) model pairs compared on every task."""


@dataclass(frozen=True)
class Score:
    """One model's value of one metric on one task."""

    value: float
    stderr: float | None
    """None when lm-eval gave none (a single item, or a metric without one)."""

    @property
    def half_width(self) -> float | None:
        """CI: half the width of the 95 % interval, 1.96 · se."""
        return None if self.stderr is None else Z95 * self.stderr

    @property
    def interval(self) -> tuple[float, float] | None:
        """(A − CI, A + CI)."""
        if self.half_width is None:
            return None
        return (self.value - self.half_width, self.value + self.half_width)


def delta_a(before: Score, after: Score) -> float:
    """ΔA = A_after − A_before."""
    return after.value - before.value


def forgetting_rate(before: Score, after: Score) -> tuple[float | None, str | None]:
    """(FR in percent, None), FR = (1 − A_after / A_before) × 100; (None, why) when A_before is 0."""
    if before.value == 0:
        return None, "A_base is 0: the forgetting rate (1 − A_FT / A_base) is undefined"
    return (1 - after.value / before.value) * 100, None


def knowledge_loss(before: Score, after: Score) -> tuple[float, float | None]:
    """(ΔK, its ± term): ΔK = A_before − A_after, ± sqrt(CI_before² + CI_after²); the ± term is None when a
    score has no standard error."""
    if before.half_width is None or after.half_width is None:
        return before.value - after.value, None
    return before.value - after.value, math.hypot(before.half_width, after.half_width)


def intervals_separate(before: Score, after: Score) -> bool | None:
    """Whether the two 95 % intervals do not overlap; None when a score has no standard error."""
    a, b = before.interval, after.interval
    if a is None or b is None:
        return None
    return a[1] < b[0] or b[1] < a[0]


@dataclass(frozen=True)
class Comparison:
    """ΔA, FR, ΔK and the separation flag of one metric between an earlier and a later model."""

    delta_a: float
    forgetting_rate: float | None
    """Percent; None when undefined (forgetting_rate_note says why)."""
    forgetting_rate_note: str | None
    knowledge_loss: float
    knowledge_loss_pm: float | None
    """ΔK's ± term, sqrt(CI_base² + CI_FT²)."""
    intervals_separate: bool | None

    def to_dict(self) -> dict:
        return asdict(self)


def compare(before: Score, after: Score) -> Comparison:
    rate, note = forgetting_rate(before, after)
    loss, plus_minus = knowledge_loss(before, after)
    return Comparison(delta_a(before, after), rate, note, loss, plus_minus, intervals_separate(before, after))
