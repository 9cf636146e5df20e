"""Stage fingerprints: what makes a stage's published output stale.

A stage's fingerprint hashes its code (its module and the rlhf modules it imports, less the framework's),
the config keys it reads (less bookkeeping keys, rlhf.config.BOOKKEEPING), the content of its input files
and its upstream stages' fingerprints.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.config import PipelineConfig, fingerprint_value
from rlhf.errors import UserError

if TYPE_CHECKING:
    from rlhf.runner import Stage



def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


FRAMEWORK_MODULES = {
    "rlhf.runner", "rlhf.fingerprint", "rlhf.config", "rlhf.errors", "rlhf.dag", "rlhf.tracking", "rlhf.cli", "rlhf.launch"
}
"""Left out of code hashes: they decide what runs, how it is started and where it is logged, not what a
stage computes (config values reach the fingerprint through the keys a stage reads)."""


def code_hash(module: str) -> str:
    """Hash of a stage module's source and of every `rlhf` module it imports, directly or not, found
    without importing them (so `status` stays fast). Editing shared code makes its stages stale."""
    digest = hashlib.sha256()
    for name in sorted(_rlhf_modules_used_by(module) - FRAMEWORK_MODULES):
        digest.update(name.encode() + b"\0" + _module_source(name) + b"\0")
    return digest.hexdigest()


_IMPORT = re.compile(rb"^[ \t]*(?:from[ \t]+(rlhf[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[\w ,\t]+)|import[ \t]+(rlhf[\w.]*))", re.M)


def _rlhf_modules_used_by(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for package, names, plain in _IMPORT.findall(_module_source(name)):
            if plain:
                todo.append(plain.decode())
                continue
            todo.append(package.decode())
            if _is_package(package.decode()):  # `from rlhf.stages import ppo` imports a module
                for imported in names.decode().strip("()").replace("\n", " ").split(","):
                    candidate = f"{package.decode()}.{imported.split(' as ')[0].strip()}"
                    if imported.strip() and importlib.util.find_spec(candidate) is not None:
                        todo.append(candidate)
    return seen


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def _module_source(name: str) -> bytes:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"stage module {name} not found")
    return Path(spec.origin).read_bytes()


def file_hash(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"{path}: input file not found")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stage_parts(stage: Stage, config: PipelineConfig, upstream_fps: dict[str, str]) -> dict[str, Any]:
    return {
        "code": code_hash(stage.module),
        "config": {key: fingerprint_value(config, key) for key in stage.reads},
        "files": {str(p): file_hash(p) for p in stage.file_inputs(config)},
        "upstream": dict(upstream_fps),
    }


def fingerprint(parts: dict[str, Any]) -> str:
    return _sha(json.dumps(parts, sort_keys=True))
