"""The one place that talks to lm-evaluation-harness (the `lm_eval` package: `pip install -e ".[eval]"`).

- `prepare_tasks`: every configured task checked before any model loads, each problem one UserError line:
  an unknown name (with close matches), a data file that is missing or has a malformed row (file and row,
  the field the task reads), a task whose data is on the Hugging Face hub when the hub cannot be reached.
  A task given `data_files` keeps its own prompt, target, choices, filters and metric (its YAML, from
  lm-eval or `include_path`); only its dataset becomes the datasets library's json or parquet builder on the
  user's file, in the task's original fields (GSM8K's question / answer, ...).
- `harness_model`: a model the pipeline loaded (rlhf.models), handed to lm-eval's HFLM as it is.
- `evaluate_task`: `lm_eval.simple_evaluate` on one task, and its metrics with their standard errors.

Every model is prompted through its chat template (APPLY_CHAT_TEMPLATE): the pipeline trains, samples and
serves every model in its template (sft's data, ppo's rollouts, evaluate, `rlhf chat`), the base model is an
instruct model (the embedded SmolLM2-135M-Instruct), and a score taken off-template would measure a prompt
format that none of the three is used in. Few-shot examples are then turns of the conversation.

The project's own local tasks (rlhf_word_relations, rlhf_arithmetic) live in `rlhf/data_builders/benchmarks/`,
each YAML beside the JSONL that is its default data.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.resources
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config import BenchmarkConfig, BenchmarkTaskConfig
from rlhf.data_builders.json_files import iter_json_records, json_type_name, read_utf8
from rlhf.errors import UserError, one_line

SHIPPED_TASKS = Path(str(importlib.resources.files("rlhf.data_builders") / "benchmarks"))
"""The project's local tasks: <name>.yaml with its data <name>.jsonl."""

APPLY_CHAT_TEMPLATE = True
"""The same for the base, SFT and PPO models (see the module docstring)."""

DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""A data file's suffix -> the datasets library's builder that reads it."""


@dataclass(frozen=True)
class PreparedTask:
    """A configured task, checked, ready for `evaluate_task`."""

    name: str
    """The lm-eval task (or group) name: the key of its results."""
    spec: str | dict
    """What simple_evaluate gets: the name, or the task's full config with the local data in it."""
    limit: int | None
    num_fewshot: int | None
    data_file: Path | None
    fields: tuple[str, ...] = ()
    """The fields of the data file that the task reads."""
    identity: dict = field(default_factory=dict)
    """What its results depend on besides the model: the cache key's task part (rlhf.stages.benchmark)."""


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UserError(
            'benchmark.tasks needs lm-evaluation-harness, which is not installed: pip install -e ".[eval]"'
        ) from None
    return lm_eval


# --- tasks --------------------------------------------------------------------------------------


def prepare_tasks(settings: BenchmarkConfig):
    """(the TaskManager, [PreparedTask]) for `settings.tasks`, in order. Reads no model and downloads nothing."""
    lm_eval = require_lm_eval()
    local_paths = [SHIPPED_TASKS]
    if settings.include_path:
        include = Path(settings.include_path)
        if not include.is_dir():
            raise UserError(f"benchmark.include_path: '{include}' is not a folder of lm-eval task YAMLs")
        local_paths.append(include)  # after the shipped tasks: a user's task of the same name wins
    local_files = _files_hash(local_paths)
    manager = task_manager([task.name for task in settings.tasks], tuple(str(p) for p in local_paths), local_files)
    prepared = []
    for index, task in enumerate(settings.tasks):
        key = f"benchmark.tasks[{index}] ({task.name})"
        entry = manager.task_index.get(task.name)
        if entry is None:
            raise UserError(f"{key}: no lm-eval task is named '{task.name}'{_close_matches(task.name, manager.all_tasks)}")
        from_lm_eval = entry.yaml_path is None or not any(_is_under(entry.yaml_path, p) for p in local_paths)
        identity = {
            "name": task.name,
            "limit": task.limit,
            "num_fewshot": task.num_fewshot,
            "definition": f"lm-eval {lm_eval.__version__}" if from_lm_eval else local_files,
        }
        data_file = Path(task.data_files) if task.data_files else _shipped_data(entry)
        if data_file is None:
            check_hub(key, manager, entry)
            prepared.append(PreparedTask(task.name, task.name, task.limit, task.num_fewshot, None, (), identity))
        else:
            prepared.append(_local_data_task(key, manager, entry, task, data_file, identity))
    return manager, prepared


