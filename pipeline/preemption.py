"""SIGTERM in a training stage (a preempted cloud machine, a cluster's time limit): finish the step,
save a complete checkpoint, exit with one line saying where. The same command resumes there.

`StopOnSigterm` catches the signal and remembers it; the stage asks `requested()` at each step boundary
(all processes agree: one stopping alone would leave the others waiting), saves, and raises `Preempted`,
which the CLI prints as its last line and turns into exit status 143 (128 + SIGTERM, what a killed
process reports)."""

from __future__ import annotations

import signal

from rlhf.errors import UserError

EXIT_STATUS = 128 + signal.SIGTERM


class Preempted(UserError):
    """A training stage stopped on SIGTERM after saving a checkpoint; nothing was published."""

    exit_status = EXIT_STATUS


class StopOnSigterm:
    """A context: SIGTERM sets a flag instead of killing the process; the previous handler comes back after."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self) -> StopOnSigterm:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def requested(self) -> bool:
        """Whether any process got SIGTERM (an all-reduce when there are several)."""
        import torch  # here: the runner imports this module, and `rlhf status` never needs torch

        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.received
        flag = torch.tensor([float(self.received)], device=_collective_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def _collective_device():
    import torch

    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def preempted(stage: str, step: int, checkpoint) -> Preempted:
    return Preempted(
        f"{stage}: stopped by SIGTERM after step {step}; checkpoint saved in {checkpoint}; "
        "nothing published: run the same command to resume from it"
    )
