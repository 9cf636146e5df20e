"""SIGTERM (a preempted machine, a cluster's time limit) in a training stage: it finishes the step, saves a
complete checkpoint there, exits with status 143 and one line saying where; the same command resumes.
The signal is sent to this very process, through the CLI's `main`, as a scheduler would send it."""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from transformers import Trainer

from rlhf.cli import main
from rlhf.stages import ppo

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sigterm") / "run"
    assert main(["run", SMOKE, f"output_dir={run_dir}", "--only", "instructions,sft,preferences,reward"]) == 0
    return run_dir


@pytest.fixture
def run_dir(upstream, tmp_path) -> Path:
    return Path(shutil.copytree(upstream, tmp_path / "run"))


def sigterm_myself() -> None:
    # Only where a stage listens for it: otherwise the signal would end the test run itself.
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "SIGTERM is not handled: the stage would be killed"
    os.kill(os.getpid(), signal.SIGTERM)


def last_line(text: str) -> str:
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-1]


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_sigterm_in_a_trainer_stage_checkpoints_that_step_and_resumes(run_dir, stage, monkeypatch, capsys):
    args = ["run", SMOKE, f"output_dir={run_dir}", "--only", stage, f"{stage}.max_steps=8", f"{stage}.save_steps=100",
            f"{stage}.logging_steps=1"]
    original = Trainer.training_step

    def training_step(self, *a, **k):
        if self.state.global_step == 4:  # arrives during step 5
            sigterm_myself()
        return original(self, *a, **k)

    monkeypatch.setattr(Trainer, "training_step", training_step)
    assert main(args) == 143
    checkpoints = next(run_dir.glob(f".work/{stage}-*/checkpoints"))
    assert last_line(capsys.readouterr().err) == (
        f"{stage}: stopped by SIGTERM after step 5; checkpoint saved in {checkpoints / 'checkpoint-5'}; "
        "nothing published: run the same command to resume from it"
    )
    assert (checkpoints / "checkpoint-5" / "COMPLETE").exists()  # saved whole, at the step it was in
    assert json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]["train_steps"] == 4  # the old output stays
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the stage's only

    monkeypatch.undo()
    assert main(args) == 0
    assert f"{stage}: resuming from {checkpoints / 'checkpoint-5'}" in capsys.readouterr().out
    assert json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]["train_steps"] == 8
    curve = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if "loss" in r] == list(range(1, 9))


def test_sigterm_in_ppo_checkpoints_that_step_and_resumes(run_dir, monkeypatch, capsys):
    args = ["run", SMOKE, f"output_dir={run_dir}", "--only", "ppo", "ppo.steps=5", "ppo.save_every=100"]
    original = ppo.ppo_update

    def ppo_update(*a, **k):
        if a[-1] == 2:
            sigterm_myself()
        return original(*a, **k)

    monkeypatch.setattr(ppo, "ppo_update", ppo_update)
    assert main(args) == 143
    checkpoints = next(run_dir.glob(".work/ppo-*/checkpoints"))
    assert last_line(capsys.readouterr().err) == (
        f"ppo: stopped by SIGTERM after step 2; checkpoint saved in {checkpoints / 'step-000002'}; "
        "nothing published: run the same command to resume from it"
    )
    assert (checkpoints / "step-000002" / "COMPLETE").exists()
    assert not (run_dir / "ppo").exists()

    monkeypatch.undo()
    assert main(args) == 0
    assert "ppo: resuming after step 2" in capsys.readouterr().out
    curve = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [1, 2, 3, 4, 5]


def test_a_launched_stage_stopped_by_sigterm_says_so_with_its_status():
    """Under `accelerate launch`, the children print the line and exit 143; the parent passes both on."""
    from rlhf.launch import _failure
    from rlhf.preemption import Preempted

    line = "ppo: stopped by SIGTERM after step 3; checkpoint saved in /r/.work/ppo-x/checkpoints/step-000003; nothing published: ..."
    error = _failure("ppo", 143, f"some output\n{line}\n")
    assert isinstance(error, Preempted) and str(error) == line and error.exit_status == 143


def test_editing_a_bookkeeping_key_after_a_crash_resumes_instead_of_retraining(run_dir, monkeypatch, capsys):
    """ppo.save_every, sample_every and kl_budget change how ppo logs and checkpoints, not what it computes:
    they are not in its fingerprint, so the crashed attempt's work folder is found again."""
    original = ppo.ppo_update

    def crash_at_step_4(*a, **k):
        if a[-1] == 4:
            raise KeyboardInterrupt  # as if killed during step 4
        return original(*a, **k)

    monkeypatch.setattr(ppo, "ppo_update", crash_at_step_4)
    assert main(["run", SMOKE, f"output_dir={run_dir}", "--only", "ppo", "ppo.steps=5", "ppo.save_every=2"]) == 130
    monkeypatch.undo()
    edited = [SMOKE, f"output_dir={run_dir}", "ppo.steps=5", "ppo.save_every=3", "ppo.sample_every=1", "ppo.kl_budget=4"]
    capsys.readouterr()
    assert main(["run", *edited, "--only", "ppo"]) == 0
    assert "ppo: resuming after step 2" in capsys.readouterr().out
    curve = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [1, 2, 3, 4, 5]
    samples = [json.loads(line)["step"] for line in (run_dir / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert sorted(set(samples)) == [2, 3, 4, 5]  # step 2 from the first attempt (every 2), then every step
    # ppo stays up to date whatever the budget; a stage that reads ppo.kl_budget by name (evaluate
    # checks its KL against it) would go stale.
    main(["status", *edited[:-1], "ppo.kl_budget=6"])
    assert "  ppo            up to date" in capsys.readouterr().out
    from rlhf.dag import STAGES

    assert "ppo.kl_budget" in next(s for s in STAGES if s.name == "evaluate").reads
