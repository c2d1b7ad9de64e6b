"""Mixture of Gaussian experts: pi(a|s) = sum_z q(z|s) N(a; mu_z(s), L_z(s) L_z(s)^T).

A shared backbone encodes the flat normalised observation window; linear heads give every
expert's mean and Cholesky factor (diagonal through softplus plus a floor); the gating network
reads the *detached* backbone feature. Acting needs one backbone pass, the mean head and the
gating only.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vdd_ros.core.config import MoEConfig, check_expert_mode
from vdd_ros.core.nets import mlp
from vdd_ros.core.normalizer import Normalizer

LOG_2PI = math.log(2 * math.pi)


class MixtureOfExperts(nn.Module):
    """Gaussian MoE policy over flat action chunks (VDD student and the baselines)."""

    kind = 'moe'

    def __init__(self, cfg: MoEConfig, obs_dim: int, action_dim: int, obs_horizon: int = 1,
                 action_horizon: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.obs_horizon, self.action_horizon = obs_horizon, action_horizon
        self.flat_obs, self.dim = obs_dim * obs_horizon, action_dim * action_horizon
        self.num_experts = z = cfg.num_experts
        self.full = cfg.covariance == 'full'
        self.obs_normalizer = Normalizer(obs_dim)
        self.action_normalizer = Normalizer(action_dim)
        self.backbone = mlp(self.flat_obs, cfg.hidden_dim, cfg.num_layers)
        self.mean_head = nn.Linear(cfg.hidden_dim, z * self.dim)
        n_scale = self.dim * (self.dim + 1) // 2 if self.full else self.dim
        self.scale_head = nn.Linear(cfg.hidden_dim, z * n_scale)
        self.gate = mlp(cfg.hidden_dim, cfg.gating_hidden_dim, 1, z)
        if self.full:
            rows, cols = torch.tril_indices(self.dim, self.dim)
            self.register_buffer('tril_rows', rows, persistent=False)
            self.register_buffer('tril_cols', cols, persistent=False)
            self.register_buffer('diag_mask', rows == cols, persistent=False)
        with torch.no_grad():
            self.mean_head.weight.mul_(0.1)
            self.scale_head.weight.mul_(0.01)
            raw = math.log(math.expm1(cfg.init_std - cfg.min_std))
            bias = self.scale_head.bias.view(z, n_scale)
            bias.zero_()
            if self.full:
                bias[:, self.diag_mask] = raw
            else:
                bias.fill_(raw)
            self.gate[-1].weight.zero_()
            self.gate[-1].bias.zero_()
        self.expert_mode: str | int = cfg.expert_mode
        self._episode_expert: torch.Tensor | None = None

    # -- parameterisation -------------------------------------------------------------------
    @torch.no_grad()
    def init_means(self, actions: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Spread the experts' initial means over the data: farthest-point picks of actions."""
        pool = actions.reshape(-1, self.dim)
        if pool.shape[0] > 2048:
            pool = pool[torch.randperm(pool.shape[0], generator=generator)[:2048]]
        first = int(torch.randint(pool.shape[0], (1,), generator=generator))
        picks = [first]
        dist = (pool - pool[first]).pow(2).sum(-1)
        for _ in range(1, self.num_experts):
            picks.append(int(dist.argmax()))
            dist = torch.minimum(dist, (pool - pool[picks[-1]]).pow(2).sum(-1))
        self.mean_head.bias.copy_(pool[picks].reshape(-1))

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        return self.backbone(obs)

    def log_gating(self, h: torch.Tensor) -> torch.Tensor:
        """log q(z|s) from the detached feature, `(B, Z)`."""
        return F.log_softmax(self.gate(h.detach()), dim=-1)

    def means(self, h: torch.Tensor) -> torch.Tensor:
        return self.mean_head(h).view(h.shape[0], self.num_experts, self.dim)

    def scales(self, h: torch.Tensor) -> torch.Tensor:
        """Standard deviations `(B, Z, D)` (diag) or Cholesky factors `(B, Z, D, D)` (full)."""
        raw = self.scale_head(h).view(h.shape[0], self.num_experts, -1)
        if not self.full:
            return F.softplus(raw) + self.cfg.min_std
        diag = F.softplus(raw[..., self.diag_mask]) + self.cfg.min_std
        vals = raw.clone()
        vals[..., self.diag_mask] = diag
        chol = raw.new_zeros(h.shape[0], self.num_experts, self.dim, self.dim)
        chol[..., self.tril_rows, self.tril_cols] = vals
        return chol

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat normalised obs `(B, flat_obs)` -> log gating, means, scales."""
        h = self.features(obs)
        return self.log_gating(h), self.means(h), self.scales(h)

    # -- densities --------------------------------------------------------------------------
    def component_log_prob(self, a: torch.Tensor, means: torch.Tensor,
                           scales: torch.Tensor) -> torch.Tensor:
        """log N(a; mu_z, Sigma_z) for `a (B, S, D)` under every expert: `(B, S, Z)`."""
        diff = a[:, :, None, :] - means[:, None]                      # (B, S, Z, D)
        if self.full:
            chol = scales[:, None].expand(-1, diff.shape[1], -1, -1, -1)
            white = torch.linalg.solve_triangular(chol, diff[..., None], upper=False)[..., 0]
            log_det = scales.diagonal(dim1=-2, dim2=-1).log().sum(-1)[:, None]
        else:
            white = diff / scales[:, None]
            log_det = scales.log().sum(-1)[:, None]
        return -0.5 * white.pow(2).sum(-1) - log_det - 0.5 * self.dim * LOG_2PI

    def entropy(self, scales: torch.Tensor) -> torch.Tensor:
        """Differential entropy of each expert, `(B, Z)`."""
        diag = scales.diagonal(dim1=-2, dim2=-1) if self.full else scales
        return diag.log().sum(-1) + 0.5 * self.dim * (1 + LOG_2PI)

    def log_prob(self, a: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """Mixture log-density of flat actions `(B, D)` given flat obs `(B, flat_obs)`."""
        log_gate, means, scales = self(obs)
        comp = self.component_log_prob(a[:, None], means, scales)[:, 0]
        return torch.logsumexp(log_gate + comp, dim=-1)

    def responsibilities(self, a: torch.Tensor, log_gate: torch.Tensor, means: torch.Tensor,
                         scales: torch.Tensor) -> torch.Tensor:
        """log q(z|a,s) for `a (B, S, D)`: `(B, S, Z)`."""
        joint = log_gate[:, None] + self.component_log_prob(a, means, scales)
        return joint - torch.logsumexp(joint, dim=-1, keepdim=True)

    def rsample_experts(self, means: torch.Tensor, scales: torch.Tensor, n: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised samples `(B, Z, n, D)` from every expert."""
        eps = torch.randn(*means.shape[:2], n, self.dim, device=means.device,
                          generator=generator)
        if self.full:
            return means[:, :, None] + (scales[:, :, None] @ eps[..., None])[..., 0]
        return means[:, :, None] + scales[:, :, None] * eps

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw flat actions `(B, D)` from the full mixture."""
        log_gate, means, scales = self(obs)
        idx = _sample_index(log_gate.exp(), generator)
        draws = self.rsample_experts(means, scales, 1, generator)[:, :, 0]
        return draws[torch.arange(obs.shape[0]), idx]

    # -- acting -----------------------------------------------------------------------------
    def set_expert_mode(self, mode: str | int) -> None:
        """'sample', 'argmax', 'per_episode', or a pinned expert index."""
        check_expert_mode(mode, self.num_experts)
        self.expert_mode = mode if mode in ('sample', 'argmax', 'per_episode') else int(mode)
        self._episode_expert = None

    def reset(self) -> None:
        self._episode_expert = None

    def select(self, log_gate: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        mode = self.expert_mode
        if mode == 'argmax':
            return log_gate.argmax(-1)
        if mode == 'sample':
            return _sample_index(log_gate.exp(), generator)
        if mode == 'per_episode':
            if self._episode_expert is None or self._episode_expert.shape[0] != log_gate.shape[0]:
                self._episode_expert = _sample_index(log_gate.exp(), generator)
            return self._episode_expert
        return torch.full(log_gate.shape[:1], int(mode), dtype=torch.long,
                          device=log_gate.device)

    @torch.no_grad()
    def predict(self, obs_window: torch.Tensor, generator: torch.Generator | None = None,
                diagnostics: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """Policy interface: the chosen expert's mean, one backbone pass."""
        b = obs_window.shape[0]
        h = self.backbone(obs_window.reshape(b, -1))
        log_gate = F.log_softmax(self.gate(h), dim=-1)
        means = self.mean_head(h).view(b, self.num_experts, self.dim)
        idx = self.select(log_gate, generator)
        action = means[torch.arange(b), idx]
        info: dict[str, float] = {}
        if diagnostics:
            gate = log_gate[0].exp()
            info['expert'] = float(idx[0])
            info['gating_entropy'] = float(-(gate * log_gate[0]).sum())
            comp = self.component_log_prob(action[:1, None], means[:1], self.scales(h[:1]))
            info['log_prob'] = float(torch.logsumexp(log_gate[:1] + comp[:, 0], -1))
        return action.view(b, self.action_horizon, self.action_dim), info

    def to_config(self) -> dict[str, Any]:
        return {'obs_dim': self.obs_dim, 'action_dim': self.action_dim,
                'obs_horizon': self.obs_horizon, 'action_horizon': self.action_horizon}


def _sample_index(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Inverse-CDF draw of one index per row (cheaper than torch.multinomial at batch 1)."""
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator)
    idx = (probs.cumsum(-1) < u * probs.sum(-1, keepdim=True)).sum(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)
