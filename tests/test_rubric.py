"""The rubric reward: each component against hand-computed numbers, the total, and the orderings that matter."""

import random

import pytest

from rlhf.data_builders.filters import rouge_l
from rlhf.errors import UserError
from rlhf.reward.rubric import (
    CLEAN_TEXT_PENALTIES,
    DEFAULT_BAND,
    LONG_BAND,
    SHORT_BAND,
    RubricScore,
    RubricWeights,
    clean_text,
    clean_text_issues,
    content_words,
    distinct_ngram_fraction,
    ends_properly,
    length_band,
    length_fit,
    no_repetition,
    prefer,
    reference_overlap,
    relevance,
    repeated_unit_fraction,
    score_response,
)

INSTRUCTION = "Explain why the sky is blue."
GOOD = (
    "The sky looks blue because of Rayleigh scattering. Sunlight contains all colours, but when it "
    "passes through the atmosphere, the tiny nitrogen and oxygen molecules scatter short blue "
    "wavelengths much more strongly than long red ones. That scattered blue light reaches our eyes "
    "from every direction, so the whole sky appears blue. At sunset the light travels through more "
    "air, the blue is scattered away, and the sky turns red and orange."
)
REFERENCE = (
    "The sky is blue because air molecules scatter blue sunlight more than red sunlight. This is "
    "called Rayleigh scattering, and the scattered blue light reaches our eyes from all directions."
)


# --- weights -------------------------------------------------------------------------------


def test_default_weights_sum_to_one():
    w = RubricWeights()
    assert sum(w.as_dict().values()) == pytest.approx(1.0)
    assert w.as_dict() == {
        "ends_properly": 0.2, "no_repetition": 0.2, "length_fit": 0.15,
        "relevance": 0.15, "reference_overlap": 0.2, "clean_text": 0.1,
    }  # fmt: skip


@pytest.mark.parametrize("bad", [{"relevance": -0.1}, {"clean_text": float("nan")}, {"length_fit": "0.1"}])
def test_bad_weights_are_user_errors(bad):
    with pytest.raises(UserError):
        RubricWeights(**bad)


def test_all_zero_weights_are_a_user_error():
    with pytest.raises(UserError):
        RubricWeights(0, 0, 0, 0, 0, 0)


def test_only_reference_weight_without_reference_is_a_user_error():
    only_ref = RubricWeights(0, 0, 0, 0, 1, 0)
    assert score_response("Say hi.", "Hi.", "Hi.", only_ref).total == 1.0
    with pytest.raises(UserError):
        score_response("Say hi.", "Hi.", None, only_ref)


def test_non_string_inputs_are_user_errors():
    with pytest.raises(UserError):
        score_response("Say hi.", None)
    with pytest.raises(UserError):
        score_response("Say hi.", "Hi.", reference=3)


# --- ends_properly -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The sky is blue.", 1.0),
        ("Is it blue?", 1.0),
        ("Wow!", 1.0),
        ('He said "blue."', 1.0),
        ("(see above)", 1.0),
        ("It is 'blue'", 1.0),
        ("**The answer is blue.**  \n", 1.0),  # markdown emphasis and whitespace are looked through
        ("Here it is:\n```python\nprint('blue')\n```", 1.0),  # closing code fence
        ("Here it is:\n```python\nprint('blue')", 0.0),  # fence opened, never closed
        ("The sky is blue because the", 0.0),  # mid-sentence
        ("Reasons:", 0.0),  # short, but ends on a colon: more was coming
        ("Paris", 1.0),  # bare answer of <= 3 words
        ("1. Apple\n2. Banana\n3. Cherry", 1.0),  # short final list item
        ("1. Apple\n2. The banana is the best fruit because", 0.0),  # list item cut mid-sentence
        ("The sky is blue.<|im_end|>", 1.0),  # template tokens are clean_text's business
        ("", 0.0),
        ("   \n", 0.0),
    ],
)
def test_ends_properly(text, expected):
    assert ends_properly(text) == expected


def test_truncated_never_ends_properly():
    assert ends_properly("The sky is blue.", truncated=True) == 0.0
    assert score_response(INSTRUCTION, GOOD, truncated=True).components["ends_properly"] == 0.0


