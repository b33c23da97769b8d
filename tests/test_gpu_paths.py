"""What the GPU paths rely on, checked on the CPU: the CUDA-graph step's set-up (lr placement after a resume,
state restored after the warm-up, thread-local capture), a normaliser that never moves itself, random erasing in
one copy per batch, and `no_sync` under DDP with --compile. What only a GPU can show is in benchmarks/gpu_check.sh."""

import contextlib
import copy
import json

import pytest
import torch
from timm.data.random_erasing import RandomErasing
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, accelerate_launch, child_env, free_port
from trainer import graphs
from trainer.config import TrainConfig
from trainer.data import Normalize, random_erase, seeded
from trainer.optim import create_optimizer


def bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))


def train(model, optimizer, steps=3):
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 8, 8)), torch.randint(0, 10, (8,))).backward()
        optimizer.step()


def state_of(model, optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()})


@pytest.mark.parametrize("saved_by", ["cuda_graph", "eager"])
def test_resumed_learning_rates_are_tensors_on_the_parameters_device(saved_by):
    # A run with its weights on another device ("meta" stands for the GPU) loads a checkpoint's optimizer state,
    # as accelerate's load_state does, from the CPU: torch leaves the learning rates there (finding 1).
    config = TrainConfig(model="test_vit", learning_rate=3e-3)
    saver = torch.nn.Linear(4, 3)
    saving = create_optimizer(config, saver, fused=False, capturable=saved_by == "cuda_graph")
    if saved_by == "eager":  # an eager run's state: float lr, capturable False, Adam's step on the CPU
        saver(torch.randn(2, 4)).sum().backward()
        saving.step()
        for group in saving.param_groups:
            group["lr"] = 1.5e-3  # what the scheduler had set
    state = copy.deepcopy(saving.state_dict())
    model = torch.nn.Linear(4, 3).to("meta")
    # Built without capturable: the loaded groups replace every hyper-parameter anyway (and a meta lr can't be checked).
    optimizer = create_optimizer(config, model, fused=False)
    optimizer.load_state_dict(state)
    # torch's load_state_dict leaves them as saved: floats, or tensors on the CPU.
    assert all(not torch.is_tensor(g["lr"]) or g["lr"].device.type == "cpu" for g in optimizer.param_groups)
    graphs.place_hyperparameters(optimizer)
    for group in optimizer.param_groups:
        assert torch.is_tensor(group["lr"]) and group["lr"].device.type == "meta" and group["lr"].dtype == torch.float32
        assert group["capturable"] is True
    for p, s in optimizer.state.items():
        assert all(v.device == p.device for v in s.values() if torch.is_tensor(v))
    # The value is kept (checked where values can be read: CPU parameters).
    cpu_optimizer = create_optimizer(config, torch.nn.Linear(4, 3), fused=False, capturable=True)
    cpu_optimizer.load_state_dict(state)
    graphs.place_hyperparameters(cpu_optimizer)
    expected = 1.5e-3 if saved_by == "eager" else 3e-3
    assert [float(g["lr"]) for g in cpu_optimizer.param_groups] == pytest.approx([expected] * len(state["param_groups"]))


@pytest.mark.parametrize("trained_before", [0, 2])
def test_snapshot_puts_back_weights_buffers_and_optimizer_state(trained_before):
    model = bn_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, optimizer, trained_before)
    before_model, before_optimizer = state_of(model, optimizer)
    restore = graphs.snapshot(model, optimizer)
    train(model, optimizer, 3)  # the graph's warm-up
    assert not torch.equal(model[1].running_mean, before_model["1.running_mean"])
    restore()
    after_model, after_optimizer = state_of(model, optimizer)
    for key, value in before_model.items():  # weights, running_mean/var and num_batches_tracked
        assert torch.equal(after_model[key], value), key
    for p, state in after_optimizer.items():
        for key, value in state.items():  # as before, or a fresh (zero) state where there was none
            assert torch.equal(value, before_optimizer[p][key] if p in before_optimizer else torch.zeros_like(value))


def test_graph_capture_is_thread_local_and_starts_from_the_state_before_the_warm_up(monkeypatch):
    # CUDA's stream and graph calls replaced by stand-ins that run the step eagerly on the CPU: what is checked is
    # the set-up around them (findings 3 and 4), not CUDA.
    captures = []
    model = bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    class Stream:
        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def graph(cuda_graph, **options):
        captures.append((options, state_of(model, optimizer)))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    before_model, _ = state_of(model, optimizer)
    loss = lambda logits, labels: torch.nn.functional.cross_entropy(logits, labels, reduction="none")  # noqa: E731
    graphs.CudaGraphStep(model, optimizer, loss, (8, 3, 8, 8), None, 0.0)
    (options, (captured_model, captured_optimizer)), = captures
    assert options.get("capture_error_mode") == "thread_local"
    for key, value in before_model.items():
        assert torch.equal(captured_model[key], value), key
    assert all(torch.equal(v, torch.zeros_like(v)) for s in captured_optimizer.values() for v in s.values())
    assert torch.is_tensor(optimizer.param_groups[0]["lr"])  # placed before the capture


