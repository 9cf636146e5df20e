"""Bad input, in one table: every reader the pipeline has, and its config, fed broken content.

Each row is run the way a user meets it, through `rlhf run` (`rlhf.cli.main`, in this process) on
configs/smoke.yaml, and must end in exactly one line on stderr, `error: ...`, that names the file (with
its line, or the key) and says what was expected; exit status 2; no traceback; nothing published.
A few rows are not errors but counted skips: the stage finishes and its stats count what it dropped.

Rows by target (what is bad):
  config    the YAML config file itself            rlhf run cfg.yaml
  override  a `key=value` on the command line      rlhf run smoke.yaml key=value
  seeds     instructions.seeds (.txt/.jsonl/.json) rlhf run ... --only instructions
  split     an instruction split, as sft reads it  rlhf run ... --only sft (preferences and ppo share its reader)
  prefs     preferences.path (.jsonl/.json/.parquet) rlhf run ... --only preferences (source=import)
  model     model.name_or_path                     rlhf run ... --only sft
  teacher   an OpenAI-compatible teacher endpoint  rlhf run ... --only instructions (a real HTTP server)
In `expect`, {path} stands for the bad file. Upstream stages a row needs are faked (a manifest and the
files the stage reads), so no row trains or loads a model.
"""

from __future__ import annotations

import contextlib
import json
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_openai_server import fake_openai_server

import rlhf.data_builders.teacher as teacher_module
from rlhf.cli import main

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")


@dataclass(frozen=True)
class Counted:
    """Not an error: the stage finishes and `file` (in the run directory) counts the skipped rows at `key`."""

    file: str
    key: tuple[str, ...]
    count: int


@dataclass(frozen=True)
class Row:
    id: str
    target: str  # config, override, seeds, split, prefs, model, teacher: see the module docstring
    name: str  # the bad file's name (its suffix picks the format); for override/model/teacher: the setting
    content: object  # what the file holds (None: it does not exist); override: the value; teacher: the reply
    expect: str | Counted  # a fragment of the error line ({path}: the bad file), or a counted skip

    def __str__(self) -> str:
        return self.id


MESSAGES = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]
SPLIT_ROW = json.dumps({"messages": MESSAGES, "source": "seed"})
PAIR = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
PAIR_LINE = json.dumps(PAIR)
SEED_LINE = '{"instruction": "Name a colour.", "output": "Blue."}'

