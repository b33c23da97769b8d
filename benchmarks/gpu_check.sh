#!/usr/bin/env bash
# The GPU check of the trainer, as prepared runs in stages, most important first. Each stage writes its result
# file under $OUT the moment it finishes (benchmark rows as each is measured), and has a time budget. The whole
# takes about 900 s on one H200 (measured 2026-12-04: stage a needed more than 200 s, b more than 150 s, e 95 s
# without DeepSpeed), more than one device command (600 s), so run it as commands of at most $GPU_CHECK_BUDGET (540)
# s each: `--stage a`, then `--stage b,c`, then `--stage e,d`.
#   a  correctness (budget 300 s): eager vs --cuda_graph per-step losses for both study models (20 steps,
#      2 epochs, the learning rate rising every step); a --cuda_graph run stopped after step 6 by the preemption
#      signal and resumed from its step checkpoint continues the uninterrupted run's losses, its lr tensors on
#      the GPU; 2 epochs with --num_workers 2 and the data on the CPU (--cuda_graph, --reprob) give the same
#      losses as with the data on the GPU.                                          -> $OUT/a_correctness.txt
#   b  throughput (240 s): python -m trainer.bench, raw step vs trainer, both models, eager and cuda_graph,
#      augmentation crop_flip and none; then NFNet with --channels_last.          -> $OUT/b_throughput/bench.md,
#                                                                                    $OUT/b_throughput_cl/bench.md
#   c  ZeRO-2 vs the plain trainer at world size 1 (150 s; needs deepspeed)         -> $OUT/c_zero2/bench.md,
#      then a ZeRO-2 run with --model_ema (the float32 EMA follows DeepSpeed's half-precision weights)
#                                                                                    $OUT/c_zero2_ema.txt
#   e  FSDP2 at world size 1 (300 s; no DeepSpeed needed): the ViT under accelerate_configs/fsdp.yaml against the
#      plain trainer, per-step losses; its epoch-1 checkpoint finished by the plain trainer (another strategy:
#      through the full state, trainer/full_state.py) against the FSDP run; with deepspeed, a ZeRO-2 run's epoch-1
#      checkpoint finished under FSDP against the ZeRO-2 run; then the trainer's throughput under FSDP beside
#      eager.                                                                    -> $OUT/e_fsdp.txt, $OUT/e_fsdp/bench.md
#   d  torch.compile, last (whatever is left of the budget; running out of it there is "stopped", not a failure)
#                                                                                  -> $OUT/d_compile/bench.md
# First, before any stage, what decides whether the check can run at all: the versions (pip show), the room in
# /dev/shm and /tmp (df), the GPU (nvidia-smi), and the work folder chosen: the first of $GPU_CHECK_WORK, /dev/shm,
# /tmp and the repository's .gpu_check_work with $GPU_CHECK_NEED_MB free (a ViT-B/8 checkpoint is ~1.4 GB and the
# resume check holds two; a container's /dev/shm is often 64 MB).
# $OUT/summary.txt: that preamble, then one line per stage (ok / FAILED / stopped / skipped, seconds); $OUT/log.txt:
# all output. Exit status: the number of stages that failed (0: all passed, skipped or stopped at the time left).
#
# Usage, in the repository root:
#   OUT=results bash benchmarks/gpu_check.sh --stage a       # a GPU machine (the device tool sets OUT itself):
#   OUT=results bash benchmarks/gpu_check.sh --stage b,c     # the preamble, then those stages; no --stage: all
#   OUT=results bash benchmarks/gpu_check.sh --stage e,d     # (d last: it takes the time the others left)
#   bash benchmarks/gpu_check.sh --cpu-smoke         # the same stages on the CPU, tiny models, a few steps
#                                                    # (what needs CUDA is skipped, saying so); tests/test_gpu_check.py
#   bash benchmarks/gpu_check.sh --make-wheels       # on a machine with PyPI: DeepSpeed and its needs into .whl/
# The GPU image has no DeepSpeed (Python 3.12, torch 2.11, accelerate 1.15): stage c installs the wheels of
# .whl/ ($GPU_CHECK_WHEELS) when that folder is there (put .whl/ in .git/info/exclude and carry it), and is skipped
# otherwise; wheels that fail to install are reported, and the stages still import the repository's trainer.
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
  # timm: the lowest the project allows (setup.cfg); the image's may be older (1.0.29 on 2026-12-04), which refuses
  # --model_ema under DeepSpeed half precision (runtime.py's check_ema_precision) instead of running stage c's EMA run.
  $PY -m pip download --no-deps --only-binary=:all: -d .whl timm==1.0.31
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
STAGES=a,b,c,d,e  # --stage: the stages this run does (the preamble always runs)
RUN_STAGE=      # --run-stage: one stage, in the child process the main run starts for it under its time limit
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpu-smoke) SMOKE=1 ;;
    --stage) STAGES=${2:-}; shift
      [[ $STAGES =~ ^[abcde](,[abcde])*$ ]] || { echo "error: --stage takes stages a-e, comma-separated (got '$STAGES')" >&2; exit 2; } ;;
    --run-stage) RUN_STAGE=$2; shift ;;
    *) echo "error: unknown argument $1 (use --cpu-smoke, --stage a,b,c,d,e or --make-wheels)" >&2; exit 2 ;;
  esac
  shift
