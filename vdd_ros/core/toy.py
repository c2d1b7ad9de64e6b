"""Toy problems with a closed-form score: conditional rings of 2-D Gaussians.

Given a 1-D observation s in [-1, 1], actions come from K isotropic Gaussians (standard
deviation `std`) on a circle of radius `radius + radius_slope * s`, rotated by `rotation * s`,
with equal weights or the given `weights`. The exact score of such a mixture smoothed by any
sigma is known, so VDD can be checked against it before a diffusion teacher is involved.

`run_toy` distils the 8-mode equal-weight ring from its exact score and from a trained teacher
(mode recovery, mode masses, distances to the data), and the unequal-weight mixture
(`ToyConfig.unequal`) from its exact score with each VDD objective, judged on what acting with
expert means hides: mode masses of sampled actions, each expert's spread against the true
components', and off-mode mass (samples farther than `OFF_MODE_STDS` component standard
deviations from every mode).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vdd_ros.core.baselines import train_em
from vdd_ros.core.config import (VDD_OBJECTIVES, BaselineConfig, MoEConfig, TeacherConfig,
                                 VDDConfig, at_least, one_of, positive)
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.scores import GaussianMixtureScore, TeacherScore
from vdd_ros.core.teacher import DiffusionTeacher, train_teacher
from vdd_ros.core.vdd import distill
from vdd_ros.errors import ConfigError

COVER_RADIUS = 0.25   # an expert mean within this distance of a mode centre covers the mode
MASS_FLOOR = 0.25     # a mode "has mass" when it gets at least this fraction of 1/K of samples
OFF_MODE_STDS = 3.0   # a sample is off-mode when farther than this many stds from every mode


@dataclass
class RingConfig:
    """A conditional ring mixture (see the module docstring); no weights means equal ones."""

    num_modes: int = 8
    radius: float = 2.0
    radius_slope: float = 0.5
    std: float = 0.3
    rotation: float = 0.0
    weights: list[float] = field(default_factory=list)

    def validate(self) -> None:
        at_least(self.num_modes, 2, 'num_modes')
        for name in ('radius', 'std'):
            positive(getattr(self, name), name)
        if self.weights:
            if len(self.weights) != self.num_modes:
                raise ConfigError(f'weights: expected num_modes ({self.num_modes}) entries, got '
                                  f'{len(self.weights)}')
            for i, w in enumerate(self.weights):
                positive(w, f'weights[{i}]')


@dataclass
class UnequalConfig(RingConfig):
    """The unequal-weight mixture, distilled from its exact score by `vdd` (whose objective is
    held to the toy's targets) and by each objective in `compare` (reported alongside).

    One expert per mode, so that each expert's spread has a true component to match. The modes
    do not rotate with s: with `rotation` 0.5 no farthest-point start (of 20 seeds) put one
    expert nearest each mode at every state, and seed 0 lost a mode with either objective.
    """

    num_modes: int = 5
    std: float = 0.25
    weights: list[float] = field(default_factory=lambda: [0.35, 0.25, 0.2, 0.12, 0.08])
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(
        num_experts=5, hidden_dim=64, num_layers=2, covariance='full', init_std=0.5,
        min_std=1e-3))
    vdd: VDDConfig = field(default_factory=lambda: VDDConfig(
        iterations=2000, batch_size=256, lr=3e-3, gating_lr=3e-3, final_lr_fraction=0.05,
        uniform_gating_fraction=0.5, init_em_iterations=0, backbone_lr_scale=1.0,
        objective='smoothed'))
    compare: list[str] = field(default_factory=lambda: ['plain'])

    def validate(self) -> None:
        super().validate()
        for i, name in enumerate(self.compare):
            one_of(name, VDD_OBJECTIVES, f'compare[{i}]')


@dataclass
class ToyConfig(RingConfig):
    """The toy problems and the training budget of each model on them."""

    data_size: int = 20000
    eval_states: int = 9
    eval_samples: int = 1000
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(
        hidden_dim=128, num_layers=3, sigma_data=1.0, sigma_max=3.0, sampling_steps=8,
        iterations=4000, batch_size=512, lr=1e-3))
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(
        num_experts=8, hidden_dim=64, num_layers=2, covariance='full', init_std=0.5,
        min_std=1e-3))
    # (the toys keep their own std floor: their experts have no near-deterministic phase)
    # no warm start here: the backbone trains with the heads, and a uniform gating for the
    # first half keeps two experts from sharing one ring mode
    vdd: VDDConfig = field(default_factory=lambda: VDDConfig(
        iterations=2000, batch_size=128, lr=3e-3, gating_lr=3e-3, final_lr_fraction=0.05,
        uniform_gating_fraction=0.5, init_em_iterations=0, backbone_lr_scale=1.0))
    gaussian_bc: BaselineConfig = field(default_factory=lambda: BaselineConfig(iterations=1500))
    em_moe: BaselineConfig = field(default_factory=lambda: BaselineConfig(iterations=1500))
    unequal: UnequalConfig = field(default_factory=UnequalConfig)

    def validate(self) -> None:
        super().validate()
        for name in ('data_size', 'eval_states', 'eval_samples'):
            at_least(getattr(self, name), 1, name)


class RingProblem:
    """A conditional ring mixture: component means, data sampling, mode classification."""

    def __init__(self, cfg: RingConfig) -> None:
        self.cfg = cfg
        self.base = 2 * math.pi * torch.arange(cfg.num_modes) / cfg.num_modes
        weights = torch.tensor(cfg.weights or [1.0] * cfg.num_modes)
        self.probs = weights / weights.sum()

    def modes(self, obs: torch.Tensor) -> torch.Tensor:
        """Mode centres `(..., K, 2)` for observations `(..., 1)`."""
        angle = self.base.to(obs) + self.cfg.rotation * obs
        radius = (self.cfg.radius + self.cfg.radius_slope * obs)[..., None]
        return radius * torch.stack([angle.cos(), angle.sin()], dim=-1)

    def components(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means = self.modes(obs)
        return means, self.probs.log().to(means).expand(means.shape[:-1])

    def score(self) -> GaussianMixtureScore:
        return GaussianMixtureScore(self.components, self.cfg.std)

    def sample(self, n: int, generator: torch.Generator,
               obs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` pairs (obs `(n, 1)`, action `(n, 2)`); obs uniform in [-1, 1] unless given."""
        if obs is None:
            obs = torch.rand(n, 1, generator=generator) * 2 - 1
        if self.cfg.weights:
            k = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        else:
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


def sample_metrics(problem: RingProblem, samples: torch.Tensor,
                   states: torch.Tensor) -> dict[str, Any]:
    """Mode masses of `samples (S, n, 2)` against the true weights, and their off-mode mass."""
    mass = mode_mass(problem, samples, states)
    nearest = (samples[:, :, None] - problem.modes(states)[:, None]).norm(dim=-1).min(-1).values
    return {'off_mode_mass': float((nearest > OFF_MODE_STDS * problem.cfg.std).float().mean()),
            'mode_mass': [round(float(m), 4) for m in mass],
            'max_mass_error': float(np.abs(mass - problem.probs.numpy()).max())}


def expert_stds(moe: MixtureOfExperts, states: torch.Tensor) -> torch.Tensor:
    """`(S, Z, D)` standard deviations of each expert along its principal axes, raw units."""
    with torch.no_grad():
        scales = moe.scales(moe.features(moe.obs_normalizer.normalize(states)))
        unit = moe.action_normalizer.scale
        if not moe.full:
            return scales * unit
        chol = unit[:, None] * scales
        return torch.linalg.eigvalsh(chol @ chol.transpose(-1, -2)).clamp_min(0).sqrt()


def spread_metrics(problem: RingProblem, moe: MixtureOfExperts, samples: torch.Tensor,
                   states: torch.Tensor) -> dict[str, Any]:
    """`sample_metrics` of the MoE's `samples`, each expert's standard deviations (range over
    states and axes) against the true components', and `mean_errors`."""
    stds = expert_stds(moe, states)                                     # (S, Z, D)
    covered, worst, distinct = mean_errors(problem, moe, states)
    return {**sample_metrics(problem, samples, states),
            'expert_std_range': [[round(float(x.min()), 4), round(float(x.max()), 4)]
                                 for x in stds.transpose(0, 1)],
            'max_std_error': float((stds / problem.cfg.std - 1).abs().max()),
            'modes_covered': covered, 'max_mean_error': worst, 'distinct': distinct}


def run_unequal(cfg: ToyConfig, seed: int = 0, show_bar: bool = True) -> dict[str, Any]:
    """VDD from the exact score of the unequal-weight mixture, once per objective (the same
    data and initial model for each): metrics by objective, and of fresh data as a floor."""
    ucfg = cfg.unequal
    problem = RingProblem(ucfg)
    gen = torch.Generator().manual_seed(seed)
    obs, actions = problem.sample(cfg.data_size, gen)
    states = torch.linspace(-1, 1, cfg.eval_states)[:, None]
    n = cfg.eval_samples
    samples = {'data': torch.stack([problem.sample(n, gen, s.expand(n, 1))[1] for s in states])}
    by_objective: dict[str, Any] = {}
    metrics = {'weights': [round(float(p), 4) for p in problem.probs], 'std': ucfg.std,
               'objective': ucfg.vdd.objective,
               'data': sample_metrics(problem, samples['data'], states),
               'objectives': by_objective}
    for objective in dict.fromkeys([ucfg.vdd.objective, *ucfg.compare]):
        t0 = time.monotonic()
        torch.manual_seed(seed)
        moe = _new_moe(ucfg.moe, actions, torch.Generator().manual_seed(seed))
        vcfg = VDDConfig(**{**ucfg.vdd.__dict__, 'objective': objective})
        distill(moe, problem.score(), obs, actions, vcfg, seed=seed, show_bar=show_bar,
                stage=f'vdd_{objective}')
        seconds = time.monotonic() - t0
        samples[objective] = policy_samples(moe, lambda o: moe.sample(o, gen), states, n)
        by_objective[objective] = {**spread_metrics(problem, moe, samples[objective], states),
                                   'seconds': seconds}
    return {'metrics': metrics, 'plot': {'problem': problem, 'states': states,
                                         'samples': samples}}


def _new_moe(cfg: MoEConfig, actions: torch.Tensor, gen: torch.Generator) -> MixtureOfExperts:
    moe = MixtureOfExperts(cfg, 1, 2)
    moe.init_means(actions, gen)
    return moe


def run_toy(cfg: ToyConfig, seed: int = 0, show_bar: bool = True) -> dict[str, Any]:
    """Train every model on the toys and measure them; returns metrics and samples."""
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

    # 4. The unequal-weight mixture from its exact score, with each VDD objective.
    t0 = time.monotonic()
    unequal = run_unequal(cfg, seed, show_bar)
    result['unequal'] = unequal['metrics']
    timings['vdd_unequal'] = time.monotonic() - t0
    result['seconds'] = timings
    plot = {'states': states, 'samples': samples, 'problem': problem,
            'analytic_means': _raw_means(analytic, states),
            'moe_means': _raw_means(student, states),
            'moe_gate': _gates(student, states), 'unequal': unequal['plot']}
    return {'metrics': result, 'plot': plot}


def _raw_means(moe: MixtureOfExperts, states: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return moe.action_normalizer.unnormalize(
            moe.means(moe.features(moe.obs_normalizer.normalize(states))))


def _gates(moe: MixtureOfExperts, states: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return moe.log_gating(moe.features(moe.obs_normalizer.normalize(states))).exp()