ROWS = [
    # --- the config file --------------------------------------------------------------------------
    Row("config-missing", "config", "cfg.yaml", None, "{path}: config file not found"),
    Row("config-empty", "config", "cfg.yaml", "", "{path}: expected a mapping of config sections, found an empty file"),
    Row("config-only-comments", "config", "cfg.yaml", "# all defaults?\n", "{path}: expected a mapping of config sections, found an empty file"),
    Row("config-top-level-list", "config", "cfg.yaml", "- sft\n- ppo\n", "{path}: expected a mapping of config sections at the top level"),
    Row("config-malformed-yaml", "config", "cfg.yaml", "seed: 1\nsft:\n  batch_size: [1, 2\n", "{path}:4: invalid YAML: expected ',' or ']'"),
    Row("config-tab-indent", "config", "cfg.yaml", "sft:\n\tbatch_size: 2\n", "{path}:2: invalid YAML: found character '\\t'"),
    Row("config-unknown-key", "config", "cfg.yaml", "sft:\n  learning_rat: 1\n", "{path}: unknown key 'sft.learning_rat' (did you mean 'sft.learning_rate'?)"),
    Row("config-unknown-section", "config", "cfg.yaml", "lorra:\n  r: 4\n", "{path}: unknown key 'lorra' (did you mean 'lora'?)"),
    Row("config-wrong-type", "config", "cfg.yaml", "sft:\n  batch_size: many\n", "{path}: key 'sft.batch_size': Input should be a valid integer"),
    Row("config-bad-choice", "config", "cfg.yaml", "model:\n  quantization: 3bit\n", "{path}: key 'model.quantization': Input should be 'none', '8bit' or '4bit' (got '3bit')"),
    Row("config-out-of-range", "config", "cfg.yaml", "lora:\n  r: 0\n", "{path}: key 'lora.r': Input should be greater than 0 (got 0)"),
    Row("config-section-not-mapping", "config", "cfg.yaml", "sft: 3\n", "{path}: key 'sft': Input should be a valid dictionary"),
    Row("config-non-utf8", "config", "cfg.yaml", b"seed: 1\nrun_name: caf\xe9\n", "{path}:2: expected UTF-8 text, found byte 0xe9"),
    # --- overrides on the command line --------------------------------------------------------------
    Row("override-unknown-key", "override", "sft.bach_size", "3", "override: unknown key 'sft.bach_size' (did you mean 'sft.batch_size'?)"),
    Row("override-value-as-section", "override", "sft.batch_size.x", "3", "override: 'sft.batch_size' is a value, not a section"),
    Row("override-malformed-yaml", "override", "sft.batch_size", "[1", "override 'sft.batch_size=[1': expected a YAML value after '='"),
    Row("override-wrong-type", "override", "sft.batch_size", "many", "override 'sft.batch_size=many': key 'sft.batch_size': Input should be a valid integer"),
    Row("override-bad-section", "override", "lora", "3", "override 'lora=3': key 'lora': Input should be a valid dictionary"),
    # --- seed files: instructions.seeds ---------------------------------------------------------------
    Row("seeds-missing", "seeds", "seeds.jsonl", None, "{path}: input file not found"),
    Row("seeds-empty-txt", "seeds", "seeds.txt", "\n  \n", "{path}: expected at least one seed, found none"),
    Row("seeds-empty-jsonl", "seeds", "seeds.jsonl", "", "{path}: expected at least one seed, found none"),
    Row("seeds-empty-json", "seeds", "seeds.json", "[]", "{path}: expected at least one seed, found none"),
    Row("seeds-wrong-suffix", "seeds", "seeds.csv", "instruction\nSay hi.\n", "{path}: expected a seed file ending in .txt, .jsonl or .json"),
    Row("seeds-malformed-jsonl", "seeds", "seeds.jsonl", SEED_LINE + '\n{"instruction": "oops",\n', "{path}:2: expected one JSON object per line"),
    Row("seeds-malformed-json", "seeds", "seeds.json", "[\n  " + SEED_LINE + ',\n  {"instruction": "oops",}\n]\n', "{path}:3: expected valid JSON"),
    Row("seeds-json-not-a-list", "seeds", "seeds.json", SEED_LINE, "{path}:1: expected a JSON list of seed objects, got an object"),
    Row("seeds-line-not-an-object", "seeds", "seeds.jsonl", SEED_LINE + '\n["a list"]\n', '{path}:2: expected a JSON object with an "instruction", got a list'),
    Row("seeds-missing-field-jsonl", "seeds", "seeds.jsonl", SEED_LINE + '\n\n{"prompt": "hi"}\n', '{path}:3: expected an "instruction" key'),
    Row("seeds-missing-field-json", "seeds", "seeds.json", "[\n  " + SEED_LINE + ',\n  {\n    "input": "x"\n  }\n]', '{path}:3: expected an "instruction" key'),
    Row("seeds-wrong-type", "seeds", "seeds.jsonl", SEED_LINE + '\n{"instruction": 5}\n', '{path}:2: expected "instruction" to be a string, got a number'),
    Row("seeds-wrong-type-output", "seeds", "seeds.jsonl", '{"instruction": "Hi.", "output": {"a": 1}}\n', '{path}:1: expected "output" to be a string, got an object'),
    Row("seeds-empty-instruction", "seeds", "seeds.jsonl", SEED_LINE + '\n{"instruction": "  "}\n', '{path}:2: expected a non-empty "instruction"'),
    Row("seeds-non-utf8-txt", "seeds", "seeds.txt", b"Say hi.\nSay caf\xe9.\n", "{path}:2: expected UTF-8 text, found byte 0xe9"),
    Row("seeds-non-utf8-jsonl", "seeds", "seeds.jsonl", SEED_LINE.encode() + b'\n{"instruction": "caf\xe9"}\n', "{path}:2: expected UTF-8 text, found byte 0xe9"),
    Row("seeds-non-utf8-json", "seeds", "seeds.json", b"[\n" + SEED_LINE.encode() + b',\n{"instruction": "caf\xe9"}\n]', "{path}:3: expected UTF-8 text, found byte 0xe9"),
    # --- instruction splits (train.jsonl / eval.jsonl), read by sft, preferences and ppo ------------------
    Row("split-missing", "split", "train.jsonl", None, "{path}: instruction split not found"),
    Row("split-empty", "split", "train.jsonl", "\n", '{path}: expected at least one row with "messages", found none'),
    Row("split-malformed", "split", "train.jsonl", SPLIT_ROW + '\n{"messages": [\n', "{path}:2: expected one JSON object per line"),
    Row("split-missing-field", "split", "train.jsonl", SPLIT_ROW + '\n{"text": "Hi."}\n', '{path}:2: expected an object with a "messages" list, got an object without it'),
    Row("split-wrong-type", "split", "train.jsonl", SPLIT_ROW + '\n{"messages": "Hi."}\n', '{path}:2: expected "messages" to be a list of at least 2 messages (prompt, answer), got a string'),
    Row("split-bad-message", "split", "train.jsonl", SPLIT_ROW + '\n{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}\n', '{path}:2: expected "messages[0]" to be an object with string "role" and "content"'),
    Row("split-no-answer", "split", "train.jsonl", SPLIT_ROW + "\n" + json.dumps({"messages": MESSAGES[:1] * 2}) + "\n", "{path}:2: expected the last message to be the assistant's answer"),
    Row("split-non-utf8", "split", "train.jsonl", SPLIT_ROW.encode() + b'\n{"messages": "caf\xe9"}\n', "{path}:2: expected UTF-8 text, found byte 0xe9"),
    # --- preference files: preferences.path -------------------------------------------------------------
    Row("prefs-missing-jsonl", "prefs", "pairs.jsonl", None, "{path}: preference file not found"),
    Row("prefs-empty-jsonl", "prefs", "pairs.jsonl", "", "{path}: expected at least one preference row, found none"),
    Row("prefs-malformed-jsonl", "prefs", "pairs.jsonl", PAIR_LINE + '\n{"prompt": "oops",\n', "{path}:2: expected one JSON object per line"),
    Row("prefs-missing-field-jsonl", "prefs", "pairs.jsonl", PAIR_LINE + '\n{"prompt": "p", "chosen": "a"}\n', '{path}:2: expected a "rejected" key'),
    Row("prefs-wrong-type-jsonl", "prefs", "pairs.jsonl", PAIR_LINE + '\n{"prompt": "p", "chosen": 4, "rejected": "b"}\n', '{path}:2: expected "chosen" to be a string or a list of messages, got a number'),
    Row("prefs-non-utf8-jsonl", "prefs", "pairs.jsonl", PAIR_LINE.encode() + b'\n{"prompt": "caf\xe9"}\n', "{path}:2: expected UTF-8 text, found byte 0xe9"),
    Row("prefs-unknown-suffix", "prefs", "pairs.csv", "prompt,chosen,rejected\n", "{path}: expected a preference file ending in .jsonl, .json or .parquet"),
    Row("prefs-missing-json", "prefs", "pairs.json", None, "{path}: preference file not found"),
    Row("prefs-empty-json", "prefs", "pairs.json", "[]", "{path}: expected at least one preference row, found none"),
    Row("prefs-malformed-json", "prefs", "pairs.json", "[\n  " + PAIR_LINE + ',\n  {"prompt": "oops",}\n]\n', "{path}:3: expected valid JSON"),
    Row("prefs-json-not-a-list", "prefs", "pairs.json", '{\n  "prompt": "p",\n  "chosen": "a"\n}', "{path}:1: expected a JSON list of objects (or one object per line), got an object"),
    Row("prefs-missing-field-json", "prefs", "pairs.json", "[\n  " + PAIR_LINE + ',\n\n  {\n    "prompt": "p",\n    "chosen": "a"\n  }\n]', '{path}:4: expected a "rejected" key'),
    Row("prefs-wrong-type-json", "prefs", "pairs.json", "[\n  " + PAIR_LINE + ',\n  {"prompt": 7, "chosen": "a", "rejected": "b"}\n]', '{path}:3: expected "prompt" to be a string, got a number'),
    Row("prefs-non-utf8-json", "prefs", "pairs.json", b"[\n" + PAIR_LINE.encode() + b',\n{"prompt": "caf\xe9"}\n]', "{path}:3: expected UTF-8 text, found byte 0xe9"),
    Row("prefs-missing-parquet", "prefs", "pairs.parquet", None, "{path}: preference file not found"),
    Row("prefs-corrupt-parquet", "prefs", "pairs.parquet", b"PAR1 not really parquet", "{path}: cannot read the parquet file"),
    Row("prefs-empty-parquet", "prefs", "pairs.parquet", [], "{path}: expected at least one preference row, found none"),
    Row("prefs-missing-column-parquet", "prefs", "pairs.parquet", [{"prompt": "p", "chosen": "a"}], '{path}: row 0: expected a "rejected" key'),
    Row("prefs-null-value-parquet", "prefs", "pairs.parquet", [PAIR, {"prompt": "p", "chosen": "a", "rejected": None}], '{path}: row 1: expected "rejected" to be a string or a list of messages, got null'),
    Row("prefs-wrong-type-parquet", "prefs", "pairs.parquet", [{"prompt": "p", "chosen": 4, "rejected": 5}], '{path}: row 0: expected "chosen" to be a string or a list of messages, got a number'),
    Row("prefs-all-rows-dropped", "prefs", "pairs.jsonl", json.dumps({**PAIR, "rejected": "4"}) + "\n", "{path}: the only row was dropped (1 identical); expected at least one usable preference pair"),
    Row("prefs-identical-rows-counted", "prefs", "pairs.jsonl", "".join(json.dumps({**PAIR, "prompt": f"Q{i}?"}) + "\n" for i in range(8)) + json.dumps({**PAIR, "rejected": "4"}) + "\n", Counted("preferences/stats.json", ("dropped", "identical"), 1)),
    # --- the model ------------------------------------------------------------------------------------
    Row("model-unknown-hub-id-offline", "model", "model.name_or_path", "no-such-org/no-such-model", "model.name_or_path: 'no-such-org/no-such-model' is neither a local directory nor in the Hugging Face cache, and HF_HUB_OFFLINE is set"),
    Row("model-unknown-hub-id-hub-unreachable", "model", "model.name_or_path", "no-such-org/no-such-model", "model.name_or_path: 'no-such-org/no-such-model' is neither a local directory nor in the Hugging Face cache, and the hub is unreachable ([Errno -2] Name or service not known)"),
    Row("model-missing-directory", "model", "model.name_or_path", "/nonexistent/model", "model.name_or_path: '/nonexistent/model' is not a model directory"),
    Row("model-directory-without-model", "model", "model.name_or_path", "{tmp}", "model.name_or_path: '{tmp}' is a directory without a model (expected a config.json"),
    # --- the teacher endpoint (instructions.teacher.kind=openai) ------------------------------------------
    Row("teacher-unreachable", "teacher", "instructions.teacher.base_url", "unreachable", "teacher endpoint {url} unreachable after 3 attempts: Connection refused"),
    Row("teacher-garbage-body", "teacher", "instructions.teacher.base_url", b"<html>Bad gateway</html>", "teacher endpoint {url} returned an invalid response after 3 attempts: expected JSON with choices[0].message.content"),
    Row("teacher-rejects-request", "teacher", "instructions.teacher.base_url", 401, "teacher endpoint {url} returned HTTP 401: "),
    Row("teacher-garbage-text-counted", "teacher", "instructions.teacher.base_url", "?!", Counted("instructions/stats.json", ("dropped", "too_short"), 13)),
]


