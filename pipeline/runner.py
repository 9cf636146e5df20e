"""The DAG runner: decide which stages are stale, run them in order, publish their outputs atomically.

A stage is up to date when its published `manifest.json` carries the fingerprint it would have now
(rlhf.fingerprint: its code, the config keys it reads, its input files, its upstream fingerprints).

Publishing: a stage writes into `<output_dir>/.tmp/<stage>.<pid>/`; when it returns, the runner
writes `manifest.json` there last and renames the directory to `<output_dir>/<stage>/`. A stage that
fails publishes nothing and leaves every earlier output as it was.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhf import launch
from rlhf.config import PipelineConfig, to_yaml
from rlhf.errors import UserError
from rlhf.fingerprint import fingerprint, stage_parts
from rlhf.preemption import StopOnSigterm

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Stage:
    """A stage declared as data. `module` defines `run(ctx: StageContext) -> dict` (metrics)."""

    name: str
    module: str
    reads: tuple[str, ...]
    """Config keys it reads (sections or dotted keys): changing one makes it stale."""
    upstream: tuple[str, ...] = ()
    file_inputs: Callable[[PipelineConfig], list[Path]] = lambda config: []
    outputs: tuple[str, ...] = ()
    """Files and folders it publishes, relative to its output folder."""
    checkpoints: bool = False
    """Whether it trains with checkpoints: SIGTERM then stops it at the next step boundary with a checkpoint
    saved (rlhf.preemption), instead of killing it."""
    launch: str | None = None
    """How it runs when `launch.num_processes` > 1 or `launch.accelerate_config` is set (rlhf.launch):
    "trainer" (a Hugging Face Trainer: DDP or DeepSpeed as the accelerate config says), "data-parallel"
    (plain processes that average gradients themselves), None (once, in the `rlhf run` process)."""


@dataclass
class StageContext:
    """What a running stage gets: its config, where to write, and its upstream outputs."""

    stage: Stage
    config: PipelineConfig
    run_dir: Path
    out_dir: Path
    """Temporary folder, published as `<run_dir>/<stage>/` when `run` returns."""
    work_dir: Path
    """Scratch that survives a failed or killed attempt (checkpoints), removed after publishing."""
    inputs: dict[str, Path] = field(default_factory=dict)
    """Upstream stage name → its published folder."""
    fingerprint: str = ""
    sigterm: StopOnSigterm = field(default_factory=StopOnSigterm)
    """Asked at each step boundary of a stage that `checkpoints`; never set for the others."""


@dataclass
class StageStatus:
    stage: Stage
    state: str  # "up to date" | "stale" | "missing"
    reasons: list[str]
    fingerprint: str
    parts: dict[str, Any]


# --- status -------------------------------------------------------------------------------------


def read_manifest(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _why_stale(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    reasons = []
    if old.get("code") != new["code"]:
        reasons.append("code changed")
    for key, old_value, new_value in _diff(old.get("config", {}), new["config"]):
        reasons.append(f"config {key}: {old_value!r} -> {new_value!r}")
    for path in sorted(set(old.get("files", {})) | set(new["files"])):
        if old.get("files", {}).get(path) != new["files"].get(path):
            reasons.append(f"input {path} changed")
    for name, fp in new["upstream"].items():
        if old.get("upstream", {}).get(name) != fp:
            reasons.append(f"upstream {name} changed")
    return reasons or ["fingerprint changed"]


def _diff(old: Any, new: Any, prefix: str = ""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
    elif old != new:
        yield prefix, old, new


def plan(stages: list[Stage], config: PipelineConfig) -> list[StageStatus]:
    """Each stage's state, in topological order, as if every stale upstream stage had rerun."""
    run_dir = Path(config.output_dir)
    fps: dict[str, str] = {}
    statuses = []
    for stage in topological_order(stages):
        parts = stage_parts(stage, config, {name: fps[name] for name in stage.upstream})
        fp = fingerprint(parts)
        fps[stage.name] = fp
        manifest = read_manifest(run_dir / stage.name)
        if manifest is None:
            statuses.append(StageStatus(stage, "missing", ["no published output"], fp, parts))
        elif manifest["fingerprint"] == fp:
            statuses.append(StageStatus(stage, "up to date", [], fp, parts))
        else:
            statuses.append(StageStatus(stage, "stale", _why_stale(manifest["parts"], parts), fp, parts))
    return statuses


