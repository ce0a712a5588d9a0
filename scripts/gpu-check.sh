#!/usr/bin/env bash
# The GPU check (one CUDA GPU, under 10 minutes), from the repository root with rere installed:
#   1. `rere bench decode --device cuda --preset paper`: every row of the decoding benchmark at
#      the paper's shape (vocabulary 151,936, 50 beams, 11,000 items), float32, 3 repeats;
#   2. the tiny workflow (tests/config/tiny.yaml) end to end on CUDA with sft.bf16 and rl.bf16
#      set by a config overlay, in a scratch copy of the workflow.
# Figures and logs go to $OUT (default gpu-check/):
#   scripts/gpu-check.sh            # or: OUT=/tmp/gpu scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=$(mkdir -p "${OUT:-gpu-check}" && cd "${OUT:-gpu-check}" && pwd)

python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu-check: torch sees no CUDA device")'
python -c 'import torch; print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)' \
    | tee "$OUT/device.txt"
start=$(date +%s)

echo "== 1/2 rere bench decode --device cuda --preset paper"
timeout 300 rere bench decode --device cuda --preset paper --repeats 3 --out "$OUT/bench-decode-paper-cuda.json" \
    2> "$OUT/bench-decode-paper-cuda.log" | tee "$OUT/bench-decode-paper-cuda.txt"

echo "== 2/2 tiny workflow on CUDA, bf16"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for name in Snakefile workflow config tests/config tests/data; do
    mkdir -p "$work/$(dirname "$name")"
    cp -r "$ROOT/$name" "$work/$name"
done
cat > "$work/bf16.yaml" <<'EOF'
# overlay on tests/config/tiny.yaml: mixed precision where the schema offers it
sft:
  bf16: true
rl:
  bf16: true
EOF
# the target first: --configfile takes every argument after it
if ! (cd "$work" && timeout 300 snakemake --cores 4 results/table.csv --configfile tests/config/tiny.yaml bf16.yaml \
    > "$OUT/workflow.log" 2>&1); then
    tail -n 40 "$OUT/workflow.log"
    for f in "$work"/logs/*/*.log; do echo "--- $f"; tail -n 20 "$f"; done
    exit 1
fi
cp "$work/results/table.csv" "$work/results/report.md" "$OUT/"
mkdir -p "$OUT/benchmarks" && cp -r "$work/benchmarks/." "$OUT/benchmarks/"
cat "$OUT/table.csv"
echo "gpu-check: done in $(( $(date +%s) - start )) s; figures in $OUT"