def write(path: Path, content: object) -> None:
    if content is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, list):  # parquet rows
        import datasets

        if content:
            datasets.Dataset.from_list(content).to_parquet(str(path))
        else:
            features = datasets.Features({k: datasets.Value("string") for k in PAIR})
            datasets.Dataset.from_dict({k: [] for k in PAIR}, features=features).to_parquet(str(path))
    else:
        path.write_text(content, encoding="utf-8")


def fake_published(run_dir: Path, stage: str, files: dict[str, object] | None = None) -> None:
    """A stage's output as the runner sees it: a manifest (and the files the next stage reads)."""
    folder = run_dir / stage
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "fingerprint": "fake", "parts": {}}))
    for name, content in (files or {}).items():
        write(folder / name, content)


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def hub_unreachable(monkeypatch) -> None:
    """As on a machine without network and without HF_HUB_OFFLINE: the hub's DNS lookup fails."""
    import huggingface_hub
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)


def command(row: Row, tmp_path: Path, stack: contextlib.ExitStack, monkeypatch) -> tuple[list[str], dict]:
    """The `rlhf` arguments that meet the row's bad input, and what to fill into its `expect`."""
    run_dir = tmp_path / "run"
    path = tmp_path / row.name
    base = ["run", SMOKE, f"output_dir={run_dir}"]
    if row.target == "config":
        write(path, row.content)
        return ["run", str(path), f"output_dir={run_dir}"], {"path": path}
    if row.target == "override":
        return [*base, f"{row.name}={row.content}"], {}
    if row.target == "seeds":
        write(path, row.content)
        return [*base, "--only", "instructions", f"instructions.seeds={path}"], {"path": path}
    if row.target == "split":
        fake_published(run_dir, "instructions", {"train.jsonl": row.content, "eval.jsonl": SPLIT_ROW + "\n"})
        return [*base, "--only", "sft"], {"path": run_dir / "instructions" / row.name}
    if row.target == "prefs":
        write(path, row.content)
        fake_published(run_dir, "instructions")
        fake_published(run_dir, "sft")
        return [*base, "--only", "preferences", "preferences.source=import", f"preferences.path={path}"], {"path": path}
    if row.target == "model":
        fake_published(run_dir, "instructions", {"train.jsonl": SPLIT_ROW + "\n", "eval.jsonl": SPLIT_ROW + "\n"})
        if row.id == "model-unknown-hub-id-hub-unreachable":
            hub_unreachable(monkeypatch)
        value = str(row.content).format(tmp=tmp_path)
        return [*base, "--only", "sft", f"{row.name}={value}"], {"tmp": tmp_path}
    if row.target == "teacher":
        sleeps: list[float] = []
        monkeypatch.setattr(teacher_module.time, "sleep", sleeps.append)
        if row.content == "unreachable":
            url = f"http://127.0.0.1:{unused_port()}/v1"
        else:
            url = stack.enter_context(fake_openai_server(lambda request: row.content))
        seeds = tmp_path / "seeds.jsonl"
        if isinstance(row.expect, Counted):  # seeds with answers: the teacher is asked for new instructions only
            write(seeds, "".join(json.dumps({"instruction": f"Name colour number {i}.", "output": "Blue."}) + "\n" for i in range(12)))
            sizes = ["instructions.num_instructions=20", "instructions.num_eval=2"]
        else:  # seeds without answers: the teacher is asked to answer them first
            write(seeds, '{"instruction": "Name a colour."}\n')
            sizes = []
        teacher = [
            "instructions.teacher.kind=openai", f"{row.name}={url}", "instructions.teacher.model=teacher",
            "instructions.teacher.max_retries=2", "instructions.teacher.timeout_s=5",
        ]
        return [*base, "--only", "instructions", f"instructions.seeds={seeds}", *teacher, *sizes], {"url": url, "sleeps": sleeps}
    raise ValueError(row.target)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Parquet rows load through `datasets`: keep its cache out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_bad_input(row: Row, tmp_path, monkeypatch, capsys):
    with contextlib.ExitStack() as stack:
        argv, fill = command(row, tmp_path, stack, monkeypatch)
        status = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    run_dir = tmp_path / "run"
    if isinstance(row.expect, Counted):
        assert status == 0, err
        value = json.loads((run_dir / row.expect.file).read_text())
        for part in row.expect.key:
            value = value[part]
        assert value == row.expect.count, json.loads((run_dir / row.expect.file).read_text())
        return
    assert status == 2, out + err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert row.expect.format(**fill) in errors[0]
    if "after 3 attempts" in row.expect:  # retried with exponential backoff (1 s, then 2 s) before giving up
        assert fill["sleeps"] == [1.0, 2.0]
    # Nothing of the stage that met the bad input is published (faked upstream stages aside).
    published = [p.parent.name for p in run_dir.glob("*/manifest.json")]
    assert set(published) <= {"instructions", "sft"} - ({"instructions"} if row.target in ("seeds", "teacher") else set())


