"""Per-dimension affine normalizer; a submodule of every model, so it is saved with it."""
from __future__ import annotations

import torch
from torch import nn


class Normalizer(nn.Module):
    """x_norm = (x - offset) / scale, per feature (last dimension).

    `mode='minmax'` maps the data range to [-1, 1]; `mode='standard'` to zero mean, unit
    variance. Constant features keep scale 1 so they never blow up.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer('offset', torch.zeros(dim))
        self.register_buffer('scale', torch.ones(dim))

    @torch.no_grad()
    def fit(self, data: torch.Tensor, mode: str = 'minmax', eps: float = 1e-4) -> 'Normalizer':
        data = data.reshape(-1, data.shape[-1]).float()
        if mode == 'minmax':
            low, high = data.min(0).values, data.max(0).values
            offset, scale = (high + low) / 2, (high - low) / 2
        elif mode == 'standard':
            offset, scale = data.mean(0), data.std(0)
        else:
            raise ValueError(f"normalizer mode must be 'minmax' or 'standard', got {mode!r}")
        scale = torch.where(scale < eps, torch.ones_like(scale), scale)
        self.offset.copy_(offset)
        self.scale.copy_(scale)
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.offset) / self.scale

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset
