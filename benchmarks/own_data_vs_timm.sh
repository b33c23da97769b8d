#!/usr/bin/env bash
# This trainer beside timm's own train.py on the same image folder: scikit-learn's handwritten digits (1,437 train
# and 360 val real 8x8 scans, written as 32x32 grey PNGs by `python -m trainer.synthetic --digits`), resnet18 from
# scratch, AdamW lr 1e-3, weight decay 1e-2, batch 128, 15 epochs of cosine decay per step without warm-up, no
# augmentation, no label smoothing, fp32 on the CPU, for each seed. Prints one line per run and a table of each
# trainer's final top-1 (mean and spread over the seeds).
#
#   benchmarks/own_data_vs_timm.sh TIMM_TRAIN_PY [OUT] [SEEDS]
#     TIMM_TRAIN_PY  timm's train.py (from a clone of huggingface/pytorch-image-models; the pip package has none)
#     OUT            work and result folder (default: a new temporary one)
#     SEEDS          seeds to run (default: "0 1 2")
#
# The two recipes are matched where the two trainers let them be: timm's --no-aug trains on its evaluation
# transform (resize to 32, centre crop 32: the images as they are), its --crop-pct 1.0 evaluates them whole as
# this trainer does, --sched-on-updates steps its cosine per optimizer step as this trainer does. What differs:
# each draws its own initial weights and image order from its seed, and timm's training loader drops the last
# incomplete batch (11 steps of 128 per epoch) where this trainer trains it (12 steps, the last of 29 images).
set -euo pipefail
timm_train=${1:?usage: benchmarks/own_data_vs_timm.sh TIMM_TRAIN_PY [OUT] [SEEDS]}
out=${2:-$(mktemp -d)}
seeds=${3:-0 1 2}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
[[ -d $out/digits ]] || python -m trainer.synthetic --digits "$out/digits" > /dev/null
folder=$out/digits/folder
results=$out/results.csv
echo "trainer,seed,top1,seconds" > "$results"
for seed in $seeds; do
  start=$(date +%s)
  python "$repo/trainer/main.py" --data "imagefolder:$folder" --model resnet18 --no-pretrained --device cpu \
    --mixed_precision no --optimizer adamw --learning_rate 1e-3 --weight_decay 1e-2 --batch_size 128 --epochs 15 \
    --warmup_epochs 0 --scheduler cosine --augment none --label_smoothing 0 --seed "$seed" --save_epochs -1 \
    --no-progress --save_dir "$out/ours_seed$seed" --overwrite > "$out/ours_seed$seed.log" 2>&1
  top1=$(python -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['val_acc1'])" \
    "$out/ours_seed$seed/metrics.jsonl")
  echo "cifar-trainer,$seed,$top1,$(($(date +%s) - start))" | tee -a "$results"
  start=$(date +%s)
  python "$timm_train" --data-dir "$folder" --train-split train --val-split val --model resnet18 --num-classes 10 \
    --img-size 32 --crop-pct 1.0 --interpolation bilinear --opt adamw --lr 1e-3 --weight-decay 1e-2 -b 128 \
    --epochs 15 --warmup-epochs 0 --cooldown-epochs 0 --sched cosine --sched-on-updates --min-lr 0 --no-aug \
    --smoothing 0 --seed "$seed" --device cpu -j 0 --output "$out/timm_seed$seed" --experiment run \
    > "$out/timm_seed$seed.log" 2>&1
  top1=$(python -c "import csv,sys; print(list(csv.DictReader(open(sys.argv[1])))[-1]['eval_top1'])" \
    "$out/timm_seed$seed/run/summary.csv")
  echo "timm train.py,$seed,$top1,$(($(date +%s) - start))" | tee -a "$results"
done
python - "$results" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print("| trainer | seeds | final top-1 (%) per seed | mean | sd |")
print("|---|---|---|---|---|")
for name in dict.fromkeys(r["trainer"] for r in rows):
    values = [float(r["top1"]) for r in rows if r["trainer"] == name]
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    print(f"| {name} | {len(values)} | {', '.join(f'{v:.2f}' for v in values)} | {statistics.mean(values):.2f} | {sd:.2f} |")
PY
