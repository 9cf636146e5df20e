"""kill -9 in the middle of a training stage, then the same command: it resumes from the last complete
checkpoint, ends with the same step count, and never resumes from a torn checkpoint."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.cli import main

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")

# Run the CLI, but SIGKILL the process itself when a Trainer reaches `step` (after the checkpoint at 6).
KILLED_AT_STEP = """
import os, signal, sys
from transformers import Trainer
original = Trainer.training_step
def training_step(self, *args, **kwargs):
    if self.state.global_step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
Trainer.training_step = training_step
from rlhf.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("kill") / "run"
    assert main(["run", SMOKE, f"output_dir={run_dir}", "--only", "instructions,sft,preferences,reward"]) == 0
    return run_dir


@pytest.fixture
def run_dir(upstream, tmp_path) -> Path:
    return Path(shutil.copytree(upstream, tmp_path / "run"))


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_killed_training_stage_resumes_from_last_complete_checkpoint(run_dir, stage, capsys):
    args = ["run", SMOKE, f"output_dir={run_dir}", "--only", stage, f"{stage}.max_steps=10", f"{stage}.save_steps=3",
            f"{stage}.logging_steps=1"]
    published = (run_dir / stage / "manifest.json").read_text()
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_STEP.format(step=7), *args], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (run_dir / stage / "manifest.json").read_text() == published  # the killed attempt published nothing
    checkpoints = run_dir.glob(f".work/{stage}-*/checkpoints")
    checkpoints = next(checkpoints)
    assert all((checkpoints / f"checkpoint-{n}" / "COMPLETE").exists() for n in (3, 6))
    (checkpoints / "checkpoint-9").mkdir()  # as if killed while saving step 9: no COMPLETE marker

    capsys.readouterr()
    assert main(args) == 0  # the same command, resumed in this process
    assert f"{stage}: resuming from {checkpoints / 'checkpoint-6'}" in capsys.readouterr().out
    manifest = json.loads((run_dir / stage / "manifest.json").read_text())
    assert manifest["metrics"]["train_steps"] == 10
    curve = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if "loss" in r] == list(range(1, 11))  # the killed attempt's steps too
    assert not checkpoints.exists()  # scratch removed once published


KILLED_AT_PPO_STEP = """
import os, signal, sys
from rlhf.stages import ppo
original = ppo.ppo_update
def ppo_update(*args, **kwargs):
    if args[-1] == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
ppo.ppo_update = ppo_update
from rlhf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_ppo_resumes_with_the_same_number_of_updates(run_dir):
    args = ["run", SMOKE, f"output_dir={run_dir}", "--only", "ppo", "ppo.steps=5", "ppo.save_every=2"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_PPO_STEP.format(step=4), *args], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (run_dir / "ppo").exists() and (run_dir / "reward" / "manifest.json").exists()
    # The resumed run in a process of its own too: only ppo runs in it, so its live models can be counted.
    resumed = subprocess.run([sys.executable, "-m", "rlhf.cli", *args], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "ppo: resuming after step 2" in resumed.stdout
    curve = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [1, 2, 3, 4, 5]  # the killed attempt's steps 1-2 too, 3-4 once
    # In this process only ppo ran: the live models are the one backbone shared by the four roles.
    assert json.loads((run_dir / "ppo" / "manifest.json").read_text())["metrics"]["resident_backbones"] == 1
