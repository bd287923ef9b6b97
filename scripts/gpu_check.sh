#!/usr/bin/env bash
# The GPU proof in one command: throughput per attack and precision, TGR per source family at
# auto batch and batch 1, the paper workload, evaluation of every paper target, peak memory,
# determinism across fresh processes, versions. Writes OUT/gpu_check.json and OUT/gpu_check.md.
#
# Usage:
#   scripts/gpu_check.sh [--out OUT] [--quick] [--budget SECONDS]   # any order; OUT: gpu_check
#   scripts/gpu_check.sh OUT [...]                                  # OUT as the first word works too
#   PYTHON=.venv/bin/python scripts/gpu_check.sh --quick --out /tmp/q   # CPU, tiny models, < 60 s
#
# Needs no network and no install: when tgr-bench is not importable, it is built from this
# checkout into a temporary folder. On an offline machine without hydra-core/omegaconf, put
# their wheels in $TGR_BENCH_WHEELS (default: .whl/ in the checkout), e.g. fetched elsewhere with
#   pip download --no-deps -d .whl hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# A first word that is not an option is the output folder, as `--out` anywhere is.
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  set -- --out "$@"
fi
py="${PYTHON:-python3}"
site="${TMPDIR:-/tmp}/tgr-bench-site"
export PYTHONUNBUFFERED=1

if ! "$py" -c "import hydra, omegaconf" 2>/dev/null; then
  wheels="${TGR_BENCH_WHEELS:-$here/.whl}"
  if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: hydra-core and omegaconf are not installed and $wheels holds no wheels;" \
         "pip install hydra-core omegaconf, or put their wheels there." >&2
    exit 2
  fi
  "$py" -m pip install -q --no-index --no-deps --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$py" -c "import tgr_bench.conf" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" "$here"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$py" -m tgr_bench.bench.gpu_check "$@"
