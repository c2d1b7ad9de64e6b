"""One acting interface for the teacher, the MoE, the baselines and scripted oracles.

This module imports no torch (the ONNX acting path runs without it); `ModelPolicy` imports
torch when it is built.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vdd_ros.errors import UserError

if TYPE_CHECKING:
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


# odd, about 2**32 / golden ratio: the training seeds' noise seeds lie far apart
NOISE_STRIDE = 0x9E3779B9
# how a policy seeds its sampling noise (evaluation stages are keyed by it)
NOISE_SEEDING = 'episode seed + training seed * NOISE_STRIDE mod 2**32'


def noise_seed(episode_seed: int, training_seed: int = 0) -> int:
    """The seed of a policy's sampling noise in an episode: the episode's seed plus the
    checkpoint's training seed times NOISE_STRIDE, modulo 2**32 (torch's CPU generator reads a
    seed's low 32 bits). Checkpoints of different training seeds so draw different noise in
    the same episode; training seed 0 draws the episode seed's own."""
    return (int(episode_seed) + int(training_seed) * NOISE_STRIDE) & 0xFFFFFFFF


def training_seed(meta: dict[str, Any], where: str) -> int:
    """The training seed in a checkpoint's (or exported file's) metadata, `train.seed`; 0 if
    none is recorded. UserError naming `where` if it is not an integer >= 0."""
    train = meta.get('train') or {}
    seed = train.get('seed', 0) if isinstance(train, dict) else 0
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f'{where}: train.seed: must be an integer >= 0, got {seed!r}')
    return seed


class Policy(ABC):
    """Closed-loop policy: `reset()` at episode start, then `act(obs)` once per control step.

    `act` takes the latest flat observation (shape `(obs_dim,)`) and returns one action
    (shape `(action_dim,)`). After each call `info` holds diagnostics of that step
    (for an MoE: the chosen expert, the gating entropy, the action's log-likelihood).
    """

    spec: PolicySpec
    info: dict[str, float]
    # a scripted oracle of a camera task: it acts on the simulator's state observation (of the
    # base task, `spec.obs_fields`), not on what the cameras see
    privileged: bool = False

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


class ChunkPolicy(Policy):
    """A model queried with an observation window for an action chunk, acted out step by step.

    Keeps the last `obs_horizon` observations (the first one repeated at an episode's start)
    and queues the chunk's first `action_exec` actions; `query` is called only when the queue
    is empty. Subclasses implement `query(window (obs_horizon, obs_dim)) -> (actions
    (action_horizon, action_dim) float32, info)`. A sampling subclass seeds its noise at
    `reset(seed)` with `noise_seed(seed, training_seed)` (the checkpoint's training seed).
    """

    def __init__(self, spec: PolicySpec, training_seed: int = 0) -> None:
        self.spec = spec
        self.training_seed = int(training_seed)   # offsets the noise seed of each episode
        self.info: dict[str, float] = {}
        self.diagnostics = False
        self._obs_dim = spec.obs_dim     # (a sum over the fields: not recomputed per step)
        self._history: deque[np.ndarray] = deque(maxlen=spec.obs_horizon)
        self._queue: deque[np.ndarray] = deque()
        self._ahead = np.zeros((0, spec.action_dim), dtype=np.float32)  # beyond action_exec

    @abstractmethod
    def query(self, window: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """The action chunk for one observation window."""

    def reset(self, seed: int | None = None) -> None:
        self._history.clear()
        self._queue.clear()
        self._ahead = self._ahead[:0]

    def act(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32).reshape(-1)
        if obs.shape[0] != self._obs_dim:
            raise ValueError(f'observation has {obs.shape[0]} values, policy expects '
                             f'{self._obs_dim}')
        if not self._history:
            self._history.extend([obs] * self.spec.obs_horizon)
        else:
            self._history.append(obs)
        if not self._queue:
            stacked = obs[None] if self.spec.obs_horizon == 1 else np.stack(self._history)
            actions, info = self.query(stacked)
            self._queue.extend(actions[:self.spec.action_exec])
            self._ahead = actions[self.spec.action_exec:]
            self.info = dict(info)
        return self._queue.popleft()

    def pending(self) -> np.ndarray:
        if not self._queue:
            return self._ahead.astype(np.float32, copy=True)
        return np.concatenate([np.stack(self._queue), self._ahead]).astype(np.float32)


class ModelPolicy(ChunkPolicy):
    """Runs a torch model that maps an observation window to an action chunk.

    The model implements `predict(obs_window, generator, diagnostics) -> (actions, info)` with
    `obs_window (B, obs_horizon, obs_dim)` and `actions (B, action_horizon, action_dim)` in
    raw units (the model owns its normalizers); `info` is a dict of floats.
    Set `diagnostics = True` to have `info` filled on every query (costs a little latency).
    """

    def __init__(self, model: torch.nn.Module, spec: PolicySpec, device: str = 'cpu',
                 training_seed: int = 0) -> None:
        import torch
        super().__init__(spec, training_seed)
        self._torch = torch
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device)
        self._generator.seed()

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        if seed is not None:
            self._generator.manual_seed(noise_seed(seed, self.training_seed))
        if hasattr(self.model, 'reset'):
            self.model.reset()

    def query(self, window: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        with self._torch.inference_mode():
            x = self._torch.from_numpy(window)[None]
            if self.device.type != 'cpu':
                x = x.to(self.device)
            actions, info = self.model.predict(x, generator=self._generator,
                                               diagnostics=self.diagnostics)
            return actions[0].cpu().numpy(), info
