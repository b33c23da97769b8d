"""Any checkpoint resumed under any strategy and process count, through its full training state.

accelerate's `load_state` reads a checkpoint only under the layout that wrote it: DDP's optimizer state is a list
in the optimizer's order, FSDP's is keyed by parameter name, DeepSpeed's is flat partitions, one file per rank
(and the engine refuses another process count). So when the layout changes (DDP <-> ZeRO-1/2/3 <-> FSDP, or a
ZeRO checkpoint on another number of processes), the checkpoint's state is read here as one full, unsharded state
keyed by timm's parameter names: each parameter's float32 master weight and its optimizer state (step, Adam's
moments, SGD's momentum), and written into the prepared model and optimizer of this run with the libraries' own
loaders:

  read   DDP / one process: `model.safetensors` and accelerate's `optimizer.bin`, whose per-parameter entries are
         numbered in the optimizer's order (mapped to names with this run's optimizer, built the same way: the
         options that shape it are fixed on resume, checkpoint.FIXED_ON_RESUME).
         FSDP: accelerate's full-state `optimizer.bin`, already keyed by name (fsdp_state_dict_type FULL_STATE_DICT).
         DeepSpeed: DeepSpeed's own `ds_to_universal`, which writes each parameter's fp32 weight and optimizer
         state unsharded; the step count from the engine's rank-0 optimizer file (ds_to_universal writes it for
         ZeRO-1/2 only).
  write  DDP / FSDP: torch's distributed-checkpoint `set_model_state_dict` / `set_optimizer_state_dict` with
         full_state_dict (each process keeps its shard of the full tensors).
         DeepSpeed: its `safe_set_full_fp32_param` / `safe_set_full_optimizer_state`, which write each process's
         fragment of the fp32 master weights and moments, then the step count and the engine's working weights
         from the master (what DeepSpeed's own universal loader does after loading, see `_write_deepspeed`).

The scheduler, the progress and the random states are the same files under every strategy (accelerate's custom
objects and random_states_N.pkl) and are loaded with accelerate's own functions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .checkpoint_folder import MODEL_FILE, STATE_DIR, CheckpointError, all_ok, load_weights

def layout(distributed_type: str | None, zero_stage: int | None) -> str:
    """The checkpoint layout a run of this accelerate distributed type writes: zeroN, fsdp, or ddp (NO, MULTI_CPU,
    MULTI_GPU and the other data-parallel types, whose state is replicated)."""
    if distributed_type == "DEEPSPEED":
        return f"zero{zero_stage}"
    return "fsdp" if distributed_type == "FSDP" else "ddp"


def loads_natively(saved: dict, here: dict) -> bool:
    """Whether accelerate's load_state reads the checkpoint as saved (`saved`: its manifest; `here`: this run's
    resolved facts). DDP state is replicated and FSDP's is full, so any process count reads them; DeepSpeed's
    partitions only the same stage on the same count."""
    before = layout(saved.get("distributed_type"), saved.get("deepspeed_zero_stage"))
    now = layout(here["distributed_type"], here["deepspeed_zero_stage"])
    return before == now and (not now.startswith("zero") or saved.get("processes") == here["processes"])


def load(runtime, ranks, folder: Path, saved: dict, model, optimizer, param_names: list[str], scratch: Path) -> None:
    """Resume this run from checkpoint `folder` (`saved`: its manifest) whatever layout wrote it: collective.
    `param_names`: this run's parameter names in its optimizer's order; `scratch`: where the main process converts
    DeepSpeed state (every process reads it there), removed afterwards."""
    from .checkpoint_folder import verify
    folder = Path(folder)
    check_convertible(folder, saved)
    ranks.on_main(lambda: verify(folder), (CheckpointError,))
    deepspeed_source = layout(saved.get("distributed_type"), saved.get("deepspeed_zero_stage")).startswith("zero")
    try:
        if deepspeed_source:
            ranks.on_main(lambda: _convert_deepspeed(folder, scratch), (CheckpointError,))
        # Every process reads; they agree on the outcome before any enters write()'s collectives, so a read that
        # fails on one process (a node whose mount lacks a file) is one refusal everywhere, not a hang.
        problem = None
        try:
            model_state, optimizer_state = read(folder, saved, param_names, scratch)
        except (CheckpointError, OSError, KeyError, ValueError, RuntimeError) as error:
            problem = f"{type(error).__name__}: {error}"
        if not all_ok(runtime.accelerator, problem is None):
            raise CheckpointError(f"could not read the training state of {folder} for this strategy "
                                  f"({problem or 'failed on another process'})")
        write(runtime, model, optimizer, model_state, optimizer_state, param_names)
        load_rest(runtime.accelerator, folder)
    finally:
        runtime.accelerator.wait_for_everyone()
        if ranks.is_main:
            shutil.rmtree(scratch, ignore_errors=True)


def check_convertible(folder: Path, saved: dict) -> None:
    """CheckpointError for a checkpoint whose state cannot be read for another layout: DeepSpeed's ds_to_universal
    (deepspeed 0.19.8) reads Adam's moments by name (exp_avg, exp_avg_sq) and fails on SGD's momentum."""
    kind = layout(saved.get("distributed_type"), saved.get("deepspeed_zero_stage"))
    optimizer = (saved.get("options") or {}).get("optimizer", "adamw")
    if kind.startswith("zero") and optimizer != "adamw":
        raise CheckpointError(
            f"{folder} holds DeepSpeed {kind} state of --optimizer {optimizer} on {saved.get('processes')} "
            f"process(es), and DeepSpeed's ds_to_universal, which reads it for another strategy or process count, "
            f"converts Adam's state only: resume it under {kind} on {saved.get('processes')} process(es)")


def read(folder: Path, saved: dict, param_names: list[str], scratch: Path) -> tuple[dict, dict]:
    """(model state, optimizer state) of checkpoint `folder`, full and keyed by parameter name: the model's
    weights and buffers (float32 master weights where the checkpoint holds them) and {name: {step, exp_avg, ...}}.
    `scratch`: a DeepSpeed checkpoint's state as ds_to_universal wrote it."""
    folder, state_dir = Path(folder), Path(folder) / STATE_DIR
    model_state = load_weights(folder / MODEL_FILE)  # every buffer too, under timm's names
    kind = layout(saved.get("distributed_type"), saved.get("deepspeed_zero_stage"))
    if kind == "ddp":
        numbered = torch.load(state_dir / "optimizer.bin", map_location="cpu", weights_only=True)["state"]
        return model_state, {param_names[index]: entry for index, entry in numbered.items()}
    if kind == "fsdp":
        path = state_dir / "optimizer.bin"
        if not path.is_file():
            raise CheckpointError(f"{folder} holds FSDP state sharded per process (fsdp_state_dict_type "
                                  f"SHARDED_STATE_DICT): resume it under FSDP, or save with FULL_STATE_DICT "
                                  f"(accelerate_configs/fsdp.yaml) to resume under another strategy")
        return model_state, torch.load(path, map_location="cpu", weights_only=True)["state"]
    return _read_deepspeed(state_dir / "pytorch_model", model_state, param_names, scratch)


