"""The benchmark stage: the real lm-evaluation-harness on tiny models (base, SFT, SFT + a policy adapter), the
forgetting arithmetic against hand-worked numbers, the local-data form of a named lm-eval task and its errors,
and the per-model cache that a ppo change leaves base and SFT in."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

from rlhf.benchmark_math import Score, compare, forgetting_rate, intervals_separate, knowledge_loss
from rlhf.config import BenchmarkConfig, load_config
from rlhf.errors import UserError
from rlhf.lm_harness import SHIPPED_TASKS, evaluate_task, harness_model, prepare_tasks
from rlhf.models import load_causal_lm, load_tokenizer, resolve_model

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")


# --- the arithmetic, worked by hand ------------------------------------------------------------------------


def test_intervals_and_forgetting_measures_by_hand():
    base, tuned = Score(0.50, 0.05), Score(0.40, 0.04)
    assert base.half_width == pytest.approx(0.098) and base.interval == pytest.approx((0.402, 0.598))
    c = compare(base, tuned)
    assert c.delta_a == pytest.approx(-0.10)
    assert c.forgetting_rate == pytest.approx(20.0) and c.forgetting_rate_note is None  # (1 - 0.4 / 0.5) × 100
    assert c.knowledge_loss == pytest.approx(0.10)
    assert c.knowledge_loss_pm == pytest.approx(math.sqrt(0.098**2 + 0.0784**2))  # 0.12550
    assert c.knowledge_loss_pm == pytest.approx(0.125501, abs=1e-6)
    assert c.intervals_separate is False  # [0.402, 0.598] and [0.3216, 0.4784] overlap

    # Intervals that clear each other: [0.7608, 0.8392] and [0.4412, 0.5588].
    assert intervals_separate(Score(0.8, 0.02), Score(0.5, 0.03)) is True
    assert knowledge_loss(Score(0.8, 0.02), Score(0.5, 0.03)) == pytest.approx((0.3, 0.0706688), abs=1e-6)
    # The reference material's GSM8K figures: 33.51 % -> 3.71 % is a forgetting rate of 88.93 %.
    assert forgetting_rate(Score(0.3351, None), Score(0.0371, None))[0] == pytest.approx(88.928, abs=1e-3)


def test_a_base_of_zero_gives_no_forgetting_rate_and_no_crash():
    c = compare(Score(0.0, 0.0), Score(0.1, 0.03))
    assert c.forgetting_rate is None and "A_base is 0" in c.forgetting_rate_note
    assert c.delta_a == pytest.approx(0.1)
    assert (c.knowledge_loss, c.knowledge_loss_pm) == pytest.approx((-0.1, 0.0588))
    assert c.intervals_separate is True  # [0, 0] against [0.0412, 0.1588]
    no_error = compare(Score(0.3, None), Score(0.2, 0.01))  # lm-eval gave no stderr for one of them
    assert no_error.knowledge_loss_pm is None and no_error.intervals_separate is None
    assert no_error.forgetting_rate == pytest.approx(100 / 3)


# --- a named lm-eval task on local data ---------------------------------------------------------------------


GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?", "answer": "3 + 2 = 5\n#### 5"},
    {"question": "A box holds 4 pens. How many pens are in 3 boxes?", "answer": "4 * 3 = 12\n#### 12"},
    {"question": "Sara had 10 sweets and ate 4. How many are left?", "answer": "10 - 4 = 6\n#### 6"},
]


def jsonl(path: Path, rows: list, raw_lines: dict | None = None) -> Path:
    lines = [json.dumps(row) for row in rows]
    for index, text in (raw_lines or {}).items():
        lines[index] = text
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare(tasks: list[dict], **settings):
    return prepare_tasks(BenchmarkConfig.model_validate({"tasks": tasks, **settings}))


def error_of(tasks: list[dict], **settings) -> str:
    with pytest.raises(UserError) as caught:
        prepare(tasks, **settings)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_gsm8k_runs_its_own_prompt_and_metric_on_a_local_file(tmp_path):
    data = jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    manager, [task] = prepare([{"name": "gsm8k", "data_files": str(data), "limit": 2, "num_fewshot": 1}])
    assert task.fields == ("question", "answer") and task.data_file == data
    assert task.spec["doc_to_text"] == "Question: {{question}}\nAnswer:"  # gsm8k's own YAML, from lm-eval
    assert task.spec["dataset_path"] == "json" and task.spec["dataset_name"] is None
    assert task.spec["dataset_kwargs"] == {"data_files": {"test": str(data), "train": str(data)}}
    path = resolve_model("tiny-random-llama")
    model = load_causal_lm(path, load_config(SMOKE).model)
    result = evaluate_task(harness_model(model, load_tokenizer(path), batch_size=2), manager, task, seed=0)
    assert set(result.metrics) == {"exact_match,strict-match", "exact_match,flexible-extract"} and result.samples == 2
    assert all(m["stderr"] is not None for m in result.metrics.values())


def test_local_data_in_parquet_reads_the_same_fields(tmp_path):
    import datasets

    data = tmp_path / "gsm8k.parquet"
    datasets.Dataset.from_list(GSM8K_ROWS).to_parquet(str(data))
    _, [task] = prepare([{"name": "gsm8k", "data_files": str(data)}])
    assert task.spec["dataset_path"] == "parquet" and task.fields == ("question", "answer")


def test_local_data_errors_name_the_file_the_row_or_the_task(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert error_of([{"name": "gsm8k", "data_files": str(missing)}]) == (
        f"benchmark.tasks[0] (gsm8k): data file '{missing}' not found"
    )
    no_answer = jsonl(tmp_path / "a.jsonl", [GSM8K_ROWS[0], GSM8K_ROWS[1], {"question": "What is 2 + 2?"}])
    assert error_of([{"name": "gsm8k", "data_files": str(no_answer)}]) == (
        f"{no_answer}:3: row has no field 'answer' (task gsm8k reads question, answer)"
    )
    broken = jsonl(tmp_path / "b.jsonl", GSM8K_ROWS, {1: '{"question": "Half a row", '})
    assert error_of([{"name": "gsm8k", "data_files": str(broken)}]).startswith(f"{broken}:2: expected one JSON object per line")
    none_has_it = jsonl(tmp_path / "c.jsonl", [{"question": "Q?"}, {"question": "R?"}])
    assert error_of([{"name": "gsm8k", "data_files": str(none_has_it)}]).startswith(f"{none_has_it}:1: ")
    assert "'answer'" in error_of([{"name": "gsm8k", "data_files": str(none_has_it)}])
    assert error_of([{"name": "gsm8kk"}]) == "benchmark.tasks[0] (gsm8kk): no lm-eval task is named 'gsm8kk' (did you mean 'gsm8k'?)"
    assert error_of([{"name": "rlhf_arithmetic"}], include_path=str(tmp_path / "none")).startswith(
        f"benchmark.include_path: '{tmp_path / 'none'}' is not a folder"
    )


def test_a_task_folder_goes_in_as_include_path(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    spec = yaml.safe_load((SHIPPED_TASKS / "rlhf_arithmetic.yaml").read_text())
    data = jsonl(tmp_path / "sums.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "What is 2 + 3?", "answer": "5"}])
    spec |= {"task": "my_sums", "dataset_kwargs": {"data_files": {"test": str(data)}}}
    (folder / "my_sums.yaml").write_text(yaml.safe_dump(spec))
    _, [task] = prepare([{"name": "my_sums"}], include_path=str(folder))
    assert task.spec == "my_sums" and task.data_file is None  # its own YAML names its data
    _, [again] = prepare([{"name": "my_sums", "data_files": str(data)}], include_path=str(folder))
    assert again.fields == ("question", "answer")


# --- shipped files --------------------------------------------------------------------------------------------


def test_shipped_local_tasks_are_what_their_script_writes():
    spec = importlib.util.spec_from_file_location("build", REPO / "data_builders" / "benchmarks" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for name, text in build.build().items():
        assert (SHIPPED_TASKS / name).read_text() == text, f"{name}: rerun data_builders/benchmarks/build.py"
    relations = [json.loads(line) for line in (SHIPPED_TASKS / "rlhf_word_relations.jsonl").read_text().splitlines()]
    sums = [json.loads(line) for line in (SHIPPED_TASKS / "rlhf_arithmetic.jsonl").read_text().splitlines()]
    assert len(relations) >= 100 and len(sums) >= 100
    assert all(len(set(r["choices"])) == 4 and 0 <= r["label"] < 4 for r in relations)
    assert len({r["question"] + str(r["choices"]) for r in relations}) == len(relations)
    operations = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "times": lambda a, b: a * b}
    for row in sums:
        a, operation, b = row["question"].removeprefix("What is ").rstrip("?").split()
        assert str(operations[operation](int(a), int(b))) == row["answer"]
