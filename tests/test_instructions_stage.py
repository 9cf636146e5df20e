"""The instructions stage end to end through the runner, with a scripted teacher on a real HTTP server."""

import json
from pathlib import Path

import pytest
from fake_openai_server import fake_openai_server

from rlhf.config import PipelineConfig
from rlhf.dag import STAGES
from rlhf.data_builders.self_instruct import NEW_TASK_PROMPT, parse_instruction
from rlhf.errors import UserError
from rlhf.runner import decide, run_pipeline

INSTRUCTIONS_STAGE = STAGES[:1]
SEEDS = [
    {"instruction": "Name three primary colours.", "output": "Red, yellow and blue."},
    {"instruction": "Rewrite the sentence in the passive voice.", "input": "The cat ate the fish.", "output": "The fish was eaten by the cat."},
    {"instruction": "Give one tip for sleeping better.", "output": "Keep a regular bedtime, even at weekends."},
    {"instruction": "What is the capital of Japan?", "output": "Tokyo is the capital of Japan."},
]


def write_seeds(tmp_path: Path, rows=SEEDS) -> Path:
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scripted_teacher(candidates: list[str]):
    """Answers 'new instruction' prompts from `candidates` in turn, and any other prompt with an answer."""
    queue = list(candidates)

    def answer(request: dict) -> str:
        prompt = request["messages"][-1]["content"]
        if prompt.startswith(NEW_TASK_PROMPT.split("{")[0]):
            return queue.pop(0) if queue else "Name three primary colours."
        return f"Here is a complete answer to: {prompt.splitlines()[0]}."

    return answer


def config_for(tmp_path: Path, base_url: str, **instructions) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "output_dir": str(tmp_path / "run"),
            "wandb": {"mode": "disabled"},
            "instructions": {
                "seeds": str(write_seeds(tmp_path)),
                "num_eval": 2,
                "examples_per_prompt": 2,
                "teacher": {"kind": "openai", "base_url": base_url, "model": "teacher", "max_retries": 0},
                **instructions,
            },
        }
    )


def run_stage(config: PipelineConfig) -> Path:
    run_pipeline(INSTRUCTIONS_STAGE, config, decide(INSTRUCTIONS_STAGE, config), echo=lambda line: None)
    return Path(config.output_dir) / "instructions"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_expansion_filters_candidates_and_writes_splits(tmp_path):
    candidates = [
        "1. Explain why the sky looks blue during the day.",  # kept (numbering stripped)
        "Draw a picture of a cat.",  # unsupported_task
        "What is the capital of Japan?",  # duplicate of a seed
        "Hi",  # too_short
        "Instruction: Suggest two healthy breakfast ideas for busy mornings.",  # kept
    ]
    with fake_openai_server(scripted_teacher(candidates)) as base_url:
        out = run_stage(config_for(tmp_path, base_url, num_instructions=6, max_rounds=3))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["seeds"] == 4 and stats["kept"] == 2
    # round 2 asks for 2 and the script has 1 left: the fallback answer is a duplicate too
    assert stats["dropped"] == {"unsupported_task": 1, "duplicate": 2, "too_short": 1}
    rows = read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")
    assert (len(read_jsonl(out / "train.jsonl")), len(read_jsonl(out / "eval.jsonl"))) == (4, 2)
    prompts = {r["messages"][0]["content"] for r in rows}
    assert "Explain why the sky looks blue during the day." in prompts
    assert "Rewrite the sentence in the passive voice.\n\nThe cat ate the fish." in prompts
    generated = [r for r in rows if r["source"] == "generated"]
    assert [m["role"] for m in generated[0]["messages"]] == ["user", "assistant"]
    assert generated[0]["messages"][1]["content"].startswith("Here is a complete answer")


def test_passthrough_needs_no_teacher(tmp_path):
    config = config_for(tmp_path, "http://127.0.0.1:9/v1", expand=False, num_instructions=100)
    out = run_stage(config)  # the teacher URL is dead: any call would fail
    assert len(read_jsonl(out / "train.jsonl")) == 2 and len(read_jsonl(out / "eval.jsonl")) == 2


def test_seeds_without_outputs_are_answered_by_the_teacher(tmp_path):
    config = config_for(tmp_path, "", expand=False)
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("List two uses of vinegar.\nExplain what a prime number is.\nName a large ocean.\n")
    config.instructions.seeds = str(seeds)
    config.instructions.num_eval = 1
    with fake_openai_server(scripted_teacher([])) as base_url:
        config.instructions.teacher.base_url = base_url
        out = run_stage(config)
    answers = [r["messages"][1]["content"] for r in read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")]
    assert sorted(answers)[0].startswith("Here is a complete answer to:") and len(answers) == 3


def test_too_few_instructions_for_eval_is_a_clear_error(tmp_path):
    config = config_for(tmp_path, "", expand=False, num_eval=4)
    with pytest.raises(UserError, match="only 4 instructions, need more than instructions.num_eval=4"):
        run_stage(config)
    assert not (Path(config.output_dir) / "instructions").exists()


def test_unreachable_teacher_fails_without_publishing(tmp_path):
    config = config_for(tmp_path, "http://127.0.0.1:9/v1", num_instructions=10)
    with pytest.raises(UserError, match="teacher endpoint http://127.0.0.1:9/v1 unreachable"):
        run_stage(config)
    assert not (Path(config.output_dir) / "instructions").exists()


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("5. Describe a sunset.", "Describe a sunset."),
        ('New instruction: "Plan a picnic."\nMore text', "Plan a picnic."),
        ("\n\n- Summarise the news.", "Summarise the news."),
        ("Task 3: Count to ten.", "Count to ten."),
        ("", ""),
    ],
)
def test_parse_instruction(reply, expected):
    assert parse_instruction(reply) == expected
