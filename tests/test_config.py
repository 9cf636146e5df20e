"""Config loading: YAML + overrides, unknown keys with suggestions, wrong types, bad files."""

import pytest
import yaml

from rlhf.config import PipelineConfig, load_config, to_yaml
from rlhf.errors import UserError


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_defaults_and_values(tmp_path):
    config = load_config(write(tmp_path, "output_dir: out\nsft:\n  learning_rate: 1.0e-4\n"))
    assert config.output_dir == "out" and config.sft.learning_rate == 1e-4
    assert config.model.name_or_path == "smollm2-135m-instruct" and config.lora.r == 16
    assert config.run_name == "cfg"  # defaults to the file's name


def test_overrides_parse_yaml_values(tmp_path):
    config = load_config(
        write(tmp_path, "sft:\n  batch_size: 2\n"),
        ["sft.batch_size=4", "lora.target_modules=[q_proj, v_proj]", "instructions.expand=false", "sft.learning_rate=3e-5"],
    )
    assert config.sft.batch_size == 4 and config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.instructions.expand is False and config.sft.learning_rate == 3e-5


def test_resolved_config_round_trips(tmp_path):
    config = load_config(write(tmp_path, "lora:\n  r: 4\n"), ["instructions.teacher.kind=openai"])
    again = PipelineConfig.model_validate(yaml.safe_load(to_yaml(config)))
    assert again == config


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("sft:\n  learning_rat: 1\n", [], "cfg.yaml: unknown key 'sft.learning_rat' (did you mean 'sft.learning_rate'?)"),
        ("lorra:\n  r: 1\n", [], "unknown key 'lorra' (did you mean 'lora'?)"),
        ("instructions:\n  teacher:\n    kin: local\n", [], "unknown key 'instructions.teacher.kin' (did you mean 'instructions.teacher.kind'?)"),
        ("seed: 0\n", ["sft.bach_size=3"], "override: unknown key 'sft.bach_size' (did you mean 'sft.batch_size'?)"),
        ("seed: 0\n", ["sft.batch_size.x=3"], "'sft.batch_size' is a value, not a section"),
        ("seed: 0\n", ["sft.batch_size"], "expected key.sub=value"),
        ("sft:\n  batch_size: many\n", [], "key 'sft.batch_size': Input should be a valid integer"),
        ("model:\n  quantization: 3bit\n", [], "key 'model.quantization': Input should be 'none', '8bit' or '4bit'"),
        ("lora:\n  r: 0\n", [], "key 'lora.r': Input should be greater than 0"),
        ("- a\n- b\n", [], "expected a mapping of config sections"),
        ("sft: [1\n", [], "cfg.yaml:2: invalid YAML"),
        ("benchmark:\n  tasks: [{name: gsm8k, limt: 5}]\n", [], "unknown key 'benchmark.tasks.0.limt' (did you mean 'benchmark.tasks.0.limit'?)"),
        ("benchmark:\n  tasks: [{name: gsm8k, limit: 0}]\n", [], "key 'benchmark.tasks.0.limit': Input should be greater than 0"),
        ("benchmark:\n  tasks: [{data_files: a.jsonl}]\n", [], "key 'benchmark.tasks.0.name': Field required"),
        ("benchmark:\n  tasks: [{name: gsm8k}, {name: gsm8k, limit: 3}]\n", [], "key 'benchmark': task 'gsm8k' is listed twice"),
        ("evaluate:\n  lm_eval_tasks: [hellaswag]\n", [],
         "unknown key 'evaluate.lm_eval_tasks': lm-eval runs in the benchmark stage now, set benchmark.tasks"),
        ("seed: 0\n", ["evaluate.lm_eval_limit=5"],
         "override: unknown key 'evaluate.lm_eval_limit': lm-eval runs in the benchmark stage now, set benchmark.tasks[].limit"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(UserError) as error:
        load_config(write(tmp_path, text), overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(UserError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="cfg.yaml:2: expected UTF-8 text, found byte 0xff"):
        load_config(write(tmp_path, b"seed: 1\nrun_name: \xff\xfe\n"))


def test_benchmark_section(tmp_path):
    config = load_config(write(tmp_path, "seed: 0\n"))
    assert config.benchmark.tasks == [] and config.benchmark.include_path is None and config.benchmark.batch_size == 16
    config = load_config(
        write(tmp_path, "benchmark:\n  tasks:\n    - {name: gsm8k, data_files: g.jsonl, limit: 50, num_fewshot: 0}\n    - name: hellaswag\n"),
        ["benchmark.batch_size=4"],
    )
    gsm8k, hellaswag = config.benchmark.tasks
    assert (gsm8k.name, gsm8k.data_files, gsm8k.limit, gsm8k.num_fewshot) == ("gsm8k", "g.jsonl", 50, 0)
    assert (hellaswag.data_files, hellaswag.limit, hellaswag.num_fewshot) == (None, None, None)
    assert config.benchmark.batch_size == 4
