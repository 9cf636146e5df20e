#!/usr/bin/env bash
# The quickstart as a new user meets it, timed: a fresh clone of this repository at COMMIT in DIR, the
# install of README.md's quickstart block into DIR/.venv, a fresh model cache (DIR/.modelcache), then
# `rlhf run configs/quickstart.yaml` under /usr/bin/time -v; last, each stage's time, peak and the results.
#
#   bench/fresh_quickstart.sh COMMIT DIR            # as the machine computes (bfloat16 with AVX-512)
#   bench/fresh_quickstart.sh COMMIT DIR --avx2     # PyTorch, MKL and oneDNN held to AVX2, float32
#
# --avx2 emulates an AVX2-only CPU on an AVX-512 one (the clock, caches and memory stay this machine's).
# DIR is deleted first. Outputs in DIR: install.log, run.log, run.err (time -v's report at its end).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
commit=$1 dir=$2 mode=${3:-}
case "$mode" in
  ""|--avx2) ;;
  *) echo "fresh_quickstart.sh: unknown option '$mode' (expected --avx2 or nothing)" >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$dir"
git clone -q "$repo" "$dir"
cd "$dir"
git checkout -q "$commit"
export RLHF_CACHE_DIR="$dir/.modelcache" WANDB_MODE=offline
block=$(sed -n '/<!-- quickstart:begin -->/,/<!-- quickstart:end -->/p' README.md | grep -v '^<!--' | grep -v '^```')
install=${block% && rlhf run configs/quickstart.yaml}
[ "$install" != "$block" ] || { echo "README.md's quickstart block does not end with 'rlhf run configs/quickstart.yaml'" >&2; exit 1; }
started=$(date +%s)
bash -euo pipefail -c "$install" > install.log 2>&1
installed=$(date +%s)
. .venv/bin/activate
if [ "$mode" = --avx2 ]; then
  export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 RLHF_CPU_BF16=0
fi
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); code $(git rev-parse --short HEAD); ${mode:-native}"
/usr/bin/time -v rlhf run configs/quickstart.yaml > run.log 2> run.err
finished=$(date +%s)
python - "$dir/runs/quickstart" <<'EOF'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
total = 0.0
for stage in ("instructions", "sft", "preferences", "reward", "ppo", "evaluate", "benchmark", "export"):
    manifest = json.loads((run / stage / "manifest.json").read_text())
    total += manifest["duration_s"]
    print(f"{stage:13s} {manifest['duration_s']:7.1f} s  peak {manifest['memory']['peak_mb'] / 1024:.2f} GiB")
report = json.loads((run / "evaluate" / "report.json").read_text())
sft, ppo, wins = report["models"]["sft"], report["models"]["ppo"], report["win_rate"]
accuracy = json.loads((run / "reward" / "manifest.json").read_text())["metrics"].get("eval_accuracy")
print(f"stages {total:.1f} s; reward accuracy {accuracy:.3f}; win rate {wins['win_rate']:.3f} "
      f"({wins['wins']}/{wins['ties']}/{wins['losses']}), interval {report['win_rate_interval']}; "
      f"gold {ppo['gold_reward'] - sft['gold_reward']:+.4f}; proxy {ppo['proxy_reward'] - sft['proxy_reward']:+.3f}; "
      f"KL {ppo['kl']:.2f}; EOS {sft['eos_fraction']:.2f} -> {ppo['eos_fraction']:.2f}")
EOF
echo "install $((installed - started)) s, run $((finished - installed)) s, total $((finished - started)) s"
