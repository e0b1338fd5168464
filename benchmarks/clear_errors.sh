#!/usr/bin/env bash
# Shows the one-line errors diffquant gives for bad input; writes benchmarks/results/clear-errors.txt.
# Usage: bash benchmarks/clear_errors.sh   (after ./run has set up .venv)
set -u
cd "$(dirname "$0")/.."
DQ=${DQ:-.venv/bin/diffquant}
out=benchmarks/results/clear-errors.txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export PYTHONWARNINGS=ignore
show() {
  echo "\$ diffquant $*"
  "$DQ" "$@" 2>&1 | grep -v -E "torchao|_pytree|Unable to import" | tail -n 3
  echo "(exit ${PIPESTATUS[0]})"
  echo
}
{
  echo "# commit $(git rev-parse --short HEAD), $(date -u +%FT%TZ)"
  echo "## an unknown model name"
  show sample mnist-vae -n 4 --out "$tmp/x.npz"
  echo "## a path that holds no model"
  mkdir -p "$tmp/empty"
  show quantize "$tmp/empty" --recipe w4a8 --out "$tmp/q"
  echo "## an impossible config (a group size that does not divide the layer)"
  echo '{"name": "g7", "weight": {"method": "uniform", "bits": 4, "group_size": 7}}' > "$tmp/g7.json"
  show quantize mnist-dit --recipe "$tmp/g7.json" --out "$tmp/q"
  echo "## an unknown recipe"
  show quantize mnist-dit --recipe w5a5 --out "$tmp/q"
  echo "## a truncated checkpoint"
  "$DQ" quantize mnist-dit --recipe w4a16 --out "$tmp/q4" > /dev/null 2>&1
  head -c 100000 "$tmp/q4/quantized.safetensors" > "$tmp/cut" && mv "$tmp/cut" "$tmp/q4/quantized.safetensors"
  show sample "$tmp/q4" -n 4 --out "$tmp/x.npz"
  echo "## a recipe file with a typo"
  echo '{"name": "typo", "weight": {"method": "uniform", "bitz": 4}}' > "$tmp/typo.json"
  show quantize mnist-dit --recipe "$tmp/typo.json" --out "$tmp/q"
  echo "## an AQ budget below what codebooks cost"
  echo '{"name": "aq-w0.2", "weight": {"method": "aq", "target_bits": 0.2}}' > "$tmp/aq05.json"
  show quantize mnist-unet --recipe "$tmp/aq05.json" --out "$tmp/q"
  echo "## labels out of range"
  show sample mnist-dit -n 4 --labels 3-12 --out "$tmp/x.npz"
} > "$out"
cat "$out"
