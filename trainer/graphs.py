"""The whole training step (forward, backward, clipping, optimizer) captured as one CUDA graph.

At CIFAR size the GPU waits on kernel launches, not on arithmetic (measured on one H200, torch 2.11,
2026-11-27: NFNet-F0's bf16 step takes ~46 ms for 256 images whose kernels add up to ~17 ms). Replaying a
captured graph launches the step's hundreds of kernels at once. torch.compile's "reduce-overhead" mode graphs the forward and backward only,
and failed on these models with a plain training step ("accessing tensor output of CUDAGraphs that has been
overwritten by a subsequent run", same machine and date), so the step is captured here as in
PyTorch's "whole network capture" recipe:
- every micro-batch has one static shape (with --cuda_graph data/plan.py pads the short last step with weight-0
  images; models with BatchNorm are refused, since padding would enter their batch statistics);
- inputs are copied into static buffers; the learning rate and the loss scale are device tensors that
  the optimizer (fused, capturable AdamW or SGD) and the loss read inside the graph;
- warm-up iterations on a side stream initialise cuBLAS, autograd and the optimizer state, then the
  weights, the module buffers (BatchNorm's running statistics) and the optimizer state are put back as they
  were, in place, so the warm-up leaves no trace;
- the optimizer's learning rates are device tensors beside the weights before capture, also after a resume
  (place_hyperparameters), and capture is thread-local, so a DataLoader's pin-memory thread may use CUDA
  meanwhile.
It runs one process with no gradient accumulation (the graph assigns gradients; it cannot accumulate).
"""

from __future__ import annotations

import torch


class CudaGraphStep:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, per_image_loss,
                 input_shape: tuple, autocast_dtype: torch.dtype | None, grad_clip: float, warmup: int = 3):
        device = next(model.parameters()).device
        self.model, self.optimizer, self.per_image_loss = model, optimizer, per_image_loss
        self.autocast_dtype, self.grad_clip = autocast_dtype, grad_clip
        self.images = torch.zeros(input_shape, device=device)
        self.labels = torch.zeros(input_shape[0], dtype=torch.long, device=device)
        self.weights = torch.ones(input_shape[0], device=device)
        self.scale = torch.ones((), device=device)
        self.loss = None  # the static output: the micro-batch's weighted loss sum
        place_hyperparameters(optimizer)
        self._capture(warmup)

    def _step(self) -> torch.Tensor:
        # The autocast cache must be off inside a graph: cached casts would outlive the capture.
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            logits = self.model(self.images)
        weighted = (self.per_image_loss(logits.float(), self.labels) * self.weights).sum()
        (weighted * self.scale).backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.optimizer.step()
        return weighted.detach()

    def _capture(self, warmup: int) -> None:
        restore = snapshot(self.model, self.optimizer)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        restore()
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        # Thread-local capture: the default ("global") mode makes CUDA calls from other threads of the process
        # invalid during capture, and the DataLoader's pin-memory thread (--num_workers with CPU-side data) makes
        # them (cudaErrorStreamCaptureUnsupported). The captured step itself runs on this thread alone.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.loss = self._step()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                 scale: float) -> torch.Tensor:
        self.images.copy_(images, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        self.weights.copy_(weights, non_blocking=True)
        self.scale.fill_(scale)
        self.graph.replay()
        return self.loss.clone()  # the next replay overwrites the static output


def place_hyperparameters(optimizer: torch.optim.Optimizer) -> None:
    """Put everything a captured optimizer step reads on its parameters' device; call after any load_state_dict.

    torch's Optimizer.load_state_dict deep-copies `param_groups` without moving them and moves only the per-
    parameter state: a resumed run's tensor learning rates come back wherever the loaded state was (the CPU,
    through accelerate's load_state), and an eager run's checkpoint brings float learning rates and
    capturable=False. A fused CUDA kernel reads a CPU lr tensor (or a float) as a host scalar when the graph is
    captured, so the graph would train at that one lr, the scheduler's in-place fill_ never reaching it. So: each
    group's lr becomes a float32 tensor on its parameters' device (value kept), other tensor hyper-parameters move
    there too, `capturable` is set where the optimizer has it, and per-parameter state (Adam's step) moves beside
    its parameter.
    """
    for group in optimizer.param_groups:
        device = group["params"][0].device
        for key, value in group.items():
            if key != "params" and torch.is_tensor(value) and value.device != device:
                group[key] = value.to(device)
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        if "capturable" in group:  # torch's AdamW has the flag; its SGD has none and captures as it is
            group["capturable"] = True
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.device != param.device:
                state[key] = value.to(param.device)


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Copies of the model's weights and buffers and of the optimizer state; the returned function puts them
    back in place (the tensors a captured graph reads must stay the same objects)."""
    tensors = [*model.parameters(), *model.buffers()]  # buffers: BatchNorm running statistics and counters
    saved = [t.detach().clone() for t in tensors]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_state = {p: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
                   for p in params if p in optimizer.state}

    @torch.no_grad()
    def restore() -> None:
        for t, copy in zip(tensors, saved):
            t.copy_(copy)
        for p in params:
            for key, value in optimizer.state[p].items():
                if torch.is_tensor(value):
                    # Zero is a fresh state: Adam's moments and step; SGD's momentum buffer (with no
                    # dampening, momentum * 0 + grad equals the first step's buffer = grad).
                    value.copy_(saved_state[p][key]) if p in saved_state else value.zero_()
    return restore
