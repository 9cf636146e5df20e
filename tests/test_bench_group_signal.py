"""bench/group_signal.py: same-outcome groups and the proxy's agreement with gold, against hand-counted numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import group_signal as gs  # noqa: E402

# One prompt, four samples: A, B finish; C, D stop at max_new_tokens. The proxy orders C, D against gold.
# A second prompt's two samples tie on gold: their pair is left out, their group counts.
ROWS = [
    ("p1", 2.0, 0.9, True), ("p1", 1.0, 0.8, True), ("p1", -1.0, 0.5, False), ("p1", 0.0, 0.4, False),
    ("p2", 1.0, 0.6, True), ("p2", 0.5, 0.6, True),
]


def write_samples(path: Path) -> Path:
    lines = [
        json.dumps({"prompt": p, "sft_proxy": proxy, "sft_gold": gold, "sft_finished": finished,
                    "ppo_proxy": 0.0, "ppo_gold": 0.0, "ppo_finished": True})
        for p, proxy, gold, finished in ROWS
    ]
    (path / "evaluate").mkdir(parents=True)
    (path / "evaluate" / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_group_signal_counts_groups_and_pairs_by_outcome(tmp_path):
    by_prompt = gs.read_samples(write_samples(tmp_path) / "evaluate" / "samples.jsonl", "sft")
    signal = gs.group_signal(by_prompt, 2)
    # Groups of 2: p1's AB, CD (same outcome), AC, AD, BC, BD (mixed); p2's one (same).
    assert signal.groups == 7
    assert signal.same_outcome_share == pytest.approx(3 / 7)
    assert signal.median_std_same == pytest.approx(0.5**0.5)  # stds 0.707 (AB), 0.707 (CD), 0.354 (p2)
    assert signal.median_std_mixed == pytest.approx(2**0.5)  # stds 2.121, 1.414, 1.414, 0.707
    # Same-outcome pairs: AB agrees, CD disagrees; p2's tie on gold is left out. Mixed: all four agree.
    assert (signal.agreement_same, signal.pairs_same) == (0.5, 2)
    assert (signal.agreement_mixed, signal.pairs_mixed) == (1.0, 4)


def test_group_signal_command_prints_the_figures(tmp_path):
    run = write_samples(tmp_path / "run")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "group_signal.py"), str(run), "--group", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[1].startswith("same_outcome_share=0.429 ")
    assert lines[2] == "median_proxy_std same_outcome=0.707 mixed=1.414"
    assert lines[3] == "proxy_orders_as_gold same_outcome=0.500 (2 pairs) mixed=1.000 (4 pairs)"


def test_group_signal_names_the_line_of_a_bad_sample(tmp_path):
    run = write_samples(tmp_path / "run")
    path = run / "evaluate" / "samples.jsonl"
    path.write_text(path.read_text() + json.dumps({"prompt": "p3", "sft_proxy": 1.0}) + "\n")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "group_signal.py"), str(run)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"{path}:7: expected sft_proxy, sft_gold and sft_finished" in result.stderr
