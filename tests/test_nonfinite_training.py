"""A NaN or inf in sft or reward training: the stage stops at that step with one line naming it, keeps
the last good checkpoint, publishes nothing; the same command, once the fault is gone, resumes there.
(ppo's counterpart is in test_ppo.py.)"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from trl import RewardTrainer

from rlhf.cli import main
from rlhf.stages.sft import SFTTrainerOnCPU

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")
TRAINER = {"sft": SFTTrainerOnCPU, "reward": RewardTrainer}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """instructions (the shipped seeds, no teacher), sft, and imported preference pairs."""
    run_dir = tmp_path_factory.mktemp("nonfinite") / "run"
    pairs = run_dir.parent / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": f"Question {i}?", "chosen": f"Thank you, answer {i}.", "rejected": "no"}) + "\n" for i in range(24)
    ))
    overrides = ["instructions.expand=false", "preferences.source=import", f"preferences.path={pairs}"]
    assert main(["run", SMOKE, f"output_dir={run_dir}", "--only", "instructions,sft,preferences", *overrides]) == 0
    return run_dir


@pytest.fixture
def run_dir(upstream, tmp_path) -> Path:
    return Path(shutil.copytree(upstream, tmp_path / "run"))


class InfiniteGradient(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: a finite loss whose gradient blows up."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def inject(monkeypatch, stage: str, fault: str, at_step: int) -> None:
    """Poison the loss (or its gradient) of one training step of `stage`'s trainer."""
    trainer_class = TRAINER[stage]
    original = trainer_class.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.state.global_step + 1 != at_step:
            return result
        loss, *outputs = result if return_outputs else (result,)
        loss = loss * float("nan") if fault == "loss" else InfiniteGradient.apply(loss)
        return (loss, *outputs) if return_outputs else loss

    monkeypatch.setattr(trainer_class, "compute_loss", compute_loss)


@pytest.mark.parametrize("stage, fault, step", [("sft", "loss", 5), ("reward", "loss", 5), ("sft", "gradient", 3)])
def test_non_finite_step_stops_keeps_last_checkpoint_and_resumes(run_dir, monkeypatch, capsys, stage, fault, step):
    """The fault is at the last step (`step`); checkpoints every 2 steps."""
    args = ["run", SMOKE, f"output_dir={run_dir}", "--only", stage,
            f"{stage}.max_steps={step}", f"{stage}.save_steps=2", f"{stage}.logging_steps=1"]
    before = (run_dir / stage / "manifest.json").read_text() if (run_dir / stage).exists() else None
    inject(monkeypatch, stage, fault, at_step=step)
    kept = [f"checkpoint-{n}" for n in range(2, step, 2)]

    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    errors = re.findall(r"error: [^\r\n]*", err)  # (after a progress bar, on its line)
    what = "loss (nan)" if fault == "loss" else "gradient norm ("
    assert len(errors) == 1 and f"error: {stage} step {step}: non-finite {what}" in errors[0], err
    assert f"The last good checkpoint ({kept[-1]}) is kept and nothing is published" in errors[0]
    # Nothing published: the stage's earlier output (if any) is untouched; the good checkpoints are kept.
    assert ((run_dir / stage / "manifest.json").read_text() if (run_dir / stage).exists() else None) == before
    checkpoints = next(run_dir.glob(f".work/{stage}-*/checkpoints"))
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == kept
    assert all((checkpoints / name / "COMPLETE").exists() for name in kept)
    if fault == "gradient":
        return  # the resume is the same as after a NaN loss

    monkeypatch.undo()  # the fault is gone: the same command resumes from the last good checkpoint
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{stage}: resuming from {checkpoints / kept[-1]}" in out
    assert json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]["train_steps"] == step
    curve = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if "loss" in r] == list(range(1, step + 1))  # the first attempt's steps too
    assert all(r["loss"] == r["loss"] for r in curve if "loss" in r)  # no NaN reached the curve
