"""load_seeds: every supported format, and a one-line error naming file and line for every bad input."""

import json
from pathlib import Path

import pytest

from rlhf.data_builders.seeds import Seed, load_seeds
from rlhf.errors import UserError


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(UserError) as caught:
        load_seeds(path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# --- formats ---------------------------------------------------------------------------


def test_txt_one_instruction_per_line_blank_lines_skipped(tmp_path):
    path = write(tmp_path, "seeds.txt", "Name three colours.\n\n   \nWrite a haiku about rain.  \r\n")
    assert load_seeds(path) == [Seed("Name three colours."), Seed("Write a haiku about rain.")]


def test_jsonl_alpaca_with_and_without_input_and_output(tmp_path):
    lines = [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a prime number.", "output": "7"},
        {"instruction": "Tell a joke."},
        {"instruction": "Summarise.", "input": None, "output": None, "source": "extra column"},
    ]
    path = write(tmp_path, "seeds.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n\n")
    assert load_seeds(path) == [
        Seed("Translate to French.", "Good morning", "Bonjour"),
        Seed("Name a prime number.", "", "7"),
        Seed("Tell a joke.", "", None),
        Seed("Summarise.", "", None),
    ]


def test_json_list(tmp_path):
    items = [{"instruction": "Add 2 and 3.", "output": "5"}, {"instruction": "Spell cat backwards.", "input": "cat"}]
    path = write(tmp_path, "seeds.json", json.dumps(items, indent=2))
    assert load_seeds(path) == [Seed("Add 2 and 3.", "", "5"), Seed("Spell cat backwards.", "cat", None)]


def test_self_instruct_seed_task_uses_first_instance(tmp_path):
    task = {
        "id": "seed_task_0",
        "name": "breakfast_suggestion",
        "instruction": "Is there anything I can eat for a breakfast that doesn't include eggs?",
        "instances": [{"input": "", "output": "Yes, oatmeal."}, {"input": "x", "output": "ignored"}],
        "is_classification": False,
    }
    path = write(tmp_path, "seed_tasks.jsonl", json.dumps(task) + "\n")
    assert load_seeds(path) == [Seed(task["instruction"], "", "Yes, oatmeal.")]


def test_utf8_byte_order_mark_and_non_ascii_text_are_fine(tmp_path):
    path = write(tmp_path, "seeds.txt", "\ufeffÉcris un poème.\n".encode("utf-8"))
    assert load_seeds(path) == [Seed("Écris un poème.")]


def test_accepts_str_path(tmp_path):
    path = write(tmp_path, "seeds.txt", "Say hello.\n")
    assert load_seeds(str(path)) == [Seed("Say hello.")]


# --- file-level errors ------------------------------------------------------------------


def test_missing_file(tmp_path):
    assert "not found" in load_error(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name", ["seeds.json", "seeds"])
def test_directory(tmp_path, name):
    directory = tmp_path / name
    directory.mkdir()
    assert "found a directory" in load_error(directory)


@pytest.mark.parametrize("name, content", [("a.txt", ""), ("b.txt", "\n  \n"), ("c.jsonl", "\n"), ("d.json", "[]")])
def test_empty_file_has_no_seeds(tmp_path, name, content):
    assert "at least one seed" in load_error(write(tmp_path, name, content))


def test_unknown_suffix(tmp_path):
    assert ".txt, .jsonl or .json" in load_error(write(tmp_path, "seeds.csv", "a,b\n"))


@pytest.mark.parametrize("name", ["seeds.txt", "seeds.jsonl", "seeds.json"])
def test_non_utf8_byte_names_its_line(tmp_path, name):
    content = b'{"instruction": "fine"}\n{"instruction": "caf\xe9"}\n'
    if name == "seeds.json":
        content = b'[\n{"instruction": "fine"},\n{"instruction": "caf\xe9"}\n]\n'
    message = load_error(write(tmp_path, name, content))
    bad_line = 3 if name == "seeds.json" else 2
    assert f"{tmp_path / name}:{bad_line}: expected UTF-8" in message
    assert "0xe9" in message


# --- JSON Lines errors ------------------------------------------------------------------


def jsonl_error(tmp_path: Path, bad_line: str) -> str:
    """Put `bad_line` on line 3, after a good line and a blank line."""
    path = write(tmp_path, "seeds.jsonl", '{"instruction": "A fine seed."}\n\n' + bad_line + "\n")
    message = load_error(path)
    assert message.startswith(f"{path}:3: "), message
    return message


def test_malformed_json_line(tmp_path):
    assert "one JSON object per line" in jsonl_error(tmp_path, '{"instruction": "oops",')


@pytest.mark.parametrize("line, type_name", [('["a list"]', "a list"), ('"a string"', "a string"), ("3", "a number")])
def test_line_that_is_not_an_object(tmp_path, line, type_name):
    message = jsonl_error(tmp_path, line)
    assert "expected a JSON object" in message and type_name in message


def test_missing_instruction(tmp_path):
    assert 'expected an "instruction" key' in jsonl_error(tmp_path, '{"prompt": "hi"}')


@pytest.mark.parametrize(
    "line, field",
    [
        ('{"instruction": 5}', '"instruction" to be a string, got a number'),
        ('{"instruction": ["a"]}', '"instruction" to be a string, got a list'),
        ('{"instruction": null}', '"instruction" to be a string, got null'),
        ('{"instruction": "Hi there.", "input": 3}', '"input" to be a string'),
        ('{"instruction": "Hi there.", "output": {"a": 1}}', '"output" to be a string, got an object'),
        ('{"instruction": "Hi there.", "instances": [{"input": "", "output": 7}]}', '"instances[0].output" to be a string'),
        ('{"instruction": "Hi there.", "instances": [{"input": true}]}', '"instances[0].input" to be a string, got a boolean'),
    ],
)
def test_wrong_field_types(tmp_path, line, field):
    assert f"expected {field}" in jsonl_error(tmp_path, line)


@pytest.mark.parametrize(
    "instances",
    ['[]', '"one"', '{"input": "", "output": "x"}', '["not an object"]', '[{"input": "", "output": "x"}, 4]'],
)
def test_bad_instances(tmp_path, instances):
    message = jsonl_error(tmp_path, '{"instruction": "Hi there.", "instances": ' + instances + "}")
    assert '"instances' in message


@pytest.mark.parametrize("instruction", ["", "   ", "\\n\\t"])
def test_empty_instruction(tmp_path, instruction):
    assert 'non-empty "instruction"' in jsonl_error(tmp_path, '{"instruction": "' + instruction + '"}')


def test_line_separator_inside_a_string_does_not_shift_line_numbers(tmp_path):
    path = write(tmp_path, "seeds.jsonl", '{"instruction": "a\u2028b"}\n{"instruction": 1}\n')
    assert f"{path}:2: " in load_error(path)


# --- JSON list errors -------------------------------------------------------------------


def test_json_syntax_error_names_its_line(tmp_path):
    path = write(tmp_path, "seeds.json", '[\n  {"instruction": "ok"},\n  {"instruction": "oops",}\n]\n')
    assert load_error(path).startswith(f"{path}:3: expected valid JSON")


def test_json_that_is_not_a_list(tmp_path):
    path = write(tmp_path, "seeds.json", '{"instruction": "one"}')
    assert "expected a JSON list" in load_error(path)


def test_json_list_error_names_the_line_of_the_offending_object(tmp_path):
    content = '[\n  {"instruction": "first"},\n\n  {\n    "instruction": "second"\n  },\n  {\n    "input": "no instruction"\n  }\n]'
    path = write(tmp_path, "seeds.json", content)
    assert load_error(path).startswith(f'{path}:7: expected an "instruction" key')


def test_json_list_on_one_line(tmp_path):
    path = write(tmp_path, "seeds.json", '[{"instruction": "fine"}, 42]')
    assert load_error(path).startswith(f"{path}:1: expected a JSON object")
