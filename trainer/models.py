"""timm models: the study's presets, any other timm name, pretrained weights that fail fast."""

from __future__ import annotations

import os
import socket
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
    """Fail in seconds, not after ~45 s of hub retries (shared notes), when weights cannot be had."""
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


def create_model(config: TrainConfig) -> torch.nn.Module:
    name, kwargs = config.timm_name_and_kwargs()
    if not timm.is_model(name):
        raise ConfigError(f"--model {config.model!r} is neither a preset (nfnet, vit) nor a timm model name")
    kwargs = dict(kwargs, num_classes=NUM_CLASSES)
    if config.pretrained_file is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=os.path.abspath(config.pretrained_file))
    elif config.pretrained:
        _check_pretrained_available(name)
    pretrained = config.pretrained or config.pretrained_file is not None
    kwargs["img_size"] = (config.image_size, config.image_size)  # the vit preset's (32, 32) at the default
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as error:
        # timm has no registry of which architectures take img_size (ViTs do, CNNs do not): ask the model.
        if "img_size" not in str(error):
            raise
        del kwargs["img_size"]
        return timm.create_model(name, pretrained=pretrained, **kwargs)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
