#!/usr/bin/env bash
# bench/gpu_all.sh DIR: the GPU training benchmark on one CUDA machine, results into DIR.
#
# For a GPU box that has torch (CUDA), transformers and peft but no TRL, bitsandbytes, vLLM or
# network: the few missing packages come from .gpu-wheels/ (filled beforehand, where PyPI is
# reachable, by `make gpu-wheels`) and are installed with `pip --no-index` into a private folder
# (nothing already installed is touched). Then `python -m bench.gpu_train` runs plain TRL + peft and
# `tunegate train`'s own trainer side by side for LoRA and QLoRA on a Llama-3-8B-shaped model.
# Writes DIR/gpu_train.json (also printed last), DIR/gpu_train.png, DIR/gpu_train.log and
# DIR/env.txt. Budget: under 8 minutes on one H200 (the benchmark is cut at BENCH_TIMEOUT seconds;
# results of finished settings are kept). Extra arguments go to the benchmark, e.g.
# `bench/gpu_all.sh out --set liger_layers=false`.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bench/gpu_all.sh DIR [gpu_train options]" >&2
  exit 2
fi
OUT=$1
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=${GPU_WHEELS:-$REPO/.gpu-wheels}
PY=${PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/tunegate-gpu-site}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
start=$(date +%s)

# GPU_ALL_CPU=1 lets the script itself be tried on a CPU (with `--shape tiny`).
GPU_ALL_CPU=${GPU_ALL_CPU:-0} "$PY" - <<'EOF' || { echo "gpu_all: this script needs a CUDA GPU and torch, transformers, peft" >&2; exit 1; }
import os
import torch, transformers, peft  # noqa: F401
assert torch.cuda.is_available() or os.environ["GPU_ALL_CPU"] == "1", "no CUDA device visible"
EOF

# Install the wheels whose distribution is missing here (no network: --no-index; --no-deps: the
# folder holds the missing dependencies too, and nothing present is upgraded).
if [ -d "$WHEELS" ]; then
  echo "gpu_all: $WHEELS holds $(du -sh "$WHEELS" | cut -f1) of wheels"
  missing=$("$PY" - "$WHEELS" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    try:
        version(name)
    except PackageNotFoundError:
        print(wheel)
EOF
)
  if [ -n "$missing" ]; then
    echo "gpu_all: installing into $SITE: $(echo "$missing" | xargs -n1 basename | tr '\n' ' ')"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $missing
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  echo "gpu_all: no $WHEELS (run \`make gpu-wheels\` where PyPI is reachable); using what is installed" >&2
fi
"$PY" -c "import trl, datasets" || { echo "gpu_all: TRL and datasets are needed: make gpu-wheels" >&2; exit 1; }

{
  nvidia-smi 2>/dev/null || true
  "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|trl|datasets|accelerate|liger|bitsandbytes|triton|flash)" || true
} >"$OUT/env.txt"

cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
timeout "${BENCH_TIMEOUT:-420}" "$PY" -m bench.gpu_train --out "$OUT/gpu_train.json" --plot "$OUT/gpu_train.png" "$@" \
  2>"$OUT/gpu_train.log" | tail -n 1 >"$OUT/gpu_train.stdout" || status=$?
if [ -s "$OUT/gpu_train.stdout" ]; then
  cat "$OUT/gpu_train.stdout"
elif [ -s "$OUT/gpu_train.json" ]; then
  echo "gpu_all: cut short (exit $status); the settings that finished:" >&2
  cat "$OUT/gpu_train.json"
else
  echo "gpu_all: the benchmark failed (exit $status); the end of its log:" >&2
  tail -n 40 "$OUT/gpu_train.log" >&2
fi
rm -f "$OUT/gpu_train.stdout"
echo "gpu_all: done in $(($(date +%s) - start)) s; results in $OUT" >&2
exit "$status"
