#!/usr/bin/env bash
# The GPU checks in one time-boxed run, for a GPU machine that is lent for minutes (each step is cut off when the
# budget runs out; every result file is written as soon as its step ends).
#
#   OUT=results/gpu BUDGET_S=560 [DATA=path/to/cifar10-jpeg.tar.gz | path/to/cifar10-dir] [SKIP="bench memory"] \
#     bash benchmarks/gpu_suite.sh
#
# SKIP names steps not to run (those already measured: see benchmarks/README.md, section GPU).
#
# Steps, in order of value: a smoke run of the tiny training preset (stops the run if the stack is broken), the
# benchmark suite against PyTorch on CUDA (both models, every row, bfloat16 variant of the AT step), average-case
# flatness at the issue's size with the K-strategies (small CNN, then ResNet-18), a short ResNet-18 PGD-AT run on
# real CIFAR-10 (DATA; 2 epochs of 100 steps, so the second epoch's images/s is free of compilation), the paper's full
# average-case measure on its snapshot, XLA's buffer plan for ResNet-18 flatness, and the attack loop modes on
# ResNet-18 (PGD unrolled vs rolled, APGD scan vs host loop: the GPU defaults, unrolled PGD and scanned APGD, are
# not measured yet). Results in OUT: suite.log (all output), bench.json, flatness_speed.json,
# strategies_resnet18.json, train_metrics.jsonl, flatness_avg.json, memory.json, loops.json (at most 8 files, as
# the device tool returns). On one H200 the steps up to memory took 467 s plus 147 s for the ResNet-18 strategies.
set -u
OUT=${OUT:?set OUT to a results folder}
BUDGET=${BUDGET_S:-560}
DATA=${DATA:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG=$OUT/suite.log
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=1

say() { echo "$*" | tee -a "$LOG"; }

# step NAME WANT_S CMD...: run CMD with at most WANT_S seconds (less if the budget is nearly spent), output to LOG.
step() {
  local name=$1 want=$2
  shift 2
  case " ${SKIP:-} " in *" $name "*) say "== $name: skipped (SKIP)"; return 0 ;; esac
  local left=$((BUDGET - SECONDS - 15))
  if ((left < 25)); then say "== $name: skipped, ${left} s of the budget left"; return 124; fi
  ((want > left)) && want=$left
  say "== $name (limit ${want} s, at ${SECONDS} s): $*"
  local t0=$SECONDS rc
  timeout -s INT -k 20 "$want" "$@" >>"$LOG" 2>&1
  rc=$?
  say "== $name: exit $rc after $((SECONDS - t0)) s"
  return $rc
}

say "== environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2
  "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for m in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "ml_collections", "torch", "numpy"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", e)
import jax
print("jax devices", jax.devices())
print("jax backend", jax.default_backend())
EOF
} >>"$LOG" 2>&1
tail -n 15 "$LOG"
if [ "${ALLOW_CPU:-0}" != 1 ] && ! grep -q "^jax backend gpu" "$LOG"; then
  say "JAX sees no GPU (see above); stopping (ALLOW_CPU=1 runs the suite anyway)"; exit 4
fi

if [ -n "$DATA" ]; then  # decode the images in the background (16 cores; the benchmarks use the GPU)
  DATA_DIR=$DATA
  if [ -f "$DATA" ]; then
    DATA_DIR=/tmp/gpu_suite_data; mkdir -p "$DATA_DIR"; tar xzf "$DATA" -C "$DATA_DIR"
  fi
  JAX_PLATFORMS=cpu "$PY" -c "from robust_flat.data import load_local as l
for s in ('train', 'test'): print(s, l('$DATA_DIR', s)[0].shape)" >>"$LOG" 2>&1 &
fi

rm -rf /tmp/gpu_suite_tiny
step smoke 90 "$PY" -m experiments.cifar10_at --config=experiments/configs/pgd_at.py:tiny \
  --run-dir /tmp/gpu_suite_tiny --no-progress --config.train.epochs=1 ||
  { say "smoke run failed: stopping"; tail -n 40 "$LOG"; exit 3; }

step bench 250 "$PY" -m benchmarks.run --models small_cnn,resnet18 --skip none --repeats 3 --bf16 \
  --out "$OUT/bench.json"
grep -E "^(model|small_cnn|resnet18|#)" "$LOG" | tail -n 20

step flatness_speed 80 "$PY" -m benchmarks.flatness_speed --samples 10 --n 1000 --rounds 2 --strategy-n 128 \
  --strategy-samples 10 --strategy-chunks 2,5 --strategy-rounds 3 --out "$OUT/flatness_speed.json"
step strategies_resnet18 150 "$PY" -m benchmarks.flatness_speed --skip-comparison --strategy-model resnet18 \
  --strategy-n 128 --strategy-samples 10 --strategy-chunks 2,5 --strategy-rounds 3 \
  --out "$OUT/strategies_resnet18.json"

if [ -n "$DATA" ]; then
  wait
  rm -rf /tmp/gpu_suite_rn18
  step train 130 "$PY" -m experiments.cifar10_at --config=experiments/configs/pgd_at.py --data-dir "$DATA_DIR" \
    --run-dir /tmp/gpu_suite_rn18 --config.train.epochs=2 --config.data.train_examples=12800 --no-progress
  cp /tmp/gpu_suite_rn18/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null
  step flatness_cli 80 "$PY" -m experiments.flatness --run-dir /tmp/gpu_suite_rn18 --measure avg \
    --data-dir "$DATA_DIR" --no-progress
  cp /tmp/gpu_suite_rn18/flatness/avg_*.json "$OUT/flatness_avg.json" 2>/dev/null
fi

step memory 120 "$PY" -m benchmarks.memory --models resnet18 \
  --rows flatness_avg_vmap,flatness_avg_chunked,train_step --out "$OUT/memory.json"
rm -f /tmp/gpu_suite_pgd_loop.json /tmp/gpu_suite_apgd_loop.json
step pgd_loop 120 "$PY" -m benchmarks.pgd_loop --model resnet18 --batch 128 --steps 7,20 --repeats 3 \
  --out /tmp/gpu_suite_pgd_loop.json
step apgd_loop 120 "$PY" -m benchmarks.apgd_loop --model resnet18 --batch 128 --n-iter 100 \
  --modes scan:1,scan:4,host:5 --repeats 3 --out /tmp/gpu_suite_apgd_loop.json
"$PY" - "$OUT/loops.json" <<'EOF'  # one file for both (the device tool returns at most 8)
import json, os, sys
out = {k: json.load(open(p)) for k, p in (("pgd", "/tmp/gpu_suite_pgd_loop.json"),
                                          ("apgd", "/tmp/gpu_suite_apgd_loop.json")) if os.path.exists(p)}
json.dump(out, open(sys.argv[1], "w"), indent=1)
EOF
say "== done at ${SECONDS} s"
