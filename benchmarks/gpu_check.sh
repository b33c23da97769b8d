#!/usr/bin/env bash
# The GPU checks of the throughput and DeepSpeed issues, as one prepared run (results in BENCHMARKS.md):
#   1. --cuda_graph trains the real ViT-B/8 like the eager path (same per-step losses, bf16 tolerance);
#   2. python -m trainer.bench: raw step vs trainer, eager and CUDA graph, augmentation on/off, ZeRO-2 at
#      world size 1, for both study models; 3. the same for torch.compile, last, as it takes longest.
# Usage (GPU machine, repository root): OUT=results bash benchmarks/gpu_check.sh
# Wheels for packages the machine lacks (deepspeed and its needs) are installed from .whl/ when present; make
# them on the development machine (Python 3.12 on the GPU image), with .whl/ in .git/info/exclude, and carry .whl:
#   pip wheel --no-deps -w .whl deepspeed==0.19.8
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl hjson pydantic pydantic-core annotated-types typing-inspection \
#     typing_extensions==4.16.0
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ date -u; nvidia-smi -L; python3 -c "import torch, timm, accelerate; print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__)"; python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)"; } 2>&1 | tee "$OUT/env.txt"

python3 -m trainer.synthetic /tmp/data --num_train 5120 --num_test 1000 >/dev/null
for mode in eager cuda_graph; do
  flag=$([[ $mode == cuda_graph ]] && echo --cuda_graph)
  python3 trainer/main.py --model vit --no-pretrained --data_dir /tmp/data --epochs 1 --warmup_epochs 0 \
    --save_dir "/tmp/run_$mode" --no-progress --log_interval 1 $flag 2>&1 | grep -E "^(model|epoch|error)|Error" | tee -a "$OUT/correctness.txt"
done
python3 - <<'PY' 2>&1 | tee -a "$OUT/correctness.txt"
import json
steps = {m: [json.loads(l) for l in open(f"/tmp/run_{m}/steps.jsonl")] for m in ("eager", "cuda_graph")}
diffs = [abs(a["train_loss"] - b["train_loss"]) / a["train_loss"] for a, b in zip(steps["eager"], steps["cuda_graph"])]
print(f"cuda_graph vs eager, ViT-B/8 bf16, {len(diffs)} steps: max relative loss difference {max(diffs):.2e}")
print("first/last losses eager", steps["eager"][0]["train_loss"], steps["eager"][-1]["train_loss"],
      "cuda_graph", steps["cuda_graph"][0]["train_loss"], steps["cuda_graph"][-1]["train_loss"])
PY

timeout 330 python3 -m trainer.bench --models vit,nfnet --modes eager,cuda_graph --steps 30 --repeats 3 \
  --out "$OUT/main" 2>&1 | grep -vE "^\[|Warning|warn" | tee "$OUT/bench_main.log"
timeout 200 python3 -m trainer.bench --models vit,nfnet --modes compile --augment crop_flip --no-zero2 --steps 30 \
  --repeats 3 --out "$OUT/compile" 2>&1 | grep -vE "^\[|Warning|warn" | tee "$OUT/bench_compile.log"
