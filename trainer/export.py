"""Export any checkpoint (DDP, DeepSpeed ZeRO or FSDP) as a timm model folder.

    python -m trainer.export checkpoint/epoch_25 --out exported/ [--ema] [--push_to_hub user/cifar100-vit]

writes what timm's own saver (`timm.models.save_for_hf`) writes: `model.safetensors` and `config.json`
(architecture, num_classes, the model arguments such as ViT's img_size, the input size and normalisation
the run used, the run's class names: CIFAR-100's 100, or its --data's), plus a model card `README.md` with the
run's options and final metrics. `--ema` exports the checkpoint's EMA weights instead. Load it with

    model = timm.create_model("local-dir:exported", pretrained=True)   # pretrained=True: load the folder's weights

`--push_to_hub NAME` pushes the same folder content with timm's `push_to_hf_hub`; load it from anywhere with
`timm.create_model("hf-hub:NAME", pretrained=True)`.

Exit status: 0 done; 2 a bad checkpoint, --out or network (one line on stderr).
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import is_checkpoint, load_checkpoint_model, read_manifest
from .config import OneLineArgumentParser
from .errors import UserError, run_command

CARD_FILE = "README.md"
# What save_for_hf (safetensors only) and the model card write: a folder holding only these is a previous export.
EXPORT_FILES = {"model.safetensors", "config.json", CARD_FILE}


class ExportError(UserError, ValueError):
    """An export, evaluation or --out the user can fix (see UserError)."""


def check_out(out: Path, *, overwrite: set[str] | None = EXPORT_FILES, flag: str = "--out") -> None:
    """Refuse an output folder that is a file, lies under a file, cannot be written or created, lies inside a
    checkpoint (a file written there fails the checkpoint's manifest, so the next resume, evaluate or export refuses
    it as damaged), or is a non-empty folder holding other files than a previous output (`overwrite`; None: any
    file). Creates nothing. The one check of every command's --out (export, evaluate, report)."""
    from .config import ConfigError, check_writable_folder
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{flag} {out} is a file; give a folder")
    for folder in [out.resolve(), *out.resolve().parents]:
        if is_checkpoint(folder):
            raise ExportError(f"{flag} {out} lies inside the checkpoint {folder}; give a folder outside it")
    try:
        check_writable_folder(str(out), flag)
    except ConfigError as error:
        raise ExportError(str(error)) from None
    if overwrite is not None and out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in overwrite or not p.is_file())
        if others:
            raise ExportError(f"{flag} {out} is a folder that holds other files than a previous export "
                              f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); give a new or empty folder")


def run_records(folder: Path) -> tuple[dict, dict | None]:
    """The run's config.json (options and resolved values) and the metrics.jsonl line of this checkpoint's step."""
    from .records import METRICS_FILE, read_lines, read_run_config
    run = folder.resolve().parent
    try:
        config = read_run_config(run) or {}
    except ValueError as error:  # cut short or damaged: one line, not a traceback
        raise ExportError(f"{error}; restore it from a copy, or delete it to go on without the run's options") from None
    info = read_manifest(folder)
    try:
        lines = read_lines(run / METRICS_FILE)
    except ValueError:
        lines = []
    metrics = next((m for m in lines if m.get("step") == info.get("global_step")), None)
    return config, metrics


def label_names(info: dict, data_dir: str | None) -> list[str]:
    """The run's class names: those its checkpoint recorded (any --data); for a checkpoint from before they were
    recorded (always CIFAR-100), its data's `meta` pickle when its data folder is still there, else CIFAR-100's."""
    if info.get("class_names"):
        return list(info["class_names"])
    from .data import CIFAR100_CLASSES, CIFAR_FOLDER, DataError, read_class_names
    meta = Path(data_dir or "", CIFAR_FOLDER, "meta").expanduser()
    if data_dir is not None and meta.is_file():
        try:
            return read_class_names(meta)
        except DataError:
            pass
    return list(CIFAR100_CLASSES)


