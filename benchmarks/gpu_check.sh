#!/usr/bin/env bash
# The GPU check of the trainer, as one prepared run in stages, most important first. Each stage writes its
# result file under $OUT the moment it finishes (benchmark rows as each is measured), and has a time budget,
# so the whole fits one device command (600 s) with room to spare: about 540 s on one H100/H200.
#   a  correctness (budget 200 s): eager vs --cuda_graph per-step losses for both study models (20 steps,
#      2 epochs, the learning rate rising every step); a --cuda_graph run stopped after step 6 by the preemption
#      signal and resumed from its step checkpoint continues the uninterrupted run's losses, its lr tensors on
#      the GPU; 2 epochs with --num_workers 2 and the data on the CPU (--cuda_graph, --reprob) give the same
#      losses as with the data on the GPU.                                          -> $OUT/a_correctness.txt
#   b  throughput (150 s): python -m trainer.bench, raw step vs trainer, both models, eager and cuda_graph,
#      augmentation crop_flip and none; then NFNet with --channels_last.          -> $OUT/b_throughput/bench.md,
#                                                                                    $OUT/b_throughput_cl/bench.md
#   c  ZeRO-2 vs the plain trainer at world size 1 (90 s; needs deepspeed)          -> $OUT/c_zero2/bench.md
#   d  torch.compile, last (whatever is left of the 540 s)                          -> $OUT/d_compile/bench.md
# $OUT/summary.txt: versions, then one line per stage (ok / FAILED / skipped, seconds); $OUT/log.txt: all output.
# Exit status: the number of stages that failed (0: all passed or skipped).
#
# Usage, in the repository root:
#   OUT=results bash benchmarks/gpu_check.sh         # a GPU machine (the device tool sets OUT itself)
#   bash benchmarks/gpu_check.sh --cpu-smoke         # the same stages on the CPU, tiny models, a few steps
#                                                    # (what needs CUDA is skipped, saying so); tests/test_gpu_check.py
#   bash benchmarks/gpu_check.sh --make-wheels       # on a machine with PyPI: DeepSpeed and its needs into .whl/
# The GPU image has no DeepSpeed (Python 3.12, torch 2.11, accelerate 1.15): stage c installs the wheels of
# .whl/ when that folder is there (put .whl/ in .git/info/exclude and carry it), and is skipped otherwise.
# pydantic pins one exact pydantic-core, so both are pinned here together.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
SCRIPT=$REPO/benchmarks/gpu_check.sh
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_results}
BUDGET=${GPU_CHECK_BUDGET:-540}

if [[ ${1:-} == --make-wheels ]]; then
  set -e
  mkdir -p .whl
  # deepspeed is a source distribution that builds in seconds (no CUDA ops compiled at install).
  $PY -m pip wheel --no-deps -w .whl deepspeed==0.19.8
  $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 \
    typing_extensions==4.16.0
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
  ls -l .whl
  exit 0
fi

SMOKE=0
STAGE=
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpu-smoke) SMOKE=1 ;;
    --stage) STAGE=$2; shift ;;
    *) echo "error: unknown argument $1 (use --cpu-smoke or --make-wheels)" >&2; exit 2 ;;
  esac
  shift
done
export SMOKE OUT REPO PY BUDGET PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Work folder (data, runs, checkpoints): in memory where /dev/shm exists; shared by the stages (exported).
export GPU_CHECK_WORK=${GPU_CHECK_WORK:-$( [[ -d /dev/shm && -w /dev/shm ]] && echo /dev/shm || echo /tmp )/gpu_check_$$}
W=$GPU_CHECK_WORK

if [[ $SMOKE == 1 ]]; then
  VIT=test_vit NFNET=test_nfnet BATCH=16 STEPS=4 TEST=50 BENCH_STEPS=2 REPEATS=1
  BUDGET=${GPU_CHECK_BUDGET:-3600}  # no real budget on a CPU: each stage may take what it needs
  DEVICE_ARGS=(--device cpu --mixed_precision no)
  GRAPH=()  # CUDA graphs need CUDA
  TOL_GRAPH=0 TOL_SAME=1e-5  # fp32 on the CPU: a resumed run is bit-identical (README)