def task_manager(names: list[str], local_paths: tuple[str, ...], local_files: str):
    """lm-eval's TaskManager over the local task folders, and over lm-eval's own ~14k tasks only when a name
    needs them: indexing those reads every YAML that lm-eval ships, seconds of work. Kept for the process
    while the local folders' files (`local_files`, their hash) stay the same."""
    local = _task_manager(local_paths, False, local_files)
    if all(name in local.task_index and local.task_index[name].kind.name == "TASK" for name in names):
        return local  # a group or tag may name lm-eval's own tasks
    return _task_manager(local_paths, True, local_files)


@functools.lru_cache(maxsize=4)
def _task_manager(local_paths: tuple[str, ...], include_defaults: bool, local_files: str):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(local_paths), include_defaults=include_defaults)


def _shipped_data(entry) -> Path | None:
    """The default data of one of the project's local tasks."""
    if entry.yaml_path is not None and Path(entry.yaml_path).resolve().parent == SHIPPED_TASKS.resolve():
        return SHIPPED_TASKS / f"{entry.name}.jsonl"
    return None


def _local_data_task(key: str, manager, entry, task: BenchmarkTaskConfig, path: Path, identity: dict) -> PreparedTask:
    """The task's own config with the datasets json/parquet builder on `path` as its dataset; every row checked."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader lm-eval's TaskManager itself uses

    if entry.kind.name != "TASK" or entry.yaml_path is None:
        raise UserError(f"{key}: data_files takes a single task defined in YAML; '{task.name}' is a {entry.kind.name.lower()}")
    if not path.is_file():
        raise UserError(f"{key}: data file '{path}' not found")
    builder = DATA_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"{key}: data file '{path}': expected a .jsonl, .json or .parquet file")
    config = load_yaml(entry.yaml_path, resolve_func=True)
    fewshot = config.get("fewshot_config") or {}
    # Every split the task reads (eval, few-shot, training) is the user's file; lm-eval never uses an item
    # as its own few-shot example.
    splits = {config.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")} | {fewshot.get("split")}
    config |= {
        "dataset_path": builder,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split in sorted(splits - {None})}},
    }
    config.pop("custom_dataset", None)
    rows = read_rows(path)
    if not rows:
        raise UserError(f"{path}: no rows (task {task.name} needs at least one)")
    try:
        built = manager.load([config])["tasks"][task.name]
    except Exception as error:  # noqa: BLE001 - whatever lm-eval or datasets raise about the file
        missing = _missing_field(error)
        if missing:  # absent from every row, so from the first one too
            raise UserError(f"{rows[0][0]}: row has no field '{missing}' (task {task.name} reads it)") from None
        raise UserError(f"{path}: lm-eval cannot read it as task {task.name}: {one_line(error)}") from None
    fields = check_rows(built, task.name, rows)
    identity = {**identity, "data_file_sha256": _sha256(path)}
    return PreparedTask(task.name, config, task.limit, task.num_fewshot, path, fields, identity)


def read_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) for every row of a .jsonl/.json file (where = "path:line") or a .parquet file ("path: row N")."""
    if path.suffix.lower() == ".parquet":
        import datasets

        try:
            dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
        except Exception as error:  # noqa: BLE001 - any failure here is a bad parquet file
            raise UserError(f"{path}: cannot read the parquet file: {one_line(error)}") from None
        return [(f"{path}: row {i}", row) for i, row in enumerate(dataset, 1)]
    return [(record.where, record.value) for record in iter_json_records(path, read_utf8(path), json_lines_in_json=True)]


