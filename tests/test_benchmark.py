"""The benchmark stage: the real lm-evaluation-harness on tiny models (base, SFT, SFT + a policy adapter), the
forgetting arithmetic against hand-worked numbers, the local-data form of a named lm-eval task and its errors,
and the per-model cache that a ppo change leaves base and SFT in."""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import lm_eval
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.benchmark_math import Score, compare, forgetting_rate, intervals_separate, knowledge_loss
from rlhf.benchmark_report import build_report, comparison_table, score_table
from rlhf.cli import main
from rlhf.config import BenchmarkConfig, load_config
from rlhf.errors import UserError
from rlhf.lm_harness import SHIPPED_TASKS, evaluate_task, harness_model, prepare_tasks
from rlhf.models import load_causal_lm, load_tokenizer, resolve_model

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOCAL_TASKS = "benchmark.tasks=[{name: rlhf_word_relations, limit: 6}, {name: rlhf_arithmetic, limit: 4}]"


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


def test_report_compares_every_pair_and_prints_undefined_rates():
    def result(value, stderr):
        return {"metrics": {"acc,none": {"value": value, "stderr": stderr}}, "samples": 10, "higher_is_better": {"acc": True}}

    results = {"base": {"t": result(0.0, 0.0)}, "sft": {"t": result(0.2, 0.1)}, "ppo": {"t": result(0.3, 0.1)}}
    report = build_report([{"name": "t"}], results, {}, {"batch_size": 1, "seed": 0})
    entry = report["tasks"]["t"]
    assert set(entry["comparisons"]) == {"base_to_sft", "base_to_ppo", "sft_to_ppo"}
    assert entry["comparisons"]["sft_to_ppo"]["acc,none"]["forgetting_rate"] == pytest.approx(-50.0)
    assert entry["comparisons"]["base_to_sft"]["acc,none"]["forgetting_rate"] is None
    assert entry["sft"]["metrics"]["acc,none"]["ci95"] == pytest.approx([0.2 - 0.196, 0.2 + 0.196])
    assert "| t | acc | 10 | 0.0000 ± 0.0000 | 0.2000 ± 0.1960 | 0.3000 ± 0.1960 |" in score_table(report)
    table = comparison_table(report)
    assert "| t | acc | base → SFT | +0.2000 | undefined (A_base = 0) | -0.2000 ± 0.1960 | **yes** |" in table
    assert "| t | acc | SFT → PPO | +0.1000 | -50.00 % | -0.1000 ± 0.2772 | no |" in table


# --- a fake run: the tiny model as base, a nudged copy as SFT, a random LoRA on it as PPO --------------------


def publish(stage_dir: Path, fingerprint: str) -> None:
    (stage_dir / "manifest.json").write_text(json.dumps({"stage": stage_dir.name, "fingerprint": fingerprint, "parts": {}}))


