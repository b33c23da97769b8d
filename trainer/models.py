"""timm models: the study's presets, any other timm name, pretrained weights that fail fast."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import socket
import unittest.mock
from urllib.parse import urlparse

import timm
import torch

from .config import ConfigError, TrainConfig
from .data import NUM_CLASSES


def _hub_reachable(url: str, timeout_s: float = 3.0) -> bool:
    host = urlparse(url).hostname
    try:
        socket.create_connection((host, urlparse(url).port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _check_pretrained_available(name: str) -> None:
    """Fail in seconds when weights cannot be had: with no network and no cached weights, timm's
    pretrained=True retries the hub for ~45 s before LocalEntryNotFoundError (measured 2026-11-27)."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise ConfigError(f"--model {name} has no pretrained weights in timm; use --no-pretrained")
    hint = "use --pretrained_file PATH (local .safetensors/.pth) or --no-pretrained"
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache
        repo = cfg.hf_hub_id.split("@")[0]
        for filename in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, filename), str):
                return
        if constants.HF_HUB_OFFLINE:
            raise ConfigError(f"pretrained weights of {name} are not in the Hugging Face cache and "
                              f"HF_HUB_OFFLINE is set; {hint}")
        if not _hub_reachable(constants.ENDPOINT):
            raise ConfigError(f"pretrained weights of {name} are not cached and {constants.ENDPOINT} "
                              f"cannot be reached; {hint}")
    elif cfg.url:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        if not os.path.isfile(cached) and not _hub_reachable(cfg.url):
            raise ConfigError(f"pretrained weights of {name} are not cached and {cfg.url} cannot be reached; {hint}")


def create_model(config: TrainConfig, num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    """The timm model of --model with a head of `num_classes` (the data's classes)."""
    name, kwargs = config.timm_name_and_kwargs()
    if not timm.is_model(name):
        raise ConfigError(f"--model {config.model!r} is neither a preset (nfnet, vit) nor a timm model name")
    kwargs = dict(kwargs, num_classes=num_classes)
    if config.pretrained_file is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=os.path.abspath(config.pretrained_file))
    elif config.pretrained:
        _check_pretrained_available(name)
    pretrained = config.pretrained or config.pretrained_file is not None
    kwargs["img_size"] = (config.image_size, config.image_size)  # the vit preset's (32, 32) at the default
    try:
        with _recorded_loads() as loads:
            try:
                model = timm.create_model(name, pretrained=pretrained, **kwargs)
            except TypeError as error:
                # timm has no registry of which architectures take img_size (ViTs do, CNNs do not): ask the model.
                if "img_size" not in str(error):
                    raise
                del kwargs["img_size"]
                model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as error:  # not a weights file, or tensors of other shapes than the model's
        if config.pretrained_file is None:
            raise
        if "size mismatch" in str(error):  # a weights file, of another model (torch's load_state_dict says so)
            raise ConfigError(f"--pretrained_file {config.pretrained_file} cannot be loaded into {name} by timm "
                              f"({type(error).__name__}: {_summary(error)})") from None
        # Anything else is the file's format: torch.load reads a text or random file's first byte as a pickle opcode
        # and raises KeyError(number), which would only puzzle.
        detail = "" if isinstance(error, KeyError) else f" ({type(error).__name__}: {_summary(error)})"
        raise ConfigError(f"--pretrained_file {config.pretrained_file} cannot be loaded into {name} by timm: it is "
                          f"not a weights file timm can read (safetensors, or a PyTorch state dict saved with "
                          f"torch.save){detail}") from None
    if config.pretrained_file is not None:
        _check_weights_fit(model, loads, config.pretrained_file, name)
    _check_image_size(model, config)
    return model


def _summary(error: Exception) -> str:
    """The first two lines of an error (torch's size mismatch puts the tensor on the second)."""
    return " ".join(line.strip() for line in str(error).splitlines()[:2] if line.strip())


@contextlib.contextmanager
def _recorded_loads():
    """Record the result of every load_state_dict call made inside.

    timm's load_pretrained drops the pretrained classifier, loads with strict=False whenever the class count
    differs (always here: 100 classes), logs the missing and unexpected keys, and returns nothing. Its loading
    is kept (file formats, checkpoint filters, position-embedding resampling); only its result is read here.
    Its warnings are held back: with 3 input channels the only one it can give is "Unexpected keys", which
    _check_weights_fit turns into the run's one error line.
    """
    results, original = [], torch.nn.Module.load_state_dict

    def recording(module, *args, **kwargs):
        result = original(module, *args, **kwargs)
        results.append(result)
        return result

    builder_log = logging.getLogger("timm.models._builder")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)
    try:
        with unittest.mock.patch.object(torch.nn.Module, "load_state_dict", recording):
            yield results
    finally:
        builder_log.setLevel(level)


