"""The benchmark stage: the real lm-evaluation-harness on tiny models (base, SFT, SFT + a policy adapter), the
forgetting arithmetic against hand-worked numbers, the local-data form of a named lm-eval task and its errors,
and the per-model cache that a ppo change leaves base and SFT in."""

import math

import pytest

from rlhf.benchmark_math import Score, compare, forgetting_rate, intervals_separate, knowledge_loss


# --- the arithmetic, worked by hand ------------------------------------------------------------------------


def test_intervals_and_forgetting_measures_by_hand():
    base, tuned = Score(0.50, 0.05), Score(0.40, 0.04)
    assert base.half_width == pytest.approx(0.098) and base.interval == pytest.approx((0.402, 0.598))
    c = compare(base, tuned)
    assert c.delta_a == pytest.approx(-0.10)
    assert c.forgetting_rate == pytest.approx(20.0) and c.forgetting_rate_note is None  # (1 - 0.4 / 0.5) × 100
    assert c.knowledge_loss == pytest.approx(0.10)
    assert c.knowledge_loss_pm == pytest.approx(math.sqrt(0.098**2 + 0.0784**2))  # 0.12550
    assert c.knowledge_loss_pm == pytest.approx(0.125501, abs=1e-6)
    assert c.intervals_separate is False  # [0.402, 0.598] and [0.3216, 0.4784] overlap

    # Intervals that clear each other: [0.7608, 0.8392] and [0.4412, 0.5588].
    assert intervals_separate(Score(0.8, 0.02), Score(0.5, 0.03)) is True
    assert knowledge_loss(Score(0.8, 0.02), Score(0.5, 0.03)) == pytest.approx((0.3, 0.0706688), abs=1e-6)
    # The reference material's GSM8K figures: 33.51 % -> 3.71 % is a forgetting rate of 88.93 %.
    assert forgetting_rate(Score(0.3351, None), Score(0.0371, None))[0] == pytest.approx(88.928, abs=1e-3)


def test_a_base_of_zero_gives_no_forgetting_rate_and_no_crash():
    c = compare(Score(0.0, 0.0), Score(0.1, 0.03))
    assert c.forgetting_rate is None and "A_base is 0" in c.forgetting_rate_note
    assert c.delta_a == pytest.approx(0.1)
    assert (c.knowledge_loss, c.knowledge_loss_pm) == pytest.approx((-0.1, 0.0588))
    assert c.intervals_separate is True  # [0, 0] against [0.0412, 0.1588]
    no_error = compare(Score(0.3, None), Score(0.2, 0.01))  # lm-eval gave no stderr for one of them
    assert no_error.knowledge_loss_pm is None and no_error.intervals_separate is None
    assert no_error.forgetting_rate == pytest.approx(100 / 3)
