"""API keys come from environment variables and never reach a file the pipeline writes."""

from pathlib import Path

from fake_openai_server import ReceivedRequest, fake_openai_server
from test_instructions_stage import scripted_teacher

from rlhf.cli import main

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")
KEY = "sk-planted-secret-7f3a9c1e5b"


def test_planted_api_key_is_used_but_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_TEST_TEACHER_KEY", KEY)
    run_dir = tmp_path / "run"
    received: list[ReceivedRequest] = []
    with fake_openai_server(scripted_teacher(["Describe the water cycle in two sentences."]), received) as base_url:
        code = main(
            [
                "run",
                SMOKE,
                f"output_dir={run_dir}",
                "--only",
                "instructions,sft",
                "wandb.mode=offline",  # the wandb config and logs are grepped too
                "instructions.teacher.kind=openai",
                f"instructions.teacher.base_url={base_url}",
                "instructions.teacher.model=teacher",
                "instructions.teacher.api_key_env=RLHF_TEST_TEACHER_KEY",
            ]
        )
    assert code == 0
    assert received and all(r.headers["Authorization"] == f"Bearer {KEY}" for r in received)
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"manifest.json", "metrics.jsonl"} <= {p.name for p in written}
    assert list((run_dir / "wandb").rglob("*.wandb"))
    leaks = [p for p in written if KEY.encode() in p.read_bytes()]
    assert leaks == []
    assert "RLHF_TEST_TEACHER_KEY" in (run_dir / "config.yaml").read_text()  # the variable's name, not its value