def test_normalize_never_moves_itself():
    # Evaluation on the GPU ("meta" here) must leave a normaliser that forked CPU workers use on the CPU (finding 2).
    normalize = Normalize((0.5,) * 3, (0.25,) * 3, 32)
    out = normalize(torch.zeros(2, 3, 32, 32, dtype=torch.uint8, device="meta"))
    assert out.device.type == "meta" and out.dtype == torch.float32
    assert normalize.mean.device.type == "cpu" and normalize.std.device.type == "cpu"
    moved = normalize.to("meta")
    assert moved is not normalize and moved.mean.device.type == "meta" and normalize.mean.device.type == "cpu"
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(normalize(images), (images.float() / 255 - 0.5) / 0.25)


class CountCopies(TorchDispatchMode):
    """Counts copies from the CPU to another device."""

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = args[0] if func is torch.ops.aten.copy_.default else out
            self.copies += source.device.type == "cpu" and target.device.type != "cpu"
        return out


@pytest.mark.parametrize("max_count", [1, 3])
def test_random_erase_is_timms_per_image_and_copies_once_per_batch(max_count):
    eraser = RandomErasing(probability=0.6, mode="pixel", max_count=max_count, device="cpu")
    images = torch.randn(32, 3, 32, 32)
    seeds = torch.randint(0, 2**31, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = images.clone()
    for image, seed in zip(expected, seeds):  # timm's own eraser, one image at a time, under the image's seed
        with seeded(seed):
            eraser(image)
    erased = images.clone()
    random_erase(erased, eraser, seeds)
    assert (expected != images).any(dim=(1, 2, 3)).sum() > 10  # most images erased
    assert torch.equal(erased, expected)
    # On images on another device ("meta" stands for the GPU): one host-to-device copy for the whole batch (finding 7).
    with CountCopies() as counter:
        random_erase(torch.zeros(32, 3, 32, 32, device="meta"), eraser, seeds)
    assert counter.copies == 1


PROBE = r'''
import json, sys
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

# Dynamo's "eager" backend instead of inductor: what is tested is the wrapping around the compiled model, and
# inductor's code generation would take minutes on two CPU cores.
compile_ = torch.compile
torch.compile = lambda model, **options: compile_(model, backend="eager")
made = []
init = DistributedDataParallel.__init__
def record(self, *args, **kwargs):
    init(self, *args, **kwargs)
    made.append(self)
DistributedDataParallel.__init__ = record

from trainer.config import TrainConfig
from trainer.loop import Trainer
data_dir, save_dir, result = sys.argv[1:]
trainer = Trainer(TrainConfig(model="test_vit", pretrained=False, data_dir=data_dir, save_dir=save_dir, compile=True,
                              batch_size=64, micro_batch_size=16, epochs=1, warmup_epochs=0, augment="none",
                              mixed_precision="no", progress=False))
trainer.accelerator.unwrap_model(trainer.model)  # as accelerate's get_state_dict does at every save under DeepSpeed
synced = []  # for each all-reduce of a gradient bucket: whether the micro-step ends an optimizer step
ddp, = made
ddp.register_comm_hook(None, lambda state, bucket: (synced.append(trainer.accelerator.sync_gradients),
                                                    allreduce_hook(None, bucket))[1])
trainer.model.train()
trainer.train_steps.set_epoch(0)
for step in range(2):
    trainer.train_step(trainer.train_steps[step], 64)
if trainer.accelerator.is_main_process:
    json.dump({"accumulation": trainer.accumulation, "synced": synced}, open(result, "w"))
trainer.accelerator.end_training()
'''


@pytest.mark.launches
def test_compile_under_ddp_all_reduces_only_on_the_last_micro_step(cifar_dir, tmp_path):
    # Finding 6: with --compile, unwrap_model(keep_torch_compile=True) re-parents the compiled wrapper, and
    # accelerate's no_sync then finds nothing to call: every micro-step all-reduced.
    (tmp_path / "probe.py").write_text(PROBE)
    result = accelerate_launch(
        ["--config_file", REPO / "accelerate_configs" / "cpu_multi.yaml", "--num_processes", 2, "--main_process_port",
         free_port(), tmp_path / "probe.py", cifar_dir, tmp_path / "run", tmp_path / "out.json"],
        env=child_env(PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-5000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["accumulation"] == 2
    assert out["synced"] and all(out["synced"]), out["synced"]  # 2 steps x 2 micro-steps: buckets of 2 only