# --- no_repetition -------------------------------------------------------------------------


def test_distinct_ngram_fraction_hand_computed():
    # "a b c a b c": 3-grams abc, bca, cab, abc -> 4 grams, 3 distinct -> 3/4.
    assert distinct_ngram_fraction("a b c a b c") == pytest.approx(0.75)
    # "the cat sat on the mat": 4 grams, all distinct.
    assert distinct_ngram_fraction("The cat sat on the mat.") == 1.0
    # Fewer than 3 words: no 3-grams at all -> 1.0.
    assert distinct_ngram_fraction("Hi there") == 1.0


def test_no_repetition_maps_distinct_fraction_linearly():
    # d = 0.75 -> (0.75 - 0.5) / (0.9 - 0.5) = 0.625; one unit, so no repeated-sentence factor.
    assert no_repetition("a b c a b c") == pytest.approx(0.625)
    assert no_repetition("The cat sat on the mat.") == 1.0
    assert no_repetition("Hi there") == 1.0
    # "go" x 6: 4 grams, 1 distinct, d = 0.25 <= 0.5 -> 0.
    assert no_repetition("go go go go go go") == 0.0
    assert no_repetition("") == 0.0


def test_repeated_sentence_is_penalised():
    text = "The cat sat down. The dog ran off. The cat sat down."
    # words: the cat sat down the dog ran off the cat sat down (12) -> 10 3-grams;
    # "the cat sat" and "cat sat down" each occur twice -> 8 distinct, d = 0.8 -> (0.8-0.5)/0.4 = 0.75.
    assert distinct_ngram_fraction(text) == pytest.approx(0.8)
    # sentences: 3 of >= 3 words, 2 distinct -> u = 1 - 2/3 = 1/3.
    assert repeated_unit_fraction(text) == pytest.approx(1 / 3)
    # 0.75 * (1 - 1/3) = 0.5
    assert no_repetition(text) == pytest.approx(0.5)


def test_short_repeated_lines_are_allowed():
    # Lines of fewer than 3 words ("}", "Yes.") may repeat legitimately.
    assert repeated_unit_fraction("Yes.\nNo.\nYes.\n}\n}") == 0.0


def test_normal_answer_scores_one_and_loop_scores_zero():
    assert no_repetition(GOOD) == 1.0
    assert no_repetition("The sky is blue because " * 8) == 0.0


# --- length_fit ----------------------------------------------------------------------------


def _n_words(n):
    return " ".join(f"w{i}" for i in range(n)) + "."


def test_length_fit_default_band_hand_computed():
    instruction = "Tell me about owls."  # no cue -> default band (20, 150)
    assert length_band(instruction) == DEFAULT_BAND
    assert length_fit(instruction, _n_words(10)) == pytest.approx(10 / 20)  # below: n / lo = 0.5
    assert length_fit(instruction, _n_words(20)) == 1.0  # edges are inside
    assert length_fit(instruction, _n_words(150)) == 1.0
    assert length_fit(instruction, _n_words(300)) == pytest.approx(150 / 300)  # above: hi / n = 0.5
    assert length_fit(instruction, "") == 0.0


def test_length_fit_follows_the_reference():
    reference = _n_words(10)  # r = 10 -> band (0.5 * 10, 2 * 10 + 5) = (5, 25)
    assert length_band("Answer in one word.", reference) == (5.0, 25.0)  # the reference wins over cues
    assert length_fit("Tell me about owls.", _n_words(4), reference) == pytest.approx(4 / 5)
    assert length_fit("Tell me about owls.", _n_words(25), reference) == 1.0
    assert length_fit("Tell me about owls.", _n_words(50), reference) == pytest.approx(25 / 50)
    assert length_band("x", "Paris.") == (1.0, 7.0)  # r = 1 -> (max(1, 0.5), 2 + 5)


