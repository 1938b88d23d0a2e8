#!/usr/bin/env bash
# The 12-row `gpt-jax aot --search` table: GPT-2 124M/350M/774M/1558M x v5e-8/v4-8/v5p-8,
# appended to one JSON-lines file (one ranking per line). CPU only, needs libtpu
# (pip install 'libtpu==0.0.42.*'). v5e searches compile at least 3 candidates (the estimate's
# order is least reliable there). On a 2-core host each search took 128-279 s with TOP=2
# (v5e: 3), about 40 minutes for all 12; the cache under ~/.cache/gpt_jax/aot makes a rerun
# instant. Usage: launch/aot_table.sh [OUT.jsonl] [TOP] [WORKERS] [BUDGET_S]
set -euo pipefail
OUT=${1:-aot_search_table.jsonl}
TOP=${2:-2}
WORKERS=${3:-2}
BUDGET=${4:-1200}
GPT_JAX=${GPT_JAX:-gpt-jax}
export JAX_PLATFORMS=cpu
for preset in 124M 350M 774M 1558M; do
  for topology in v5e-8 v4-8 v5p-8; do
    top=$TOP
    if [ "$topology" = v5e-8 ] && [ "$top" -lt 3 ]; then top=3; fi
    echo "== $preset on $topology" >&2
    nice -n 10 "$GPT_JAX" aot --search --preset="$preset" --topology="$topology" \
      --dtype=bfloat16 --top="$top" --workers="$WORKERS" --budget_s="$BUDGET" \
      --json_out="$OUT" || echo "== $preset on $topology: failed (exit $?)" >&2
  done
done
