"""Reading the seed instructions that self-instruct generation starts from.

Three file formats, chosen by suffix:

- ``.txt``: one instruction per line; blank lines are skipped.
- ``.jsonl``: one JSON object per line.
- ``.json``: one JSON list of objects.

Each JSON object is either Alpaca-shaped, ``{"instruction", "input"?, "output"?}``, or a
self-instruct seed task, ``{"instruction", "instances": [{"input", "output"}, ...]}``, of which
the first instance is used. Other keys are ignored, because public datasets carry extra columns.

Every problem is reported as a ``UserError`` whose one-line message names the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import UserError


@dataclass(frozen=True)
class Seed:
    instruction: str
    input: str = ""
    output: str | None = None


def load_seeds(path: str | Path) -> list[Seed]:
    """Read seeds from a .txt, .jsonl or .json file; raise UserError on anything malformed."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: seed file not found")
    if path.is_dir():
        raise UserError(f"{path}: expected a seed file, found a directory")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        raise UserError(f"{path}: expected a seed file ending in .txt, .jsonl or .json")
    text = _read_utf8(path)

    if suffix == ".txt":
        seeds = _parse_txt(text)
    elif suffix == ".jsonl":
        seeds = _parse_jsonl(text, path)
    else:
        seeds = _parse_json_list(text, path)

    if not seeds:
        raise UserError(f"{path}: expected at least one seed, found none")
    return seeds


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read seed file ({err.strerror})") from None
    try:
        # utf-8-sig drops the byte-order mark that some Windows editors write.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        # We decode ourselves, rather than letting open() do it, to turn the byte
        # offset into a line number the user can jump to.
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(
            f"{path}:{line}: expected UTF-8 text, found byte 0x{data[err.start]:02x}"
        ) from None


def _parse_txt(text: str) -> list[Seed]:
    return [Seed(instruction=line.strip()) for line in text.split("\n") if line.strip()]


def _parse_jsonl(text: str, path: Path) -> list[Seed]:
    seeds = []
    # split("\n") rather than splitlines(): splitlines() also breaks on characters such as
    # U+2028 that may sit inside JSON strings, which would shift the line numbers we report.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: expected one JSON object per line ({err.msg}, column {err.colno})") from None
        seeds.append(_seed_from_object(obj, where))
    return seeds


def _parse_json_list(text: str, path: Path) -> list[Seed]:
    if not text.strip():
        return []
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: expected valid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(items, list):
        raise UserError(f"{path}:1: expected a JSON list of seed objects, got {_json_type_name(items)}")

    line_numbers = _item_line_numbers(text)
    return [_seed_from_object(item, f"{path}:{line}") for item, line in zip(items, line_numbers)]


def _item_line_numbers(text: str) -> list[int]:
    """The line on which each element of a (known valid) top-level JSON list starts."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    line_numbers = []
    while True:
        position = _skip_whitespace(text, position)
        if text[position] == "]":
            return line_numbers
        if text[position] == ",":
            position = _skip_whitespace(text, position + 1)
        line_numbers.append(text.count("\n", 0, position) + 1)
        _, position = decoder.raw_decode(text, position)


def _skip_whitespace(text: str, position: int) -> int:
    while text[position] in " \t\r\n":
        position += 1
    return position


def _seed_from_object(obj: object, where: str) -> Seed:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with an \"instruction\", got {_json_type_name(obj)}")
    if "instruction" not in obj:
        raise UserError(f"{where}: expected an \"instruction\" key")
    instruction = obj["instruction"]
    if not isinstance(instruction, str):
        raise UserError(f"{where}: expected \"instruction\" to be a string, got {_json_type_name(instruction)}")
    if not instruction.strip():
        raise UserError(f"{where}: expected a non-empty \"instruction\"")

    if "instances" in obj:
        example = _first_instance(obj["instances"], where)
        field_prefix = "instances[0]."
    else:
        example = obj
        field_prefix = ""

    # null is read as "absent": datasets exported from dataframes write null for empty cells.
    input_text = example.get("input")
    output = example.get("output")
    if input_text is not None and not isinstance(input_text, str):
        raise UserError(f"{where}: expected \"{field_prefix}input\" to be a string, got {_json_type_name(input_text)}")
    if output is not None and not isinstance(output, str):
        raise UserError(f"{where}: expected \"{field_prefix}output\" to be a string, got {_json_type_name(output)}")
    return Seed(instruction=instruction.strip(), input=input_text or "", output=output)


def _first_instance(instances: object, where: str) -> dict:
    if not isinstance(instances, list) or not instances:
        raise UserError(f"{where}: expected \"instances\" to be a non-empty list of objects")
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise UserError(
                f"{where}: expected \"instances[{index}]\" to be an object, got {_json_type_name(instance)}"
            )
    return instances[0]


def _json_type_name(value: object) -> str:
    """The JSON name of a parsed value's type, so messages speak the user's file format."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