@pytest.mark.parametrize(
    "instruction, band",
    [
        ("Answer in one word: what colour is the sky?", (1.0, 3.0)),  # N=1: (max(1, 0.5), max(3, 1.25))
        ("Summarize the text in 40 words.", (20.0, 50.0)),  # (40/2, 1.25*40)
        ("Describe Rome in 20 words or less.", (10.0, 25.0)),
        ("Write a 100-word story about a fox.", (50.0, 125.0)),
        ("Describe a cat in one sentence.", (3.0, 30.0)),  # (3N, 30N), N=1
        ("Write two sentences about dogs.", (6.0, 60.0)),
        ("List 5 fruits.", (5.0, 125.0)),  # (N, 25N)
        ("Name three primary colours.", (3.0, 75.0)),
        ("Is water wet? Answer yes or no.", (1.0, 40.0)),
        ("Briefly describe Rome.", SHORT_BAND),  # brevity wins over "describe"
        ("Give a short answer: why do cats purr?", SHORT_BAND),
        ("Briefly explain gravity.", SHORT_BAND),  # brevity is checked before depth
        ("Explain how vaccines work.", LONG_BAND),
        ("Write an essay on climate change.", LONG_BAND),
        ("Describe the water cycle in detail.", LONG_BAND),
        ("Write a poem about the sea.", DEFAULT_BAND),
    ],
)
def test_length_band_cues(instruction, band):
    assert length_band(instruction) == band


# --- relevance -----------------------------------------------------------------------------


def test_content_words_drop_stopwords_numbers_and_stem_to_five_letters():
    # describe/the/of/for are stopwords; the rest cut to 5 letters.
    assert content_words("Describe the benefits of regular exercise for older adults.") == {
        "benef", "regul", "exerc", "older", "adult",
    }  # fmt: skip
    assert content_words("List 5 fruits in 50 words or less.") == {"fruit"}


def test_relevance_hand_computed():
    instruction = "Describe the benefits of regular exercise for older adults."  # 5 stems, as above
    # response stems: exerc, benef, keeps, heart, stron -> matches {benef, exerc}: recall 2/5 = 0.4;
    # score = min(1, 0.4 / 0.5) = 0.8
    assert relevance(instruction, "Exercising is beneficial: it keeps the heart strong.") == pytest.approx(0.8)
    # 3 of 5 (exerc, benef, older): recall 0.6 -> min(1, 1.2) = 1
    assert relevance(instruction, "Exercise benefits older people a lot.") == 1.0
    assert relevance(instruction, "Bananas are yellow and grow in bunches.") == 0.0
    assert relevance("Write it down, please.", "Done.") == 1.0  # no content words in the instruction
    assert relevance(instruction, "") == 0.0


# --- reference_overlap ---------------------------------------------------------------------


def test_reference_overlap_scales_rouge():
    # rouge_l("the cat sat", "the cat is on the mat") = 2*2/(3+6) = 4/9 -> (4/9)/0.5 = 8/9
    assert rouge_l("The cat sat", "The cat is on the mat") == pytest.approx(4 / 9)
    assert reference_overlap("The cat sat", "The cat is on the mat") == pytest.approx(8 / 9)
    # rouge 5/6 >= 0.5 -> capped at 1
    assert reference_overlap("The cat sat on the mat.", "The cat is on the mat.") == 1.0
    assert reference_overlap("red green blue", "one two three") == 0.0
    assert reference_overlap("", "one two three") == 0.0


def test_reference_overlap_only_present_with_a_reference():
    assert "reference_overlap" not in score_response(INSTRUCTION, GOOD).components
    assert "reference_overlap" not in score_response(INSTRUCTION, GOOD, "   ").components  # blank = none
    assert "reference_overlap" in score_response(INSTRUCTION, GOOD, REFERENCE).components