done
export SMOKE OUT REPO PY BUDGET PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ $SMOKE == 1 ]]; then
  VIT=test_vit NFNET=test_nfnet BATCH=16 STEPS=4 TEST=50 BENCH_STEPS=2 REPEATS=1
  BUDGET=${GPU_CHECK_BUDGET:-3600}  # no real budget on a CPU: each stage may take what it needs
  DEVICE_ARGS=(--device cpu --mixed_precision no)
  GRAPH=()  # CUDA graphs need CUDA
  TOL_GRAPH=0 TOL_SAME=1e-5  # fp32 on the CPU: a resumed run is bit-identical (README)
  # FSDP through accelerate launch: torchrun sets OMP_NUM_THREADS=1, which changes the CPU's float sums (1.1e-7).
  TOL_FSDP=1e-5
else
  VIT=vit NFNET=nfnet BATCH=256 STEPS=10 TEST=500 BENCH_STEPS=20 REPEATS=3
  DEVICE_ARGS=(--device cuda)
  GRAPH=(--cuda_graph)
  # bf16: eager and graphed steps may order float sums differently; the same path resumed should agree closely.
  TOL_GRAPH=2e-2 TOL_SAME=1e-2
  TOL_FSDP=2e-2  # bf16: FSDP2's mixed-precision policy casts the weights; the plain trainer autocasts
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
  # Evaluation without a host sync per batch (trainer/evaluation.py): its loop under CUDA's sync debug mode, which
  # warns at every synchronising call; the two copies of the results to the host at its end are the only ones.
  cat > "$W/eval_sync.py" <<'PY'
import warnings, torch, timm
from accelerate import Accelerator
from trainer.data import Normalize
from trainer.evaluation import evaluate_model
accelerator = Accelerator()
model = timm.create_model("test_vit", num_classes=100, img_size=(32, 32)).cuda()
loader = [(torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, device="cuda"),
           torch.randint(0, 100, (50,), device="cuda")) for _ in range(4)]
normalize = Normalize((0.5,) * 3, (0.5,) * 3, 32, "cuda")
evaluate_model(accelerator, model, loader, normalize, 100)  # warm-up: cuBLAS and the allocator
torch.cuda.synchronize()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    evaluate_model(accelerator, model, loader, normalize, 100)
    torch.cuda.set_sync_debug_mode("default")
# (torch also warns once that the mode is a prototype: not a synchronising call)
syncs = [str(w.message).splitlines()[0] for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
ok = len(syncs) <= 2
print(f"{'PASS' if ok else 'FAIL'} evaluation of 4 batches: {len(syncs)} synchronising calls (at most the 2 final copies)")
raise SystemExit(0 if ok else 1)
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

# One training run through `accelerate launch` with one process: name, accelerate config (fsdp, zero2), trainer
# options; as train() otherwise, but its checkpoint after epoch 1 is kept (a resume under another strategy reads it).
launched() {
  local name=$1 config=$2; shift 2
  $PY -m accelerate.commands.launch --config_file "accelerate_configs/$config.yaml" --num_processes 1 \
    trainer/main.py --no-pretrained --data_dir "$W/data" --save_dir "$W/$name" --epochs 2 --warmup_epochs 2 \
    --batch_size "$BATCH" --micro_batch_size "$BATCH" --eval_batch_size 250 --log_interval 1 --save_epochs 1 \
    --no-progress "${DEVICE_ARGS[@]}" "$@" > "$W/$name.log" 2>&1
  local status=$?
  rm -rf "$W/$name"/epoch_2
  grep -E "^(epoch|error)|Error" "$W/$name.log" | sed "s/^/  [$name] /" | record
  return $status
}

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
  if [[ $SMOKE == 1 ]]; then
    say "skipped: evaluation's synchronising calls (CUDA's sync debug mode needs CUDA)"
  else
    $PY "$W/eval_sync.py" 2>&1 | grep -E "^(PASS|FAIL)|Error" | record
    [[ ${PIPESTATUS[0]} == 0 ]] || failed=1
  fi
  return $failed
}

