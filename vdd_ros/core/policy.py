"""One acting interface for the teacher, the MoE, the baselines and scripted oracles."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class PolicySpec:
    """What a policy consumes and produces.

    `obs_fields` names each slice of the flat observation vector (key, size) in order.
    A model sees `obs_horizon` stacked observations and predicts `action_horizon` actions,
    of which the first `action_exec` are executed before it is queried again.
    """

    obs_fields: list[tuple[str, int]]
    action_dim: int
    obs_horizon: int = 1
    action_horizon: int = 1
    action_exec: int = 1
    task: str | None = None

    @property
    def obs_dim(self) -> int:
        return int(sum(size for _, size in self.obs_fields))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d['obs_fields'] = [[k, int(n)] for k, n in self.obs_fields]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> 'PolicySpec':
        d = dict(d)
        d['obs_fields'] = [(str(k), int(n)) for k, n in d['obs_fields']]
        return cls(**d)


class Policy(ABC):
    """Closed-loop policy: `reset()` at episode start, then `act(obs)` once per control step.

    `act` takes the latest flat observation (shape `(obs_dim,)`) and returns one action
    (shape `(action_dim,)`). After each call `info` holds diagnostics of that step
    (for an MoE: the chosen expert, the gating entropy, the action's log-likelihood).
    """

    spec: PolicySpec
    info: dict[str, float]

    @abstractmethod
    def reset(self, seed: int | None = None) -> None:
        """Start a new episode."""

    @abstractmethod
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Return the action for the latest observation."""

    def pending(self) -> np.ndarray:
        """The rest of the predicted action chunk after the action `act` last returned,
        `(k, action_dim)` float32 (k may be 0): the actions `act` returns next unless the
        episode is reset, then the chunk's predictions beyond them; empty by default."""
        return np.zeros((0, self.spec.action_dim), dtype=np.float32)


class ModelPolicy(Policy):
    """Runs a torch model that maps an observation window to an action chunk.

    The model implements `predict(obs_window, generator, diagnostics) -> (actions, info)` with
    `obs_window (B, obs_horizon, obs_dim)` and `actions (B, action_horizon, action_dim)` in
    raw units (the model owns its normalizers); `info` is a dict of floats.
    Set `diagnostics = True` to have `info` filled on every query (costs a little latency).
    """

    def __init__(self, model: torch.nn.Module, spec: PolicySpec, device: str = 'cpu') -> None:
        self.model = model.to(device).eval()
        self.spec = spec
        self.device = torch.device(device)
        self.info: dict[str, float] = {}
        self.diagnostics = False
        self._history: deque[np.ndarray] = deque(maxlen=spec.obs_horizon)
        self._queue: deque[np.ndarray] = deque()
        self._ahead = np.zeros((0, spec.action_dim), dtype=np.float32)  # beyond action_exec
        self._generator = torch.Generator(device=self.device)
        self._generator.seed()

    def reset(self, seed: int | None = None) -> None:
        self._history.clear()
        self._queue.clear()
        self._ahead = self._ahead[:0]
        if seed is not None:
            self._generator.manual_seed(int(seed))
        if hasattr(self.model, 'reset'):
            self.model.reset()

    @torch.inference_mode()
    def act(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32).reshape(-1)
        if obs.shape[0] != self.spec.obs_dim:
            raise ValueError(f'observation has {obs.shape[0]} values, policy expects '
                             f'{self.spec.obs_dim}')
        if not self._history:
            self._history.extend([obs] * self.spec.obs_horizon)
        else:
            self._history.append(obs)
        if not self._queue:
            stacked = obs[None] if self.spec.obs_horizon == 1 else np.stack(self._history)
            window = torch.from_numpy(stacked)[None]
            if self.device.type != 'cpu':
                window = window.to(self.device)
            actions, info = self.model.predict(window, generator=self._generator,
                                               diagnostics=self.diagnostics)
            actions = actions[0].cpu().numpy()
            self._queue.extend(actions[:self.spec.action_exec])
            self._ahead = actions[self.spec.action_exec:]
            self.info = dict(info)
        return self._queue.popleft()

    def pending(self) -> np.ndarray:
        if not self._queue:
            return self._ahead.astype(np.float32, copy=True)
        return np.concatenate([np.stack(self._queue), self._ahead]).astype(np.float32)