else
  VIT=vit NFNET=nfnet BATCH=256 STEPS=10 TEST=500 BENCH_STEPS=20 REPEATS=3
  DEVICE_ARGS=(--device cuda)
  GRAPH=(--cuda_graph)
  # bf16: eager and graphed steps may order float sums differently; the same path resumed should agree closely.
  TOL_GRAPH=2e-2 TOL_SAME=1e-2
fi
STOP=$((STEPS / 2))  # the resume check signals a run at step STOP, mid-epoch 1

RESULT=  # stage a's result file; stages b-d write bench.md, and what they say goes to log.txt only
record() { if [[ -n $RESULT ]]; then tee -a "$OUT/$RESULT"; else cat; fi; }
say() { echo "$@" | record; }

# --- helpers shared by the stages --------------------------------------------------------------------------
write_helpers() {
  mkdir -p "$W"
  # The trainer's own entry point, in-process, optionally sending itself the preemption signal once step N is
  # logged (one process then stops after that step), and printing where the optimizer's
  # learning rates live at the end (finding 1: after a resume they must be tensors on the GPU).
  cat > "$W/run_trainer.py" <<'PY'
import os, signal, sys
from trainer import loop, main, run_log
stop_at = int(os.environ.get("STOP_AT", "0"))
log_step, run = run_log.RunLog.log_step, loop.Trainer.run
def logged(self, entry):
    log_step(self, entry)
    if entry["step"] == stop_at:
        os.kill(os.getpid(), signal.SIGUSR1)
def ran(self):
    try:
        return run(self)
    finally:
        lrs = [g["lr"] for g in getattr(self.optimizer, "optimizer", self.optimizer).param_groups]
        print("optimizer lr:", sorted({f"{type(v).__name__} on {v.device.type}" if hasattr(v, "device") else type(v).__name__
                                       for v in lrs}), flush=True)
run_log.RunLog.log_step, loop.Trainer.run = logged, ran
sys.exit(main.main(sys.argv[1:]))
PY
  # Per-step losses of two runs compared: PASS when every common step after `after` agrees within `tol`.
  cat > "$W/compare.py" <<'PY'
import json, sys
a, b, label, tol, after = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
read = lambda path: {r["step"]: r for r in map(json.loads, open(path))}
try:
    A, B = read(a), read(b)
except OSError as error:
    print(f"FAIL {label}: {error}"); sys.exit(1)
steps = [s for s in sorted(A) if s > after]
ok = bool(steps) and sorted(A) == sorted(B)
rel = max((abs(A[s]["train_loss"] - B[s]["train_loss"]) / abs(A[s]["train_loss"]) for s in steps if s in B), default=float("nan"))
ok = ok and rel <= tol and all(A[s]["lr"] == B[s]["lr"] for s in steps)
print(f"{'PASS' if ok else 'FAIL'} {label}: steps {after + 1}-{max(A, default=0)} of {len(A)} vs {len(B)}, "
      f"max relative loss difference {rel:.2e} (tolerance {tol:g}); loss first/last {A[min(A)]['train_loss']:.4f}/"
      f"{A[max(A)]['train_loss']:.4f} vs {B[min(B)]['train_loss']:.4f}/{B[max(B)]['train_loss']:.4f}")
sys.exit(0 if ok else 1)
PY
  if [[ ! -d $W/data ]]; then
    $PY -m trainer.synthetic "$W/data" --num_train $((BATCH * STEPS)) --num_test "$TEST" >/dev/null
  fi
}

# One training run: name, then trainer options. 2 epochs of $STEPS steps, the learning rate rising every step
# (warm-up over the whole run), a loss line per step. Its end-of-run checkpoint (~1.4 GB for ViT-B/8) is
# dropped once written: only steps.jsonl and a preempted run's step_N checkpoint are kept.
train() {
  local name=$1; shift
  STOP_AT=${STOP_AT:-0} $PY "$W/run_trainer.py" --no-pretrained --data_dir "$W/data" --save_dir "$W/$name" \
    --epochs 2 --warmup_epochs 2 --batch_size "$BATCH" --micro_batch_size "$BATCH" --eval_batch_size 250 \
    --log_interval 1 --no-progress "${DEVICE_ARGS[@]}" "$@" > "$W/$name.log" 2>&1
  local status=$?
  rm -rf "$W/$name"/epoch_*
  grep -E "^(epoch|resumed|optimizer lr|received|stopped|error)|Error" "$W/$name.log" | sed "s/^/  [$name] /" | record
  return $status
}

