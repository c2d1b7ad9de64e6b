"""Perturbed episodes: what a deployed policy meets and its demonstrations never showed.

`PerturbedEnv` wraps a SimEnv for one episode of one perturbation kind:
- `clean`: none;
- `displace`: at step `start` the cube (a random one of the task's) jumps `magnitude` metres
  horizontally in a random direction, at rest (out of the gripper if it held it);
- `friction`: from the first step the sliding friction between the cubes and the fingers is
  `magnitude` times its value;
- `mass`: from the first step the cubes weigh `magnitude` times their mass;
- `obs_noise`: from step `start` the policy sees every feature with Gaussian noise of
  `magnitude` times that feature's standard deviation in the training data (`feature_std`).
The start step and directions come from the episode's seed. Physics changes are undone when
the episode ends (`close`), since robosuite keeps its model across soft resets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from vdd_ros.errors import UserError

KINDS = ('clean', 'displace', 'friction', 'mass', 'obs_noise')
# sizes at which the lift_carry VDD-MoE fails often but not always (friction: x0.02 never
# failed, x0.005 always; mass: x20 never, x40 always)
DEFAULT_MAGNITUDE = {'clean': 0.0, 'displace': 0.08, 'friction': 0.01, 'mass': 30.0,
                     'obs_noise': 2.0}


@dataclass(frozen=True)
class Perturbation:
    """One kind of perturbation, its size and the window of steps it may start in."""

    kind: str = 'clean'
    magnitude: float | None = None
    start_range: tuple[int, int] = (10, 40)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f'perturbation: unknown kind {self.kind!r} (known: '
                            f'{", ".join(KINDS)})')
        size = self.size
        if not math.isfinite(size) or size < 0:
            raise UserError(f'perturbation {self.kind}: magnitude must be finite and >= 0, '
                            f'got {size}')
        lo, hi = self.start_range
        if not 0 <= lo <= hi:
            raise UserError(f'perturbation {self.kind}: start range must be 0 <= lo <= hi, '
                            f'got {self.start_range}')

    @property
    def size(self) -> float:
        return float(DEFAULT_MAGNITUDE[self.kind] if self.magnitude is None else self.magnitude)

    @property
    def label(self) -> str:
        return self.kind if self.kind == 'clean' else f'{self.kind} {self.size:g}'


class PerturbedEnv:
    """A SimEnv for episodes under one `Perturbation` (the rollout runner's env interface)."""

    def __init__(self, env: Any, perturbation: Perturbation,
                 feature_std: np.ndarray | None = None) -> None:
        if perturbation.kind == 'obs_noise' and feature_std is None:
            raise UserError('perturbation obs_noise needs the features\' standard deviations')
        self.env, self.p = env, perturbation
        self.feature_std = None if feature_std is None else np.asarray(feature_std, np.float64)
        self.start = 0
        self._rng = np.random.default_rng(0)
        self._restore: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def reset(self, seed: int | None = None) -> np.ndarray:
        self.close()
        self._rng = np.random.default_rng([int(seed or 0), KINDS.index(self.p.kind)])
        self.start = int(self._rng.integers(self.p.start_range[0], self.p.start_range[1] + 1))
        obs = self.env.reset(seed)
        if self.p.kind in ('friction', 'mass'):
            for name in self.env.objects:
                mass = self.env.object_physics(name)[1] * self.p.size \
                    if self.p.kind == 'mass' else None
                friction = self.p.size if self.p.kind == 'friction' else None
                self._restore.append((name, self.env.object_physics(name, friction, mass)))
        return self._observe(obs)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        obs, reward, done = self.env.step(action)
        if self.p.kind == 'displace' and self.env.t == self.start and not done:
            name = self.env.objects[int(self._rng.integers(len(self.env.objects)))]
            angle = self._rng.uniform(0, 2 * math.pi)
            obs = self.env.displace_object(
                name, self.p.size * np.array([math.cos(angle), math.sin(angle), 0.0]))
        return self._observe(obs), reward, done

    def _observe(self, obs: np.ndarray) -> np.ndarray:
        if self.p.kind != 'obs_noise' or self.env.t < self.start:
            return obs
        noise = self._rng.standard_normal(obs.shape) * self.feature_std * self.p.size
        return (obs + noise).astype(np.float32)

    def close(self) -> None:
        """Undo this episode's physics changes."""
        while self._restore:
            name, before = self._restore.pop()
            self.env.restore_physics(name, before)