def _convert_deepspeed(folder: Path, scratch: Path) -> None:
    import subprocess
    import sys
    shutil.rmtree(scratch, ignore_errors=True)
    # --inject_missing_state: the universal_checkpoint_info that Megatron-style clients write; plain (no tensor or
    # pipeline parallelism) defaults describe this trainer's data-parallel state.
    result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                             str(folder / STATE_DIR / "pytorch_model"), "--output_folder", str(scratch),
                             "--inject_missing_state"], capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["ds_to_universal failed"])[-1]
        raise CheckpointError(f"could not read the ZeRO state of {folder} (DeepSpeed's ds_to_universal): {reason}")


def _read_deepspeed(engine_dir: Path, model_state: dict, param_names: list[str], scratch: Path) -> tuple[dict, dict]:
    # The base optimizer's step count, the same in every group (each step updates every parameter).
    rank0 = torch.load(engine_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                       weights_only=False)["optimizer_state_dict"]
    base = rank0.get("base_optimizer_state") or rank0["optimizer_state_dict"]  # ZeRO-1/2, ZeRO-3
    # (SGD keeps no step count, and without momentum no state at all.)
    step = next(iter(base["state"].values()), {}).get("step")
    optimizer_state = {}
    for name in param_names:
        shape = model_state[name].shape
        entry = {}
        for file in sorted((scratch / "zero" / name).glob("*.pt")):
            if file.stem == "step":
                continue
            value = torch.load(file, map_location="cpu", weights_only=False)
            value = value["param"] if isinstance(value, dict) else value  # ZeRO-1/2 dict, ZeRO-3 flat tensor
            entry[file.stem] = value.reshape(shape).float()
        model_state[name] = entry.pop("fp32")
        if step is not None:
            entry["step"] = step.clone() if torch.is_tensor(step) else step
        optimizer_state[name] = entry
    return model_state, optimizer_state