def topological_order(stages: list[Stage]) -> list[Stage]:
    by_name = {s.name: s for s in stages}
    order: list[Stage] = []
    visiting: set[str] = set()

    def visit(stage: Stage) -> None:
        if stage in order:
            return
        if stage.name in visiting:
            raise RuntimeError(f"stage graph has a cycle through {stage.name}")
        visiting.add(stage.name)
        for name in stage.upstream:
            visit(by_name[name])
        visiting.discard(stage.name)
        order.append(stage)

    for stage in stages:
        visit(stage)
    return order


def downstream_of(stages: list[Stage], names: set[str]) -> set[str]:
    """The named stages and every stage that depends on them."""
    result = set(names)
    for stage in topological_order(stages):
        if result & set(stage.upstream):
            result.add(stage.name)
    return result


# --- running ------------------------------------------------------------------------------------


def process_rank() -> int:
    """This process's rank under `accelerate launch` / torchrun (0 when run alone). Only rank 0 takes
    the lock and publishes; the other ranks compute alongside it."""
    return int(os.environ.get("RANK", "0"))


@dataclass
class Decision:
    status: StageStatus
    run: bool
    why: str


def decide(
    stages: list[Stage],
    config: PipelineConfig,
    only: list[str] | None = None,
    from_stage: str | None = None,
    force: bool = False,
) -> list[Decision]:
    """What `rlhf run` would do with each stage, and why."""
    names = {s.name for s in stages}
    for name in [*(only or []), *([from_stage] if from_stage else [])]:
        if name not in names:
            raise UserError(f"unknown stage '{name}' (stages: {', '.join(s.name for s in topological_order(stages))})")
    forced = set(only or []) | (downstream_of(stages, {from_stage}) if from_stage else set())
    decisions = []
    for status in plan(stages, config):
        name = status.stage.name
        if only and name not in only:
            decisions.append(Decision(status, False, "not selected (--only)"))
        elif name in forced or force:
            flag = "--only" if only else "--from" if from_stage else "--force"
            decisions.append(Decision(status, True, f"requested ({flag})"))
        elif status.state == "up to date":
            decisions.append(Decision(status, False, "up to date"))
        else:
            decisions.append(Decision(status, True, "; ".join(status.reasons)))
    return decisions


def run_pipeline(
    stages: list[Stage],
    config: PipelineConfig,
    decisions: list[Decision],
    echo: Callable[[str], None] = print,
) -> None:
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if any(d.run and launch.launches(d.status.stage, config) for d in decisions):
        launch.check(config)
    if process_rank() != 0:
        echo = _quiet  # rank 0 speaks for every process
    with _run_lock(run_dir):
        if process_rank() == 0 and not launch.is_launched_child():  # a launched child's parent wrote it
            _write_atomic(run_dir / "config.yaml", to_yaml(config))
        published: dict[str, str] = {}  # stage name → fingerprint of what is on disk now
        for decision in decisions:
            stage = decision.status.stage
            if not decision.run:
                if not launch.is_launched_child():  # the parent already said why the others are skipped
                    echo(f"[skip] {stage.name}: {decision.why}")
                manifest = read_manifest(run_dir / stage.name)
                if manifest:
                    published[stage.name] = manifest["fingerprint"]
                continue
            for name in stage.upstream:
                if name not in published:
                    raise UserError(f"stage {stage.name} needs the output of {name}, which is missing: run it first")
            if not launch.is_launched_child():  # ... nor why this one runs
                echo(f"[run ] {stage.name}: {decision.why}")
            # The fingerprint records the upstream outputs actually consumed.
            parts = stage_parts(stage, config, {name: published[name] for name in stage.upstream})
            if launch.launches(stage, config):
                published[stage.name] = _run_launched(stage, config, parts, run_dir, echo)
            else:
                published[stage.name] = _run_stage(stage, config, parts, run_dir, echo)