def check_rows(task, name: str, rows: list[tuple[str, Any]]) -> tuple[str, ...]:
    """The fields `task` reads, found on the first row; then every row must have each of them (a null counts
    as missing) and, for a task without process_docs, give its prompt, target and choices."""
    for where, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object (one task item), got {json_type_name(row)}")
    first_where, first = rows[0]
    if (error := _read_error(task, first)) is not None:
        raise UserError(f"{first_where}: task {name} cannot read this row: {_describe(error)}")
    fields = tuple(f for f in first if _read_error(task, {k: v for k, v in first.items() if k != f}) is not None)
    listed = ", ".join(fields)
    for where, row in rows:
        if missing := next((f for f in fields if row.get(f) is None), None):
            raise UserError(f"{where}: row has no field '{missing}' (task {name} reads {listed})")
        if task.config.process_docs is None and (error := _read_error(task, row)) is not None:
            raise UserError(f"{where}: task {name} cannot read this row: {_describe(error)}")
    return fields


def _read_error(task, row: dict) -> Exception | None:
    """What the task's own prompt, target and choices raise on one raw row (after its process_docs), if anything."""
    try:
        doc = row
        if task.config.process_docs is not None:
            import datasets

            doc = task.config.process_docs(datasets.Dataset.from_list([row]))[0]
        task.doc_to_text(doc)
        task.doc_to_target(doc)
        if task.config.doc_to_choice is not None:
            task.doc_to_choice(doc)
    except Exception as error:  # noqa: BLE001 - any failure means the task cannot read the row
        return error
    return None


def _missing_field(error: Exception) -> str | None:
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    match = re.search(r"'([^']+)' is undefined", str(error))  # jinja2's StrictUndefined, which lm-eval uses
    return match.group(1) if match else None


def _describe(error: Exception) -> str:
    missing = _missing_field(error)
    return f"no field '{missing}'" if missing else one_line(error)


def check_hub(key: str, manager, entry) -> None:
    """Fail when the task's data is a hub dataset that cannot be had: not in the local caches, and the hub
    offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or unreachable."""
    for dataset in sorted(_hub_datasets(manager, entry)):
        if _in_local_cache(dataset):
            continue
        if _offline():
            raise UserError(
                f"{key}: its data is the hub dataset '{dataset}', which is not in the Hugging Face cache, and "
                "HF_HUB_OFFLINE is set: give a local copy as data_files, or run where the hub is reachable"
            )
        _check_reachable(key, dataset)


def _hub_datasets(manager, entry, seen=None) -> set[str]:
    """The hub dataset ids of a task, or of every task in a group or tag."""
    seen = set() if seen is None else seen
    if entry.name in seen:
        return set()
    seen.add(entry.name)
    kind = entry.kind.name
    if kind == "TAG":
        members = list(entry.tags)
    elif kind == "GROUP":
        members = [m if isinstance(m, str) else m.get("task") for m in (entry.cfg or {}).get("task", [])]
    else:
        path = (entry.cfg or {}).get("dataset_path")
        return {path} if isinstance(path, str) and _is_hub_id(path) else set()
    found = set()
    for member in members:
        if isinstance(member, str) and member in manager.task_index:
            found |= _hub_datasets(manager, manager.task_index[member], seen)
    return found


def _is_hub_id(dataset_path: str) -> bool:
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return dataset_path not in _PACKAGED_DATASETS_MODULES and not Path(dataset_path).exists()


def _in_local_cache(dataset: str) -> bool:
    """Downloaded before: the hub client's cache or the datasets library's (both load offline)."""
    import datasets
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"
    prepared = Path(datasets.config.HF_DATASETS_CACHE) / dataset.replace("/", "___")
    return hub.is_dir() or prepared.is_dir()


