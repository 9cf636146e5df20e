"""bench/fresh_quickstart.sh: its arguments are checked before anything is cloned or deleted."""

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "fresh_quickstart.sh"


def test_missing_arguments_print_the_usage(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "HEAD"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "bench/fresh_quickstart.sh COMMIT DIR --avx2" in result.stderr


def test_an_unknown_option_is_one_line_and_leaves_dir_alone(tmp_path):
    kept = tmp_path / "run" / "kept.txt"
    kept.parent.mkdir()
    kept.write_text("earlier output")
    result = subprocess.run(["bash", str(SCRIPT), "HEAD", str(kept.parent), "--avx"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == "fresh_quickstart.sh: unknown option '--avx' (expected --avx2 or nothing)"
    assert kept.read_text() == "earlier output"  # DIR is deleted only once the arguments are good