stage_b() {
  local modes=eager,cuda_graph
  [[ $SMOKE == 1 ]] && { modes=eager; say "skipped: cuda_graph rows (CUDA graphs need CUDA)"; }
  bench b_throughput --models "$VIT,$NFNET" --modes "$modes" --augment crop_flip,none --no-zero2 || return 1
  bench b_throughput_cl --models "$NFNET" --modes "$modes" --augment crop_flip --no-zero2 --channels_last
}

stage_c() {
  if [[ $DEEPSPEED != 1 ]]; then  # as the preamble found it
    say "skipped: deepspeed is not importable (make the wheels with --make-wheels and carry .whl)"
    return 0
  fi
  RESULT=c_zero2_ema.txt
  write_helpers
  # --model_ema under ZeRO-2: DeepSpeed holds the weights in bf16 (fp32 in the CPU smoke), the EMA stays float32
  # and is updated from them every step (runtime.py's check_ema_precision refuses a timm too old for that).
  local name=zero2_ema
  $PY -m accelerate.commands.launch --config_file accelerate_configs/zero2.yaml --num_processes 1 trainer/main.py \
    --model "$VIT" --no-pretrained --data_dir "$W/data" --save_dir "$W/$name" --epochs 1 --warmup_epochs 0 \
    --batch_size "$BATCH" --eval_batch_size 250 --model_ema --no-progress "${DEVICE_ARGS[@]}" > "$W/$name.log" 2>&1
  local status=$?
  grep -E "^(epoch|error)|Error" "$W/$name.log" | sed "s/^/  [$name] /" | record
  if [[ $status == 0 ]] && grep -q '"val_acc1_ema"' "$W/$name/metrics.jsonl" 2>/dev/null; then
    say "PASS $VIT: ZeRO-2 with --model_ema, 1 epoch, the EMA evaluated ($(grep -o '"mixed_precision": "[a-z0-9]*"' "$W/$name/config.json" | head -1))"
  else
    say "FAIL $VIT: ZeRO-2 with --model_ema exited $status"; tail -5 "$W/$name.log" | record
  fi
  local ema_status=$([[ $status == 0 ]] && echo 0 || echo 1)
  rm -rf "$W/$name"
  RESULT=
  # The plain trainer at world size 1 has no DDP wrapper; its row is the reference of the ZeRO-2 rows.
  bench c_zero2 --models "$VIT" --modes eager --augment crop_flip --zero2 || return 1
  return "$ema_status"
}

# A run finished from another run's epoch-1 checkpoint under another strategy: SOURCE NAME SAVED_LAYOUT LABEL TOL
# RUNNER [options]. Copies SOURCE's epoch_1 and records into NAME (as after a crash in epoch 2), runs RUNNER (train
# or `launched NAME CONFIG`), checks that the run converted the state from SAVED_LAYOUT, and compares its losses after
# epoch 1 with SOURCE's.
finish_elsewhere() {
  local source=$1 name=$2 saved=$3 label=$4 tol=$5; shift 5
  mkdir -p "$W/$name"
  cp -r "$W/$source/epoch_1" "$W/$source/steps.jsonl" "$W/$source/metrics.jsonl" "$W/$name/" 2>/dev/null || return 1
  "$@" --model "$VIT" --checkpoint "$W/$name/epoch_1" || return 1
  grep -q "^converted the training state of .* from $saved on 1 process(es)" "$W/$name.log" \
    || { say "FAIL $VIT: $name did not convert the $saved checkpoint"; return 1; }
  compare "$W/$source/steps.jsonl" "$W/$name/steps.jsonl" "$VIT: $label, steps after $STEPS" "$tol" "$STEPS"
}