def _offline() -> bool:
    import datasets
    from huggingface_hub import constants

    on = {"1", "ON", "YES", "TRUE"}
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE or any(f.upper() in on for f in flags)


def _check_reachable(key: str, dataset: str) -> None:
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        huggingface_hub.dataset_info(dataset, timeout=10)
    except GatedRepoError:
        return  # exists; loading it says what access it needs
    except RepositoryNotFoundError:
        raise UserError(f"{key}: its data, the hub dataset '{dataset}', does not exist (a private one needs `hf auth login`)") from None
    except Exception as error:  # noqa: BLE001 - DNS, connection, timeout, proxy: the hub cannot be reached
        raise UserError(
            f"{key}: its data is the hub dataset '{dataset}', which is not in the Hugging Face cache, and the hub is "
            f"unreachable ({one_line(error)}): give a local copy as data_files"
        ) from None


def _close_matches(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.75)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _is_under(path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_hash(folders: list[Path]) -> str:
    """One hash of every file in the local task folders (YAMLs, their includes and Python helpers)."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + _sha256(path).encode())
    return digest.hexdigest()


# --- models and results -------------------------------------------------------------------------


def harness_model(model, tokenizer, batch_size: int):
    """lm-eval's HFLM around a model the pipeline loaded (its device, dtype and quantization as loaded)."""
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval.models.huggingface").addFilter(_loaded_model_warnings)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _loaded_model_warnings(record: logging.LogRecord) -> bool:
    """Drop HFLM's two warnings about being handed a loaded model rather than a name: that is how the
    pipeline loads every model (its quantization, dtype and adapter), on purpose, in one process."""
    message = record.getMessage()
    return not message.startswith(("`pretrained` model kwarg is not of type", "Passed an already-initialized model"))


@dataclass(frozen=True)
class TaskResult:
    """One task's results on one model: metric ("acc,none", "exact_match,last-number", ...) -> value and
    standard error (None when lm-eval gave none), with how many items were scored."""

    metrics: dict[str, dict[str, float | None]]
    samples: int | None
    higher_is_better: dict[str, bool]


def evaluate_task(lm, manager, task: PreparedTask, seed: int) -> TaskResult:
    """lm_eval.simple_evaluate on one task, seeded for its few-shot draws, greedy as its YAML says."""
    import lm_eval

    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task.spec],
        task_manager=manager,
        num_fewshot=task.num_fewshot,
        limit=task.limit,
        apply_chat_template=APPLY_CHAT_TEMPLATE,
        fewshot_as_multiturn=APPLY_CHAT_TEMPLATE,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return parse_results(output, task.name)


def parse_results(output: dict, name: str) -> TaskResult:
    """A task's (or group's) numeric metrics and their standard errors from simple_evaluate's output."""
    raw = output["results"].get(name) or output.get("groups", {}).get(name, {})
    metrics = {}
    for key, value in raw.items():
        metric, comma, filter_name = key.partition(",")
        if not comma or metric.endswith("_stderr") or not _is_number(value):
            continue
        stderr = raw.get(f"{metric}_stderr,{filter_name}")
        metrics[key] = {"value": float(value), "stderr": float(stderr) if _is_number(stderr) else None}
    if not metrics:
        raise RuntimeError(f"lm-eval returned no numeric metric for task {name}: {sorted(raw)}")
    leaves = output.get("group_subtasks", {}).get(name) or [name]
    counts = [output.get("n-samples", {}).get(leaf, {}).get("effective") for leaf in leaves]
    higher = {}
    for leaf in [name, *leaves]:
        higher = {**output.get("higher_is_better", {}).get(leaf, {}), **higher}
    return TaskResult(metrics, sum(counts) if all(isinstance(c, int) for c in counts) else None, higher)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # NaN is no number
