"""load_preference_pairs: every shape from every source, drop counting, and one-line errors naming file and line."""

import json
from pathlib import Path

import pytest

from rlhf.data_builders.preference_import import (
    ImportResult,
    PreferencePair,
    load_preference_pairs,
    pair_to_row,
)
from rlhf.errors import UserError


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# One row of each shape, all meaning: prompt "What is 2+2?", chosen "4", rejected "5".
ROWS = {
    "plain": [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}],
    "conversational": [
        {"prompt": [user("What is 2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}
    ],
    "conversation_pair": [
        {  # UltraFeedback-binarized: prompt as a string, chosen/rejected as whole conversations.
            "prompt": "What is 2+2?",
            "chosen": [user("What is 2+2?"), assistant("4")],
            "rejected": [user("What is 2+2?"), assistant("5")],
            "score_chosen": 9.0,
        }
    ],
    "hh": [{"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5"}],
}
EXPECTED = PreferencePair(prompt=[user("What is 2+2?")], chosen=[assistant("4")], rejected=[assistant("5")])


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(rows: list) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def load_error(source: Path | str) -> str:
    with pytest.raises(UserError) as caught:
        load_preference_pairs(str(source))
    message = str(caught.value)
    assert "\n" not in message, message
    assert str(source) in message, message
    return message


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` in a throwaway cache, so parquet loading leaves nothing in the user's home."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")
    return datasets


# --- shapes from files ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(ROWS))
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_every_shape_from_jsonl_and_json(tmp_path, shape, suffix):
    rows = ROWS[shape] * 2
    content = jsonl(rows) if suffix == ".jsonl" else json.dumps(rows, indent=2)
    path = write(tmp_path, "prefs" + suffix, content)
    result = load_preference_pairs(str(path))
    assert result == ImportResult(pairs=[EXPECTED, EXPECTED], dropped={}, source=str(path), shape=shape)


def test_conversation_pair_without_prompt_key_and_with_system_message(tmp_path):
    context = [{"role": "system", "content": "Be terse."}, user("Hi"), assistant("Hello."), user("2+2?")]
    row = {"chosen": context + [assistant("4")], "rejected": context + [assistant("Five.")]}
    result = load_preference_pairs(str(write(tmp_path, "p.jsonl", jsonl([row]))))
    assert result.shape == "conversation_pair"
    assert result.pairs == [PreferencePair(context, [assistant("4")], [assistant("Five.")])]


def test_conversational_keeps_multi_message_responses_and_ignores_extra_message_keys(tmp_path):
    row = {
        "prompt": [user("Weather?")],
        "chosen": [{"role": "assistant", "content": "Let me check.", "name": None}, {"role": "tool", "content": "sun"}, assistant("Sunny.")],
        "rejected": [assistant("No idea.")],
    }
    pair = load_preference_pairs(str(write(tmp_path, "p.jsonl", jsonl([row])))).pairs[0]
    assert pair.chosen == [assistant("Let me check."), {"role": "tool", "content": "sun"}, assistant("Sunny.")]


def test_hh_multi_turn_keeps_the_shared_context(tmp_path):
    context = "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit."
    row = {"chosen": context + "\n\nAssistant: An apple.", "rejected": context + "\n\nAssistant: No."}
    result = load_preference_pairs(str(write(tmp_path, "hh.jsonl", jsonl([row]))))
    assert result.shape == "hh"
    assert result.pairs == [
        PreferencePair(
            prompt=[user("Hi there."), assistant("Hello! How can I help?"), user("Name a fruit.")],
            chosen=[assistant("An apple.")],
            rejected=[assistant("No.")],
        )
    ]


def test_plain_prompt_written_as_hh_transcript_is_split_into_turns(tmp_path):
    row = {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: 2+2?\n\nAssistant:", "chosen": " 4", "rejected": " 5"}
    pair = load_preference_pairs(str(write(tmp_path, "p.jsonl", jsonl([row])))).pairs[0]
    assert pair == PreferencePair([user("Hi"), assistant("Hello."), user("2+2?")], [assistant("4")], [assistant("5")])


def test_json_file_holding_json_lines_as_dataset_to_json_writes(tmp_path):
    path = write(tmp_path, "prefs.json", jsonl(ROWS["plain"] * 3))
    assert load_preference_pairs(str(path)).pairs == [EXPECTED] * 3


def test_pair_to_row_is_the_conversational_trl_row(tmp_path):
    row = pair_to_row(EXPECTED)
    assert row == {"prompt": [user("What is 2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}
    row["chosen"][0]["content"] = "changed"
    assert EXPECTED.chosen == [assistant("4")]


def test_utf8_byte_order_mark_and_crlf_are_fine(tmp_path):
    path = write(tmp_path, "p.jsonl", ("\ufeff" + jsonl(ROWS["plain"]).replace("\n", "\r\n")).encode("utf-8"))
    assert load_preference_pairs(str(path)).pairs == [EXPECTED]


# --- dropped rows ----------------------------------------------------------------------------


def test_identical_and_empty_pairs_are_dropped_and_counted(tmp_path):
    rows = [
        ROWS["plain"][0],
        {"prompt": "Q", "chosen": "same ", "rejected": " same"},
        {"prompt": "Q", "chosen": "A", "rejected": "A"},
        {"prompt": "Q", "chosen": "   ", "rejected": "B"},
        {"prompt": "  ", "chosen": "A", "rejected": "B"},
    ]
    result = load_preference_pairs(str(write(tmp_path, "p.jsonl", jsonl(rows))))
    assert result.pairs == [EXPECTED]
    assert result.dropped == {"identical": 2, "empty_response": 1, "empty_prompt": 1}


@pytest.mark.parametrize("shape", ["conversational", "conversation_pair", "hh"])
def test_identical_pairs_dropped_in_every_shape(tmp_path, shape):
    same = dict(ROWS[shape][0])
    same["rejected"] = same["chosen"]
    result = load_preference_pairs(str(write(tmp_path, "p.jsonl", jsonl([same] + ROWS[shape]))))
    assert result.pairs == [EXPECTED] and result.dropped == {"identical": 1}


def test_hh_empty_final_assistant_turn_is_an_empty_response(tmp_path):
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello."}
    result = load_preference_pairs(str(write(tmp_path, "hh.jsonl", jsonl([row] + ROWS["hh"]))))
    assert result.dropped == {"empty_response": 1}


def test_all_rows_dropped_says_how_many_and_why(tmp_path):
    rows = [{"prompt": "Q", "chosen": "A", "rejected": "A"}] * 2 + [{"prompt": "Q", "chosen": "", "rejected": "B"}]
    message = load_error(write(tmp_path, "p.jsonl", jsonl(rows)))
    assert "all 3 rows were dropped" in message and "2 identical" in message and "1 empty_response" in message


# --- datasets sources ----------------------------------------------------------------------


def test_saved_dataset_directory(tmp_path, datasets_cache):
    directory = tmp_path / "saved"
    datasets_cache.Dataset.from_list(ROWS["conversation_pair"] * 2).save_to_disk(str(directory))
    result = load_preference_pairs(str(directory))
    assert result == ImportResult([EXPECTED, EXPECTED], {}, str(directory), "conversation_pair")


def test_saved_dataset_dict_uses_train_split_else_the_first(tmp_path, datasets_cache):
    Dataset, DatasetDict = datasets_cache.Dataset, datasets_cache.DatasetDict
    other = [{"prompt": "Other?", "chosen": "x", "rejected": "y"}]
    DatasetDict({"test": Dataset.from_list(other), "train": Dataset.from_list(ROWS["plain"])}).save_to_disk(
        str(tmp_path / "with_train")
    )
    DatasetDict({"validation": Dataset.from_list(ROWS["hh"])}).save_to_disk(str(tmp_path / "no_train"))
    assert load_preference_pairs(str(tmp_path / "with_train")).pairs == [EXPECTED]
    assert load_preference_pairs(str(tmp_path / "no_train")).shape == "hh"


def test_folder_with_a_parquet_file(tmp_path, datasets_cache):
    folder = tmp_path / "folder"
    folder.mkdir()
    datasets_cache.Dataset.from_list(ROWS["conversational"] * 3).to_parquet(str(folder / "part-0.parquet"))
    write(folder, "README.md", "# not data\n")
    result = load_preference_pairs(str(folder))
    assert result == ImportResult([EXPECTED] * 3, {}, str(folder), "conversational")


def test_folder_of_json_files_prefers_train_files_and_searches_subfolders(tmp_path):
    write(tmp_path, "hub/data/train-00000.jsonl", jsonl(ROWS["plain"]))
    write(tmp_path, "hub/data/train-00001.json", json.dumps(ROWS["hh"]))
    write(tmp_path, "hub/data/test-00000.jsonl", jsonl([{"prompt": "Other?", "chosen": "x", "rejected": "y"}]))
    result = load_preference_pairs(str(tmp_path / "hub"))
    assert result.pairs == [EXPECTED, EXPECTED] and result.shape == "plain,hh"


def test_datasets_row_error_names_source_and_row(tmp_path, datasets_cache):
    path = tmp_path / "p.parquet"
    rows = ROWS["plain"] + [{"prompt": "Q", "chosen": "A", "rejected": None}]
    datasets_cache.Dataset.from_list(rows).to_parquet(str(path))
    assert load_error(path).startswith(f'{path}: row 1: expected "rejected" to be a string or a list of messages, got null')


def test_corrupt_parquet_file(tmp_path, datasets_cache):
    path = write(tmp_path, "p.parquet", b"not parquet at all")
    assert "cannot read the parquet file" in load_error(path)


def test_unreachable_hub_id(monkeypatch, datasets_cache):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The flag is read when the libraries are imported, which may have happened before this test.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets_cache.config, "HF_HUB_OFFLINE", True)
    message = load_error("no-such-owner/no-such-preferences")
    assert message.startswith("preferences.path: cannot load dataset 'no-such-owner/no-such-preferences': ")


# --- file-level errors -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nope.jsonl", "nope.json", "nope/deeper/x"])
def test_missing_file(tmp_path, name):
    assert "not found" in load_error(tmp_path / name)


def test_directory_without_data_files(tmp_path):
    write(tmp_path, "empty/notes.txt", "nothing here")
    assert "found none" in load_error(tmp_path / "empty")


def test_unknown_suffix(tmp_path):
    assert ".jsonl, .json or .parquet" in load_error(write(tmp_path, "p.csv", "prompt,chosen,rejected\n"))


@pytest.mark.parametrize("name, content", [("a.jsonl", ""), ("b.jsonl", "\n  \n"), ("c.json", "[]"), ("d.json", " \n")])
def test_empty_file_has_no_rows(tmp_path, name, content):
    path = write(tmp_path, name, content)
    assert load_error(path) == f"{path}: expected at least one preference row, found none"


@pytest.mark.parametrize("name", ["p.jsonl", "p.json"])
def test_non_utf8_byte_names_its_line(tmp_path, name):
    good = json.dumps(ROWS["plain"][0]).encode()
    bad = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'
    content = good + b"\n" + bad + b"\n" if name == "p.jsonl" else b"[\n" + good + b",\n" + bad + b"\n]\n"
    message = load_error(write(tmp_path, name, content))
    bad_line = 2 if name == "p.jsonl" else 3
    assert message.startswith(f"{tmp_path / name}:{bad_line}: expected UTF-8") and "0xe9" in message


def test_json_syntax_error_names_its_line(tmp_path):
    path = write(tmp_path, "p.json", '[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": "oops",}\n]\n')
    assert load_error(path).startswith(f"{path}:3: expected valid JSON")


@pytest.mark.parametrize("content", ['{\n  "prompt": ["a"],\n  "chosen": ["b"]\n}', '"just a string"'])
def test_json_that_is_not_a_list(tmp_path, content):
    path = write(tmp_path, "p.json", content)
    assert load_error(path).startswith(f"{path}:1: expected a JSON list of objects")


def test_json_list_item_that_is_not_an_object(tmp_path):
    path = write(tmp_path, "p.json", '[{"prompt": "a", "chosen": "b", "rejected": "c"}, 42]')
    assert load_error(path).startswith(f'{path}:1: expected an object with "chosen" and "rejected", got a number')


def test_single_dropped_row(tmp_path):
    path = write(tmp_path, "p.jsonl", jsonl([{"prompt": "Q", "chosen": "A", "rejected": "A"}]))
    assert "the only row was dropped (1 identical)" in load_error(path)


def test_json_list_error_names_the_line_of_the_offending_object(tmp_path):
    content = '[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n\n  {\n    "prompt": "a",\n    "chosen": "b"\n  }\n]'
    path = write(tmp_path, "p.json", content)
    assert load_error(path) == f'{path}:4: expected a "rejected" key'


# --- row errors (JSON Lines; the bad row is on line 3, after a good row and a blank line) ---------


def row_error(tmp_path: Path, bad_line: str | dict, shape: str = "plain") -> str:
    if isinstance(bad_line, dict):
        bad_line = json.dumps(bad_line)
    path = write(tmp_path, "p.jsonl", json.dumps(ROWS[shape][0]) + "\n\n" + bad_line + "\n")
    message = load_error(path)
    assert message.startswith(f"{path}:3: "), message
    return message


def test_malformed_json_line(tmp_path):
    assert "one JSON object per line" in row_error(tmp_path, '{"prompt": "oops",')


@pytest.mark.parametrize("line, type_name", [('["a list"]', "a list"), ('"a string"', "a string"), ("3", "a number")])
def test_line_that_is_not_an_object(tmp_path, line, type_name):
    message = row_error(tmp_path, line)
    assert "expected an object" in message and type_name in message


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "Q", "rejected": "B"}, 'expected a "chosen" key'),
        ({"prompt": "Q", "chosen": "A"}, 'expected a "rejected" key'),
        ({"chosen": "A", "rejected": "B"}, 'expected a "prompt" key'),
    ],
)
def test_missing_keys(tmp_path, row, expected):
    assert expected in row_error(tmp_path, row)


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "Q", "chosen": 4, "rejected": "B"}, '"chosen" to be a string or a list of messages, got a number'),
        ({"prompt": "Q", "chosen": "A", "rejected": {"a": 1}}, '"rejected" to be a string or a list of messages, got an object'),
        ({"prompt": "Q", "chosen": "A", "rejected": [assistant("B")]}, "both strings or both lists"),
        ({"prompt": 7, "chosen": "A", "rejected": "B"}, '"prompt" to be a string, got a number'),
    ],
)
def test_wrong_types_plain(tmp_path, row, expected):
    assert expected in row_error(tmp_path, row)


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": [user("Q")], "chosen": [assistant("A")], "rejected": [{"role": "assistant"}]}, '"rejected[0]" to have a "content" key'),
        ({"prompt": [{"content": "Q"}], "chosen": [assistant("A")], "rejected": [assistant("B")]}, '"prompt[0]" to have a "role" key'),
        ({"prompt": ["Q"], "chosen": [assistant("A")], "rejected": [assistant("B")]}, '"prompt[0]" to be a message object'),
        ({"prompt": [user("Q")], "chosen": [assistant("A")], "rejected": [{"role": "assistant", "content": 5}]}, '"rejected[0].content" to be a string, got a number'),
        ({"prompt": 3, "chosen": [assistant("A")], "rejected": [assistant("B")]}, '"prompt" to be a list of messages or a string'),
    ],
)
def test_wrong_types_conversational(tmp_path, row, expected):
    assert expected in row_error(tmp_path, row, "conversational")


def test_row_of_another_shape_names_its_line(tmp_path):
    message = row_error(tmp_path, ROWS["hh"][0], "conversational")
    assert "expected a conversational row like line 1" in message and "found a hh row" in message


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"chosen": [user("Q"), assistant("A")], "rejected": [user("Q")]}, '"rejected" to continue after the 1 message'),
        ({"chosen": [user("Q"), assistant("A")], "rejected": [user("Q"), user("more")]}, 'assistant message in "rejected"'),
        ({"chosen": [user("Q"), assistant("A")], "rejected": [user("Other"), assistant("B")]}, "same prompt message"),
    ],
)
def test_conversation_pair_that_cannot_be_split(tmp_path, row, expected):
    assert expected in row_error(tmp_path, row, "conversation_pair")


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi\n\nAssistant: Hey"}, '"chosen" to contain an "Assistant:" turn'),
        ({"chosen": "\n\nHuman: Hi\n\nAssistant: A", "rejected": "\n\nHuman: Bye\n\nAssistant: B"}, "differ at turn 1"),
        ({"chosen": "\n\nHuman: Hi\n\nAssistant: A\n\nHuman: ?", "rejected": "\n\nHuman: Hi\n\nAssistant: B"}, "end with an"),
        ({"chosen": "Preamble\n\nHuman: Hi\n\nAssistant: A", "rejected": "\n\nHuman: Hi\n\nAssistant: B"}, "before the first turn"),
    ],
)
def test_bad_hh_transcripts(tmp_path, row, expected):
    assert expected in row_error(tmp_path, row, "hh")


def test_hh_transcript_with_no_assistant_turn_as_first_row(tmp_path):
    path = write(tmp_path, "hh.jsonl", jsonl([{"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hello"}]))
    assert load_error(path).startswith(f'{path}:1: expected "chosen" to contain an "Assistant:" turn')
