"""SIGTERM (a preempted machine, a cluster's time limit) in a training stage: it finishes the step, saves a
complete checkpoint there, exits with status 143 and one line saying where; the same command resumes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")

# The CLI, with SIGTERM sent to itself in the middle of a training step (`step` is the Trainer's count of
# finished steps when it arrives, so it arrives during step + 1).
TERMINATED_IN_TRAINER = """
import os, signal, sys
from transformers import Trainer
original = Trainer.training_step
def training_step(self, *args, **kwargs):
    if self.state.global_step == {step} and not os.environ.get("SENT"):
        os.environ["SENT"] = "1"
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, *args, **kwargs)
Trainer.training_step = training_step
from rlhf.cli import main
sys.exit(main(sys.argv[1:]))
"""

TERMINATED_IN_PPO = """
import os, signal, sys
from rlhf.stages import ppo
original = ppo.ppo_update
def ppo_update(*args, **kwargs):
    if args[-1] == {step}:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)
ppo.ppo_update = ppo_update
from rlhf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def last_line(text: str) -> str:
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-1]


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_sigterm_in_a_trainer_stage_checkpoints_that_step_and_resumes(tmp_path, stage):
    run_dir = tmp_path / "run"
    upto = "instructions,sft" if stage == "sft" else "instructions,sft,preferences,reward"
    args = ["run", SMOKE, f"output_dir={run_dir}", "--only", upto,
            f"{stage}.max_steps=8", f"{stage}.save_steps=100", f"{stage}.logging_steps=1"]
    stopped = subprocess.run([sys.executable, "-c", TERMINATED_IN_TRAINER.format(step=4), *args], capture_output=True, text=True)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    checkpoints = next(run_dir.glob(f".work/{stage}-*/checkpoints"))
    assert last_line(stopped.stderr) == (
        f"{stage}: stopped by SIGTERM after step 5; checkpoint saved in {checkpoints / 'checkpoint-5'}; "
        "nothing published: run the same command to resume from it"
    )
    assert (checkpoints / "checkpoint-5" / "COMPLETE").exists()  # saved whole, at the step it was in
    assert not (run_dir / stage).exists()

    resumed = subprocess.run([sys.executable, "-m", "rlhf.cli", *args], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{stage}: resuming from {checkpoints / 'checkpoint-5'}" in resumed.stdout
    assert json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]["train_steps"] == 8
    curve = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if "loss" in r] == list(range(1, 9))


def test_sigterm_in_ppo_checkpoints_that_step_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", SMOKE, f"output_dir={run_dir}", "--only", "instructions,sft,preferences,reward,ppo", "ppo.steps=5",
            "ppo.save_every=100"]
    stopped = subprocess.run([sys.executable, "-c", TERMINATED_IN_PPO.format(step=2), *args], capture_output=True, text=True)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    checkpoints = next(run_dir.glob(".work/ppo-*/checkpoints"))
    assert last_line(stopped.stderr) == (
        f"ppo: stopped by SIGTERM after step 2; checkpoint saved in {checkpoints / 'step-000002'}; "
        "nothing published: run the same command to resume from it"
    )
    assert (checkpoints / "step-000002" / "COMPLETE").exists()
    assert not (run_dir / "ppo").exists() and (run_dir / "reward" / "manifest.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "rlhf.cli", *args], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "ppo: resuming after step 2" in resumed.stdout
    curve = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [1, 2, 3, 4, 5]


def test_editing_a_bookkeeping_key_after_a_kill_resumes_instead_of_retraining(tmp_path):
    """ppo.save_every, sample_every and kl_budget change how ppo logs and checkpoints, not what it computes:
    they are not in its fingerprint, so the killed attempt's work folder is found again."""
    from test_kill_resume import KILLED_AT_PPO_STEP

    run_dir = tmp_path / "run"
    args = ["run", SMOKE, f"output_dir={run_dir}", "ppo.steps=5", "ppo.save_every=2"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_PPO_STEP.format(step=4), *args], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    edited = ["run", SMOKE, f"output_dir={run_dir}", "ppo.steps=5", "ppo.save_every=3", "ppo.sample_every=1", "ppo.kl_budget=4"]
    resumed = subprocess.run([sys.executable, "-m", "rlhf.cli", *edited], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "ppo: resuming after step 2" in resumed.stdout
    curve = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [1, 2, 3, 4, 5]
    samples = [json.loads(line)["step"] for line in (run_dir / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert sorted(set(samples)) == [2, 3, 4, 5]  # step 2 from the first attempt (every 2), then every step
    # A stage that reads ppo.kl_budget by name (evaluate checks its KL against it) goes stale; ppo does not.
    status = subprocess.run([sys.executable, "-m", "rlhf.cli", "status", *edited[1:-1], "ppo.kl_budget=6"],
                            capture_output=True, text=True).stdout
    assert "  ppo            up to date" in status
    assert "  evaluate       stale (config ppo.kl_budget: 4.0 -> 6.0)" in status