# --- clean_text ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "instruction, response, issues",
    [
        ("Name the capital of France.", "Paris is the capital.", ()),
        ("Name the capital of France.", "As an AI language model, I can say Paris.", ()),  # fine
        ("Name the capital of France.", "Paris.<|im_end|>", ("template_tokens",)),
        ("Name the capital of France.", "<|im_start|>assistant\nParis.<|im_end|>", ("template_tokens",)),
        ("Name the capital of France.", "assistant\nParis.", ("template_tokens",)),
        ("Name the capital of France.", "Paris.<|endoftext|>", ("template_tokens",)),
        ("Name the capital of France.", "Assistant: Paris.", ("role_label",)),
        ("Name the capital of France.", "Paris.\nUser: and Germany?", ("role_label",)),
        ("Name the capital of France.", "Name the capital of France.\nParis.", ("echoed_instruction",)),
        ("Name the capital of France.", "Paris\x00\x07.", ("control_characters",)),
        ("Name the capital of France.", "Paris \ufffd\ufffd.", ("control_characters",)),
        ("Name the capital of France.", "Паріж є столицею.", ("non_ascii",)),
        ("Translate 'thank you' to Japanese.", "ありがとうございます", ()),  # asked for it
    ],
)
def test_clean_text_issues(instruction, response, issues):
    assert clean_text_issues(instruction, response) == issues


def test_clean_text_penalties_hand_computed():
    i = "Name the capital of France."
    assert clean_text(i, "Paris.") == 1.0
    assert clean_text(i, "Paris.<|im_end|>") == pytest.approx(1 - 0.5)
    assert clean_text(i, "Assistant: Paris.") == pytest.approx(1 - 0.3)
    assert clean_text(i, "Name the capital of France. Paris.") == pytest.approx(1 - 0.3)
    # template 0.5 + echo 0.3 + control 0.3 = 1.1 -> floored at 0
    assert clean_text(i, "<|im_start|>Name the capital of France. Paris\x00.") == 0.0
    assert clean_text(i, "") == 0.0
    assert set(CLEAN_TEXT_PENALTIES) == {
        "template_tokens", "role_label", "echoed_instruction", "control_characters", "non_ascii",
    }  # fmt: skip


def test_template_tokens_are_stripped_before_other_components():
    leaked = score_response(INSTRUCTION, GOOD + "<|im_end|>").components
    clean = score_response(INSTRUCTION, GOOD).components
    assert leaked.pop("clean_text") == 0.5 and clean.pop("clean_text") == 1.0
    assert leaked == clean


# --- total -----------------------------------------------------------------------------------


def test_total_renormalises_without_reference():
    # "Tell me about owls." -> default band (20, 150); content words {owls}.
    # "Owls hunt at night": ends 0 (4 words, no punctuation), no_repetition 1 (2 distinct 3-grams),
    # length 4/20 = 0.2, relevance 1 (owls), clean 1.
    # total = (0.2*0 + 0.2*1 + 0.15*0.2 + 0.15*1 + 0.1*1) / (1 - 0.2) = 0.48 / 0.8 = 0.6
    s = score_response("Tell me about owls.", "Owls hunt at night")
    assert s.components == pytest.approx(
        {"ends_properly": 0.0, "no_repetition": 1.0, "length_fit": 0.2, "relevance": 1.0, "clean_text": 1.0}
    )
    assert s.total == pytest.approx(0.6)


def test_total_with_reference():
    # reference has 7 words -> band (3.5, 19): 4 words inside -> length 1.
    # rouge: LCS "owls hunt at night" = 4 -> 2*4/(4+7) = 8/11 >= 0.5 -> overlap 1.
    # total = 0.2*0 + 0.2*1 + 0.15*1 + 0.15*1 + 0.2*1 + 0.1*1 = 0.8
    s = score_response("Tell me about owls.", "Owls hunt at night", "Owls are birds that hunt at night.")
    assert s.components["length_fit"] == 1.0
    assert s.components["reference_overlap"] == 1.0
    assert s.total == pytest.approx(0.8)


def test_custom_weights_are_a_weighted_mean():
    only_length = RubricWeights(0, 0, 1, 0, 0, 0)
    assert score_response("Tell me about owls.", "Owls hunt at night", weights=only_length).total == pytest.approx(0.2)
    doubled = RubricWeights(*(2 * v for v in RubricWeights().as_dict().values()))
    assert score_response("Tell me about owls.", "Owls hunt at night", weights=doubled).total == pytest.approx(0.6)


