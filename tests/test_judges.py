"""Judges for generated preference pairs: the LLM judge's order swap, verdict parsing, the rubric judge."""

import re

import pytest
from fake_openai_server import fake_openai_server

from rlhf.data_builders.teacher import OpenAITeacher
from rlhf.reward.judges import Candidate, LLMJudge, RubricJudge, parse_verdict

PROMPT = [{"role": "user", "content": "Explain why we sleep."}]
SHORT = Candidate(PROMPT, "Rest.")
LONG = Candidate(PROMPT, "Sleep lets the body repair tissue and the brain consolidate memories.")


def responses_in(prompt: str) -> tuple[str, str]:
    a, b = re.search(r"Response A:\n(.*)\n\nResponse B:\n(.*)\n\nAnswer", prompt, re.S).groups()
    return a, b


def prefers_longer(prompt: str) -> str:
    a, b = responses_in(prompt)
    return "A" if len(a) > len(b) else "B"


class FakeTeacher:
    """A deterministic verdict function behind the teacher interface."""

    def __init__(self, verdict):
        self.verdict, self.prompts = verdict, []

    def complete(self, conversations, **settings):
        self.prompts += [c[-1]["content"] for c in conversations]
        return [self.verdict(c[-1]["content"]) for c in conversations]


def test_agreeing_orders_give_a_verdict():
    teacher = FakeTeacher(prefers_longer)
    assert LLMJudge(teacher).verdicts([(SHORT, LONG), (LONG, SHORT)]) == [1, 0]
    # Each pair was asked twice, the second time with the responses swapped.
    assert responses_in(teacher.prompts[0]) == (SHORT.response, LONG.response)
    assert responses_in(teacher.prompts[1]) == (LONG.response, SHORT.response)


def test_position_bias_is_a_tie():
    assert LLMJudge(FakeTeacher(lambda prompt: "A")).verdicts([(SHORT, LONG), (LONG, SHORT)]) == [None, None]
    assert LLMJudge(FakeTeacher(lambda prompt: "I cannot decide.")).verdicts([(SHORT, LONG)]) == [None]


def test_llm_judge_over_http():
    with fake_openai_server(lambda request: prefers_longer(request["messages"][-1]["content"])) as base_url:
        judge = LLMJudge(OpenAITeacher(base_url, "judge", max_retries=0))
        assert judge.verdicts([(LONG, SHORT), (SHORT, LONG)]) == [0, 1]


@pytest.mark.parametrize(
    "reply, verdict",
    [("A", 0), ("B.", 1), ("Response B is better.", 1), ("**A**", 0), ("Both A and B", None), ("a tie", None), ("", None)],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_rubric_judge_prefers_the_complete_answer():
    cut = Candidate(PROMPT, "Sleep lets the body repair tissue and the", finished=False)
    scores = RubricJudge().scores([LONG, cut])
    assert scores[0] > scores[1] and all(0 <= s <= 1 for s in scores)
