"""Score functions: what VDD needs from a teacher, plus an analytic mixture for tests and toys.

A score function maps noisy actions `a (..., D)`, an observation broadcastable against `a`'s
leading dimensions `(..., F)`, and a noise level `sigma` (shape of `a` without the last
dimension) to grad_a log p_sigma(a | s), the score of the data smoothed by N(0, sigma^2 I).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from vdd_ros.core.teacher import DiffusionTeacher


class ScoreFunction(Protocol):
    def __call__(self, a: torch.Tensor, obs: torch.Tensor,
                 sigma: torch.Tensor) -> torch.Tensor: ...


class TeacherScore:
    """The frozen diffusion teacher's score (D(a; sigma, s) - a) / sigma^2, without gradients."""

    def __init__(self, teacher: DiffusionTeacher) -> None:
        self.teacher = teacher.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.teacher.score(a, obs, sigma)


class GaussianMixtureScore:
    """Exact score of an isotropic Gaussian mixture whose components depend on the observation.

    `components(obs)` returns means `(..., K, D)` and log weights `(..., K)`; every component
    has standard deviation `std`, so smoothing by sigma gives variance std^2 + sigma^2.
    """

    def __init__(self, components: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 std: float) -> None:
        self.components, self.std = components, std

    def _terms(self, a: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor):
        means, log_w = self.components(obs)
        var = (self.std ** 2 + sigma ** 2)[..., None, None]          # (..., 1, 1)
        diff = means - a[..., None, :]                                  # (..., K, D)
        dim = a.shape[-1]
        log_n = (-0.5 * diff.pow(2).sum(-1) / var[..., 0]
                 - 0.5 * dim * torch.log(2 * torch.pi * var[..., 0]))
        return diff, var, log_w + log_n

    def __call__(self, a: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        diff, var, joint = self._terms(a, obs, sigma)
        resp = torch.softmax(joint, dim=-1)[..., None]
        return (resp * diff / var).sum(-2)

    def log_prob(self, a: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self._terms(a, obs, sigma)[2], dim=-1)
