"""Reading a user's preference dataset into one normalised shape: prompt, chosen and rejected conversations.

Sources, tried in this order:

- a local ``.jsonl`` file (one JSON object per line), ``.json`` file (a JSON list of objects, or
  JSON Lines, which is what ``Dataset.to_json`` writes) or ``.parquet`` file;
- a local directory: a dataset saved with ``save_to_disk`` (of a ``DatasetDict``, the "train"
  split, else the first), or a folder of .jsonl/.json/.parquet files (if some of them are named
  for a "train" split, only those; subfolders are searched when the top level holds none);
- anything else is a hub dataset id, loaded with ``datasets.load_dataset(id, split="train")``.

Each file (or loaded dataset) has one shape, detected from its first row and then required of
every row:

- ``plain``: ``prompt``, ``chosen`` and ``rejected`` are strings. A prompt written as an HH
  transcript ("\\n\\nHuman: …\\n\\nAssistant:") is split into its turns.
- ``conversational``: ``prompt`` is a list of messages (or a string) and ``chosen``/``rejected``
  are lists of messages that start with an assistant message (TRL's conversational format).
- ``conversation_pair``: ``chosen`` and ``rejected`` are whole conversations that share their
  opening messages (UltraFeedback-binarized; a ``prompt`` key, if any, is ignored). The longest
  common prefix is the prompt and what follows on each side is the response.
- ``hh``: no ``prompt`` key; ``chosen`` and ``rejected`` are Anthropic-HH transcripts. The turns
  before the final "Assistant:" turn are the prompt and must agree on both sides.

Rows are dropped, and counted by reason, when a response is empty ("empty_response"), when
chosen and rejected are the same after stripping whitespace ("identical"), or when the prompt is
empty ("empty_prompt"). Every problem with the input is a ``UserError`` whose one-line message
names the file and line (``path:line``) or, for rows read through ``datasets``, the source and
the 0-based row index (``source: row i``, so ``dataset[i]`` is the row).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.data_builders.json_files import iter_json_records, json_type_name, read_utf8
from rlhf.errors import UserError, one_line

Conversation = list[dict[str, str]]  # chat messages: {"role": ..., "content": ...}

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
# Files that describe a dataset rather than hold its rows.
_METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
# A file or folder named for the train split: "train.jsonl", "data/train-00000-of-00001.parquet".
_TRAIN_FILE = re.compile(r"(^|[-_./])train([-_./]|$)")
# A turn marker in an Anthropic-HH transcript; the first turn may omit the leading blank line.
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_HH_PROMPT = re.compile(r"\s*Human:")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}

_SHAPES = {
    "plain": "string prompt, chosen and rejected",
    "conversational": "a prompt with chosen and rejected assistant messages",
    "conversation_pair": "chosen and rejected as whole conversations",
    "hh": "chosen and rejected as Anthropic HH transcripts",
}


@dataclass(frozen=True)
class PreferencePair:
    prompt: Conversation  # the shared context: messages up to (not including) the final assistant turn
    chosen: Conversation  # the preferred final assistant turn(s): normally [{"role": "assistant", "content": ...}]
    rejected: Conversation


@dataclass
class ImportResult:
    pairs: list[PreferencePair]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count, e.g. {"identical": 3}
    source: str = ""  # path or hub id, as given
    shape: str = ""  # detected shape; shapes of several files are joined with "," in file order


@dataclass
class _Rows:
    """The rows of one file or loaded dataset, each with where it came from."""

    label: str  # names the whole source in file-level messages
    rows: Iterable[tuple[str, str, object]]  # (where, short location, row): ("a.jsonl:3", "line 3", {...})


def load_preference_pairs(path_or_id: str) -> ImportResult:
    """Read preference pairs from a local file or directory, or a hub dataset id; raise UserError on bad input."""
    source = str(path_or_id)
    path = Path(source).expanduser()
    if path.is_dir():
        batches = _directory_batches(path)
    elif path.is_file():
        batches = [_file_rows(path)]
    elif _looks_like_local_path(source):
        raise UserError(f"{path}: preference file not found")
    else:
        batches = [_hub_rows(source)]

    pairs: list[PreferencePair] = []
    dropped: dict[str, int] = {}
    shapes: list[str] = []
    for batch in batches:
        shape = _read_batch(batch, pairs, dropped)
        if shape not in shapes:
            shapes.append(shape)

    if not pairs:
        total = sum(dropped.values())
        reasons = ", ".join(f"{count} {reason}" for reason, count in dropped.items())
        rows = "the only row was" if total == 1 else f"all {total} rows were"
        raise UserError(f"{source}: {rows} dropped ({reasons}); expected at least one usable preference pair")
    return ImportResult(pairs=pairs, dropped=dropped, source=source, shape=",".join(shapes))


def pair_to_row(pair: PreferencePair) -> dict:
    """The conversational TRL row for a pair: {"prompt": [...], "chosen": [...], "rejected": [...]}."""
    return {
        "prompt": [dict(message) for message in pair.prompt],
        "chosen": [dict(message) for message in pair.chosen],
        "rejected": [dict(message) for message in pair.rejected],
    }


# --- sources ------------------------------------------------------------------------------


def _looks_like_local_path(source: str) -> bool:
    """Whether a string that names nothing on disk was meant as a path rather than a hub id ("owner/name")."""
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in _FILE_SUFFIXES
    )


def _file_rows(path: Path) -> _Rows:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path)
    if suffix not in (".jsonl", ".json"):
        raise UserError(
            f"{path}: expected a preference file ending in .jsonl, .json or .parquet "
            "(or a directory, or a hub dataset id)"
        )
    records = iter_json_records(path, read_utf8(path), json_lines_in_json=True)
    return _Rows(str(path), ((record.where, f"line {record.line}", record.value) for record in records))


def _directory_batches(path: Path) -> list[_Rows]:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return [_saved_dataset_rows(path)]
    files = _data_files(path, recursive=False) or _data_files(path, recursive=True)
    if not files:
        raise UserError(
            f"{path}: expected a dataset saved with save_to_disk or .jsonl, .json or .parquet files, found none"
        )
    return [_file_rows(file) for file in files]


def _data_files(directory: Path, recursive: bool) -> list[Path]:
    candidates = directory.rglob("*") if recursive else directory.iterdir()
    files = sorted(
        file
        for file in candidates
        if file.is_file()
        and file.suffix.lower() in _FILE_SUFFIXES
        and file.name not in _METADATA_FILES
        and not any(part.startswith(".") for part in file.relative_to(directory).parts)
    )
    train = [file for file in files if _TRAIN_FILE.search(file.relative_to(directory).as_posix().lower())]
    return train or files


def _saved_dataset_rows(path: Path) -> _Rows:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - any failure here is a bad dataset folder
        raise UserError(f"{path}: cannot load the saved dataset: {one_line(err)}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if not dataset:
            raise UserError(f"{path}: expected a saved dataset with at least one split, found none")
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    return _dataset_rows(dataset, str(path))


def _parquet_rows(path: Path) -> _Rows:
    import datasets
    import pyarrow.parquet

    try:
        # `datasets` calls a file without rows "no data"; its footer says so plainly.
        empty = pyarrow.parquet.read_metadata(path).num_rows == 0
    except Exception as err:  # noqa: BLE001 - any failure here is a bad parquet file
        raise UserError(f"{path}: cannot read the parquet file: {one_line(err)}") from None
    if empty:
        raise UserError(f"{path}: expected at least one preference row, found none")
    try:
        dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - any failure here is a bad parquet file
        raise UserError(f"{path}: cannot read the parquet file: {one_line(err)}") from None
    return _dataset_rows(dataset, str(path))


def _hub_rows(hub_id: str) -> _Rows:
    import datasets

    try:
        dataset = datasets.load_dataset(hub_id, split="train")
    except Exception as err:  # noqa: BLE001 - network, missing dataset, missing split, bad files
        raise UserError(f"preferences.path: cannot load dataset '{hub_id}': {one_line(err)}") from None
    return _dataset_rows(dataset, hub_id)


def _dataset_rows(dataset, source: str) -> _Rows:
    return _Rows(source, ((f"{source}: row {i}", f"row {i}", row) for i, row in enumerate(dataset)))


# --- rows ---------------------------------------------------------------------------------


def _read_batch(batch: _Rows, pairs: list[PreferencePair], dropped: dict[str, int]) -> str:
    """Convert one source's rows, appending kept pairs and counting dropped ones; return its shape."""
    shape = first = None
    for where, location, row in batch.rows:
        row_shape = _classify(row, where)
        if shape is None:
            shape, first = row_shape, location
        elif row_shape != shape:
            raise UserError(
                f"{where}: expected a {shape} row like {first} ({_SHAPES[shape]}), "
                f"found a {row_shape} row ({_SHAPES[row_shape]})"
            )
        result = _CONVERTERS[shape](row, where)
        reason = result if isinstance(result, str) else _drop_reason(result)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            pairs.append(result)
    if shape is None:
        raise UserError(f"{batch.label}: expected at least one preference row, found none")
    return shape