stage_e() {
  RESULT=e_fsdp.txt
  local failed=0 fsdp=${VIT}_fsdp
  write_helpers
  # The plain run: stage a's eager ViT when this command ran it, else here (the same options).
  [[ -f $W/${VIT}_eager/steps.jsonl ]] || train "${VIT}_eager" --model "$VIT" || failed=1
  launched "$fsdp" fsdp --model "$VIT" || failed=1
  grep -q '"distributed_type": "FSDP"' "$W/$fsdp/config.json" 2>/dev/null \
    || { say "FAIL $VIT: the FSDP run did not resolve distributed_type FSDP"; failed=1; }
  compare "$W/${VIT}_eager/steps.jsonl" "$W/$fsdp/steps.jsonl" \
    "$VIT: FSDP2 (fsdp.yaml, 1 process) vs the plain trainer, per-step losses" "$TOL_FSDP" 0 || failed=1
  finish_elsewhere "$fsdp" "${VIT}_fsdp_then_plain" fsdp \
    "FSDP run finished by the plain trainer from epoch 1 vs the FSDP run" "$TOL_SAME" \
    train "${VIT}_fsdp_then_plain" --save_epochs 1 || failed=1
  # With DeepSpeed: a ZeRO-2 run's epoch-1 checkpoint finished under FSDP (ds_to_universal, then FSDP's loaders).
  if [[ $DEEPSPEED == 1 ]]; then
    launched "${VIT}_zero2" zero2 --model "$VIT" || failed=1
    finish_elsewhere "${VIT}_zero2" "${VIT}_zero2_then_fsdp" zero2 \
      "ZeRO-2 run finished under FSDP from epoch 1 vs the ZeRO-2 run" "$TOL_FSDP" \
      launched "${VIT}_zero2_then_fsdp" fsdp || failed=1
  else
    say "skipped: a ZeRO-2 checkpoint finished under FSDP (deepspeed is not importable; carry .whl)"
  fi
  rm -rf "$W/$fsdp" "$W/${VIT}_fsdp_then_plain" "$W/${VIT}_zero2" "$W/${VIT}_zero2_then_fsdp"
  RESULT=
  bench e_fsdp --models "$VIT" --modes eager --augment crop_flip --no-zero2 --fsdp || failed=1
  return $failed
}

stage_d() {
  # NFNet first: launch-bound (its bf16 step took ~46-51 ms at batch 32, 256 and 1024 alike on one H200), where
  # compilation can matter most. The CPU smoke compiles one tiny model only, with dynamo's capture and AOTAutograd's
  # graphs run eagerly (aot_eager): inductor's C++ kernels made this stage 32 s on 2 cores with a cold cache (torch
  # 2.14.1, 2026-12-05). The tests compile with aot_eager too: inductor itself runs here, on the GPU only.
  local models=$NFNET,$VIT backend=inductor
  [[ $SMOKE == 1 ]] && { models=$VIT backend=aot_eager; }
  bench d_compile --models "$models" --modes compile --compile_backend "$backend" --augment crop_flip --no-zero2
}

if [[ -n $RUN_STAGE ]]; then
  W=$GPU_CHECK_WORK
  "stage_$RUN_STAGE"
  exit $?
fi

