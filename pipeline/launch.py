"""Running a training stage in several processes from a plain `rlhf run`.

With `launch.num_processes` > 1 (or `launch.accelerate_config` set), the runner starts each training
stage (sft, reward, ppo) as a child

    accelerate launch [--config_file F] --num_processes N -m rlhf.cli run <run_dir>/config.yaml --only STAGE

and waits for it; the data stages (instructions, preferences) run once, in the `rlhf run` process.
The child reads the resolved config that the parent wrote, so it computes the same fingerprint; its
rank 0 publishes the stage as usual and the parent checks that the published manifest carries that
fingerprint. The parent keeps the run lock for the whole run: the child's rank 0 finds the lock held by
the process named in RLHF_LAUNCHED_BY (its parent) and works under it instead of refusing to start.
"""

from __future__ import annotations

import collections
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from rlhf.config import PipelineConfig
from rlhf.errors import UserError
from rlhf.preemption import Preempted, StopOnSigterm

LAUNCHED_BY = "RLHF_LAUNCHED_BY"
"""Set in a launched child's environment to "<pid>@<host>" of the `rlhf run` that holds the run lock."""

SHARDING_TYPES = {"DEEPSPEED", "FSDP"}
"""accelerate `distributed_type`s that shard the model or optimizer. The ppo stage cannot run under them
(it calls the backbone with different adapters switched on, never through one prepared model), so it
takes only the process count from such a config."""


class StageFailed(UserError):
    """A stage failed in its launched processes. Their output, shown above it, has the details; the
    CLI prints this one line and exits with status 1 (not 2: the cause need not be the user's input)."""

    exit_status = 1


def is_launched_child() -> bool:
    """True inside processes that a parent `rlhf run` launched (they must not relaunch themselves)."""
    return LAUNCHED_BY in os.environ


def launches(stage, config: PipelineConfig) -> bool:
    """Whether the runner starts `stage` in child processes instead of running it in this one."""
    wanted = config.launch.num_processes > 1 or config.launch.accelerate_config is not None
    # Under a launcher already (our own child, or a user's torchrun): the processes exist, run the stage.
    inside = is_launched_child() or "WORLD_SIZE" in os.environ
    return stage.launch is not None and wanted and not inside


def read_accelerate_config(path: str) -> dict:
    """The accelerate config file as a mapping; a missing or malformed file is a one-line error."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"launch.accelerate_config: {path}: file not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"launch.accelerate_config: {path}: not a YAML file ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or "distributed_type" not in data:
        raise UserError(f"launch.accelerate_config: {path}: not an accelerate config (no distributed_type)")
    return data


def check(config: PipelineConfig) -> None:
    """Fail before anything runs when the launch settings cannot work."""
    path = config.launch.accelerate_config
    if path is None:
        return
    kind = str(read_accelerate_config(path)["distributed_type"]).upper()
    if kind == "MULTI_GPU" and config.launch.num_processes < 2:
        raise UserError(
            f"launch.accelerate_config: {path} is a multi-GPU config: set launch.num_processes to 2 or more"
        )


def launch_command(stage, config: PipelineConfig, config_file: Path) -> list[str]:
    """The child command line for `stage` (argv; `accelerate launch` run with this Python)."""
    processes = config.launch.num_processes
    accelerate_config = config.launch.accelerate_config
    if accelerate_config and stage.launch == "data-parallel":
        if str(read_accelerate_config(accelerate_config)["distributed_type"]).upper() in SHARDING_TYPES:
            accelerate_config = None
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        # --num_processes overrides the file's: launch.num_processes is the one setting of the count.
        command += ["--config_file", accelerate_config, "--num_processes", str(processes)]
    else:
        # --multi_gpu selects accelerate's torch.distributed launcher (torchrun's agent), which starts N
        # processes on GPUs and, on a machine without one, N CPU processes talking over gloo. `--cpu`
        # would select the single-process launcher, which needs `mpirun` for several CPU processes.
        # Precision is model.dtype's, so accelerate adds no mixed precision on top.
        command += ["--multi_gpu"] if processes > 1 else []
        command += ["--num_processes", str(processes), "--num_machines", "1"]
        command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return command + ["-m", "rlhf.cli", "run", str(config_file), "--only", stage.name]


def display(command: list[str]) -> str:
    """The command as a user would type it."""
    shown = ["accelerate", "launch", *command[3:]] if command[1:3] == ["-m", "accelerate.commands.launch"] else command
    return shlex.join(shown)


def run_launched(stage, command: list[str], echo) -> None:
    """Run the child command; stderr is shown as it comes and its tail kept, to name the failure."""
    echo(f"[launch] {stage.name}: {display(command)}")
    _free_accelerator_memory()
    env = {**os.environ, LAUNCHED_BY: f"{os.getpid()}@{socket.gethostname()}"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    tail: collections.deque[bytes] = collections.deque(maxlen=256)  # last chunks of stderr
    try:
        with StopOnSigterm():  # a SIGTERM reaches the children too: wait for them to save and stop
            while chunk := process.stderr.read1(1 << 16):
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
                tail.append(chunk)
            status = process.wait()
    except BaseException:  # Ctrl-C reaches the children too; do not leave them behind
        process.terminate()
        process.wait(timeout=60)
        raise
    if status != 0:
        raise _failure(stage.name, status, b"".join(tail).decode(errors="replace"))


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): ?(.*)$")


def _failure(stage: str, status: int, stderr: str) -> UserError:
    """The one-line error for a failed child, from the last error its processes printed."""
    lines = [line.strip() for line in stderr.splitlines()]
    stopped = [line for line in lines if ": stopped by SIGTERM after step " in line]
    if stopped:  # a preempted child saved its checkpoint: say where, with the same exit status
        return Preempted(stopped[-1])
    user_errors = [line[len("error: ") :] for line in lines if line.startswith("error: ")]
    if user_errors:  # our CLI's one-line message for a user error in the child: pass it on as such
        return UserError(f"{stage} (launched): {user_errors[-1]}")
    exceptions = [line for line in lines if _EXCEPTION_LINE.match(line) and "ChildFailedError" not in line]
    cause = f": {_shorten(exceptions[-1])}" if exceptions else "; their output is above"
    return StageFailed(f"stage {stage} failed in its launched processes (exit status {status}){cause}")


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _free_accelerator_memory() -> None:
    """Give cached GPU memory back before the children start (an earlier data stage may have used
    some in this process; the children need the whole GPU)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()
