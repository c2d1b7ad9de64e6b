"""Small network building blocks shared by the teacher and the MoE."""
from __future__ import annotations

import math

import torch
from torch import nn


def mlp(in_dim: int, hidden_dim: int, num_layers: int,
        out_dim: int | None = None) -> nn.Sequential:
    """`num_layers` hidden layers of width `hidden_dim` with Mish; optional linear output."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(dim, hidden_dim), nn.Mish()]
        dim = hidden_dim
    if out_dim is not None:
        layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


class FourierEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar (the log noise level)."""

    def __init__(self, dim: int = 32, max_period: float = 100.0) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / half)
        self.register_buffer('freqs', freqs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = x[..., None] * self.freqs * 10.0
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class ResidualMLP(nn.Module):
    """MLP with residual hidden blocks and LayerNorm; the denoiser's trunk."""

    def __init__(self, in_dim: int, hidden_dim: int, num_layers: int, out_dim: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden_dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim), nn.Mish(),
                          nn.Linear(hidden_dim, hidden_dim))
            for _ in range(max(num_layers - 1, 0)))
        self.out = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Mish(),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)
