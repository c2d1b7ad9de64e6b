"""Conditional 8-mode ring: a 2-D action problem where averaging the modes fails.

Given a 1-D observation s in [-1, 1], actions come from K equally weighted isotropic Gaussians
on a circle of radius `radius + radius_slope * s`, rotated by `rotation * s`. The exact score
of this mixture is known, so VDD can be checked against it before a diffusion teacher is
involved.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vdd_ros.core.baselines import train_em
from vdd_ros.core.config import (BaselineConfig, MoEConfig, TeacherConfig, VDDConfig, at_least,
                                 positive)
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.scores import GaussianMixtureScore, TeacherScore
from vdd_ros.core.teacher import DiffusionTeacher, train_teacher
from vdd_ros.core.vdd import distill

COVER_RADIUS = 0.25   # an expert mean within this distance of a mode centre covers the mode
MASS_FLOOR = 0.25     # a mode "has mass" when it gets at least this fraction of 1/K of samples


@dataclass
class ToyConfig:
    """The toy problem and the training budget of each model on it."""

    num_modes: int = 8
    radius: float = 2.0
    radius_slope: float = 0.5
    std: float = 0.3
    rotation: float = 0.0
    data_size: int = 20000
    eval_states: int = 9
    eval_samples: int = 1000
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(
        hidden_dim=128, num_layers=3, sigma_data=1.0, sigma_max=3.0, sampling_steps=8,
        iterations=4000, batch_size=512, lr=1e-3))
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(
        num_experts=8, hidden_dim=64, num_layers=2, covariance='full', init_std=0.5))
    # no warm start here: the backbone trains with the heads, and a uniform gating for the
    # first half keeps two experts from sharing one ring mode
    vdd: VDDConfig = field(default_factory=lambda: VDDConfig(
        iterations=2000, batch_size=128, lr=3e-3, gating_lr=3e-3, final_lr_fraction=0.05,
        uniform_gating_fraction=0.5, init_em_iterations=0, backbone_lr_scale=1.0))
    gaussian_bc: BaselineConfig = field(default_factory=lambda: BaselineConfig(iterations=1500))
    em_moe: BaselineConfig = field(default_factory=lambda: BaselineConfig(iterations=1500))

    def validate(self) -> None:
        at_least(self.num_modes, 2, 'num_modes')
        for name in ('radius', 'std'):
            positive(getattr(self, name), name)
        for name in ('data_size', 'eval_states', 'eval_samples'):
            at_least(getattr(self, name), 1, name)


class RingProblem:
    """The conditional ring mixture: component means, data sampling, mode classification."""

    def __init__(self, cfg: ToyConfig) -> None:
        self.cfg = cfg
        self.base = 2 * math.pi * torch.arange(cfg.num_modes) / cfg.num_modes

    def modes(self, obs: torch.Tensor) -> torch.Tensor:
        """Mode centres `(..., K, 2)` for observations `(..., 1)`."""
        angle = self.base.to(obs) + self.cfg.rotation * obs
        radius = (self.cfg.radius + self.cfg.radius_slope * obs)[..., None]
        return radius * torch.stack([angle.cos(), angle.sin()], dim=-1)

    def components(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means = self.modes(obs)
        log_w = torch.full(means.shape[:-1], -math.log(self.cfg.num_modes), device=obs.device)
        return means, log_w

    def score(self) -> GaussianMixtureScore:
        return GaussianMixtureScore(self.components, self.cfg.std)

    def sample(self, n: int, generator: torch.Generator,
               obs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` pairs (obs `(n, 1)`, action `(n, 2)`); obs uniform in [-1, 1] unless given."""
        if obs is None:
            obs = torch.rand(n, 1, generator=generator) * 2 - 1
        k = torch.randint(self.cfg.num_modes, (n,), generator=generator)
        centre = self.modes(obs)[torch.arange(n), k]
        return obs, centre + self.cfg.std * torch.randn(n, 2, generator=generator)

    def classify(self, actions: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """Index of the nearest mode centre for each action."""
        return (self.modes(obs) - actions[:, None]).norm(dim=-1).argmin(-1)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| between two sample sets."""
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean()
                 - torch.cdist(y, y).mean())


def mean_errors(problem: RingProblem, moe: MixtureOfExperts,
                states: torch.Tensor) -> tuple[int, float, bool]:
    """Worst case over `states`: modes covered, max distance mode->nearest expert, distinct."""
    with torch.no_grad():
        means = moe.action_normalizer.unnormalize(
            moe.means(moe.features(moe.obs_normalizer.normalize(states))))
    centres = problem.modes(states)
    covered, worst, distinct = problem.cfg.num_modes, 0.0, True
    for m, c in zip(means, centres):
        dist = torch.cdist(c, m)                          # (K modes, Z experts)
        nearest, which = dist.min(dim=1)
        covered = min(covered, int((nearest < COVER_RADIUS).sum()))
        worst = max(worst, float(nearest.max()))
        distinct &= len(set(which.tolist())) == problem.cfg.num_modes
    return covered, worst, distinct


def policy_samples(model: torch.nn.Module, draw: Any, states: torch.Tensor,
                   n: int) -> torch.Tensor:
    """`(S, n, 2)` raw actions of `draw(normalised obs) -> normalised actions` per state."""
    with torch.no_grad():
        return torch.stack([model.action_normalizer.unnormalize(
            draw(model.obs_normalizer.normalize(s.expand(n, 1)))) for s in states])


def mode_mass(problem: RingProblem, samples: torch.Tensor, states: torch.Tensor) -> np.ndarray:
    """Fraction of samples nearest each mode, pooled over states."""
    counts = torch.zeros(problem.cfg.num_modes)
    for s, x in zip(states, samples):
        counts += torch.bincount(problem.classify(x, s.expand(len(x), 1)),
                                 minlength=problem.cfg.num_modes)
    return (counts / counts.sum()).numpy()


def _new_moe(cfg: MoEConfig, actions: torch.Tensor, gen: torch.Generator) -> MixtureOfExperts:
    moe = MixtureOfExperts(cfg, 1, 2)
    moe.init_means(actions, gen)
    return moe


def run_toy(cfg: ToyConfig, seed: int = 0, show_bar: bool = True) -> dict[str, Any]:
    """Train every model on the toy and measure mode recovery; returns metrics and samples."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    problem = RingProblem(cfg)
    obs, actions = problem.sample(cfg.data_size, gen)
    states = torch.linspace(-1, 1, cfg.eval_states)[:, None]
    timings: dict[str, float] = {}
    result: dict[str, Any] = {'seed': seed}

    # 1. VDD against the exact mixture score, in raw units.
    t0 = time.monotonic()
    analytic = _new_moe(cfg.moe, actions, gen)
    distill(analytic, problem.score(), obs, actions, cfg.vdd, seed=seed, show_bar=show_bar)
    covered, worst, distinct = mean_errors(problem, analytic, states)
    result['analytic'] = {'modes_covered': covered, 'max_mean_error': worst,
                          'distinct': distinct}
    timings['vdd_analytic'] = time.monotonic() - t0

    # 2. A diffusion teacher trained on samples, then VDD from its score. The toy's actions
    #    are O(1) already, so every model keeps identity normalizers and the score is queried
    #    at the same noise levels as in 1; the teacher's sigma_data and sigma_max fit that scale.
    t0 = time.monotonic()
    teacher = DiffusionTeacher(cfg.teacher, 1, 2)
    n_obs, n_act = obs, actions
    train_teacher(teacher, n_obs, n_act, seed=seed, show_bar=show_bar)
    timings['teacher'] = time.monotonic() - t0

    t0 = time.monotonic()
    student = _new_moe(cfg.moe, n_act, gen)
    distill(student, TeacherScore(teacher), n_obs, n_act, cfg.vdd, seed=seed, show_bar=show_bar)
    timings['vdd_teacher'] = time.monotonic() - t0

    # 3. Baselines on the data: Gaussian BC (Z=1) and an EM-trained MoE.
    t0 = time.monotonic()
    baselines = {}
    for name, z, bcfg in (('gaussian_bc', 1, cfg.gaussian_bc), ('em_moe', cfg.moe.num_experts,
                                                                 cfg.em_moe)):
        mcfg = MoEConfig(**{**cfg.moe.__dict__, 'num_experts': z})
        model = _new_moe(mcfg, n_act, gen)
        train_em(model, n_obs, n_act, bcfg, seed=seed, stage=name, show_bar=show_bar)
        baselines[name] = model
    timings['baselines'] = time.monotonic() - t0

    # Measure: mode masses and distances to fresh data at fixed states.
    n = cfg.eval_samples
    samples = {
        'data': torch.stack([problem.sample(n, gen, s.expand(n, 1))[1] for s in states]),
        'teacher': policy_samples(teacher, lambda o: teacher.sample(o, generator=gen),
                                  states, n),
        'vdd_moe': policy_samples(student, student.sample, states, n),
        'gaussian_bc': policy_samples(baselines['gaussian_bc'], baselines['gaussian_bc'].sample,
                                      states, n),
        'em_moe': policy_samples(baselines['em_moe'], baselines['em_moe'].sample, states,
                                 n),
    }
    masses = {k: mode_mass(problem, v, states) for k, v in samples.items()}
    floor = MASS_FLOOR / cfg.num_modes
    distances = {k: float(np.mean([energy_distance(x, d) for x, d in
                                   zip(v, samples['data'])]))
                 for k, v in samples.items() if k != 'data'}
    covered, worst, distinct = mean_errors(problem, student, states)
    result['teacher'] = {
        'modes_covered': covered,
        'max_mean_error': worst,
        'distinct': distinct,
        'modes_with_mass': int((masses['vdd_moe'] >= floor).sum()),
        'teacher_modes_with_mass': int((masses['teacher'] >= floor).sum()),
        'max_mass_error': float(np.abs(masses['vdd_moe'] - masses['teacher']).max()),
        'moe_mass': [round(float(m), 4) for m in masses['vdd_moe']],
        'teacher_mass': [round(float(m), 4) for m in masses['teacher']],
    }
    result['moe_distance'] = distances['vdd_moe']
    result['gaussian_bc_distance'] = distances['gaussian_bc']
    result['distances'] = distances
    result['modes_with_mass'] = {k: int((m >= floor).sum()) for k, m in masses.items()}
    result['seconds'] = timings
    plot = {'states': states, 'samples': samples, 'problem': problem,
            'analytic_means': _raw_means(analytic, states),
            'moe_means': _raw_means(student, states),
            'moe_gate': _gates(student, states)}
    return {'metrics': result, 'plot': plot}


def _raw_means(moe: MixtureOfExperts, states: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return moe.action_normalizer.unnormalize(
            moe.means(moe.features(moe.obs_normalizer.normalize(states))))


def _gates(moe: MixtureOfExperts, states: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return moe.log_gating(moe.features(moe.obs_normalizer.normalize(states))).exp()
