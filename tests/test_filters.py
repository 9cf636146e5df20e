"""rouge_l against hand-computed values, and each InstructionFilter rule on a minimal example."""

import pytest

from rlhf.data_builders.filters import DROP_REASONS, InstructionFilter, rouge_l

GOOD_OUTPUT = "Crimson leaves drift down, the cold wind hums, autumn says goodbye."


# --- rouge_l ----------------------------------------------------------------------------


def test_identical_texts_score_one():
    assert rouge_l("Write a poem about the sea.", "Write a poem about the sea.") == 1.0


def test_disjoint_texts_score_zero():
    assert rouge_l("red green blue", "one two three four") == 0.0


def test_case_and_punctuation_are_ignored():
    assert rouge_l("Hello, World!", "hello world") == 1.0


def test_empty_text_scores_zero():
    assert rouge_l("", "anything at all") == 0.0
    assert rouge_l("anything at all", "") == 0.0


def test_hand_computed_equal_lengths():
    # candidate: the cat sat on the mat  (6 tokens)
    # reference: the cat is  on the mat  (6 tokens)
    # LCS = "the cat on the mat" = 5, so P = R = 5/6 and F = 5/6.
    assert rouge_l("The cat sat on the mat.", "The cat is on the mat.") == pytest.approx(5 / 6)


def test_hand_computed_different_lengths():
    # candidate: a b c d (4), reference: b d e (3); LCS = "b d" = 2.
    # P = 2/4, R = 2/3, F = 2PR / (P + R) = (2/3) / (7/6) = 4/7.
    assert rouge_l("a b c d", "b d e") == pytest.approx(4 / 7)


def test_order_matters_because_lcs_is_a_subsequence():
    # Reversed tokens share only one in order: LCS = 1, F = 2 * 1 / (3 + 3) = 1/3.
    assert rouge_l("a b c", "c b a") == pytest.approx(1 / 3)


def test_rouge_l_is_symmetric():
    assert rouge_l("a b c d", "b d e") == rouge_l("b d e", "a b c d")


# --- InstructionFilter ------------------------------------------------------------------


def test_good_instruction_is_kept():
    pool = ["Translate the sentence into German.", "List three prime numbers."]
    assert InstructionFilter().drop_reason("Write a haiku about autumn leaves.", GOOD_OUTPUT, pool) is None


@pytest.mark.parametrize(
    "instruction, output, pool, reason",
    [
        ("Write poem", GOOD_OUTPUT, [], "too_short"),
        ("   ", GOOD_OUTPUT, [], "too_short"),
        ("Write " + "very " * 150 + "long.", GOOD_OUTPUT, [], "too_long"),
        ("- Write a poem about spring.", GOOD_OUTPUT, [], "bad_start"),
        ("(Write a poem about spring.)", GOOD_OUTPUT, [], "bad_start"),
        ("Écris un poème sur le printemps.", GOOD_OUTPUT, [], "bad_start"),
        ("Describe the image below in detail.", GOOD_OUTPUT, [], "unsupported_task"),
        ("Visit this WEBSITE and summarise it.", GOOD_OUTPUT, [], "unsupported_task"),
        ("Write a haiku about autumn leaves.", "  \n\t", [], "empty_output"),
        ("Write a haiku about autumn leaves.", "I am sorry " * 5, [], "degenerate_output"),
        ("Write a poem about the sea.", GOOD_OUTPUT, ["write  a POEM about the sea."], "duplicate"),
        # 6 and 7 tokens, LCS 6: F = 12/13 ≈ 0.92 ≥ 0.7.
        ("Write a poem about the sea.", GOOD_OUTPUT, ["Write a short poem about the sea."], "similar"),
    ],
)
def test_each_reason(instruction, output, pool, reason):
    assert InstructionFilter().drop_reason(instruction, output, pool) == reason


def test_every_reason_is_listed():
    assert set(DROP_REASONS) == {
        "too_short", "too_long", "unsupported_task", "bad_start",
        "duplicate", "similar", "empty_output", "degenerate_output",
    }


def test_blocked_words_match_whole_words_only():
    # "imagine" contains "image"'s letters but is a fine text task; "filed" is not "file".
    instruction = "Imagine you filed a complaint; write the letter."
    assert InstructionFilter().drop_reason(instruction, GOOD_OUTPUT, []) is None


def test_word_limits_are_inclusive():
    text_filter = InstructionFilter(min_words=3, max_words=5)
    assert text_filter.drop_reason("Name three birds.", GOOD_OUTPUT, []) is None
    assert text_filter.drop_reason("Name three birds and fish.", GOOD_OUTPUT, []) is None
    assert text_filter.drop_reason("Name three birds and six fish.", GOOD_OUTPUT, []) == "too_long"


def test_four_repeats_are_not_degenerate_but_five_are():
    text_filter = InstructionFilter()
    instruction = "Write a haiku about autumn leaves."
    assert text_filter.drop_reason(instruction, "I am sorry " * 4, []) is None
    assert text_filter.drop_reason(instruction, "I am sorry " * 5, []) == "degenerate_output"


def test_similarity_threshold_is_inclusive():
    # "alpha beta gamma delta" vs "alpha beta omega sigma": LCS 2, F = 4/8 = 0.5.
    text_filter = InstructionFilter(max_rouge=0.5)
    assert text_filter.drop_reason("alpha beta gamma delta", GOOD_OUTPUT, ["alpha beta omega sigma"]) == "similar"
    assert InstructionFilter(max_rouge=0.51).drop_reason(
        "alpha beta gamma delta", GOOD_OUTPUT, ["alpha beta omega sigma"]
    ) is None


def test_cheap_checks_come_before_pool_checks():
    # Both too short and a duplicate: the cheap reason is reported.
    assert InstructionFilter().drop_reason("Hi", GOOD_OUTPUT, ["hi"]) == "too_short"


def test_custom_blocked_words():
    text_filter = InstructionFilter(blocked_words=("Spreadsheet",))
    assert text_filter.drop_reason("Fill in this spreadsheet for me.", GOOD_OUTPUT, []) == "unsupported_task"
    assert text_filter.drop_reason("Describe a picture of a cat.", GOOD_OUTPUT, []) is None


def test_instruction_and_output_checks_can_run_separately():
    # The generator screens instructions before asking the teacher for their answers.
    text_filter = InstructionFilter()
    pool = ["Write a poem about the sea."]
    assert text_filter.instruction_drop_reason("Write a poem about the sea.", pool) == "duplicate"
    assert text_filter.instruction_drop_reason("Describe this photo.", []) == "unsupported_task"
    assert text_filter.instruction_drop_reason("Write a haiku about autumn leaves.", pool) is None
    assert text_filter.output_drop_reason(" ") == "empty_output"
    assert text_filter.output_drop_reason("la la la " * 5) == "degenerate_output"
    assert text_filter.output_drop_reason(GOOD_OUTPUT) is None


def test_output_checks_come_before_pool_checks():
    assert InstructionFilter().drop_reason("Write a poem about the sea.", "", ["Write a poem about the sea."]) == "empty_output"