def write(runtime, model, optimizer, model_state: dict, optimizer_state: dict, param_names: list[str]) -> None:
    """Load the full state into this run's prepared `model` and `optimizer` (collective: every process calls it)."""
    if runtime.deepspeed:
        _write_deepspeed(model, model_state, optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    inner = optimizer
    while hasattr(inner, "optimizer"):  # accelerate's AcceleratedOptimizer around torch's
        inner = inner.optimizer
    names = iter(param_names)
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [next(names) for _ in group["params"]]}
              for group in inner.param_groups]
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, inner, {"state": optimizer_state, "param_groups": groups}, options=options)


def _write_deepspeed(engine, model_state: dict, optimizer_state: dict) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    zero = engine.optimizer  # DeepSpeed's ZeRO optimizer around the base (torch) optimizer
    # The base optimizer's state, one entry per flat fp32 partition. A fresh engine has none yet (torch creates it
    # at the first step; ZeRO-1/2 then links each parameter's fragment to it), and DeepSpeed's setters write into
    # it: so it is created here, zero, with the checkpoint's keys and step count, and linked as DeepSpeed links it
    # after its first step (_lazy_init_hp_params_optimizer_state, a no-op once linked). DeepSpeed's own universal
    # loader builds the same entries from per-parameter files (base_optimizer.load_hp_checkpoint_state_from_
    # checkpoint_dir), which would mean writing the full state to disk first.
    partitions = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat
    keys = set().union(*optimizer_state.values())  # none for a stateless optimizer (SGD without momentum)
    step = next((entry["step"] for entry in optimizer_state.values() if "step" in entry), None)
    for partition in partitions:
        entry = zero.optimizer.state[partition]
        if step is not None:
            entry["step"] = step.clone() if torch.is_tensor(step) else step
        for key in keys - {"step"} - set(entry):
            entry[key] = torch.zeros_like(partition)
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._lazy_init_hp_params_optimizer_state()
    for name, param in engine.module.named_parameters():
        safe_set_full_fp32_param(param, model_state[name])
        for key, value in optimizer_state.get(name, {}).items():
            if key != "step":
                safe_set_full_optimizer_state(param, value, key)
    # The working weights the module computes with, from the fp32 master just written: DeepSpeed's universal
    # loader does the same after loading (engine.load_checkpoint: update_lp_params for ZeRO-1/2;
    # load_hp_checkpoint_state_from_checkpoint_dir_stage3 copies and unflattens the ZeRO-3 partitions).
    if hasattr(zero, "update_lp_params"):
        zero.update_lp_params()
    else:
        for lp, hp in zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat):
            lp.data.copy_(hp.data)
        for flat, params in zip(zero.fp16_partitioned_groups_flat, zero.fp16_partitioned_groups):
            for param, view in zip(params, zero.unflatten(flat, params)):
                param.data = view.data
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            if name in model_state:
                buffer.copy_(model_state[name])


def load_rest(accelerator, folder: Path) -> None:
    """The scheduler, the progress (accelerate's custom objects) and this process's random states, saved the same
    way under every strategy; with another process count the new ranks have no random state of their own and
    keep the seeded one (accelerate's loader says so in its log)."""
    from accelerate.checkpointing import load_accelerator_state, load_custom_state
    from accelerate.utils import SCALER_NAME
    state_dir = str(Path(folder) / STATE_DIR)
    # fp16's gradient scaler (accelerate's scaler.pt; not DeepSpeed's own loss scale, which is not carried over)
    scaler = accelerator.scaler if (Path(state_dir) / SCALER_NAME).is_file() else None
    load_accelerator_state(state_dir, [], [], [], [], accelerator.process_index, scaler=scaler)
    for index, obj in enumerate(accelerator._custom_objects):
        load_custom_state(obj, state_dir, index)
