"""The DAG runner on three cheap fake stages: first -> second -> third."""

import json
from pathlib import Path

import pytest
from fake_stages import STAGES

from rlhf.config import PipelineConfig
from rlhf.errors import UserError
from rlhf.runner import RunLock, decide, plan, run_pipeline


def make_config(tmp_path: Path, **updates) -> PipelineConfig:
    config = PipelineConfig(output_dir=str(tmp_path / "run"), wandb={"mode": "disabled"})
    for key, value in updates.items():
        section, _, leaf = key.partition("__")
        if leaf:
            setattr(getattr(config, section), leaf, value)
        else:
            setattr(config, section, value)
    return config


def run(config, **kwargs) -> list[str]:
    """Run the pipeline; return the names of the stages that actually ran."""
    log = Path(config.output_dir) / "runs.log"
    before = log.read_text().split() if log.exists() else []
    run_pipeline(STAGES, config, decide(STAGES, config, **kwargs), echo=lambda line: None)
    return log.read_text().split()[len(before) :]


def test_first_run_runs_everything_and_rerun_nothing(tmp_path):
    config = make_config(tmp_path)
    assert run(config) == ["first", "second", "third"]
    assert run(config) == []
    assert [s.state for s in plan(STAGES, config)] == ["up to date"] * 3
    third = Path(config.output_dir) / "third"
    assert (third / "out.txt").read_text() == "first:42;second:42;third:42;"
    manifest = json.loads((third / "manifest.json").read_text())
    assert manifest["metrics"] == {"ok": 1} and manifest["parts"]["config"] == {"lora": config.lora.model_dump()}
    assert "torch" in manifest["versions"]


def test_manifest_records_each_stages_peak_memory(tmp_path, monkeypatch):
    """On the CPU: resident sets in MiB. The second stage touches 300 MiB and frees it; the others don't."""
    monkeypatch.setenv("FAKE_ALLOCATE_MB", "300")
    config = make_config(tmp_path)
    run(config)
    memory = {
        name: json.loads((Path(config.output_dir) / name / "manifest.json").read_text())["memory"]
        for name in ("first", "second", "third")
    }
    assert {m["device"] for m in memory.values()} == {"cpu"}
    growth = {name: m["peak_mb"] - m["start_mb"] for name, m in memory.items()}
    assert 290 <= growth["second"] < 340, growth  # MiB rounded to 0.1 at both ends; pages already resident
    assert growth["first"] < 20 and growth["third"] < 20, growth  # the peak starts again at each stage


def test_downstream_only_key_reruns_only_downstream(tmp_path):
    config = make_config(tmp_path)
    run(config)
    config.sft.learning_rate = 1e-5
    statuses = {s.stage.name: s for s in plan(STAGES, config)}
    assert statuses["first"].state == "up to date"
    assert statuses["second"].reasons == ["config sft.learning_rate: 0.0002 -> 1e-05"]
    assert statuses["third"].reasons == ["upstream second changed"]
    assert run(config) == ["second", "third"]


def test_upstream_key_reruns_everything_after_it(tmp_path):
    config = make_config(tmp_path)
    run(config)
    config.seed = 7
    assert run(config) == ["first", "second", "third"]
    assert (Path(config.output_dir) / "third" / "out.txt").read_text() == "first:7;second:7;third:7;"


def test_only_reruns_named_stage_against_existing_upstream(tmp_path):
    config = make_config(tmp_path)
    run(config)
    assert run(config, only=["second"]) == ["second"]
    config.seed = 9  # first is now stale, but --only uses its existing output
    assert run(config, only=["third"]) == ["third"]
    assert (Path(config.output_dir) / "third" / "out.txt").read_text() == "first:42;second:42;third:9;"


def test_only_with_missing_upstream_is_a_clear_error(tmp_path):
    config = make_config(tmp_path)
    with pytest.raises(UserError, match="needs the output of first, which is missing"):
        run(config, only=["second"])
    assert not (Path(config.output_dir) / "second").exists()


def test_from_reruns_stage_and_downstream(tmp_path):
    config = make_config(tmp_path)
    run(config)
    assert run(config, from_stage="second") == ["second", "third"]
    assert run(config, force=True) == ["first", "second", "third"]


def test_unknown_stage_name(tmp_path):
    with pytest.raises(UserError, match="unknown stage 'sfd'"):
        decide(STAGES, make_config(tmp_path), only=["sfd"])


def test_failing_stage_publishes_nothing_and_keeps_earlier_outputs(tmp_path, monkeypatch):
    config = make_config(tmp_path)
    run(config)
    run_dir = Path(config.output_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "runs.log" not in p.name}
    config.sft.learning_rate = 1e-5
    monkeypatch.setenv("FAKE_FAIL", "second")
    with pytest.raises(RuntimeError, match="second failed on purpose"):
        run(config)
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "runs.log" not in p.name}
    assert {p: b for p, b in after.items() if p.name != "config.yaml"} == {
        p: b for p, b in before.items() if p.name != "config.yaml"
    }
    assert not list(run_dir.rglob("partial.txt"))
    assert not (run_dir / ".lock").exists()
    assert {s.stage.name: s.state for s in plan(STAGES, config)} == {
        "first": "up to date",
        "second": "stale",
        "third": "stale",
    }


def test_missing_manifest_means_missing(tmp_path):
    config = make_config(tmp_path)
    run(config)
    (Path(config.output_dir) / "second" / "manifest.json").unlink()  # as if killed before publishing
    # third stays valid: second's output is rebuilt with the same fingerprint third consumed.
    assert [s.state for s in plan(STAGES, config)] == ["up to date", "missing", "up to date"]
    assert run(config) == ["second"]


def test_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(run_dir):
        with pytest.raises(UserError, match=r"another rlhf run is using this output directory \(pid \d+"):
            with RunLock(run_dir):
                pass
    # A lock left by a process that no longer exists.
    (run_dir / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": __import__("socket").gethostname()}))
    with RunLock(run_dir):
        assert json.loads((run_dir / ".lock").read_text())["pid"] != 2**22 + 12345
    assert not (run_dir / ".lock").exists()


def test_code_version_covers_the_shared_code_a_stage_imports(monkeypatch):
    from rlhf import fingerprint

    used = fingerprint._rlhf_modules_used_by("rlhf.stages.ppo")
    assert {"rlhf.stages.ppo", "rlhf.ppo_math", "rlhf.roles", "rlhf.rollout", "rlhf.models"} <= used
    before, sft_before = fingerprint.code_hash("rlhf.stages.ppo"), fingerprint.code_hash("rlhf.stages.sft")
    original = fingerprint._module_source
    monkeypatch.setattr(
        fingerprint, "_module_source", lambda name: original(name) + (b"# edited" if name == "rlhf.ppo_math" else b"")
    )
    assert fingerprint.code_hash("rlhf.stages.ppo") != before  # an edit to the math makes ppo stale
    assert fingerprint.code_hash("rlhf.stages.sft") == sft_before  # sft does not import the PPO math
    monkeypatch.setattr(
        fingerprint, "_module_source", lambda name: original(name) + (b"# edited" if name == "rlhf.runner" else b"")
    )
    assert fingerprint.code_hash("rlhf.stages.ppo") == before  # the framework is not part of a stage's code
    monkeypatch.setattr(
        fingerprint, "_module_source", lambda name: original(name) + (b"# edited" if name == "rlhf.fingerprint" else b"")
    )
    assert fingerprint.code_hash("rlhf.stages.ppo") == before
