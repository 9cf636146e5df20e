"""json_files: reading .jsonl and .json-list record files with the line each record starts on."""

from pathlib import Path

import pytest

from rlhf.data_builders.json_files import iter_json_records, json_type_name, read_utf8
from rlhf.errors import UserError


def records(path: Path, text: str, **kwargs) -> list[tuple[object, int, str]]:
    return [tuple(record) for record in iter_json_records(path, text, **kwargs)]


def error(call) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    text = '{"a": 1}\n\n  \n"x\u2028y"\n'
    assert records(path, text) == [({"a": 1}, 1, f"{path}:1"), ("x\u2028y", 4, f"{path}:4")]


def test_jsonl_malformed_line_names_line_and_column(tmp_path):
    path = tmp_path / "a.jsonl"
    message = error(lambda: records(path, '{"a": 1}\n\n{"a": \n'))
    assert message.startswith(f"{path}:3: expected one JSON object per line (")
    assert "column 7" in message


def test_json_list_items_carry_the_line_they_start_on(tmp_path):
    path = tmp_path / "a.json"
    text = '[\n  {"a": 1},\n\n  {"b":\n   2}, 3\n]\n'
    assert records(path, text) == [({"a": 1}, 2, f"{path}:2"), ({"b": 2}, 4, f"{path}:4"), (3, 5, f"{path}:5")]


def test_json_list_empty_file_has_no_records(tmp_path):
    assert records(tmp_path / "a.json", " \n") == []


def test_json_list_errors(tmp_path):
    path = tmp_path / "a.json"
    assert error(lambda: records(path, '[\n{"a": 1},\n{"a" 2}\n]')).startswith(f"{path}:3: expected valid JSON (")
    assert error(lambda: records(path, '{"a": 1}', what="seed objects")) == (
        f"{path}:1: expected a JSON list of seed objects, got an object"
    )


def test_json_lines_in_json(tmp_path):
    path = tmp_path / "a.json"
    assert records(path, '{"a": 1}\n{"a": 2}\n', json_lines_in_json=True) == [
        ({"a": 1}, 1, f"{path}:1"),
        ({"a": 2}, 2, f"{path}:2"),
    ]
    assert records(path, '[{"a": 1}]', json_lines_in_json=True) == [({"a": 1}, 1, f"{path}:1")]
    assert error(lambda: records(path, '"text"', json_lines_in_json=True)) == (
        f"{path}:1: expected a JSON list of objects, got a string"
    )
    assert "(or one object per line), got an object" in error(
        lambda: records(path, '{\n"a": 1}\n', json_lines_in_json=True)
    )


def test_read_utf8_drops_bom_and_names_the_line_of_a_bad_byte(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\xef\xbb\xbfok\n")
    assert read_utf8(path) == "ok\n"
    path.write_bytes(b"ok\nstill ok\ncaf\xe9\n")
    assert error(lambda: read_utf8(path)) == f"{path}:3: expected UTF-8 text, found byte 0xe9"


def test_read_utf8_unreadable_file_is_not_called_a_seed_file(tmp_path):
    message = error(lambda: read_utf8(tmp_path))  # a directory cannot be read as a file
    assert message.startswith(f"{tmp_path}: cannot read file (")


@pytest.mark.parametrize(
    "value, name",
    [(None, "null"), (True, "a boolean"), (1.5, "a number"), ("s", "a string"), ([], "a list"), ({}, "an object")],
)
def test_json_type_name(value, name):
    assert json_type_name(value) == name
