"""BatchNorm synchronized across processes (SimCLR's global BN), on CUDA and on CPU.

torch's :class:`~torch.nn.SyncBatchNorm` runs on GPUs only; on CPU processes (gloo)
:class:`GatheredBatchNorm` computes the same statistics: each process's per-channel sum, sum
of squares and count are summed over the processes with an all-reduce that carries
gradients back (``torch.distributed.nn.functional.all_reduce``), so that N processes
normalize with the global batch's mean and (biased) variance, as one process does, and update
the running statistics with its unbiased variance.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class GatheredBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batches of all processes (training mode, more than one process);
    plain BatchNorm otherwise. Any input rank: channels are dimension 1."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):  # fmt: skip
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float64, device=x.device)
        xd = x.double()  # the sums in float64: a sum of squares cancels badly in float32
        stats = all_reduce(torch.cat([xd.sum(dims), (xd * xd).sum(dims), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1 / float(self.num_batches_tracked)
                )
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xd - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        y = y.to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(net: nn.Module, device: torch.device):
    """Synchronize every BatchNorm of ``net`` across processes, in place: torch's
    SyncBatchNorm on CUDA, :class:`GatheredBatchNorm` elsewhere, sharing the original
    modules' parameters and buffers. Returns ``restore()``, which puts the original modules
    back with the trained state."""
    swapped = []
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm):
                continue
            if device.type == "cuda":
                new = nn.SyncBatchNorm(child.num_features, child.eps, child.momentum,
                                       child.affine, child.track_running_stats)  # fmt: skip
            else:
                new = GatheredBatchNorm(child.num_features, child.eps, child.momentum,
                                        child.affine, child.track_running_stats)  # fmt: skip
            # the same tensors: the optimizer's parameters, and the statistics updated in place
            new._parameters.update(child._parameters)
            new._buffers.update(child._buffers)
            new.train(child.training)
            setattr(parent, name, new)
            swapped.append((parent, name, child))

    def restore() -> None:
        for parent, name, original in swapped:
            # the parameters are the same tensors; the buffers are copied back (preparing
            # the model for many processes may have given it new buffer tensors)
            original.load_state_dict(getattr(parent, name).state_dict())
            setattr(parent, name, original)

    return restore
