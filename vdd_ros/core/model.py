"""The small abstract base of every model a checkpoint holds (teacher, MoE, students).

A model maps a raw observation window to a raw action chunk in one `predict` call and owns
its normalizers; `reset` starts an episode; `to_config` gives what rebuilds it; `describe`
gives the facts an evaluation reports (sampling steps, expert choice), so that no caller
probes a model with `hasattr`. The checkpoint `kind` is enforced when a subclass is defined.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from vdd_ros.core.config import TeacherConfig, VisionConfig
from vdd_ros.core.nets import FourierEmbedding, ResidualMLP
from vdd_ros.core.normalizer import Normalizer
from vdd_ros.core.vision import ObservationEncoder


class PolicyModel(nn.Module, abc.ABC):
    """Base of DiffusionTeacher, MixtureOfExperts and the one-step students."""

    kind: ClassVar[str]

    def __init__(self, cfg: Any, obs_dim: int, action_dim: int, obs_horizon: int,
                 action_horizon: int, fields: Sequence[tuple[str, int]] | None,
                 vision: VisionConfig | None) -> None:
        """What every model has: its config, sizes, normalizers and observation encoder."""
        super().__init__()
        self.cfg = cfg
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.obs_horizon, self.action_horizon = obs_horizon, action_horizon
        self.obs_normalizer = Normalizer(obs_dim)
        self.action_normalizer = Normalizer(action_dim)
        self.encoder = observation_encoder(obs_dim, obs_horizon, fields, vision)

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


def observation_encoder(obs_dim: int, obs_horizon: int,
                        fields: Sequence[tuple[str, int]] | None = None,
                        vision: VisionConfig | None = None) -> ObservationEncoder:
    """A model's encoder of the normalised window (vision.py): the identity without cameras.
    `fields` default to one low-dimensional field of `obs_dim` values."""
    fields = [(str(k), int(n)) for k, n in fields] if fields else [('obs', obs_dim)]
    if sum(n for _, n in fields) != obs_dim:
        raise ValueError(f'observation fields {fields} do not add up to {obs_dim} values')
    return ObservationEncoder(fields, obs_horizon, vision)


class DenoisingModel(PolicyModel):
    """The models that sample a flat normalised action chunk from noise (the diffusion
    teacher, the consistency student): their shared network (the observation encoder, then a
    residual MLP on the noisy chunk, the condition and the noise level's embedding) and their
    acting: normalise the window, `sample`, unnormalise.

    `sample` takes the normalised window and encodes it once; the network's own calls
    (`denoise`, `score`, `consistency`) take the condition `encode(obs)`, which without
    cameras is the window itself.
    """

    abstract_base = True

    def __init__(self, cfg: TeacherConfig, obs_dim: int, action_dim: int, obs_horizon: int = 1,
                 action_horizon: int = 1, *, fields: Sequence[tuple[str, int]] | None = None,
                 vision: VisionConfig | None = None) -> None:
        super().__init__(cfg, obs_dim, action_dim, obs_horizon, action_horizon, fields, vision)
        self.flat_obs, self.flat_act = obs_dim * obs_horizon, action_dim * action_horizon
        self.embed = FourierEmbedding(32)
        self.net = ResidualMLP(self.flat_act + self.encoder.out_dim + 32, cfg.hidden_dim,
                               cfg.num_layers, self.flat_act)
        self.sampling_steps = cfg.sampling_steps

    def encode(self, obs: torch.Tensor, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """The condition `(B, encoder.out_dim)` of normalised windows `(B, flat_obs)`."""
        return self.encoder(obs, generator)

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
