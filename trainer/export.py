"""Export the weights of any checkpoint (DDP or DeepSpeed ZeRO) for use outside the trainer.

    python -m trainer.export checkpoint/epoch_25 --out exported/

writes `model.safetensors` (the full model, as timm names its tensors) and `model.json`
({"timm_model", "num_classes", "model_kwargs"}), after verifying the checkpoint's manifest. Load with

    timm.create_model(info["timm_model"], pretrained=True, num_classes=info["num_classes"], **info["model_kwargs"],
                      pretrained_cfg_overlay=dict(file="model.safetensors", num_classes=info["num_classes"]))
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .checkpoint import MODEL_FILE, CheckpointError, read_manifest, verify


def export(folder: Path, out: Path) -> Path:
    verify(folder)  # the checkpoint's model.safetensors is already consolidated (gathered under ZeRO-3)
    info = read_manifest(folder)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / MODEL_FILE, out / MODEL_FILE)
    description = {k: info.get(k) for k in ("timm_model", "num_classes", "model_kwargs")}
    (out / "model.json").write_text(json.dumps(description, indent=2) + "\n")
    return out / MODEL_FILE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder, e.g. checkpoint/epoch_25")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: CHECKPOINT_export beside it)")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out or args.checkpoint.parent / f"{args.checkpoint.name}_export")
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