def test_perfect_and_empty_answers():
    assert score_response(INSTRUCTION, GOOD).total == 1.0
    # GOOD paraphrases the reference: rouge_l = 1/3 -> overlap (1/3)/0.5 = 2/3. The reference has
    # 30 words -> band (15, 65); GOOD has 72 -> length 65/72. Total = 0.2 + 0.2 + 0.15*65/72 + 0.15
    # + 0.2*2/3 + 0.1 = 0.91875.
    with_ref = score_response(INSTRUCTION, GOOD, REFERENCE)
    assert rouge_l(GOOD, REFERENCE) == pytest.approx(1 / 3)
    assert with_ref.components["reference_overlap"] == pytest.approx(2 / 3)
    assert with_ref.components["length_fit"] == pytest.approx(65 / 72)
    assert with_ref.total == pytest.approx(0.91875)
    empty = score_response(INSTRUCTION, "", REFERENCE)
    assert empty.total == 0.0 and set(empty.components.values()) == {0.0}
    assert score_response(INSTRUCTION, "<|im_end|>").total == 0.0


def test_totals_and_components_stay_in_unit_interval():
    rng = random.Random(0)
    alphabet = list("abc xyz.!?\n") + ["<|im_end|>", "```", "\x00", "é", "Assistant:", " sky blue "]
    for _ in range(200):
        response = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        reference = rng.choice([None, "", "The sky is blue.", response])
        s = score_response(INSTRUCTION, response, reference, truncated=rng.random() < 0.2)
        assert 0.0 <= s.total <= 1.0
        assert all(0.0 <= v <= 1.0 for v in s.components.values())


def test_deterministic():
    a = score_response(INSTRUCTION, GOOD[:200], REFERENCE)
    b = score_response(INSTRUCTION, GOOD[:200], REFERENCE)
    assert isinstance(a, RubricScore) and a == b


def test_prefer_returns_both_totals():
    cut = GOOD[:150]
    assert prefer(INSTRUCTION, GOOD, cut, REFERENCE) == (
        score_response(INSTRUCTION, GOOD, REFERENCE).total,
        score_response(INSTRUCTION, cut, REFERENCE).total,
    )
    # keywords pass through: truncated zeroes ends_properly; no reference -> (0.2 + 0.15 + 0.15 + 0.1) / 0.8
    assert prefer(INSTRUCTION, GOOD, GOOD, truncated=True) == pytest.approx((0.75, 0.75))


# --- orderings that matter -----------------------------------------------------------------


def _cut_mid_sentence(text):
    return text[: text.index("so the whole") + len("so the whole")]


def _padded(text, factor=4):
    filler = " This is a very important point to remember."
    out = text
    while len(out.split()) < factor * len(text.split()):
        out += filler
    return out


LOOPING = "The sky is blue because " * 12 + "the sky is blue."
OFF_TOPIC = (
    "Bananas are a good source of potassium and fibre. They grow in tropical climates and are "
    "usually eaten raw or in smoothies. Many people enjoy them for breakfast with cereal and milk."
)


@pytest.mark.parametrize("reference", [None, REFERENCE], ids=["no-reference", "reference"])
@pytest.mark.parametrize(
    "worse",
    [
        _cut_mid_sentence(GOOD),
        LOOPING,
        OFF_TOPIC,
        _padded(GOOD),
        GOOD + "<|im_end|>\n<|im_end|>",
        (INSTRUCTION + " ") * 6,  # parroting the prompt
    ],
    ids=["cut-mid-sentence", "looping", "off-topic", "padded-4x", "leaked-im_end", "echo-loop"],
)
def test_complete_relevant_answer_wins(worse, reference):
    good, bad = prefer(INSTRUCTION, GOOD, worse, reference)
    assert good > bad


def test_truncated_flag_loses_to_the_same_finished_answer():
    assert score_response(INSTRUCTION, GOOD, truncated=True).total < score_response(INSTRUCTION, GOOD).total


def test_padding_costs_length_and_repetition():
    padded = score_response(INSTRUCTION, _padded(GOOD), REFERENCE).components
    assert padded["no_repetition"] == 0.0
    assert padded["length_fit"] < 0.5
