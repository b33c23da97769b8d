"""Evaluate a checkpoint, an exported folder or any timm model on the test set of CIFAR-100 or of --data.

    python -m trainer.evaluate checkpoint/epoch_25 --out eval/      # a checkpoint folder (its run's normalisation)
    python -m trainer.evaluate exported/ --data_dir ./data          # a folder written by trainer.export
    python -m trainer.evaluate hf-hub:user/cifar100-vit             # any timm name with 100 classes (local-dir: too)
    python -m trainer.evaluate exported/ --data imagefolder:pets/   # the val/ images of an image folder
    accelerate launch --multi_gpu --num_processes 2 -m trainer.evaluate checkpoint/epoch_25 --device cpu

Prints top-1, top-5 and loss (the trainer's own evaluation code, so a checkpoint gives the numbers of its run's
metrics.jsonl line) and writes into --out: `metrics.json`, `per_class.csv` (images, correct and accuracy of each
class, named by the data set, with its superclass for CIFAR-100) and `confusion.png` (the confusion matrix; for
CIFAR-100 classes grouped by its 20 superclasses, read from the test pickle's `coarse_labels`) and
`predictions.csv` (each test image's label and
top-1 class, in the test set's order: what the study's seeds and intervals compare). Under `accelerate launch` the
test set is sharded over the processes and each image is counted once.

Exit status: 0 done; 2 a bad model, folder or data (one line on stderr).
"""

from __future__ import annotations