# --- the preamble: what decides whether the check can run at all ----------------------------------------------
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
NEED_MB=${GPU_CHECK_NEED_MB:-$([[ $SMOKE == 1 ]] && echo 200 || echo 6000)}
free_mb() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 { print int($4 / 1024) }'; }
choose_work() {  # the first candidate folder that is writable and has NEED_MB free; else the one with the most
  local best= best_free=-1 candidate free
  for candidate in ${GPU_CHECK_WORK:+"$GPU_CHECK_WORK"} /dev/shm /tmp "$REPO/.gpu_check_work"; do
    mkdir -p "$candidate" 2>/dev/null && [[ -w $candidate ]] || continue
    free=$(free_mb "$candidate"); free=${free:-0}
    if ((free >= NEED_MB)); then echo "$candidate"; return; fi
    echo "work folder: $candidate has $free MB free, under the $NEED_MB MB needed; passed over" >&2
    ((free > best_free)) && best=$candidate best_free=$free
  done
  echo "work folder: no candidate has $NEED_MB MB free; using $best ($best_free MB)" >&2
  echo "$best"
}
{ date -u; [[ $SMOKE == 1 ]] && echo "cpu-smoke: tiny models, a few steps, on the CPU"
  # pip show's fields, read from the packages' metadata: pip's own start took 2.8 CPU-s (2-core CPU, 2026-12-05)
  $PY -c "
import importlib.metadata as metadata
for name in ('torch', 'timm', 'accelerate'):
    try:
        found = metadata.distribution(name)
        print(f'Name: {name}\tVersion: {found.version}\tLocation: {found.locate_file(\"\")}')
    except metadata.PackageNotFoundError:
        print(f'Name: {name}\tnot installed')" || echo "package versions: failed"
  df -h /dev/shm /tmp "$REPO" 2>&1
  if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1 | head -20; else echo "nvidia-smi: not found"; fi
} | tee "$OUT/summary.txt"
export GPU_CHECK_WORK=$(choose_work 2> >(tee -a "$OUT/summary.txt" >&2))/gpu_check_$$
W=$GPU_CHECK_WORK
mkdir -p "$W"
echo "work folder: $W" | tee -a "$OUT/summary.txt"
# The repository first on the path whatever happens to the wheels: a failed install must not make every stage
# fail to import `trainer`.
ORIGINAL_PYTHONPATH=${PYTHONPATH:-}
export PYTHONPATH=$REPO${ORIGINAL_PYTHONPATH:+:$ORIGINAL_PYTHONPATH}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" \
      "$WHEELS"/*.whl; then
    export PYTHONPATH=$REPO:$W/site${ORIGINAL_PYTHONPATH:+:$ORIGINAL_PYTHONPATH}
  else
    echo "wheels: could not install those of $WHEELS; going on without them" | tee -a "$OUT/summary.txt"
  fi
fi
# One process imports them all (each import of torch costs seconds); stages c and e read DEEPSPEED from here.
{ $PY -c "
import sys, torch, timm, accelerate
print('python', sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())
try:
    import deepspeed
    print('deepspeed', deepspeed.__version__)
except Exception:
    print('deepspeed: not importable')" 2>&1 | grep -vE '^(\[|[WI][0-9]{4} )' || echo "imports: failed"  # logs left out
  $PY -c "import trainer; print('trainer from', trainer.__file__)" 2>&1 | tail -1
  echo "PYTHONPATH=$PYTHONPATH"
} | tee -a "$OUT/summary.txt"
export DEEPSPEED=0
grep -q "^deepspeed [0-9]" "$OUT/summary.txt" && DEEPSPEED=1

start=$SECONDS failures=0
for stage in a:300 b:240 c:150 e:300 d:0; do
  name=${stage%%:*} budget=${stage##*:}
  [[ ,$STAGES, == *,$name,* ]] || continue
  [[ $SMOKE == 1 ]] && budget=0
  left=$((BUDGET - (SECONDS - start)))
  [[ $budget == 0 || $budget -gt $left ]] && budget=$left
  if [[ $budget -lt 20 ]]; then
    echo "stage $name: skipped (${left} s left of ${BUDGET} s)" | tee -a "$OUT/summary.txt"; continue
  fi
  echo "=== stage $name (budget ${budget} s) ==="
  t0=$SECONDS
  timeout --kill-after=10 "$budget" bash "$SCRIPT" --run-stage "$name" $([[ $SMOKE == 1 ]] && echo --cpu-smoke)
  status=$?
  rm -f "$OUT"/*/bench.json "$OUT"/*/bench.jsonl  # left by a stage stopped at its budget; bench.md has the rows
  case $status in
    0) result=ok ;;
    # Stage d has no budget of its own, only the time the others left: running out of it measured less, it did
    # not fail.
    124|137) if [[ $name == d ]]; then result="stopped at the ${budget} s left (rows measured so far are kept)"
             else result="FAILED: over its ${budget} s budget (rows measured so far are kept)"; failures=$((failures + 1)); fi ;;
    *) result=FAILED; failures=$((failures + 1)) ;;
  esac
  echo "stage $name: $result ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
done
rm -rf "$W"
echo "total $((SECONDS - start)) s; $failures stage(s) failed; results in $OUT"
exit $failures