def export_kwargs(folder: Path, model, info: dict, ema: bool) -> dict:
    """The arguments of timm's save_for_hf / push_to_hf_hub: label names, preprocessing, model card."""
    config, metrics = run_records(folder)
    options, resolved = config.get("options", {}), config.get("resolved", {})
    data_config = model.pretrained_cfg  # what the trainer normalised with when the run's config.json is missing
    image_size = options.get("image_size", 32)
    data_config = {
        "mean": tuple(resolved.get("normalize_mean", data_config.get("mean"))),
        "std": tuple(resolved.get("normalize_std", data_config.get("std"))),
        # The trainer feeds CIFAR's whole 32x32 image bilinearly resized to image_size, or an own image's shorter
        # side resized (bilinear) and its centre cropped to a square (data/images.py): what timm's evaluation
        # transform does at crop_pct 1.0.
        "input_size": (3, image_size, image_size), "crop_pct": 1.0, "interpolation": "bilinear",
    }
    names = label_names(info, options.get("data_dir"))
    dataset = info.get("data_title", "CIFAR-100")
    details = {"Architecture": info["timm_model"], "Dataset": dataset, "Classes": info["num_classes"],
               "Image size": f"{image_size} x {image_size}", "Weights": "EMA" if ema else "trained model",
               "Checkpoint": f"{folder.name} (epoch {info.get('epoch')}, step {info.get('global_step')})",
               "Params (M)": f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}"}
    if metrics:
        suffix = "_ema" if ema and "val_acc1_ema" in metrics else ""
        details["Test metrics"] = {k: metrics[k + suffix] for k in ("val_acc1", "val_acc5", "val_loss")}
        details["Final train loss"] = metrics.get("train_loss")
    if options:
        details["Training options"] = options
    card = {"description": f"{info['timm_model']} fine-tuned on {dataset} with cifar-trainer (timm + accelerate).",
            "details": details,
            "usage": "```python\nimport timm\nmodel = timm.create_model(\"local-dir:PATH\", pretrained=True)  "
                     "# or \"hf-hub:NAME\" once pushed\nmodel.pretrained_cfg[\"label_names\"]  "
                     f"# the {len(names)} classes\n```"}
    return {"model_config": {"label_names": names}, "data_config": data_config, "model_card": card}


def check_hub_reachable() -> None:
    """Fail in seconds, not after huggingface_hub's retries, when the Hub cannot be reached."""
    from huggingface_hub import constants
    from .models import _hub_reachable
    if constants.HF_HUB_OFFLINE:
        raise ExportError("--push_to_hub: HF_HUB_OFFLINE is set; unset it to push")
    if not _hub_reachable(constants.ENDPOINT):
        raise ExportError(f"--push_to_hub: {constants.ENDPOINT} cannot be reached; push later with the same command "
                          f"when online")


def export(folder: Path, out: Path, ema: bool = False, push_to_hub: str | None = None) -> Path:
    from timm.models import save_for_hf
    from timm.models._hub import generate_readme
    folder, out = Path(folder), Path(out).expanduser()
    check_out(out)
    if push_to_hub:
        check_hub_reachable()
    model, info = load_checkpoint_model(folder, ema=ema)
    kwargs = export_kwargs(folder, model, info, ema)
    save_for_hf(model, str(out), model_config=kwargs["model_config"], data_config=kwargs["data_config"],
                safe_serialization=True)
    (out / CARD_FILE).write_text(generate_readme(kwargs["model_card"], push_to_hub or out.resolve().name))
    if push_to_hub:
        from huggingface_hub.errors import HfHubHTTPError
        from timm.models import push_to_hf_hub
        try:
            push_to_hf_hub(model, push_to_hub, safe_serialization=True, **kwargs)
        except (HfHubHTTPError, OSError, ValueError) as error:
            raise ExportError(f"--push_to_hub {push_to_hub} failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); the export in {out} is complete")
    return out


def main(argv=None) -> int:
    return run_command(export_command, argv)


def export_command(argv) -> int:
    parser = OneLineArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder, e.g. checkpoint/epoch_25")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: CHECKPOINT_export beside it)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (runs with --model_ema)")
    parser.add_argument("--push_to_hub", metavar="NAME", default=None,
                        help="also push to the Hugging Face Hub as NAME (user/repo), with timm's push_to_hf_hub")
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.out or args.checkpoint.parent / f"{args.checkpoint.name}_export",
                 ema=args.ema, push_to_hub=args.push_to_hub)
    print(out)
    return 0


if __name__ == "__main__":
    from trainer.errors import exit_process
    exit_process(main())