import csv
import json
import sys
import typing
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch trainer/evaluate.py`: import the package, as main.py does
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from trainer.checkpoint import class_change, is_checkpoint, load_checkpoint_model  # noqa: E402
from trainer.config import ConfigError, OneLineArgumentParser, TrainConfig, data_source  # noqa: E402
from trainer.errors import run_command  # noqa: E402
from trainer.export import ExportError, check_out, run_records  # noqa: E402
from trainer.records import PREDICTIONS_FILE  # noqa: E402

OUT_FILES = {"metrics.json", "per_class.csv", "confusion.png", PREDICTIONS_FILE}


def load_model(source: str, ema: bool):
    """(model, normalisation {mean, std, image_size}, run options or {}, class names or None) for a checkpoint, a
    folder or a timm name: the names its checkpoint recorded, or an exported folder's or hub model's label_names."""
    import timm
    from timm.data import resolve_data_config
    path = Path(source).expanduser()
    if is_checkpoint(path):  # a checkpoint: its run's normalisation and image size
        model, info = load_checkpoint_model(path, ema=ema)
        config, _ = run_records(path)
        options, resolved = config.get("options", {}), config.get("resolved", {})
        norm = {"mean": resolved.get("normalize_mean", model.pretrained_cfg.get("mean")),
                "std": resolved.get("normalize_std", model.pretrained_cfg.get("std")),
                "image_size": options.get("image_size", 32)}
        return model, norm, options, info.get("class_names")
    if ema:
        raise ExportError("--ema applies to a checkpoint folder only")
    name = f"local-dir:{path}" if (path / "config.json").is_file() else source
    if name.startswith(("hf-hub:", "hf_hub:")):
        # Fail in seconds, not after the hub client's retries, when the model is neither cached nor reachable.
        from huggingface_hub import constants, try_to_load_from_cache
        from trainer.models import _hub_reachable
        repo = name.split(":", 1)[1].split("@")[0]
        if not isinstance(try_to_load_from_cache(repo, "config.json"), str) and (
                constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT)):
            raise ExportError(f"{source} is not in the Hugging Face cache and {constants.ENDPOINT} cannot be reached "
                              f"(or HF_HUB_OFFLINE is set)")
    try:
        model = timm.create_model(name, pretrained=True)  # pretrained=True: the folder's or the hub's weights
    except Exception as error:  # unknown name, no network, a folder timm cannot read: all one line to the user
        raise ExportError(f"{source} is neither a checkpoint folder, an exported folder nor a timm model that "
                          f"loads ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    data_config = resolve_data_config({}, model=model)
    return model.eval(), {"mean": data_config["mean"], "std": data_config["std"],
                          "image_size": data_config["input_size"][-1]}, {}, model.pretrained_cfg.get("label_names")


def write_per_class(path: Path, confusion, class_names: list[str], superclasses) -> None:
    """`superclasses`: (each class's superclass or -1, the superclass names), or None (empty columns)."""
    coarse, coarse_names = superclasses or ([-1] * len(class_names), [])
    images, correct = confusion.sum(dim=1).tolist(), confusion.diagonal().tolist()
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "name", "superclass", "superclass_name", "images", "correct", "accuracy"])
        for c in range(len(class_names)):
            writer.writerow([c, class_names[c], coarse[c], coarse_names[coarse[c]] if coarse[c] >= 0 else "",
                             images[c], correct[c], f"{100 * correct[c] / images[c]:.2f}" if images[c] else ""])


def write_predictions(path: Path, labels, predictions) -> None:
    """One row per test image, in the test set's order: its label and the model's top-1 class (what the study's
    seeds and intervals compare, trainer/stats.py)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "prediction"])
        writer.writerows(zip(range(len(labels)), labels.tolist(), predictions.tolist()))


def plot_confusion(path: Path, confusion, superclasses, class_names: list[str], title: str) -> None:
    """Row-normalised confusion matrix (percent of each true class): classes ordered by superclass (CIFAR-100),
    else in label order, ticked with their names when there are 40 or fewer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    num_classes = len(class_names)
    coarse, coarse_names = superclasses or ([-1] * num_classes, [])
    order = sorted(range(num_classes), key=lambda c: (coarse[c] if coarse[c] >= 0 else len(coarse_names), c))
    matrix = confusion[order][:, order].double()
    matrix = 100 * matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(10, 9.5))
    image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0, vmax=100, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.04, label="% of the true class")
    if superclasses is not None:
        # One tick per superclass, at the middle of its block, and lines between blocks.
        groups = [coarse[c] for c in order]
        starts = [i for i in range(num_classes) if i == 0 or groups[i] != groups[i - 1]]
        for start in starts[1:]:
            ax.axhline(start - 0.5, color="white", linewidth=0.4)
            ax.axvline(start - 0.5, color="white", linewidth=0.4)
        ends = starts[1:] + [num_classes]
        centres = [(s + e - 1) / 2 for s, e in zip(starts, ends)]
        labels = [coarse_names[groups[s]] if groups[s] >= 0 else "absent from the test set" for s in starts]
        ax.set_yticks(centres, labels, fontsize=6)
        ax.set_xticks(centres, labels, fontsize=6, rotation=90)
        ax.set_ylabel("true class (grouped by superclass)")
    else:
        if num_classes <= 40:
            size = 8 if num_classes <= 20 else 6
            ax.set_yticks(range(num_classes), class_names, fontsize=size)
            ax.set_xticks(range(num_classes), class_names, fontsize=size, rotation=90)
        ax.set_ylabel("true class")
    ax.set_xlabel("predicted class")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(source: str, data_dir: str | None, out: Path, eval_batch_size: int | None, device: str,
             ema: bool = False, data: str | None = None) -> dict:
    """`data`/`data_dir`: the test set (default: the checkpoint run's --data and --data_dir, else CIFAR-100 in
    ./data)."""
    import torch
    from accelerate import Accelerator

    from trainer.data import Normalize, load_data
    from trainer.runtime import check_process_group, runs_on_cpu
    from trainer.evaluation import evaluate_model
    from trainer.ranks import Ranks
    from trainer.config import env_world_size

    check_out(out, overwrite=OUT_FILES)
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:  # the confusion figure, written after the evaluation
        raise ConfigError("trainer.evaluate draws its confusion figure with matplotlib: pip install -e '.[report]'")
    on_cpu = runs_on_cpu(device)
    # On a GPU a checkpoint is evaluated in its run's precision, as the trainer did (under DeepSpeed the trainer's
    # weights themselves were half precision: the numbers then agree within rounding). The CPU runs fp32.
    from_checkpoint = is_checkpoint(Path(source).expanduser())
    precision = run_records(Path(source).expanduser())[0].get("resolved", {}).get("mixed_precision", "no") \
        if from_checkpoint and not on_cpu else "no"
    # cpu=True makes a multi-process launch on a machine without GPUs one gloo group (see trainer/runtime.py).
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=precision)
    check_process_group(accelerator, launched=env_world_size())
    ranks = Ranks(accelerator)
    with ranks.first_on_main() as downloads:  # a hub model or the data set: fetched once, then read
        model, norm, options, trained_names = load_model(source, ema)
        data = data or options.get("data", "cifar100")
        dataset = load_data(data, data_dir or options.get("data_dir", "./data"), norm["image_size"], downloads,
                            evaluation_only=True)
    test, class_names = dataset.test, dataset.class_names
    changed = class_change(trained_names, model.num_classes, dataset.class_names)
    if changed is not None:  # the count, or a name where the model records its classes' names
        raise ExportError(f"{source} was trained on other classes than {dataset.title}'s ({changed}): evaluate it "
                          f"on the data it was trained on (--data)")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(test.images, test.labels),
                                         batch_size=eval_batch_size or options.get("eval_batch_size", 500))
    # evaluation_mode: placed on the device, no DDP wrapper (no gradients to synchronise).
    model = accelerator.prepare_model(model, evaluation_mode=True)
    loader = accelerator.prepare(loader)
    normalize = Normalize(norm["mean"], norm["std"], norm["image_size"], accelerator.device)
    totals, confusion, labels, predictions = evaluate_model(accelerator, model, loader, normalize, dataset.num_classes,
                                                                 per_image=True)
    # The per-image file pairs runs image by image (trainer/stats.py): its order must be the test set's. A
    # sequential loader sharded by accelerate gathers back in that order; this says so rather than assume it.
    if not torch.equal(labels, test.labels.to(labels.dtype)):
        raise RuntimeError("the gathered evaluation is not in the test set's order; predictions.csv not written")
    loss, correct1, correct5, count = totals.tolist()
    result = {"source": source, "ema": ema, "val_loss": loss / count, "val_acc1": 100 * correct1 / count,
              "val_acc5": 100 * correct5 / count, "val_images": int(count), "processes": accelerator.num_processes}
    if ranks.is_main:
        groups = dataset.superclasses()
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        write_per_class(out / "per_class.csv", confusion, class_names, groups)
        write_predictions(out / PREDICTIONS_FILE, labels, predictions)
        plot_confusion(out / "confusion.png", confusion, groups, class_names,
                       f"{dataset.title}, {source}: top-1 {result['val_acc1']:.2f} %, {int(count)} test images")
    accelerator.wait_for_everyone()
    ranks.say(json.dumps(result))
    return result


def main(argv=None) -> int:
    return run_command(evaluate_command, argv)


def evaluate_command(argv) -> int:
    parser = OneLineArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint folder, folder written by trainer.export, or a timm name "
                                       "(local-dir:PATH, hf-hub:NAME)")
    parser.add_argument("--data", default=None, help="the test set: cifar100, cifar10, imagefolder:PATH or "
                                                     "hf:PATH_OR_NAME (default: the checkpoint run's --data, else "
                                                     "cifar100)")
    parser.add_argument("--data_dir", default=None, help="folder holding cifar-100-python/ (default: the "
                                                         "checkpoint run's --data_dir, else ./data)")
    parser.add_argument("--out", type=Path, default=Path("evaluation"), help="output folder (default: evaluation)")
    parser.add_argument("--eval_batch_size", type=int, default=None,
                        help="test images per process per forward pass (default: the run's, else 500)")
    parser.add_argument("--device", choices=typing.get_args(typing.get_type_hints(TrainConfig)["device"]), default="auto")
    parser.add_argument("--ema", action="store_true", help="evaluate a checkpoint's EMA weights")
    args = parser.parse_args(argv)
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise ConfigError(f"--eval_batch_size must be at least 1, got {args.eval_batch_size}")
    if args.data is not None:
        data_source(args.data)  # a ConfigError naming the spellings, before anything is loaded
    evaluate(args.source, args.data_dir, args.out, args.eval_batch_size, args.device, args.ema, args.data)
    return 0


if __name__ == "__main__":
    from trainer.errors import exit_process
    exit_process(main())