def _run_launched(stage: Stage, config: PipelineConfig, parts: dict, run_dir: Path, echo) -> str:
    """Run a stage in child processes on the resolved config this run wrote; they publish it."""
    fp = fingerprint(parts)
    launch.run_launched(stage, launch.launch_command(stage, config, run_dir / "config.yaml"), echo)
    manifest = read_manifest(run_dir / stage.name)
    if manifest is None or manifest["fingerprint"] != fp:
        raise launch.StageFailed(f"stage {stage.name}: its launched processes exited without publishing it")
    return fp


def _quiet(message: str) -> None:
    pass


def _run_lock(run_dir: Path):
    """The run lock, taken by rank 0 only; a launched child works under its parent's lock."""
    if process_rank() != 0:
        return contextlib.nullcontext()
    lock = RunLock(run_dir)
    holder = lock._holder()
    if holder and os.environ.get(launch.LAUNCHED_BY) == f"{holder.get('pid')}@{holder.get('host')}":
        return contextlib.nullcontext()
    return lock


def _run_stage(stage: Stage, config: PipelineConfig, parts: dict, run_dir: Path, echo) -> str:
    # Imported here: rlhf.memory imports torch, which `rlhf status` and a no-op `rlhf run` never need.
    from rlhf.memory import current_memory_mb, release_freed_memory, reset_peak_memory, stage_memory

    fp = fingerprint(parts)
    tmp_root = run_dir / ".tmp"
    out_dir = tmp_root / f"{stage.name}.{os.getpid()}"
    work_dir = run_dir / ".work" / f"{stage.name}-{fp[:12]}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        stage=stage,
        config=config,
        run_dir=run_dir,
        out_dir=out_dir,
        work_dir=work_dir,
        inputs={name: run_dir / name for name in stage.upstream},
        fingerprint=fp,
    )
    started = time.time()
    try:
        module = importlib.import_module(stage.module)
        release_freed_memory()  # an earlier stage in this process may have left freed pages resident
        reset_peak_memory()
        start_mb = current_memory_mb()
        with ctx.sigterm if stage.checkpoints else contextlib.nullcontext():
            metrics = module.run(ctx) or {}
        memory = stage_memory(start_mb)
        missing = [o for o in stage.outputs if not (out_dir / o).exists()] if process_rank() == 0 else []
        if missing:
            raise RuntimeError(f"stage {stage.name} did not write {', '.join(missing)}")
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finished = time.time()
    if process_rank() != 0:  # rank 0 publishes what every rank computed together
        shutil.rmtree(out_dir, ignore_errors=True)
        return fp
    (out_dir / "config.yaml").write_text(to_yaml(config))
    manifest = {
        "stage": stage.name,
        "fingerprint": fp,
        "parts": parts,
        "inputs": {name: str(path) for name, path in ctx.inputs.items()},
        "outputs": list(stage.outputs),
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "duration_s": round(finished - started, 2),
        "metrics": metrics,
        "memory": memory,
        "versions": library_versions(),
    }
    _write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2))
    _publish(out_dir, run_dir / stage.name)
    shutil.rmtree(work_dir, ignore_errors=True)
    peak = f"{memory['peak_mb'] / 1024:.2f} GiB " + ("resident" if memory["device"] == "cpu" else "GPU allocated")
    echo(f"[done] {stage.name} in {finished - started:.1f}s, peak {peak} -> {run_dir / stage.name}")
    return fp


def _publish(src: Path, dest: Path) -> None:
    """Swap a finished folder into place. At every instant `dest` is either the old complete output,
    absent (the runner then sees the stage as missing), or the new complete output."""
    old = src.parent / f"{dest.name}.old.{os.getpid()}"
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for package in ("rlhf-pipeline", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


class RunLock:
    """One `rlhf run` per output folder. A lock left by a dead process is stale and taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def __enter__(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder and _alive(holder):
                    raise UserError(
                        f"{self.path.parent}: another rlhf run is using this output directory "
                        f"(pid {holder['pid']} on {holder['host']}, started {holder['started_at']})"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started_at": _iso(time.time())}, f)
            return self
        raise UserError(f"{self.path}: could not take the run lock")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot check another machine's processes: assume it runs
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