def test_every_reader_and_fault_kind_has_rows():
    """The table covers each reader with each kind of fault the issue lists."""
    ids = {row.id for row in ROWS}
    for target, kinds in {
        "config": ["missing", "empty", "malformed-yaml", "unknown-key", "wrong-type", "non-utf8"],
        "override": ["unknown-key", "malformed-yaml", "wrong-type"],
        "seeds": ["missing", "empty-txt", "empty-jsonl", "empty-json", "malformed-jsonl", "malformed-json",
                  "missing-field-jsonl", "missing-field-json", "wrong-type", "non-utf8-txt", "non-utf8-jsonl", "non-utf8-json"],
        "split": ["missing", "empty", "malformed", "missing-field", "wrong-type", "non-utf8"],
        "prefs": [f"{kind}-{fmt}" for fmt in ("jsonl", "json", "parquet") for kind in ("missing", "empty")]
        + [f"{kind}-{fmt}" for fmt in ("jsonl", "json") for kind in ("malformed", "missing-field", "wrong-type", "non-utf8")]
        + ["corrupt-parquet", "missing-column-parquet", "wrong-type-parquet"],
        "model": ["unknown-hub-id-offline", "unknown-hub-id-hub-unreachable"],
        "teacher": ["unreachable", "garbage-body", "garbage-text-counted"],
    }.items():
        missing = [kind for kind in kinds if f"{target}-{kind}" not in ids]
        assert not missing, (target, missing)
