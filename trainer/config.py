"""One typed configuration for a training run, its command line, and its validation.

Field names are the reference study's names; the command line spells them `--learning_rate` or
`--learning-rate`; booleans take `--x` / `--no-x`; `--config FILE` (YAML or JSON) supplies values that
the command line overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import yaml

from .errors import UserError
from .time_limit import parse_duration


# Exit status of a run stopped by the preemption signal after saving (EX_TEMPFAIL: run again with --resume auto).
# Here, in a module without torch, so that the study runner can read it cheaply.
PREEMPTED_EXIT_CODE = 75


class ConfigError(UserError, ValueError):
    """A configuration the user can fix (see UserError)."""


# The two models of the reference study: the exact timm names and keyword arguments it used.
MODEL_PRESETS = {
    "nfnet": ("dm_nfnet_f0.dm_in1k", {}),
    "vit": ("vit_base_patch8_224.augreg_in21k_ft_in1k", {"img_size": (32, 32)}),
}
# accelerate.utils.LoggerType without "all" (an explicit list keeps the record of what was logged where); written
# out here because importing accelerate imports torch, which this module avoids.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
PATH_FIELDS = ("pretrained_file", "data_dir", "checkpoint", "save_dir")


@dataclass(kw_only=True)
class TrainConfig:
    # --- model -------------------------------------------------------------------------------
    model: str = "nfnet"
    """`nfnet` or `vit` (the study's presets) or any timm model name."""
    pretrained: bool = True
    """Start from pretrained weights (timm / Hugging Face cache or hub)."""
    pretrained_file: Optional[str] = None
    """Local .safetensors or .pth weights, loaded through timm (head reset, ViT position embeddings resampled)."""
    image_size: int = 32
    """Side of the square training image in pixels; CIFAR's 32x32 images are resized when different."""

    # --- data --------------------------------------------------------------------------------
    data: str = "cifar100"
    """`cifar100`, `cifar10`, `imagefolder:PATH` (PATH/train/<class>/, PATH/val/<class>/) or `hf:PATH_OR_NAME` (a Hugging Face datasets data set)."""
    data_dir: str = "./data"
    """Folder that holds `cifar-100-python/` (or CIFAR-10's `cifar-10-batches-py/`); downloaded there when missing."""
    download: bool = True
    """Download CIFAR-100 (or CIFAR-10) into data_dir when it is missing."""
    decode: Literal["auto", "once", "per_step"] = "auto"
    """Own images (imagefolder:, hf:): `once` into memory at the start, `per_step` as each step needs them (in --num_workers processes), `auto` once when they fit in memory, else per_step."""
    augment: Literal["crop_flip", "randaug", "none"] = "crop_flip"
    """`crop_flip`: random crop of the 4-pixel zero-padded image + flip; `randaug`: then timm's RandAugment; `none`."""
    randaug: str = "rand-m9-mstd0.5-inc1"
    """timm RandAugment string of `--augment randaug`: m magnitude (0-10), n ops per image, mstd magnitude std."""
    reprob: float = 0.0
    """Probability per image of timm's random erasing (a box of 2-33 % of the area, pixel noise); 0: off."""
    mixup: float = 0.0
    """Mixup alpha: mixing weight ~ Beta(alpha, alpha), timm's Mixup within each micro-batch; 0: off."""
    cutmix: float = 0.0
    """CutMix alpha: pasted box's area share ~ Beta(alpha, alpha), within each micro-batch; 0: off."""
    mixup_prob: float = 1.0
    """Probability that a micro-batch is mixed at all, when --mixup or --cutmix is on."""
    mixup_switch_prob: float = 0.5
    """Probability of cutmix rather than mixup for a mixed micro-batch, when both are on."""
    num_workers: int = 0
    """Worker processes that prepare micro-batches on the CPU; 0 prepares them in the training process."""
    data_device: Literal["auto", "cpu", "accelerator"] = "auto"
    """Where the training set lives: `accelerator` keeps it on the GPU, `auto` does so whenever training on a GPU."""

    # --- optimisation ------------------------------------------------------------------------
    seed: int = 3407
    """Seed of weights' initialisation, data order and augmentation."""
    epochs: int = 25
    """Passes over the training set."""
    warmup_epochs: float = 5
    """Epochs of linear warm-up from 0 to learning_rate."""
    learning_rate: float = 5e-4
    """Peak learning rate, per global batch of batch_size images."""
    min_lr: float = 0.0
    """Floor that the cosine schedule decays to."""
    weight_decay: float = 1e-2
    """Decoupled weight decay (AdamW) or L2 penalty (SGD)."""
    optimizer: Literal["adamw", "sgdm"] = "adamw"
    """`adamw` or `sgdm` (SGD with momentum)."""
    momentum: float = 0.9
    """Momentum of `sgdm`."""
    nesterov: bool = False
    """Nesterov momentum for `sgdm`."""
    scheduler: Literal["cosine", "linear_decay"] = "cosine"
    """`cosine` (warm-up, then cosine to min_lr) or `linear_decay` (warm-up, then linear to 0)."""
    batch_size: int = 256
    """Global batch: images per optimizer step, summed over processes and accumulation steps."""
    micro_batch_size: Optional[int] = None
    """Images per process per forward pass; default: the largest that divides, so accumulation is smallest."""
    max_micro_batch_size: int = 256
    """Largest micro-batch the automatic choice may pick (memory bound per process)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 turns clipping off (also under DeepSpeed)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy (as timm's LabelSmoothingCrossEntropy); folded into the targets with mixup/cutmix."""
    layer_decay: Optional[float] = None
    """Layer-wise lr decay (timm): a parameter at depth i of L gets learning_rate * layer_decay^(L - i); unset: off."""
    model_ema: bool = False
    """Keep an exponential moving average of the weights (timm ModelEmaV3), evaluated and saved beside the model."""
    model_ema_decay: float = 0.9998
    """Weight of the old average at each optimizer step: ema = decay * ema + (1 - decay) * weights."""

    # --- hardware ----------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`cuda`, `cpu`, or `auto` (a GPU when there is one, else the CPU)."""
    compile: bool = False
    """torch.compile the model (with --compile_backend), with static shapes: the epoch's shorter last step and evaluation each compile once more, and full steps keep their own graph."""
    # torch.compile's CUDA-graph modes (reduce-overhead, max-autotune) failed on these models with a plain training
    # step ("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run", one H200,
    # torch 2.11, 2026-11-27); --cuda_graph captures the whole step instead.
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode: `default` or `max-autotune-no-cudagraphs` (for CUDA graphs use --cuda_graph)."""
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """torch.compile backend: `inductor` generates kernels; `aot_eager` and `eager` run the captured graphs eagerly (to tell a compiler problem from a capture problem, as timm's `--torchcompile BACKEND`)."""
    cuda_graph: bool = False
    """Capture the whole training step as one CUDA graph (one GPU, one process, no accumulation, no BatchNorm): no launch overhead."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """`no`, `bf16`, `fp16`, or `auto`: fp32 on CPU; on GPUs the accelerate config's bf16/fp16, else bf16 where supported."""

    # --- evaluation, checkpoints, logging ----------------------------------------------------
    eval_batch_size: int = 500
    """Test images per process per forward pass during evaluation."""
    checkpoint: Optional[str] = None
    """Checkpoint folder (`{save_dir}/epoch_N` or `step_N`) to resume from."""
    resume: Optional[Literal["auto"]] = None
    """`auto`: resume from the newest checkpoint in save_dir that verifies; with none, start fresh unless save_dir holds another run."""
    overwrite: bool = False
    """Start a fresh run in a save_dir that holds another one: its checkpoints, records and tracker folders are deleted first."""
    keep_last: int = 0
    """Keep only the newest K checkpoints (deleted after a newer one is complete); 0 keeps all."""
    keep_best: bool = False
    """With keep_last, also keep the checkpoint with the best val_acc1."""
    on_save_error: Literal["stop", "continue"] = "stop"
    """When a checkpoint cannot be written (disk full, permissions): `stop` (exit 1) or `continue` training (the final checkpoint and a preempted run's always stop, exit 1)."""
    preempt_signal: Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"] = "SIGTERM"
    """Signal that makes the run save a checkpoint within two steps and exit with status 75 (also SIGUSR1 and SIGINT always)."""
    time_limit: Optional[str] = None
    """Save and exit 75 before this much time from the start has passed (`3h50m`, `230m`, `03:50:00`); under SLURM the job's own end time is read too (the earlier wins), with no --signal needed."""
    time_limit_margin: float = 60.0
    """Seconds kept free before the time limit beyond twice the longest step or epoch end: the first save (before one is measured) and the exit."""
    save_epochs: int = -1
    """Save a checkpoint every this many epochs; -1: after the last epoch only."""
    save_dir: str = "checkpoint"
    """Folder for config.json, metrics.jsonl and checkpoints."""
    log_interval: int = 20
    """Optimizer steps between steps.jsonl lines and progress updates (the loop's only host syncs)."""
    progress: bool = True
    """Show a progress bar on the main process."""
    log_with: Optional[str] = None
    """Also log each log_interval and epoch to accelerate's trackers, comma-separated: tensorboard, mlflow, wandb, ..."""

    def __post_init__(self) -> None:
        """The checks of the values themselves: no file is read and no library imported here (check_environment
        does both), so that a TrainConfig is cheap to build and means the same on every machine."""
        for name in PATH_FIELDS:  # `~` from config files, or `--save_dir=~/x` that the shell leaves alone
            if getattr(self, name) is not None:
                setattr(self, name, os.path.expanduser(getattr(self, name)))
        for f in dataclasses.fields(self):  # argparse's float() and YAML's .inf take inf and nan
            value = getattr(self, f.name)
            _need(not isinstance(value, float) or math.isfinite(value), f"--{f.name} must be a finite number, got {value}")
        for name, choices in _choices().items():
            value = getattr(self, name)
            allowed = value in choices or (value is None and _optional(name))
            _need(allowed, _CHOICE_MESSAGES.get(name, "--{name} {value!r} is not one of: {listed}").format(
                name=name, value=value, listed=", ".join(choices), either=" or ".join(choices)))
        # An empty path is the current folder to every file function: the run would mix with whatever is there.
        _need(self.save_dir.strip() != "", "--save_dir is empty: name the run's folder (e.g. --save_dir runs/vit)")
        _need(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        # accelerate's set_seed also seeds numpy, whose seeds lie in [0, 2**32 - 1].
        _need(0 <= self.seed < 2**32, f"--seed must lie in [0, 2**32 - 1], got {self.seed}")
        _need(0 <= self.warmup_epochs <= self.epochs,
             f"--warmup_epochs must lie in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        _need(self.learning_rate > 0, f"--learning_rate must be positive, got {self.learning_rate}")
        _need(0 <= self.min_lr <= self.learning_rate, f"--min_lr must lie in [0, learning_rate], got {self.min_lr}")
        _need(self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}")
        _need(self.batch_size >= 1, f"--batch_size must be at least 1, got {self.batch_size}")
        _need(self.micro_batch_size is None or self.micro_batch_size >= 1,
             f"--micro_batch_size must be at least 1, got {self.micro_batch_size}")
        _need(self.max_micro_batch_size >= 1, f"--max_micro_batch_size must be at least 1, got {self.max_micro_batch_size}")
        _need(self.eval_batch_size >= 1, f"--eval_batch_size must be at least 1, got {self.eval_batch_size}")
        _need(self.grad_clip >= 0, f"--grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        _need(0 <= self.label_smoothing < 1, f"--label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        _need(self.num_workers >= 0, f"--num_workers must be >= 0, got {self.num_workers}")
        _need(self.image_size >= 8, f"--image_size must be at least 8 pixels, got {self.image_size}")
        data_source(self.data)  # a ConfigError naming the accepted spellings
        _need(self.decode == "auto" or data_source(self.data)[0] in ("imagefolder", "hf"),
              f"--decode {self.decode} applies to --data imagefolder: and hf: (CIFAR's pickles are read whole)")
        _need(self.save_epochs == -1 or self.save_epochs >= 1, f"--save_epochs must be -1 or >= 1, got {self.save_epochs}")
        _need(self.log_interval >= 1, f"--log_interval must be at least 1, got {self.log_interval}")
        _need(0 <= self.momentum < 1, f"--momentum must lie in [0, 1), got {self.momentum}")
        self._check_augmentation()
        _need(self.layer_decay is None or 0 < self.layer_decay <= 1,
             f"--layer_decay must lie in (0, 1] (1: no decay), got {self.layer_decay}")
        _need(0 <= self.model_ema_decay < 1, f"--model_ema_decay must lie in [0, 1), got {self.model_ema_decay}")
        for name in self.trackers:
            _need(name in TRACKERS, f"--log_with {name!r} is not one of accelerate's trackers: {', '.join(TRACKERS)}")
        if self.pretrained_file is not None:
            _need(Path(self.pretrained_file).suffix in (".safetensors", ".pth", ".pt", ".bin"),
                 f"--pretrained_file {self.pretrained_file} must be a .safetensors or .pth file")
        _need(self.checkpoint is None or self.resume is None, "give either --checkpoint DIR or --resume auto, not both")
        _need(not (self.overwrite and (self.resume or self.checkpoint)),
             "--overwrite starts a new run (deleting the one in save_dir); it cannot be combined with --resume or "
             "--checkpoint")
        _need(self.keep_last >= 0, f"--keep_last must be >= 0 (0 keeps all), got {self.keep_last}")
        if self.time_limit is not None:
            seconds = parse_duration(self.time_limit)
            _need(seconds is not None and seconds > 0,
                  f"--time_limit {self.time_limit!r} is not a duration such as 3h50m, 230m, 45s or 03:50:00")
        _need(self.time_limit_margin >= 0, f"--time_limit_margin must be >= 0 seconds, got {self.time_limit_margin}")

    def _check_augmentation(self) -> None:
        _need(self.augment != "randaug" or self.data_device != "accelerator",
             "--augment randaug runs timm's RandAugment on PIL images on the CPU: use --data_device cpu or auto "
             "(and --num_workers N to spread it over CPU cores)")
        default = next(f.default for f in dataclasses.fields(self) if f.name == "randaug")
        _need(self.augment == "randaug" or self.randaug == default,
             f"--randaug {self.randaug!r} applies to --augment randaug only (got --augment {self.augment})")
        if self.augment == "randaug":
            sections = self.randaug.split("-")
            known = re.compile(r"(m\d+|n\d+|p\d*\.?\d+|mstd\d*\.?\d+|mmax\d+|inc[01]|tweights|t3aw|t3a)")
            bad = [s for s in sections[1:] if not known.fullmatch(s)]
            _need(sections[0] == "rand" and not bad,
                 f"--randaug {self.randaug!r} is not a timm RandAugment string such as rand-m9-mstd0.5-inc1 "
                 f"(then m<magnitude>, n<ops>, p<prob>, mstd<std>, mmax<max>, inc<0|1>, tweights|t3a|t3aw)"
                 + (f"; unknown section {bad[0]!r}" if bad else ""))
        _need(0 <= self.reprob <= 1, f"--reprob must lie in [0, 1], got {self.reprob}")
        _need(self.mixup >= 0, f"--mixup must be >= 0 (0 = off), got {self.mixup}")
        _need(self.cutmix >= 0, f"--cutmix must be >= 0 (0 = off), got {self.cutmix}")
        _need(0 <= self.mixup_prob <= 1, f"--mixup_prob must lie in [0, 1], got {self.mixup_prob}")
        _need(0 <= self.mixup_switch_prob <= 1, f"--mixup_switch_prob must lie in [0, 1], got {self.mixup_switch_prob}")
        _need(not (self.mixes and self.cuda_graph),
             "--cuda_graph does not support --mixup/--cutmix (the captured step takes class labels, not soft targets)")

    @property
    def trackers(self) -> list[str]:
        """The accelerate trackers of --log_with (comma-separated), in order."""
        return [] if self.log_with is None else [name.strip() for name in self.log_with.split(",")]

    @property
    def mixes(self) -> bool:
        """Mixup or cutmix is on: labels become soft targets and the loss soft-target cross-entropy."""
        return self.mixup > 0 or self.cutmix > 0

    def timm_name_and_kwargs(self) -> tuple[str, dict]:
        """The timm model name and the keyword arguments the preset (if any) adds."""
        return MODEL_PRESETS.get(self.model, (self.model, {}))


DATA_KINDS = ("cifar100", "cifar10", "imagefolder:PATH", "hf:PATH_OR_NAME")


def data_source(spec: str) -> tuple[str, str | None]:
    """--data as (kind, location): ("cifar100", None), ("imagefolder", "/data/pets"), ("hf", "user/name"), ..."""
    kind, colon, location = spec.partition(":")
    if not colon and kind in ("cifar100", "cifar10"):
        return kind, None
    if colon and kind in ("imagefolder", "hf") and location.strip():
        return kind, os.path.expanduser(location) if kind == "imagefolder" else location
    raise ConfigError(f"--data {spec!r} is not one of: {', '.join(DATA_KINDS)}")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# The refusal of a value outside its field's Literal choices: this general line, or, for these fields, the line
# they had before the choices were read from the annotations ({listed}: "a, b, c"; {either}: "a or b").
_CHOICE_MESSAGES = {
    "resume": "--resume must be {either}, got {value!r}",
    "on_save_error": "--on_save_error must be {either}, got {value!r}",
    "preempt_signal": "--preempt_signal must be one of {listed}, got {value!r}",
}


def _literal(hint) -> Optional[tuple]:
    """The values of a Literal annotation, also inside Optional[...]; None for any other annotation."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return next((_literal(a) for a in typing.get_args(hint) if typing.get_origin(a) is Literal), None)


def _choices() -> dict[str, tuple]:
    """Each field whose values are a fixed set, with that set, in the order the annotation lists them."""
    hints = typing.get_type_hints(TrainConfig)
    return {name: values for name, hint in hints.items() if (values := _literal(hint)) is not None}


def _optional(name: str) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(TrainConfig)[name])


def check_environment(config: TrainConfig) -> None:
    """The checks that read the file system or import a library, run by parse_config right after the values'
    own checks (TrainConfig.__post_init__), before any data is read or any model built."""
    for name in config.trackers:
        # accelerate drops a tracker whose package is missing with a debug message only: check with its own test.
        from accelerate.utils import imports
        package = {"mlflow": "mlflow-skinny", "aim": "'aim<4'"}.get(name, name)
        _need(getattr(imports, f"is_{name}_available")(),
              f"--log_with {name} needs the {name} package: pip install {package}")
    if config.pretrained_file is not None:
        _need(Path(config.pretrained_file).is_file(), f"--pretrained_file {config.pretrained_file} does not exist")
    if config.checkpoint is not None:
        _need(Path(config.checkpoint).is_dir(), f"--checkpoint {config.checkpoint} is not a folder")
    kind, location = data_source(config.data)
    if kind == "imagefolder":
        _need(Path(location).is_dir(), f"--data imagefolder:{location}: no such folder")
    if kind == "hf":
        import importlib.util
        _need(importlib.util.find_spec("datasets") is not None,
              f"--data {config.data} needs Hugging Face datasets: pip install -e '.[datasets]'")
    if config.augment == "randaug":  # the string's form was checked in __post_init__; here, whether timm takes it
        from timm.data import rand_augment_transform
        try:
            rand_augment_transform(config.randaug, {})
        except (AssertionError, ValueError, KeyError) as error:
            raise ConfigError(f"--randaug {config.randaug!r}: timm refuses it "
                              f"({type(error).__name__}: {error})") from None


# --- command line -------------------------------------------------------------------------------

def _value_type(name: str) -> type:
    """The type of an option's values: X of Optional[X], str of a Literal of strings."""
    hint = typing.get_type_hints(TrainConfig)[name]
    choices = _literal(hint)
    if choices is not None:
        return type(choices[0])
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints its whole usage (some 30 lines for the trainer) before the line that names the mistake: print
    that line alone, `error: ...`, with exit status 2 like every other bad input. --help still prints everything.
    Every command of the package parses with it."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def a_or_an(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="trainer", description="Fine-tune a timm model on CIFAR-100 with Hugging Face Accelerate.",
        argument_default=argparse.SUPPRESS, allow_abbrev=False)  # a typo must not silently match another option
    parser.add_argument("--config", help="YAML or JSON file of options; the command line overrides it.")
    docs = _field_docs()
    for f in dataclasses.fields(TrainConfig):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kind = _value_type(f.name)
        help_text = f"{docs.get(f.name, '')} (default: {f.default})"
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(*names, dest=f.name, type=kind, metavar=f.name.upper(), help=help_text)
    return parser


def _field_docs() -> dict[str, str]:
    """The docstring under each field, read from this file, so `--help` and the code never disagree."""
    import ast
    tree = ast.parse(Path(__file__).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
    docs, last = {}, None
    for node in cls.body:
        if isinstance(node, ast.AnnAssign):
            last = node.target.id
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and last:
            docs[last] = node.value.value.replace("%", "%%")
            last = None
    return docs


def load_config_file(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--config {path} does not exist")
    try:
        values = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except UnicodeDecodeError:  # a binary file (weights, an archive) given by mistake
        raise ConfigError(f"--config {path} is not a text file (YAML or JSON)") from None
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"--config {path} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                          f"{str(error).splitlines()[0]}") from None
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must hold a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(k.replace("-", "_") for k in values) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    coerced = {}
    for key, value in values.items():
        try:
            coerced[key.replace("-", "_")] = typed_value(key.replace("-", "_"), value)
        except ConfigError as error:
            raise ConfigError(f"--config {path}: {error}") from None
    return coerced


def typed_value(name: str, value):
    """A config or study file's value of option `name`, with the option's type exactly, else ConfigError.

    An int is taken for a float, and a string that spells a number for a number (PyYAML reads `5e-4`, with
    no dot, as a string); never a bool for a number, a float for an int (1.9 must not become 1), or null
    for an option that has no null.
    """
    kind = _value_type(name)
    if value is None:
        if _optional(name):
            return None
        raise ConfigError(f"{name} must be {a_or_an(kind.__name__)}, got null (it has no null value)")
    if isinstance(value, str) and kind in (int, float):
        try:
            value = kind(value)
        except ValueError:
            pass
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"{name} must be {a_or_an(kind.__name__)}, got {value!r}")
    return value


def parse_config(argv: Optional[list[str]] = None) -> TrainConfig:
    parser = build_parser()
    cli = vars(parser.parse_args(argv))
    values = load_config_file(cli.pop("config")) if "config" in cli else {}
    values.update(cli)
    config = TrainConfig(**values)
    check_environment(config)
    return config


def check_writable_folder(path: str, option: str) -> None:
    """Refuse, creating nothing, a folder that is a file, lies under a file, or cannot be written or created.

    As root every folder is writable (os.access says so too), except on a read-only file system.
    """
    p = Path(path).absolute()
    existing = p if p.exists() else next(a for a in p.parents if a.exists())
    if not existing.is_dir():
        raise ConfigError(f"{option} {path} is a file, not a folder" if existing == p
                          else f"{option} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path} is not writable" if existing == p
                          else f"{option} {path} cannot be created: {existing} is not writable")


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def env_world_size() -> int:
    """Processes the launcher started (torchrun / accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
