import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helper modules beside the tests (fake servers, fake stages)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    """Models built for tests go to a throwaway cache; wandb never reaches the network; `auto` dtype is
    float32 on the CPU."""
    os.environ.setdefault("RLHF_CACHE_DIR", str(tmp_path_factory.mktemp("rlhf-cache")))
    os.environ["WANDB_SILENT"] = "true"
    os.environ.pop("WANDB_API_KEY", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["RLHF_CPU_BF16"] = "0"  # model.dtype auto: float32 on every CPU, whatever its instructions
    yield