def write_policy(run: Path, seed: int, fingerprint: str) -> None:
    """A LoRA adapter with random (not zero) B matrices on sft/merged, published as the ppo stage."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(run / "sft" / "merged")
    adapter = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    shutil.rmtree(run / "ppo", ignore_errors=True)
    adapter.save_pretrained(run / "ppo" / "policy")
    publish(run / "ppo", fingerprint)


@pytest.fixture(scope="module")
def fake_upstream(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("benchmark") / "run"
    base = resolve_model("tiny-random-llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(run / "sft" / "merged")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "sft" / "merged")
    publish(run / "sft", "sft-fingerprint")
    write_policy(run, seed=2, fingerprint="ppo-fingerprint-1")
    return run


def count_harness_calls(monkeypatch, logits: dict | None = None) -> list:
    """lm_eval.simple_evaluate, wrapped (not replaced): each call's model class, and the real work done. With
    `logits`, each model class's logits on a fixed input, to tell the models lm-eval was handed apart."""
    calls, real = [], lm_eval.simple_evaluate

    def counted(**kwargs):
        model = kwargs["model"]._model
        calls.append(type(model).__name__)
        if logits is not None:
            with torch.no_grad():
                logits.setdefault(len(logits), model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits)
        return real(**kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", counted)
    return calls


@pytest.fixture(scope="module")
def benchmarked(fake_upstream, tmp_path_factory) -> Path:
    """The benchmark stage on the fake run with the project's two local tasks: a multiple-choice and a
    generate-until task, the real lm-eval on the three tiny models."""
    run = tmp_path_factory.mktemp("benchmarked") / "run"
    shutil.copytree(fake_upstream, run)
    logits = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = count_harness_calls(monkeypatch, logits)
        assert main(["run", SMOKE, f"output_dir={run}", "--only", "benchmark", LOCAL_TASKS, "wandb.mode=offline"]) == 0
    assert calls == ["LlamaForCausalLM"] * 4 + ["PeftModel"] * 2  # base and sft: 2 tasks each; ppo: SFT + adapter
    # Three different models, each the same for its two tasks.
    base, sft, ppo = logits[0], logits[2], logits[4]
    assert torch.equal(base, logits[1]) and torch.equal(sft, logits[3]) and torch.equal(ppo, logits[5])
    assert (base - sft).abs().max() > 1e-3 and (sft - ppo).abs().max() > 1e-3
    return run


def test_local_multiple_choice_and_generation_tasks_run_end_to_end(benchmarked, capsys):
    report = json.loads((benchmarked / "benchmark" / "report.json").read_text())
    assert list(report["tasks"]) == ["rlhf_word_relations", "rlhf_arithmetic"]
    assert report["settings"]["apply_chat_template"] is True and report["settings"]["lm_eval_version"] == lm_eval.__version__
    metrics = {"rlhf_word_relations": "acc,none", "rlhf_arithmetic": "exact_match,last-number"}
    for task, metric in metrics.items():
        entry = report["tasks"][task]
        assert entry["samples"] == {"rlhf_word_relations": 6, "rlhf_arithmetic": 4}[task]  # the limits
        for model in ("base", "sft", "ppo"):
            score = entry[model]["metrics"][metric]
            assert 0 <= score["value"] <= 1 and score["stderr"] is not None
            assert score["ci95"] == pytest.approx([score["value"] - 1.96 * score["stderr"], score["value"] + 1.96 * score["stderr"]])
        base, sft = (Score(entry[m]["metrics"][metric]["value"], entry[m]["metrics"][metric]["stderr"]) for m in ("base", "sft"))
        assert entry["comparisons"]["base_to_sft"][metric] == compare(base, sft).to_dict()
    assert report["models"]["ppo"]["computed"] == list(metrics) and report["models"]["base"]["reused"] == []
    accuracies = [report["tasks"]["rlhf_word_relations"][m]["metrics"]["acc,none"]["value"] for m in ("base", "sft", "ppo")]

    markdown = (benchmarked / "benchmark" / "report.md").read_text()
    assert "| task | metric | items | base | SFT | PPO |" in markdown and "| rlhf_arithmetic | exact_match (last-number) | 4 |" in markdown
    assert "base → SFT" in markdown and "SFT → PPO" in markdown and "(plots/benchmark.png)" in markdown
    assert (benchmarked / "benchmark" / "plots" / "benchmark.png").read_bytes().startswith(PNG_SIGNATURE)
    manifest = json.loads((benchmarked / "benchmark" / "manifest.json").read_text())
    assert manifest["metrics"]["rlhf_word_relations/base"] == accuracies[0]
    assert "rlhf_arithmetic/base_to_ppo/delta_a" in manifest["metrics"]
    assert list((benchmarked / "wandb").rglob("offline-run-*"))  # the summary and chart went to wandb (offline)
    capsys.readouterr()
    assert main(["report", str(benchmarked)]) == 0  # no evaluate stage in this run: the benchmark tables alone
    out = capsys.readouterr().out
    assert "| rlhf_word_relations | acc | 6 |" in out and "| rlhf_arithmetic | exact_match (last-number) | base → PPO |" in out


def test_rerun_after_a_ppo_change_reuses_base_and_sft(benchmarked, tmp_path, monkeypatch, capsys):
    run = Path(shutil.copytree(benchmarked, tmp_path / "run"))
    write_policy(run, seed=3, fingerprint="ppo-fingerprint-2")  # ppo reran with other settings
    calls = count_harness_calls(monkeypatch)
    capsys.readouterr()
    assert main(["run", SMOKE, f"output_dir={run}", "--only", "benchmark", LOCAL_TASKS]) == 0
    assert calls == ["PeftModel", "PeftModel"]  # the PPO model's two tasks; base and SFT came from the cache
    manifest = json.loads((run / "benchmark" / "manifest.json").read_text())
    assert manifest["parts"]["upstream"] == {"sft": "sft-fingerprint", "ppo": "ppo-fingerprint-2"}
    out = capsys.readouterr().out
    assert "benchmark: base (tiny-random-llama): rlhf_word_relations, rlhf_arithmetic from the cache" in out
    report = json.loads((run / "benchmark" / "report.json").read_text())
    before = json.loads((benchmarked / "benchmark" / "report.json").read_text())
    assert report["models"]["base"]["reused"] == report["models"]["sft"]["reused"] == ["rlhf_word_relations", "rlhf_arithmetic"]
    assert report["models"]["ppo"]["computed"] == ["rlhf_word_relations", "rlhf_arithmetic"]
    for task in report["tasks"]:
        assert report["tasks"][task]["base"] == before["tasks"][task]["base"]
    # A changed task setting is another key: every model runs that task again.
    calls.clear()
    assert main(["run", SMOKE, f"output_dir={run}", "--only", "benchmark", "benchmark.tasks=[{name: rlhf_word_relations, limit: 3}]"]) == 0
    assert calls == ["LlamaForCausalLM", "LlamaForCausalLM", "PeftModel"]


def test_no_tasks_publishes_an_empty_report_without_loading_a_model(fake_upstream, tmp_path, monkeypatch):
    run = Path(shutil.copytree(fake_upstream, tmp_path / "run"))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("rlhf.stages.benchmark.load_causal_lm", no_model)
    assert main(["run", SMOKE, f"output_dir={run}", "--only", "benchmark"]) == 0
    report = json.loads((run / "benchmark" / "report.json").read_text())
    assert report["tasks"] == {} and report["models"] == {}
    assert "no model was benchmarked" in (run / "benchmark" / "report.md").read_text()


def test_a_task_that_needs_the_hub_offline_is_one_line_before_any_model_loads(fake_upstream, tmp_path, monkeypatch, capsys):
    run = Path(shutil.copytree(fake_upstream, tmp_path / "run"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("rlhf.stages.benchmark.load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    tasks = "benchmark.tasks=[{name: rlhf_word_relations}, {name: hellaswag, limit: 5}]"
    assert main(["run", SMOKE, f"output_dir={run}", "--only", "benchmark", tasks]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: benchmark.tasks[1] (hellaswag): its data is the hub dataset 'Rowan/hellaswag'")
    assert "HF_HUB_OFFLINE is set" in errors[0]
    assert not (run / "benchmark").exists()


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


def test_quickstart_benchmark_config_is_the_quickstart_plus_its_benchmark_section():
    plain = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    with_benchmark = yaml.safe_load((REPO / "configs" / "quickstart-benchmark.yaml").read_text())
    assert plain.pop("benchmark") == {"tasks": []}
    tasks = with_benchmark.pop("benchmark")["tasks"]
    assert plain == with_benchmark
    assert [t["name"] for t in tasks] == ["rlhf_word_relations", "rlhf_arithmetic"]
    assert load_config(REPO / "configs" / "quickstart-benchmark.yaml").benchmark.tasks[1].name == "rlhf_arithmetic"
