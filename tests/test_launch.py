"""`launch.num_processes`: a plain `rlhf run` starts the training stages under `accelerate launch`.

The end-to-end run on 2 CPU processes (gloo) is marked slow (~100 s on 2 shared cores); the command line,
the lock hand-over, the accelerate files and the failure messages are checked here without it, apart
from one real child launch that fails."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from rlhf import launch, runner
from rlhf.cli import main
from rlhf.config import load_config
from rlhf.dag import STAGES
from rlhf.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")
ACCELERATE = REPO / "configs" / "accelerate"
STAGE = {stage.name: stage for stage in STAGES}


def test_training_stages_are_launched_and_data_stages_are_not(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv(launch.LAUNCHED_BY, raising=False)
    config = load_config(SMOKE, ["launch.num_processes=2"])
    assert [s.name for s in STAGES if launch.launches(s, config)] == ["sft", "reward", "ppo"]
    assert not any(launch.launches(s, load_config(SMOKE)) for s in STAGES)  # one process: nothing to launch
    monkeypatch.setenv(launch.LAUNCHED_BY, "123@host")  # inside a launched child: never again
    assert not any(launch.launches(s, config) for s in STAGES)


def test_launch_command_lines():
    config = load_config(SMOKE, ["launch.num_processes=2"])
    command = launch.launch_command(STAGE["sft"], config, Path("runs/smoke/config.yaml"))
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert launch.display(command) == (
        "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no "
        "-m rlhf.cli run runs/smoke/config.yaml --only sft"
    )
    ddp = load_config(SMOKE, ["launch.num_processes=4", f"launch.accelerate_config={ACCELERATE / 'ddp.yaml'}"])
    assert launch.display(launch.launch_command(STAGE["ppo"], ddp, Path("c.yaml"))) == (
        f"accelerate launch --config_file {ACCELERATE / 'ddp.yaml'} --num_processes 4 -m rlhf.cli run c.yaml --only ppo"
    )
    # DeepSpeed drives the Trainer stages; ppo (its own data parallelism) takes only the process count
    zero2 = load_config(SMOKE, ["launch.num_processes=4", f"launch.accelerate_config={ACCELERATE / 'deepspeed_zero2.yaml'}"])
    assert "--config_file" in launch.launch_command(STAGE["reward"], zero2, Path("c.yaml"))
    ppo = launch.display(launch.launch_command(STAGE["ppo"], zero2, Path("c.yaml")))
    assert "--config_file" not in ppo and "--multi_gpu --num_processes 4" in ppo


@pytest.mark.parametrize(
    "name, kind, zero_stage",
    [("ddp", "MULTI_GPU", None), ("deepspeed_zero2", "DEEPSPEED", 2), ("deepspeed_zero3", "DEEPSPEED", 3)],
)
def test_accelerate_config_files_load_with_accelerate(name, kind, zero_stage):
    path = ACCELERATE / f"{name}.yaml"
    loaded = load_config_from_file(str(path))  # accelerate's own reader: unknown keys would be a TypeError
    assert loaded.distributed_type == kind and loaded.compute_environment == "LOCAL_MACHINE"
    raw = yaml.safe_load(path.read_text())
    if zero_stage:
        assert raw["deepspeed_config"]["zero_stage"] == zero_stage and loaded.mixed_precision == "bf16"
        # left to DeepSpeed's "auto", i.e. taken from the stage's grad_accum: a fixed value would clash with it
        assert "gradient_accumulation_steps" not in raw["deepspeed_config"]


def test_missing_accelerate_config_is_one_line_and_runs_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", SMOKE, f"output_dir={run_dir}", "launch.accelerate_config=configs/accelerate/nope.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: launch.accelerate_config: configs/accelerate/nope.yaml: file not found"
    assert not (run_dir / "instructions").exists()


def test_multi_gpu_config_needs_two_processes(tmp_path, capsys):
    ddp = ACCELERATE / "ddp.yaml"
    assert main(["run", SMOKE, f"output_dir={tmp_path}", f"launch.accelerate_config={ddp}"]) == 2
    assert "set launch.num_processes to 2 or more" in capsys.readouterr().err


def test_launched_child_works_under_its_parents_lock(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with runner.RunLock(tmp_path):
        monkeypatch.setenv(launch.LAUNCHED_BY, f"{os.getpid()}@{socket.gethostname()}")
        with runner._run_lock(tmp_path):  # the parent's lock: no second lock, no refusal
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        monkeypatch.setenv(launch.LAUNCHED_BY, "1@elsewhere")  # not the holder: refused as any second run
        with pytest.raises(UserError, match="another rlhf run is using this output directory"):
            with runner._run_lock(tmp_path):
                pass
    assert not (tmp_path / ".lock").exists()


def test_failure_messages_name_the_cause():
    elastic_tail = "\n".join(
        [
            "Traceback (most recent call last):",
            '  File "x.py", line 1, in <module>',
            "ValueError: bogus is not a valid SchedulerType",
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
            "rlhf.cli FAILED",
        ]
    )
    error = launch._failure("sft", 1, elastic_tail)
    assert isinstance(error, launch.StageFailed) and error.exit_status == 1
    assert str(error) == "stage sft failed in its launched processes (exit status 1): ValueError: bogus is not a valid SchedulerType"
    user = launch._failure("reward", 1, "error: data/x.jsonl:3: bad row\nerror: data/x.jsonl:3: bad row\n")
    assert type(user) is UserError and str(user) == "reward (launched): data/x.jsonl:3: bad row"
    assert str(launch._failure("ppo", -9, "Killed")).endswith("(exit status -9); their output is above")


def test_a_failing_launched_stage_stops_the_run_with_one_line(tmp_path):
    """A real child launch (2 CPU processes) whose stage fails: the parent stops with the cause in one
    line (exit status 1), publishes nothing and releases the lock."""
    run_dir = tmp_path / "run"
    (run_dir / "instructions").mkdir(parents=True)
    row = {"messages": [{"role": "user", "content": "Give one tip."}, {"role": "assistant", "content": "Rest."}]}
    for split in ("train", "eval"):
        (run_dir / "instructions" / f"{split}.jsonl").write_text((json.dumps(row) + "\n") * 4)
    (run_dir / "instructions" / "manifest.json").write_text(json.dumps({"fingerprint": "planted", "parts": {}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(launch.LAUNCHED_BY, None)
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "run", SMOKE, f"output_dir={run_dir}", "launch.num_processes=2",
         "sft.lr_scheduler=bogus", "--only", "sft"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage sft failed in its launched processes (exit status 1): ValueError: bogus"), last
    assert "[launch] sft: accelerate launch --multi_gpu --num_processes 2" in result.stdout
    assert not (run_dir / "sft").exists() and not (run_dir / ".lock").exists()


@pytest.mark.slow
def test_two_processes_run_every_training_stage_from_a_plain_run(tmp_path):
    """`rlhf run` with launch.num_processes=2: data stages in the parent, sft/reward/ppo under
    `accelerate launch` on 2 CPU processes (gloo), each published once, by rank 0."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(launch.LAUNCHED_BY, None)
    command = [sys.executable, "-m", "rlhf.cli", "run", SMOKE, f"output_dir={run_dir}", "launch.num_processes=2"]
    stages = "instructions,sft,preferences,reward,ppo"
    result = subprocess.run([*command, "--only", stages], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("[launch]")] == [
        "[launch] sft", "[launch] reward", "[launch] ppo"
    ]
    for stage in ("sft", "reward", "ppo"):
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["metrics"]["processes"] == 2, stage
    assert json.loads((run_dir / "ppo" / "manifest.json").read_text())["metrics"]["ranks_agree"] is True
    assert not list((run_dir / ".tmp").iterdir()) and not (run_dir / ".lock").exists()
    assert not list(run_dir.rglob("*.bin"))  # Trainer.save_model's pickled arguments are not published
    # The parent sees what the children published: nothing left to run.
    status = subprocess.run([*command[:3], "status", *command[4:]], capture_output=True, text=True, env=env)
    assert all("up to date" in line for line in status.stdout.splitlines()[1:6]), status.stdout
    # The accelerate config file path: ppo again, through configs/accelerate/ddp.yaml (torchrun on CPUs too).
    shutil.rmtree(run_dir / "ppo")
    ddp = [f"launch.accelerate_config={ACCELERATE / 'ddp.yaml'}", "--only", "ppo"]
    result = subprocess.run([*command, *ddp], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "ppo" / "manifest.json").read_text())["metrics"]["processes"] == 2