def _classify(row: object, where: str) -> str:
    if not isinstance(row, dict):
        raise UserError(f'{where}: expected an object with "chosen" and "rejected", got {json_type_name(row)}')
    for key in ("chosen", "rejected"):
        if key not in row:
            raise UserError(f'{where}: expected a "{key}" key')
        if not isinstance(row[key], (str, list)):
            raise UserError(
                f'{where}: expected "{key}" to be a string or a list of messages, got {json_type_name(row[key])}'
            )
    chosen, rejected = row["chosen"], row["rejected"]
    if type(chosen) is not type(rejected):
        raise UserError(
            f'{where}: expected "chosen" and "rejected" to be both strings or both lists of messages, '
            f"got {json_type_name(chosen)} and {json_type_name(rejected)}"
        )
    if isinstance(chosen, str):
        if "prompt" in row:
            return "plain"
        if _HH_MARKER.search(chosen) or _HH_MARKER.search(rejected):
            return "hh"
        raise UserError(
            f'{where}: expected a "prompt" key (or "chosen" and "rejected" as Anthropic HH transcripts, '
            '"\\n\\nHuman: ...\\n\\nAssistant: ...")'
        )
    starts = [side[0] for side in (chosen, rejected) if side]
    if "prompt" in row and all(isinstance(m, dict) and m.get("role") == "assistant" for m in starts):
        return "conversational"
    return "conversation_pair"


