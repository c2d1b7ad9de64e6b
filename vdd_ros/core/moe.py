"""Mixture of Gaussian experts: pi(a|s) = sum_z q(z|s) N(a; mu_z(s), L_z(s) L_z(s)^T).

Two architectures (`MoEConfig.experts`), one interface (`features`, `means`, `scales`,
`log_gating`, and the parameter sets `expert_parameters`, `trunk_parameters`,
`gating_parameters`):
- 'independent': every expert z is its own MLP of the flat normalised observation window,
  ending in its mean and Cholesky parameters; the Z MLPs run together on stacked weights
  `(Z, in, out)` (`StackedLinear`), so no parameter is shared by two experts. The gating is an
  MLP of its own on the normalised observation.
- 'shared': one backbone encodes the observation; linear heads give every expert's mean and
  Cholesky parameters, and the gating reads the *detached* backbone feature.
Cholesky diagonals go through softplus plus a floor. Acting computes the gating, picks the
expert and then only that expert's mean (independent: only that expert's MLP), with the
normalizers folded into the first and last layers.

The networks read the condition `condition(obs)` of the normalised window: the window itself,
or with cameras the encoder's output (vision.py). The VDD-MoE gets the teacher's trained
encoder, frozen, and distils on the teacher's conditions; the likelihood baselines train
their own. Acting then encodes each frame once and runs the networks in one pass.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vdd_ros.core.config import MoEConfig, VisionConfig, check_expert_mode
from vdd_ros.core.model import PolicyModel
from vdd_ros.core.nets import mlp

LOG_2PI = math.log(2 * math.pi)


class StackedLinear(nn.Module):
    """Z affine maps of one shape run together: `(Z, B, in) -> (Z, B, out)`, or a `(B, in)`
    input shared by all Z. Weight `(Z, in, out)`, bias `(Z, out)`; map z reads only its own
    slice (each initialised as `nn.Linear` would be)."""

    def __init__(self, z: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(z, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(z, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.expand(self.weight.shape[0], -1, -1)
        return torch.baddbmm(self.bias[:, None], x, self.weight)


class Features(NamedTuple):
    """What `MixtureOfExperts.features` gives the heads and the gating: `experts` the last
    hidden layer, `(B, H)` shared by all experts or `(Z, B, H)` one per expert, and `gating`
    the gating network's input, `(B, F)` (the backbone feature, or the normalised
    observation)."""

    experts: torch.Tensor
    gating: torch.Tensor

    def detach(self) -> 'Features':
        return Features(self.experts.detach(), self.gating.detach())


class MixtureOfExperts(PolicyModel):
    """Gaussian MoE policy over flat action chunks (VDD student and the baselines)."""

    kind = 'moe'

    def __init__(self, cfg: MoEConfig, obs_dim: int, action_dim: int, obs_horizon: int = 1,
                 action_horizon: int = 1, *, fields: Sequence[tuple[str, int]] | None = None,
                 vision: VisionConfig | None = None) -> None:
        super().__init__(cfg, obs_dim, action_dim, obs_horizon, action_horizon, fields, vision)
        self.flat_obs, self.dim = self.encoder.out_dim, action_dim * action_horizon
        self.num_experts = z = cfg.num_experts
        self.full = cfg.covariance == 'full'
        self.independent = cfg.experts == 'independent'
        n_scale = self.dim * (self.dim + 1) // 2 if self.full else self.dim
        self.mean_head: nn.Module
        self.scale_head: nn.Module
        if self.independent:
            layers: list[nn.Module] = []
            for i in range(cfg.num_layers):
                layers += [StackedLinear(z, cfg.hidden_dim if i else self.flat_obs,
                                         cfg.hidden_dim), nn.Mish()]
            self.expert_nets = nn.Sequential(*layers)
            self.mean_head = StackedLinear(z, cfg.hidden_dim, self.dim)
            self.scale_head = StackedLinear(z, cfg.hidden_dim, n_scale)
            self.gate = mlp(self.flat_obs, cfg.gating_hidden_dim, cfg.num_layers, z)
        else:
            self.backbone = mlp(self.flat_obs, cfg.hidden_dim, cfg.num_layers)
            self.mean_head = nn.Linear(cfg.hidden_dim, z * self.dim)
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
        self._acting: tuple[Any, ...] | None = None
        # what follows the first layer of the network that acting runs first (the backbone,
        # or the independent experts' gating encoder)
        self._trunk = tuple(self.gate if self.independent else self.backbone)[1:]

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
        self.mean_head.bias.view(self.num_experts, self.dim).copy_(pool[picks])

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters each of which belongs to one expert: the heads ('shared'), every
        expert's whole MLP ('independent')."""
        if self.independent:
            yield from self.expert_nets.parameters()
        yield from self.mean_head.parameters()
        yield from self.scale_head.parameters()

    def trunk_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters all experts share: the backbone ('shared'); none ('independent')."""
        if not self.independent:
            yield from self.backbone.parameters()

    def gating_parameters(self) -> Iterator[nn.Parameter]:
        """The gating network's parameters (trained by the gating step only)."""
        yield from self.gate.parameters()

    def condition(self, obs: torch.Tensor) -> torch.Tensor:
        """What the networks read, `(B, flat_obs)`, of normalised windows `(B, T_o * obs_dim)`
        (the windows themselves without cameras)."""
        return self.encoder(obs)

    def features(self, obs: torch.Tensor) -> Features:
        """What the heads and the gating read for conditions `(B, flat_obs)`."""
        if self.independent:
            return Features(self.expert_nets(obs), obs)
        h = self.backbone(obs)
        return Features(h, h)

    def log_gating(self, h: Features) -> torch.Tensor:
        """log q(z|s) from the detached gating input, `(B, Z)`."""
        return F.log_softmax(self.gate(h.gating.detach()), dim=-1)

    def _head(self, head: nn.Module, h: Features) -> torch.Tensor:
        """A head's output `(B, Z, n)` for every expert."""
        if self.independent:
            return head(h.experts).transpose(0, 1)
        return head(h.experts).view(h.experts.shape[0], self.num_experts, -1)

    def means(self, h: Features) -> torch.Tensor:
        """Expert means `(B, Z, D)` (normalised units)."""
        return self._head(self.mean_head, h)

    def scales(self, h: Features) -> torch.Tensor:
        """Standard deviations `(B, Z, D)` (diag) or Cholesky factors `(B, Z, D, D)` (full)."""
        raw = self._head(self.scale_head, h)
        if not self.full:
            return F.softplus(raw) + self.cfg.min_std
        diag = F.softplus(raw[..., self.diag_mask]) + self.cfg.min_std
        vals = raw.clone()
        vals[..., self.diag_mask] = diag
        chol = raw.new_zeros(*raw.shape[:2], self.dim, self.dim)
        chol[..., self.tril_rows, self.tril_cols] = vals
        return chol

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conditions `(B, flat_obs)` -> log gating, means, scales."""
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
        """Mixture log-density of flat actions `(B, D)` given conditions `(B, flat_obs)`."""
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
        idx = _sample_index(log_gate, generator)
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

    def select(self, logits: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """One expert index per row of gating `logits (B, Z)` under `expert_mode`."""
        mode = self.expert_mode
        if mode == 'argmax':
            return logits.argmax(-1)
        if mode == 'sample':
            return _sample_index(logits, generator)
        if mode == 'per_episode':
            if self._episode_expert is None or self._episode_expert.shape[0] != logits.shape[0]:
                self._episode_expert = _sample_index(logits, generator)
            return self._episode_expert
        return torch.full(logits.shape[:1], int(mode), dtype=torch.long, device=logits.device)

    def _select_one(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        """`select` for a single state, as a plain int (the control-loop fast path)."""
        mode = self.expert_mode
        if mode == 'sample' and logits.device.type == 'cpu':
            return _sample_one(logits[0].numpy(), generator)
        if mode == 'argmax':
            return int(logits[0].argmax())
        return int(self.select(logits, generator)[0])

    def set_min_std(self, value: float) -> None:
        """Change the floor on the experts' standard deviations (kept in `cfg`, so a saved
        checkpoint acts and scores with it)."""
        self.cfg = dataclasses.replace(self.cfg, min_std=value)
        self.cfg.validate()

    def train(self, mode: bool = True) -> 'MixtureOfExperts':
        self._acting = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._acting = None
        return super()._apply(fn, *args, **kwargs)

    def acting_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every matrix product of acting at batch 1, in order: the backbone, the
        gating and the chosen expert's mean ('shared'); the gating encoder and the chosen
        expert's MLP ('independent')."""
        nets = (self.gate, self.expert_nets) if self.independent else (self.backbone, self.gate)
        shapes = [(m.weight.shape[-2], m.weight.shape[-1]) if isinstance(m, StackedLinear)
                  else (m.in_features, m.out_features)
                  for net in nets for m in net if isinstance(m, (nn.Linear, StackedLinear))]
        return shapes + [(self.cfg.hidden_dim, self.dim)]

    def _acting_params(self) -> tuple[Any, ...]:
        """The layers of acting with the normalizers folded in (exact, cached): the first layer
        of the backbone ('shared') or of the gating encoder ('independent') as `(w, b)`, then
        the experts' layers `((w (Z, out, in), b (Z, out)), ...)` ending in the mean (the
        mean head alone for 'shared'), in raw action units."""
        if getattr(self, '_acting', None) is None:
            with torch.no_grad():
                o_off = self.obs_normalizer.offset.repeat(self.obs_horizon)
                o_scale = self.obs_normalizer.scale.repeat(self.obs_horizon)
                if self.encoder.has_cameras:      # the networks read the encoder's output
                    o_off = o_off.new_zeros(self.flat_obs)
                    o_scale = o_off.new_ones(self.flat_obs)
                a_off = self.action_normalizer.offset.repeat(self.action_horizon)
                a_scale = self.action_normalizer.scale.repeat(self.action_horizon)
                z, d = self.num_experts, self.dim
                first = self.gate[0] if self.independent else self.backbone[0]
                w1 = first.weight / o_scale
                b1 = first.bias - w1 @ o_off
                if self.independent:
                    layers = [(lin.weight.transpose(1, 2), lin.bias)
                              for lin in self.expert_nets if isinstance(lin, StackedLinear)]
                    w, b = layers[0]
                    layers[0] = (w / o_scale, b - (w / o_scale) @ o_off)
                    wm = self.mean_head.weight.transpose(1, 2)
                else:
                    layers = []
                    wm = self.mean_head.weight.view(z, d, -1)
                layers.append((wm * a_scale[:, None], self.mean_head.bias.view(z, d) * a_scale
                               + a_off))
            experts = tuple((w.contiguous(), b.contiguous()) for w, b in layers)
            self._acting = (w1, b1, experts)
        return self._acting

    @torch.no_grad()
    def predict(self, obs_window: torch.Tensor, generator: torch.Generator | None = None,
                diagnostics: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """Policy interface: raw `(B, T_o, obs_dim)` -> the chosen expert's mean `(B, T_a, A)`.

        The gating (after the backbone, 'shared'), then only the chosen expert's mean (its own
        MLP, 'independent'), with the normalizers folded into the first and last layers.
        `info` holds the (first state's) expert, and with `diagnostics` the gating entropy and
        the mixture log-likelihood of the action (raw action units).
        """
        b = obs_window.shape[0]
        w1, b1, experts = self._acting_params()
        x = obs_window.reshape(b, -1)
        if self.encoder.has_cameras:
            x = self.encoder(self.obs_normalizer.normalize(obs_window).reshape(b, -1))
        h = F.linear(x, w1, b1)
        for layer in self._trunk:
            h = layer(h)
        if self.independent:           # h: the gating; the chosen expert reads x
            logits, feature, h = h, None, x
        else:                          # h: the backbone feature, read by gating and heads
            logits, feature = self.gate(h), h
        last = len(experts) - 1
        if b == 1:
            i = self._select_one(logits, generator)
            for k, (w, bias) in enumerate(experts):
                h = F.linear(h, w[i], bias[i])
                h = F.mish(h) if k < last else h
        else:
            idx = self.select(logits, generator)
            i = int(idx[0])
            for k, (w, bias) in enumerate(experts):
                h = torch.bmm(w[idx], h[:, :, None])[:, :, 0] + bias[idx]
                h = F.mish(h) if k < last else h
        action = h
        info: dict[str, float] = {'expert': float(i)}
        if diagnostics:
            log_gate = F.log_softmax(logits[:1], dim=-1)
            info['gating_entropy'] = float(-(log_gate.exp() * log_gate).sum())
            a_norm = self.action_normalizer.normalize(
                action[:1].view(1, self.action_horizon, self.action_dim)).view(1, 1, -1)
            f = Features(feature[:1], feature[:1]) if feature is not None else \
                self.features(self.condition(
                    self.obs_normalizer.normalize(obs_window[:1]).reshape(1, -1)))
            comp = self.component_log_prob(a_norm, self.means(f), self.scales(f))
            log_det = self.action_horizon * self.action_normalizer.scale.log().sum()
            info['log_prob'] = float(torch.logsumexp(log_gate + comp[:, 0], -1) - log_det)
        return action.view(b, self.action_horizon, self.action_dim), info

    def describe(self) -> dict[str, Any]:
        return {'expert_mode': str(self.expert_mode)}

    def to_config(self) -> dict[str, Any]:
        return {'obs_dim': self.obs_dim, 'action_dim': self.action_dim,
                'obs_horizon': self.obs_horizon, 'action_horizon': self.action_horizon}


def _sample_index(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one index per row from softmax(logits) by inverse CDF (cheap at batch 1)."""
    u = torch.rand(logits.shape[0], 1, device=logits.device, generator=generator)
    cdf = torch.softmax(logits, dim=-1).cumsum(-1)
    return (cdf < u * cdf[:, -1:]).sum(-1).clamp_(max=logits.shape[-1] - 1)


def _sample_one(logits: np.ndarray, generator: torch.Generator | None) -> int:
    """Draw from softmax(logits) of one state with numpy (a few microseconds)."""
    cdf = np.cumsum(np.exp(logits - logits.max()))
    u = float(torch.rand((), generator=generator)) * cdf[-1]
    return min(int(np.searchsorted(cdf, u, side='right')), len(logits) - 1)
