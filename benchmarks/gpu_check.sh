#!/usr/bin/env bash
# One GPU run (about 9 minutes, torch only, no network needed) on a bare H100/H200 machine:
# checks every speed variant of the vitl14_sem_L512 step against eager and times it, at batch 32 and
# at the recipe's batch 64, with the allocator capped at an H100 80GB's 79.6 GiB; then the input path
# (decode + multi-crop) per CPU core of that machine, and what the batch assembly costs a real step.
# Everything goes to $OUT (default ./gpu_check_out).
#
#   bash benchmarks/gpu_check.sh                     # from the repository root
#   XFORMERS_WHEEL=/path/xformers-0.0.35-...whl bash benchmarks/gpu_check.sh   # also the xFormers variants
#   SMOKE=1 bash benchmarks/gpu_check.sh             # the same script on CPU with a tiny model (~5 min)
#   PARTS="b32 b64" bash benchmarks/gpu_check.sh     # some parts only (b32 b64 input feed; default all):
#                                                    # two calls of under 10 minutes each, e.g. on a lent device
#
# Each part has its own timeout; every variant's result is also printed as a JSON line to the part's
# .err file as soon as it is measured, so a timeout loses only the variants not yet run.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_check_out}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/semlab_inductor_cache}  # b64 reuses b32's kernels
PARTS=${PARTS:-b32 b64 input feed}
want() { [[ " $PARTS " == *" $1 "* ]]; }
CAP="--memory-cap-gib 79.6"
TINY=()
if [ -n "${SMOKE:-}" ]; then  # CPU rehearsal: tiny model, compile through aot_eager (inductor on CPU is slow)
  TINY=(--device cpu --compile-backend aot_eager --config-file train/demo_tiny student.embed_dim=48
        student.depth=2 student.num_heads=3 student.img_size=28)
fi
XF=""
if [ -n "${XFORMERS_WHEEL:-}" ]; then  # --no-deps into a side folder: never replaces the pinned torch
  $PY -m pip install --no-deps --target "$OUT/xformers_pkg" "$XFORMERS_WHEEL" > "$OUT/xformers_install.txt" 2>&1 \
    && export PYTHONPATH="$PYTHONPATH:$OUT/xformers_pkg" && XF=",xformers,packed-xformers"
  $PY -m xformers.info > "$OUT/xformers_info.txt" 2>&1
fi

{ date -u; nvidia-smi || true; nproc; free -g; uname -a
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} > "$OUT/machine.txt" 2>&1

run() {  # name timeout args...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$OUT/commands.txt"
  timeout "$limit" $PY benchmarks/train_step.py "$@" "${TINY[@]}" --json-out "$OUT/$name.json" > "$OUT/$name.txt" 2> "$OUT/$name.err"
  echo "   exit $?" | tee -a "$OUT/commands.txt"
  grep -v "^{" "$OUT/$name.txt"
}

# 1. batch 32 (eager fits): every variant against eager; compiled ones last (their first step is the compile)
want b32 && run b32 270 --batch 32 $CAP --warmup 2 --steps 5 --sync-debug \
  --variants "eager,ac-selective,ac-full,fused-adamw,chunked-ce,sync-free,packed-sdpa,flex,packed-flex${XF},normalize-on-device,compile,all-fast"

# 2. batch 64 (the recipe's) under 79.6 GiB: ac-full is the reference (exact recomputation); eager may not fit
want b64 && run b64 240 --batch 64 $CAP --warmup 2 --steps 5 --sync-debug \
  --variants "ac-full,ac-selective,eager,compile+ac-selective,all-fast" \
  --fast-extra train.activation_checkpointing=selective student.attention=flex student.pack_crops=true

# 3. the input path on this machine's CPU: images/s per core and cores per GPU for 170 images/s
if want input; then
  timeout 60 $PY benchmarks/input_path.py --rounds 3 --images 24 > "$OUT/input_path.txt" 2>&1
  cat "$OUT/input_path.txt"
fi

# 4. the Ray Data path's batch assembly (rows -> tensors -> exact-size batches + iBOT masks) beside a real
#    step, batch 32, uint8 crops normalised on the GPU: a fixed batch vs batches assembled on the training
#    thread (inline) or in background threads (threaded, as in training); the gap is what assembly costs
want feed && run feed 150 --batch 32 $CAP --warmup 3 --steps 10 --variants normalize-on-device --feeds fixed,inline,threaded
