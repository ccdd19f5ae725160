#!/usr/bin/env bash
# GPU smoke test: the CUDA-marked tests, then a 5-step `agentopd train` per built-in env with
# engine=vllm on the GPU, then a report of tokens/s and peak GPU memory per run.
# Budget: 8 minutes on one GPU (each train is capped at 100 s by `timeout`).
#
#   bash benchmarks/gpu_smoke.sh            # writes to ${OUT:-gpu-smoke}/
#
# Needs: a Python with torch (CUDA build), agentopd installed (`pip install -e '.[dev]'`) and,
# for engine=vllm, the vllm package for CUDA. Without vllm the trains fall back to engine=hf and
# the report says so. PYTHON selects the interpreter (default: .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-smoke}
mkdir -p "$OUT"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
START=$(date +%s)
log() { echo "[gpu_smoke +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/report.txt"; }
: > "$OUT/report.txt"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee -a "$OUT/report.txt" || { log "no nvidia-smi: not a GPU machine"; exit 1; }
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/report.txt" || { log "torch cannot see CUDA"; exit 1; }
import torch, sys
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
ENGINE=vllm
if ! "$PY" -c "import vllm" 2>/dev/null; then
  ENGINE=hf
  log "vllm is not importable here: the trains use engine=hf (NOT the vllm path)"
fi

# 1. The CUDA-marked tests (a skip is a failure here).
log "pytest -m gpu (and the CUDA loss test)"
AGENTOPD_REQUIRE_GPU=1 timeout 180 "$PY" -m pytest -q -m gpu tests/test_gpu_path.py \
  "tests/test_losses.py::test_chunked_under_bf16_autocast_on_cuda" 2>&1 | tail -n 15 \
  | tee -a "$OUT/report.txt"
log "pytest rc=${PIPESTATUS[0]}"

# 2. A 5-step train per built-in env on the GPU, GPU memory sampled every 200 ms.
for ENV in lookup-chain sql code-sandbox; do
  RUN="$OUT/runs"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 \
    > "$OUT/mem-$ENV.txt" 2>/dev/null &
  SMI=$!
  T0=$(date +%s)
  timeout 100 "$PY" -m agentopd train env="$ENV" device=cuda engine="$ENGINE" steps=5 \
    episodes_per_step=16 cold_start.steps=30 eval.episodes=16 eval.before=false \
    runs_dir="$RUN" run_name="$ENV" > "$OUT/train-$ENV.log" 2>&1
  RC=$?
  kill "$SMI" 2>/dev/null; wait "$SMI" 2>/dev/null
  log "train env=$ENV engine=$ENGINE rc=$RC wall=$(( $(date +%s) - T0 ))s"
  [ $RC -eq 0 ] || tail -n 20 "$OUT/train-$ENV.log" | tee -a "$OUT/report.txt"
done

# 3. Report: median tokens/s per phase and peak GPU memory of each run.
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$OUT/report.txt"
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'env':14} {'rollout tok/s':>14} {'teacher tok/s':>14} {'learner tok/s':>14} "
      f"{'peak GPU MiB':>13} {'eval success':>13}")
for env in ("lookup-chain", "sql", "code-sandbox"):
    metrics = out / "runs" / env / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    train = [r for r in rows if r.get("phase") == "train" and "throughput/rollout_tok_s" in r]
    med = lambda k: statistics.median(r[k] for r in train) if train else float("nan")
    evals = [r for r in rows if r.get("phase") == "eval"]
    mem = [int(x) for x in (out / f"mem-{env}.txt").read_text().split() if x.strip().isdigit()] \
        if (out / f"mem-{env}.txt").exists() else []
    print(f"{env:14} {med('throughput/rollout_tok_s'):14.0f} {med('throughput/teacher_tok_s'):14.0f} "
          f"{med('throughput/learner_tok_s'):14.0f} {max(mem, default=0):13d} "
          f"{evals[-1].get('eval/success', float('nan')) if evals else float('nan'):13.2f}")
EOF
log "done in $(( $(date +%s) - START ))s"
