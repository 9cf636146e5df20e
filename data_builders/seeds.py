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

from dataclasses import dataclass
from pathlib import Path

from rlhf.data_builders.json_files import iter_json_records, json_type_name, read_utf8
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
    text = read_utf8(path)

    if suffix == ".txt":
        seeds = _parse_txt(text)
    else:
        records = iter_json_records(path, text, "seed objects")
        seeds = [_seed_from_object(record.value, record.where) for record in records]

    if not seeds:
        raise UserError(f"{path}: expected at least one seed, found none")
    return seeds


def _parse_txt(text: str) -> list[Seed]:
    return [Seed(instruction=line.strip()) for line in text.split("\n") if line.strip()]


def _seed_from_object(obj: object, where: str) -> Seed:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with an \"instruction\", got {json_type_name(obj)}")
    if "instruction" not in obj:
        raise UserError(f"{where}: expected an \"instruction\" key")
    instruction = obj["instruction"]
    if not isinstance(instruction, str):
        raise UserError(f"{where}: expected \"instruction\" to be a string, got {json_type_name(instruction)}")
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
        raise UserError(f"{where}: expected \"{field_prefix}input\" to be a string, got {json_type_name(input_text)}")
    if output is not None and not isinstance(output, str):
        raise UserError(f"{where}: expected \"{field_prefix}output\" to be a string, got {json_type_name(output)}")
    return Seed(instruction=instruction.strip(), input=input_text or "", output=output)


def _first_instance(instances: object, where: str) -> dict:
    if not isinstance(instances, list) or not instances:
        raise UserError(f"{where}: expected \"instances\" to be a non-empty list of objects")
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise UserError(
                f"{where}: expected \"instances[{index}]\" to be an object, got {json_type_name(instance)}"
            )
    return instances[0]