def _check_weights_fit(model: torch.nn.Module, loads: list, path: str, name: str) -> None:
    """Refuse weights that leave more than the classifier head unloaded, or bring tensors the model lacks."""
    if not loads:  # a model with its own loader (timm's custom_load, e.g. .npz): no load result to read
        return
    classifiers = model.pretrained_cfg.get("classifier") or ()
    head = {f"{c}.{p}" for c in ((classifiers,) if isinstance(classifiers, str) else classifiers)
            for p in ("weight", "bias")}
    missing = [k for k in loads[-1].missing_keys if k not in head]
    unexpected = list(loads[-1].unexpected_keys)
    if missing or unexpected:
        total = len(model.state_dict())
        raise ConfigError(
            f"--pretrained_file {path} does not fit {name}: {len(missing)} of the model's {total} tensors are "
            f"not in the file{f' ({missing[0]}, ...)' if missing else ''} and {len(unexpected)} of the file's are "
            f"not in the model{f' ({unexpected[0]}, ...)' if unexpected else ''}; are they another model's weights?")


def _check_image_size(model: torch.nn.Module, config: TrainConfig) -> None:
    """One image through the model: timm checks the input size only in forward (a ViT's patch embedding
    asserts it there), which would be the first training step, after the run folder was written."""
    was_training = model.training
    model.eval()  # no dropout draws, no BatchNorm statistics updated
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, config.image_size, config.image_size))
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ConfigError(f"--image_size {config.image_size} does not fit --model {config.model} "
                          f"({type(error).__name__}: {_summary(error)})") from None
    finally:
        model.train(was_training)


@contextlib.contextmanager
def buffers_kept(model: torch.nn.Module):
    """Put every buffer of `model` (BatchNorm's running statistics and num_batches_tracked) back as it was on
    entry, after whatever runs inside (forward, backward and optimizer step included)."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in zip(model.buffers(), saved):
                buffer.copy_(copy)


# The containers in which timm's models keep their repeated blocks: ViT/DeiT/EVA `blocks`, NFNet/RegNet `stages.N`
# (a Sequential of blocks), ConvNeXt `stages.N.blocks`, ResNet `layerN`.
BLOCK_CONTAINERS = re.compile(r"(.*\.)?blocks|stages\.[0-9]+|layer[0-9]+")


def block_classes(model: torch.nn.Module) -> list[str]:
    """The class names of the model's repeated blocks (sorted): the units FSDP shards one at a time, gathering one
    block's weights for its forward and backward. timm models carry no `_no_split_modules` (the list accelerate
    wraps by default, which transformers' models have), so the blocks are found where timm keeps them."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Sequential, torch.nn.ModuleList)) and BLOCK_CONTAINERS.fullmatch(name):
            names.update(type(child).__name__ for child in module.children()
                         if any(p.requires_grad for p in child.parameters()))
    return sorted(names)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_trainable(model: torch.nn.Module, config: TrainConfig, num_train: int, processes: int,
                    accumulation: int) -> None:
    """Refuse, before training, a model that this run's steps would break (ConfigError, one line).

    The last step's micro-batches hold only their real images (data/plan.py): fewer than 2 x processes x
    accumulation images leave some with one image, and BatchNorm in training mode raises on a batch of one
    value per channel (a 1x1 feature map, e.g. resnet18 at 32x32), which would end the run at its first
    epoch's end. One probe forward on one image (buffers put back) asks the model itself.
    """
    if config.cuda_graph and any(n.endswith(("running_mean", "running_var")) for n, _ in model.named_buffers()):
        # A CUDA graph needs one static shape, so the short last step is padded with weight-0 images; the loss
        # weights keep them out of the gradient, but batch statistics (BatchNorm, EvoNorm-B) would see them.
        raise ConfigError(f"--cuda_graph cannot train {config.model}: it has batch statistics (BatchNorm), which "
                          f"the padding of the epoch's short last step would reach; use --compile instead")
    last = num_train - (math.ceil(num_train / config.batch_size) - 1) * config.batch_size
    slots = processes * accumulation
    if last >= 2 * slots or config.cuda_graph:  # --cuda_graph pads every micro-batch
        return
    try:
        # fork_rng: dropout in the probe must not move the random stream that training draws from next.
        with buffers_kept(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.train()(torch.zeros(1, 3, config.image_size, config.image_size))
    except ValueError as error:
        raise ConfigError(f"the epoch's last step holds {last} images over {slots} micro-batches, so some hold "
                          f"one image, which {config.model} cannot train on ({error}); choose a --batch_size that "
                          f"leaves 0 or at least {2 * slots} images for the last step ({num_train} training "
                          f"images)") from None
