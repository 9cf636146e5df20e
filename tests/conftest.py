import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helper modules beside the tests (fake servers, fake stages)
REPO = Path(__file__).resolve().parent.parent
# Before any test module imports huggingface_hub: it reads HF_HUB_OFFLINE once, at import, and without it
# every lookup of a model that is not cached waits on the network's timeouts and retries.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    """Models built for tests go to a throwaway cache; wandb never reaches the network; `auto` dtype is
    float32 on the CPU."""
    os.environ.setdefault("RLHF_CACHE_DIR", str(tmp_path_factory.mktemp("rlhf-cache")))
    os.environ["WANDB_SILENT"] = "true"
    os.environ.pop("WANDB_API_KEY", None)
    os.environ["RLHF_CPU_BF16"] = "0"  # model.dtype auto: float32 on every CPU, whatever its instructions
    yield


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> Path:
    """Every stage before ppo, run once per session on the tiny model (sft long enough to move away from
    the base, so that "reference = SFT, not base" can be told apart). Tests read it; `run_dir` copies it."""
    from rlhf.cli import main

    run_dir = tmp_path_factory.mktemp("ppo-upstream") / "run"
    overrides = [f"output_dir={run_dir}", "sft.max_steps=8", "sft.learning_rate=5e-3"]
    assert main(["run", str(REPO / "configs" / "smoke.yaml"), *overrides, "--only", "instructions,sft,preferences,reward"]) == 0
    return run_dir


@pytest.fixture
def run_dir(upstream, tmp_path) -> Path:
    """A copy of `upstream` that a test may change."""
    return Path(shutil.copytree(upstream, tmp_path / "run"))
