"""The small abstract base of every model a checkpoint holds (teacher, MoE, students).

A model maps a raw observation window to a raw action chunk in one `predict` call and owns
its normalizers; `reset` starts an episode; `to_config` gives what rebuilds it; `describe`
gives the facts an evaluation reports (sampling steps, expert choice), so that no caller
probes a model with `hasattr`. The checkpoint `kind` is enforced when a subclass is defined.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn


class PolicyModel(nn.Module, abc.ABC):
    """Base of DiffusionTeacher, MixtureOfExperts and the one-step students."""

    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get('abstract_base', False):
            return
        kind = getattr(cls, 'kind', None)
        if not isinstance(kind, str) or not kind:
            raise TypeError(f'{cls.__name__}: a PolicyModel must set its checkpoint `kind`')

    @abc.abstractmethod
    def predict(self, obs_window: torch.Tensor, generator: torch.Generator | None = None,
                diagnostics: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """Raw `(B, obs_horizon, obs_dim)` -> raw `(B, action_horizon, action_dim)`, info."""

    @abc.abstractmethod
    def to_config(self) -> dict[str, Any]:
        """The constructor arguments besides the model config (dimensions, horizons)."""

    def reset(self) -> None:
        """Start an episode (models with per-episode state override this)."""

    def describe(self) -> dict[str, Any]:
        """Facts an evaluation reports about how the model acts."""
        return {}


class DenoisingModel(PolicyModel):
    """Shared acting of the models that sample a flat normalised action chunk from noise (the
    diffusion teacher, the consistency student): normalise the window, `sample`, unnormalise."""

    abstract_base = True
    obs_dim: int
    action_dim: int
    obs_horizon: int
    action_horizon: int
    sampling_steps: int

    @abc.abstractmethod
    def sample(self, obs: torch.Tensor, steps: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Flat normalised actions for flat normalised observations `(B, flat_obs)`."""

    def predict(self, obs_window: torch.Tensor, generator: torch.Generator | None = None,
                diagnostics: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """Policy interface: raw `(B, T_o, obs_dim)` -> raw `(B, T_a, action_dim)`."""
        obs = self.obs_normalizer.normalize(obs_window).reshape(obs_window.shape[0], -1)
        flat = self.sample(obs, generator=generator)
        return self.action_normalizer.unnormalize(
            flat.reshape(-1, self.action_horizon, self.action_dim)), {}

    def describe(self) -> dict[str, Any]:
        return {'sampling_steps': int(self.sampling_steps)}

    def to_config(self) -> dict[str, Any]:
        return {'obs_dim': self.obs_dim, 'action_dim': self.action_dim,
                'obs_horizon': self.obs_horizon, 'action_horizon': self.action_horizon}