compare() { $PY "$W/compare.py" "$@" | record; return "${PIPESTATUS[0]}"; }

bench() {  # out folder, then bench options; the rows reach $OUT/<folder>/bench.md as they are measured
  local folder=$OUT/$1; shift
  $PY -m trainer.bench --batch_size "$BATCH" --steps "$BENCH_STEPS" --repeats "$REPEATS" --out "$folder" "$@" \
    2>&1 | grep -vE "Warning|warn\(" | record
  local status=${PIPESTATUS[0]}
  rm -f "$folder/bench.json" "$folder/bench.jsonl"  # bench.md holds it all (the device returns 8 files at most)
  if grep -q "| failed:" "$folder/bench.md" 2>/dev/null; then return 1; fi
  return "$status"
}

# --- the stages -------------------------------------------------------------------------------------------
stage_a() {
  RESULT=a_correctness.txt
  local failed=0
  write_helpers
  for model in $VIT $NFNET; do
    if [[ ${#GRAPH[@]} -gt 0 || $model == "$VIT" ]]; then  # (the eager $VIT run is the resume check's reference)
      train "${model}_eager" --model "$model" || failed=1
    fi
    if [[ ${#GRAPH[@]} -gt 0 ]]; then
      train "${model}_graph" --model "$model" "${GRAPH[@]}" || failed=1
      compare "$W/${model}_eager/steps.jsonl" "$W/${model}_graph/steps.jsonl" \
        "$model: --cuda_graph vs eager per-step losses" "$TOL_GRAPH" 0 || failed=1
    else
      say "skipped $model: --cuda_graph vs eager (CUDA graphs need CUDA)"
    fi
  done
  # Resume: the uninterrupted run is the one above ($VIT, graphed on a GPU); a copy stopped by the preemption
  # signal sent at step STOP (one process stops after that step) is resumed from the step it says it stopped at.
  local base=${VIT}_eager at; [[ ${#GRAPH[@]} -gt 0 ]] && base=${VIT}_graph
  STOP_AT=$STOP train "${VIT}_resumed" --model "$VIT" "${GRAPH[@]}"
  [[ $? == 75 ]] || { say "FAIL resume: the run stopped by SIGUSR1 did not exit with status 75"; failed=1; }
  cp "$W/${VIT}_resumed.log" "$W/${VIT}_stopped.log"
  at=$(sed -n 's/^stopped by .* at step \([0-9]*\);.*/\1/p' "$W/${VIT}_stopped.log" | tail -1)
  [[ -n $at ]] || { say "FAIL resume: the stopped run does not say at which step it stopped"; failed=1; at=$STOP; }
  train "${VIT}_resumed" --model "$VIT" "${GRAPH[@]}" --resume auto || failed=1
  rm -rf "$W/${VIT}_resumed"/step_*
  grep -q "^resumed from .*step_$at" "$W/${VIT}_resumed.log" \
    || { say "FAIL resume: did not resume from step_$at"; failed=1; }
  if [[ ${#GRAPH[@]} -gt 0 ]] && ! grep -q "^optimizer lr: \['Tensor on cuda'\]" "$W/${VIT}_resumed.log"; then
    say "FAIL resume: the optimizer's learning rates are not all tensors on the GPU"; failed=1
  fi
  compare "$W/$base/steps.jsonl" "$W/${VIT}_resumed/steps.jsonl" \
    "$VIT: ${GRAPH[*]:-eager} resumed from step_$at vs uninterrupted, steps after $at" "$TOL_SAME" "$at" || failed=1
  # Two epochs with the data on the CPU in 2 forked workers (evaluation between them on the GPU), graphed
  # (the loader's pin-memory thread runs during capture), with random erasing; the same run with the data on
  # the GPU erases the same boxes there, so the losses agree.
  local extra=(--model "$VIT" "${GRAPH[@]}" --reprob 0.5)
  train "${VIT}_workers" "${extra[@]}" --data_device cpu --num_workers 2 || failed=1
  train "${VIT}_resident" "${extra[@]}" || failed=1
  compare "$W/${VIT}_workers/steps.jsonl" "$W/${VIT}_resident/steps.jsonl" \
    "$VIT: --num_workers 2 with CPU-side data vs data on the device, --reprob 0.5, 2 epochs" "$TOL_SAME" 0 || failed=1
  return $failed
}

stage_b() {
  local modes=eager,cuda_graph
  [[ $SMOKE == 1 ]] && { modes=eager; say "skipped: cuda_graph rows (CUDA graphs need CUDA)"; }
  bench b_throughput --models "$VIT,$NFNET" --modes "$modes" --augment crop_flip,none --no-zero2 || return 1
  bench b_throughput_cl --models "$NFNET" --modes "$modes" --augment crop_flip --no-zero2 --channels_last
}

stage_c() {
  if ! $PY -c "import deepspeed" >/dev/null 2>&1; then
    say "skipped: deepspeed is not importable (make the wheels with --make-wheels and carry .whl)"
    return 0
  fi
  # The plain trainer at world size 1 has no DDP wrapper; its row is the reference of the ZeRO-2 rows.
  bench c_zero2 --models "$VIT" --modes eager --augment crop_flip --zero2
}

stage_d() {
  # NFNet first: launch-bound (its bf16 step took ~46-51 ms at batch 32, 256 and 1024 alike on one H200), where compilation can matter most. The CPU smoke compiles one
  # tiny model only (inductor takes minutes on 2 cores; test_train.py tests compilation itself).
  local models=$NFNET,$VIT
  [[ $SMOKE == 1 ]] && models=$VIT
  bench d_compile --models "$models" --modes compile --augment crop_flip --no-zero2
}

if [[ -n $STAGE ]]; then
  "stage_$STAGE"
  exit $?
fi

# --- the run ----------------------------------------------------------------------------------------------
mkdir -p "$OUT" "$W"
exec > >(tee -a "$OUT/log.txt") 2>&1
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" .whl/*.whl \
    && export PYTHONPATH=$W/site:$REPO || echo "could not install the wheels of .whl/"
else
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
{ date -u; [[ $SMOKE == 1 ]] && echo "cpu-smoke: tiny models, a few steps, on the CPU"; nvidia-smi -L 2>/dev/null
  $PY -c "import sys, torch, timm, accelerate; print('python', sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
  $PY -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>/dev/null | tail -1 | grep . \
    || echo "deepspeed: not importable"
} | tee "$OUT/summary.txt"

start=$SECONDS failures=0
for stage in a:200 b:150 c:90 d:0; do
  name=${stage%%:*} budget=${stage##*:}
  [[ $SMOKE == 1 ]] && budget=0
  left=$((BUDGET - (SECONDS - start)))
  [[ $budget == 0 || $budget -gt $left ]] && budget=$left
  if [[ $budget -lt 20 ]]; then
    echo "stage $name: skipped (${left} s left of ${BUDGET} s)" | tee -a "$OUT/summary.txt"; continue
  fi
  echo "=== stage $name (budget ${budget} s) ==="
  t0=$SECONDS
  timeout --kill-after=10 "$budget" bash "$SCRIPT" --stage "$name" $([[ $SMOKE == 1 ]] && echo --cpu-smoke)
  status=$?
  rm -f "$OUT"/*/bench.json "$OUT"/*/bench.jsonl  # left by a stage stopped at its budget; bench.md has the rows
  case $status in
    0) result=ok ;;
    124|137) result="FAILED: over its ${budget} s budget (rows measured so far are kept)"; failures=$((failures + 1)) ;;
    *) result=FAILED; failures=$((failures + 1)) ;;
  esac
  echo "stage $name: $result ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
done
rm -rf "$W"
echo "total $((SECONDS - start)) s; $failures stage(s) failed; results in $OUT"
exit $failures
