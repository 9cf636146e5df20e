#!/usr/bin/env bash
# One command for a fresh GPU (an H200, or a 24 GB card): every stage of configs/qwen2.5-0.5b.yaml on a
# model of the Qwen2.5-0.5B shape with random weights (built here: nothing is downloaded), once per
# generation engine (hf, vllm), then sft and reward once more under configs/accelerate/deepspeed_zero2.yaml
# in one process, so that the DeepSpeed path has run at least once. It prints each stage's time and peak
# memory, the rollout tokens per second of each engine, the planner's estimate against each measured
# peak, and ends with the line `vllm_speedup=<hf rollout time / vllm rollout time> plan_worst_ratio=<...>`.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --dry-run  # anywhere: checks the files and prints the commands it would run
#
# A bare machine gets what it lacks from wheels carried beside the repository (WHEELS, default
# bench/wheels: torch, vllm, deepspeed and the project's dependencies), installed with --no-index:
# the GPU machine reaches no registry. Budget: under 8 minutes with installs (the model is 0.5B; each
# engine's run is a few optimizer steps of each stage at the config's lengths).
#
# Settings (environment, defaults for the GPU day): CONFIG, SHAPE, PROMPT_TOKENS (256), PPO_STEPS (3), SIZES,
# WORK (runs/gpu-check), WHEELS, PYTHON; DEEPSPEED=0 leaves out the DeepSpeed step and REQUIRE_CUDA=0 the
# GPU check, for a rehearsal on a CPU with a tiny shape (tests/test_gpu_check.py does one, slow).
set -euo pipefail

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS="${WHEELS:-bench/wheels}"
WORK="${WORK:-runs/gpu-check}"
PYTHON="${PYTHON:-python3}"
CONFIG="${CONFIG:-configs/qwen2.5-0.5b.yaml}"
SHAPE="${SHAPE:-configs/model_shapes/qwen2.5-0.5b-instruct.json}"
ZERO2=configs/accelerate/deepspeed_zero2.yaml
PPO_STEPS="${PPO_STEPS:-3}"
PROMPT_TOKENS="${PROMPT_TOKENS:-256}"
DEEPSPEED="${DEEPSPEED:-1}"
REQUIRE_CUDA="${REQUIRE_CUDA:-1}"
# The run's sizes, shrunk from the config's so both engines and DeepSpeed fit the budget; the lengths
# (max_length, max_new_tokens) stay the config's: they set the memory the planner estimates.
read -ra SIZES <<< "${SIZES:-ppo.rollout_batch_size=16 ppo.num_prompts=16 evaluate.num_prompts=2 evaluate.samples_per_prompt=2}"

for file in "$CONFIG" "$SHAPE" "$ZERO2" bench/plan_vs_measured.py bench/gpu_check_report.py; do
  [[ -f "$file" ]] || { echo "gpu_check: missing $file" >&2; exit 1; }
done

run() {  # print a command; run it unless dry
  echo "+ $*"
  if (( ! DRY_RUN )); then "$@"; fi
}

# 1. Installs: only what is missing, from the carried wheels.
echo "== installs (from $WHEELS)"
if (( DRY_RUN )); then
  [[ -d "$WHEELS" ]] && echo "gpu_check: $WHEELS holds $(ls "$WHEELS" | wc -l) files" || echo "gpu_check: $WHEELS absent (a GPU run needs it unless torch, vllm and deepspeed are installed)"
fi
missing=()
modules=(torch vllm rlhf)
(( DEEPSPEED )) && modules+=(deepspeed)
for module in "${modules[@]}"; do
  if (( DRY_RUN )) || ! "$PYTHON" -c "import $module" 2>/dev/null; then missing+=("$module"); fi
done
echo "gpu_check: missing here: ${missing[*]:-none}"
packages=()
for module in "${missing[@]}"; do [[ "$module" != rlhf ]] && packages+=("$module"); done
if (( ${#packages[@]} )); then
  echo "gpu_check: installing ${packages[*]}"
  run "$PYTHON" -m pip install --no-index --find-links "$WHEELS" "${packages[@]}"
fi
if [[ " ${missing[*]} " == *" rlhf "* ]]; then
  run "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation -e ".[test]"
fi
if (( ! DRY_RUN && REQUIRE_CUDA )); then
  "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('gpu_check:', torch.cuda.get_device_name(0), f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')"
fi

# 2. Every stage, once per engine, on the random Qwen2.5-0.5B-shaped model.
for engine in hf vllm; do
  echo "== engine $engine"
  run "$PYTHON" bench/plan_vs_measured.py "$CONFIG" --model-config "$SHAPE" --work "$WORK/$engine" \
    --ppo-steps "$PPO_STEPS" --with-evaluate --prompt-tokens "$PROMPT_TOKENS" "${SIZES[@]}" "generation.engine=$engine"
done

# 3. sft and reward again through DeepSpeed ZeRO-2 (one process), on the hf run's model and data.
if (( DEEPSPEED )); then
  echo "== deepspeed zero2: sft, reward"
  run "$PYTHON" -m rlhf.cli run "$WORK/hf/config.yaml" "output_dir=$WORK/deepspeed" \
    "launch.accelerate_config=$ZERO2" --only instructions,sft,preferences,reward
fi

# 4. The report: per stage time and peak, rollout tokens/s per engine, plan vs measured, the last line.
if (( DRY_RUN )); then
  echo "+ $PYTHON bench/gpu_check_report.py $WORK $PROMPT_TOKENS"
  echo "gpu_check: dry run, nothing measured"
  echo "vllm_speedup=n/a plan_worst_ratio=n/a"
else
  "$PYTHON" bench/gpu_check_report.py "$WORK" "$PROMPT_TOKENS"
fi
