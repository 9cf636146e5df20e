"""Reading JSON record files: ``.jsonl`` (one JSON value per line) or ``.json`` (one JSON list); the
instruction splits (`read_conversations`) and JSONL outputs (`write_jsonl`) every stage shares.

Every problem is a ``UserError`` whose one-line message names the file and line (``path:line``),
so the user can jump straight to it. Line numbers count "\\n" only: ``str.splitlines()`` also
breaks on characters such as U+2028 that may sit inside JSON strings, which would shift them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from rlhf.errors import UserError


class JsonRecord(NamedTuple):
    value: object  # the parsed JSON value; callers check that it is an object
    line: int  # 1-based line on which the value starts
    where: str  # f"{path}:{line}", the prefix of every message about this record


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped); UserError naming the line of a bad byte."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read file ({err.strerror})") from None
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


def iter_json_records(
    path: Path, text: str, what: str = "objects", *, json_lines_in_json: bool = False
) -> Iterator[JsonRecord]:
    """Each value of a record file's `text`, read from `path`, with the line it starts on.

    A ``.jsonl`` file holds one JSON value per line (blank lines are skipped); any other file one
    JSON list (an empty or blank file has no records). `what` names the list's items in messages:
    "expected a JSON list of {what}". With `json_lines_in_json`, a ``.json`` file that does not
    start with "[" may also be JSON Lines, which is what ``Dataset.to_json`` writes.

    Nothing is parsed until the first record is asked for.
    """
    is_list = path.suffix.lower() != ".jsonl"
    if is_list and json_lines_in_json and not text.lstrip().startswith("["):
        _check_json_lines(path, text, what)
        is_list = False
    if is_list:
        yield from _json_list_records(path, text, what)
        return
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: expected one JSON object per line ({err.msg}, column {err.colno})") from None
        yield JsonRecord(value, line_number, where)


def json_type_name(value: object) -> str:
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


def _json_list_records(path: Path, text: str, what: str) -> Iterator[JsonRecord]:
    if not text.strip():
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise _invalid_json(path, err) from None
    if not isinstance(document, list):
        raise UserError(f"{path}:1: expected a JSON list of {what}, got {json_type_name(document)}")
    for value, line_number in zip(document, _item_line_numbers(text)):
        yield JsonRecord(value, line_number, f"{path}:{line_number}")


def _check_json_lines(path: Path, text: str, what: str) -> None:
    """A .json file not starting with "[" must be JSON Lines, not one object or a broken document."""
    if not text.strip():
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several values: JSON Lines
            return
        raise _invalid_json(path, err) from None
    if not isinstance(document, dict):
        raise UserError(f"{path}:1: expected a JSON list of {what}, got {json_type_name(document)}")
    if "\n" in text.strip():
        raise UserError(f"{path}:1: expected a JSON list of {what} (or one object per line), got an object")


def _invalid_json(path: Path, err: json.JSONDecodeError) -> UserError:
    return UserError(f"{path}:{err.lineno}: expected valid JSON ({err.msg}, column {err.colno})")


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


# --- the pipeline's chat splits and outputs ---------------------------------------------------


def read_conversations(path: Path) -> list[list[dict]]:
    """The `messages` of every row of an instruction split (train.jsonl / eval.jsonl): each a list of
    {"role", "content"} messages ending with the assistant's answer. A bad row is a UserError naming
    the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: instruction split not found (run the instructions stage)")
    conversations = [_conversation(record.value, record.where) for record in iter_json_records(path, read_utf8(path))]
    if not conversations:
        raise UserError(f'{path}: expected at least one row with "messages", found none')
    return conversations


def _conversation(row: object, where: str) -> list[dict]:
    if not isinstance(row, dict) or "messages" not in row:
        got = "an object without it" if isinstance(row, dict) else json_type_name(row)
        raise UserError(f'{where}: expected an object with a "messages" list, got {got}')
    messages = row["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        got = f"{len(messages)} message(s)" if isinstance(messages, list) else json_type_name(messages)
        raise UserError(f'{where}: expected "messages" to be a list of at least 2 messages (prompt, answer), got {got}')
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise UserError(f'{where}: expected "messages[{index}]" to be an object with string "role" and "content"')
    if messages[-1]["role"] != "assistant":
        raise UserError(f'{where}: expected the last message to be the assistant\'s answer, got role "{messages[-1]["role"]}"')
    return messages


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
