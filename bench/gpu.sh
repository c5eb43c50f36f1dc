#!/usr/bin/env bash
# The GPU speed check, as one call on a lent GPU machine (bench/README.md "GPU"): bench.speed per
# image, then batched, then batched with torch.compile while time is left. Run from the repository
# root; results and logs go to $OUT (else bench/results). A machine without this project's
# packages takes them as wheels from .whl/ (pip download ... -d .whl: pydantic, pydantic-core,
# annotated-types, typing-inspection, albumentations, albucore, simsimd, stringzilla, timm).
set -u
budget=${BUDGET_S:-540}  # seconds this script may take in all
seconds=${PASS_S:-1.5}   # about how long each timed pass of bench.speed lasts
out=${OUT:-bench/results}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
echo "cores: $(nproc)"
python3 -c "import torch, timm, torchvision, bench.speed; print('torch', torch.__version__, \
'timm', timm.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" \
  || exit 1

run() {  # run NAME ARGS...: one bench.speed within what is left of the budget
  local name=$1 left=$((budget - SECONDS)); shift
  if [ "$left" -lt 60 ]; then echo "skipped $name: ${left}s left"; return; fi
  echo "== $name ($((SECONDS))s in, ${left}s left)"
  timeout "$left" python3 -m bench.speed --device cuda --seconds "$seconds" --out "$out" "$@" \
    >"$out/$name.log" 2>&1
  echo "rc $? after ${SECONDS}s"; tail -4 "$out/$name.log"
}
run per_image
run batched --backend batched
mkdir -p "$out/compiled"
OUT_SAVED=$out; out=$out/compiled
run batched_compiled --backend batched --compile --sizes 128
out=$OUT_SAVED

rm -f "$out"/*.md "$out"/compiled/*.md  # at most 8 files come back; render() remakes them
