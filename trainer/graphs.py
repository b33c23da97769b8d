"""The whole training step (forward, backward, clipping, optimizer) captured as one CUDA graph.

At CIFAR size the GPU waits on kernel launches, not on arithmetic (shared notes: NFNet-F0's bf16 step
takes ~46 ms for 256 images whose kernels add up to ~17 ms). Replaying a captured graph launches the step's
hundreds of kernels at once. torch.compile's "reduce-overhead" mode graphs the forward and backward only,
and failed on these models with a plain training step (shared notes), so the step is captured here as in
PyTorch's "whole network capture" recipe:
- every micro-batch has one static shape (data.py pads the short last step with weight-0 images);
- inputs are copied into static buffers; the learning rate and the loss scale are device tensors that
  the optimizer (fused, capturable AdamW or SGD) and the loss read inside the graph;
- warm-up iterations on a side stream initialise cuBLAS, autograd and the optimizer state, then the
  weights and optimizer state are put back as they were, in place, so the warm-up leaves no trace.
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
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        saved_params = [p.detach().clone() for p in params]
        saved_state = {p: {k: v.clone() for k, v in self.optimizer.state[p].items() if torch.is_tensor(v)}
                       for p in params if p in self.optimizer.state}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
            for p in params:
                for key, value in self.optimizer.state[p].items():
                    if torch.is_tensor(value):
                        # Zero is a fresh state: Adam's moments and step; SGD's momentum buffer (with no
                        # dampening, momentum * 0 + grad equals the first step's buffer = grad).
                        value.copy_(saved_state[p][key]) if p in saved_state else value.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._step()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                 scale: float) -> torch.Tensor:
        self.images.copy_(images, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        self.weights.copy_(weights, non_blocking=True)
        self.scale.fill_(scale)
        self.graph.replay()
        return self.loss.clone()  # the next replay overwrites the static output