def _plain(row: dict, where: str) -> PreferencePair:
    prompt = _string(row, "prompt", where)
    if _HH_PROMPT.match(prompt):
        # An HH-derived dataset ("Dahoas/rm-static"): the prompt is the transcript up to a bare "Assistant:".
        messages = _parse_hh(prompt, "prompt", where)
        if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
            messages.pop()
    else:
        messages = [{"role": "user", "content": prompt.strip()}]
    return PreferencePair(
        prompt=messages,
        chosen=[{"role": "assistant", "content": _string(row, "chosen", where).strip()}],
        rejected=[{"role": "assistant", "content": _string(row, "rejected", where).strip()}],
    )


def _conversational(row: dict, where: str) -> PreferencePair:
    prompt = row["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = _messages(prompt, "prompt", where)
    else:
        raise UserError(
            f'{where}: expected "prompt" to be a list of messages or a string, got {json_type_name(prompt)}'
        )
    responses = {}
    for key in ("chosen", "rejected"):
        response = _messages(row[key], key, where)
        if response and not _has_assistant(response):
            raise UserError(f'{where}: expected "{key}" to contain an assistant message, found none')
        responses[key] = response
    return PreferencePair(prompt=messages, chosen=responses["chosen"], rejected=responses["rejected"])


def _conversation_pair(row: dict, where: str) -> PreferencePair | str:
    chosen = _messages(row["chosen"], "chosen", where)
    rejected = _messages(row["rejected"], "rejected", where)
    if _stripped(chosen) == _stripped(rejected):
        return "identical"
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise UserError(
            f'{where}: expected "chosen" and "rejected" to open with the same prompt message(s), '
            "they differ from the first message"
        )
    for key, conversation in (("chosen", chosen), ("rejected", rejected)):
        if shared == len(conversation):
            raise UserError(
                f'{where}: expected "{key}" to continue after the {shared} message(s) it shares with the other '
                "side, found nothing"
            )
        if not _has_assistant(conversation[shared:]):
            raise UserError(
                f'{where}: expected an assistant message in "{key}" after the {shared} shared message(s), found none'
            )
    return PreferencePair(prompt=chosen[:shared], chosen=chosen[shared:], rejected=rejected[shared:])


def _hh(row: dict, where: str) -> PreferencePair | str:
    texts = {key: _string(row, key, where) for key in ("chosen", "rejected")}
    if texts["chosen"].strip() == texts["rejected"].strip():
        return "identical"
    split = {}
    for key, text in texts.items():
        messages = _parse_hh(text, key, where)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise UserError(f'{where}: expected "{key}" to contain an "Assistant:" turn (Anthropic HH transcript), found none')
        if last != len(messages) - 1:
            raise UserError(f'{where}: expected "{key}" to end with an "Assistant:" turn, found a "Human:" turn after it')
        split[key] = (messages[:last], messages[last:])
    (chosen_prompt, chosen), (rejected_prompt, rejected) = split["chosen"], split["rejected"]
    if chosen_prompt != rejected_prompt:
        turn = next(
            (i for i, (a, b) in enumerate(zip(chosen_prompt, rejected_prompt), start=1) if a != b),
            min(len(chosen_prompt), len(rejected_prompt)) + 1,
        )
        raise UserError(
            f'{where}: expected "chosen" and "rejected" to share the turns before the final "Assistant:" turn, '
            f"they differ at turn {turn}"
        )
    return PreferencePair(prompt=chosen_prompt, chosen=chosen, rejected=rejected)


_CONVERTERS = {
    "plain": _plain,
    "conversational": _conversational,
    "conversation_pair": _conversation_pair,
    "hh": _hh,
}


def _drop_reason(pair: PreferencePair) -> str | None:
    if not _has_text(pair.chosen) or not _has_text(pair.rejected):
        return "empty_response"
    if _stripped(pair.chosen) == _stripped(pair.rejected):
        return "identical"
    if not _has_text(pair.prompt):
        return "empty_prompt"
    return None


# --- values -------------------------------------------------------------------------------


def _string(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f'{where}: expected "{key}" to be a string, got {json_type_name(value)}')
    return value


def _messages(value: object, key: str, where: str) -> Conversation:
    if not isinstance(value, list):
        raise UserError(f'{where}: expected "{key}" to be a list of messages, got {json_type_name(value)}')
    messages = []
    for index, message in enumerate(value):
        name = f"{key}[{index}]"
        if not isinstance(message, dict):
            raise UserError(
                f'{where}: expected "{name}" to be a message object with "role" and "content", '
                f"got {json_type_name(message)}"
            )
        for field_name in ("role", "content"):
            if field_name not in message:
                raise UserError(f'{where}: expected "{name}" to have a "{field_name}" key')
            if not isinstance(message[field_name], str):
                raise UserError(
                    f'{where}: expected "{name}.{field_name}" to be a string, '
                    f"got {json_type_name(message[field_name])}"
                )
        if not message["role"].strip():
            raise UserError(f'{where}: expected a non-empty "{name}.role"')
        # Only role and content: datasets gives every message the union of keys, as nulls.
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _parse_hh(text: str, key: str, where: str) -> Conversation:
    parts = _HH_MARKER.split(text)
    if parts[0].strip():
        raise UserError(
            f'{where}: expected "{key}" to be an Anthropic HH transcript starting with "Human:", '
            "found text before the first turn"
        )
    return [
        {"role": _HH_ROLES[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2])
    ]


def _has_assistant(messages: Conversation) -> bool:
    return any(message["role"] == "assistant" for message in messages)


def _has_text(messages: Conversation) -> bool:
    return any(message["content"].strip() for message in messages)


def _stripped(messages: Conversation) -> list[tuple[str, str]]:
    return [(message["role"], message["content"].strip()) for message in messages]
