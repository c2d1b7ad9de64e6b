"""Seeded scripted oracles that act from the flat observation alone.

Each task's demonstrator is a phase machine (via-point, descend, grasp, lift, carry/place,
release) for one behaviour mode. `reset(seed)` picks the mode with the configured
probabilities (a low-discrepancy sequence over seeds, so runs of consecutive seeds are
balanced). The first phase moves toward a via-point above the chosen cube (carry tasks,
`lift_carry` and `carry_four`: right after the grasp it heads for the chosen goal), so a
demonstration reveals its mode early. The mode-averaging oracle runs one machine per mode and
executes the probability-weighted mean of their actions: what a unimodal learner converges
to. It fails on every task here.

Oracles never import robosuite: they read positions from the observation fields named by the
task, so the same object can drive the robot through ROS as a policy node. A camera task's
oracle is its base task's and reads the base task's state observation (`privileged`: the
rollout runner hands it `SimEnv.state_observation()`, not the images).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from vdd_ros.core.policy import Policy, PolicySpec
from vdd_ros.errors import UserError
from vdd_ros.sim.tasks import TABLE_Z, TaskSpec, get_task

ORACLE_KINDS = ('scripted', 'averaged')
DEFAULT_NOISE = 0.03
GAIN = 20.0          # action per metre of position error (the action saturates at 1)
OPEN, CLOSE = -1.0, 1.0
# half-sizes of the Stack environment's cubes (A red 4 cm, B green 5 cm)
STACK_HALF = {'cubeA': 0.02, 'cubeB': 0.025}
VIA_HEIGHT = 0.07    # via-point height above a cube before the descent
GRASP_DEPTH = 0.005  # grasp this far below the cube centre
CARRY_CLEARANCE = 0.035
_GOLDEN = (5 ** 0.5 - 1) / 2  # fractional part of the golden ratio


class Obs:
    """Named read access to a flat observation."""

    def __init__(self, flat: np.ndarray, slices: dict[str, slice]) -> None:
        self.flat = np.asarray(flat, dtype=np.float64).reshape(-1)
        self.slices = slices

    def __getitem__(self, key: str) -> np.ndarray:
        return self.flat[self.slices[key]]

    @property
    def eef(self) -> np.ndarray:
        return self['robot0_eef_pos']


# A target function returns (position, frame) where frame 'eef' steers the end effector to the
# position and 'cube:<key>' steers the held cube whose position field is <key>.
Target = Callable[[Obs], tuple[np.ndarray, str]]


@dataclass
class Phase:
    """One phase: where to go, what the gripper does, and when the phase is over."""

    name: str
    target: Target
    grip: float
    done: Callable[[Obs, int], bool]


def _near(a: np.ndarray, b: np.ndarray, xy: float, z: float) -> bool:
    return bool(np.linalg.norm(a[:2] - b[:2]) < xy and abs(a[2] - b[2]) < z)


def _pick_phases(cube: str) -> list[Phase]:
    """Via-point above `cube`, descend, close the gripper."""
    def via(o: Obs) -> tuple[np.ndarray, str]:
        return o[cube] + np.array([0.0, 0.0, VIA_HEIGHT]), 'eef'

    def grasp_point(o: Obs) -> tuple[np.ndarray, str]:
        return o[cube] - np.array([0.0, 0.0, GRASP_DEPTH]), 'eef'

    return [
        Phase('via', via, OPEN, lambda o, n: _near(o.eef, via(o)[0], 0.012, 0.02)),
        Phase('descend', grasp_point, OPEN,
              lambda o, n: _near(o.eef, grasp_point(o)[0], 0.008, 0.006) or n >= 25),
        Phase('grasp', grasp_point, CLOSE, lambda o, n: n >= 6),
    ]


def _scripted_phases(spec: TaskSpec, mode: str) -> list[Phase]:
    """The phase list of one mode of a task."""
    if spec.goals:  # carry tasks: one mode per goal
        goal_key = f'goal_{mode}_pos'

        def carry(o: Obs) -> tuple[np.ndarray, str]:
            return o[goal_key], 'cube:cube_pos'

        return _pick_phases('cube_pos') + [
            Phase('carry', carry, CLOSE, lambda o, n: False)]

    if spec.family == 'pick_either':
        cube = f'{mode}_pos'

        def lift(o: Obs) -> tuple[np.ndarray, str]:
            p = o[cube].copy()
            p[2] = TABLE_Z + STACK_HALF[mode] + 0.15
            return p, f'cube:{cube}'

        return _pick_phases(cube) + [Phase('lift', lift, CLOSE, lambda o, n: False)]

    if spec.family == 'stack_either':
        top, bottom = ('cubeA', 'cubeB') if mode == 'A_on_B' else ('cubeB', 'cubeA')
        tk, bk = f'{top}_pos', f'{bottom}_pos'
        rest = STACK_HALF[top] + STACK_HALF[bottom]

        def carry_z(o: Obs) -> float:
            return float(o[bk][2] + rest + CARRY_CLEARANCE)

        def lift(o: Obs) -> tuple[np.ndarray, str]:
            p = o[tk].copy()
            p[2] = carry_z(o)
            return p, f'cube:{tk}'

        def over(o: Obs) -> tuple[np.ndarray, str]:
            p = o[bk].copy()
            p[2] = carry_z(o)
            return p, f'cube:{tk}'

        def lower(o: Obs) -> tuple[np.ndarray, str]:
            return o[bk] + np.array([0.0, 0.0, rest + 0.004]), f'cube:{tk}'

        def hold(o: Obs) -> tuple[np.ndarray, str]:
            return o.eef.copy(), 'eef'

        def retreat(o: Obs) -> tuple[np.ndarray, str]:
            return o[bk] + np.array([0.0, 0.0, rest + 0.12]), 'eef'

        return _pick_phases(tk) + [
            Phase('lift', lift, CLOSE, lambda o, n: o[tk][2] > carry_z(o) - 0.02),
            Phase('over', over, CLOSE, lambda o, n: _near(o[tk], over(o)[0], 0.01, 0.02)),
            Phase('lower', lower, CLOSE,
                  lambda o, n: _near(o[tk], lower(o)[0], 0.008, 0.006) or n >= 20),
            Phase('release', hold, OPEN, lambda o, n: n >= 5),
            Phase('retreat', retreat, OPEN, lambda o, n: False),
        ]
    raise AssertionError(spec.name)


class PhaseMachine:
    """Steps through a phase list from observations and turns targets into actions."""

    def __init__(self, phases: list[Phase], slices: dict[str, slice]) -> None:
        self.phases = phases
        self.slices = slices
        self.reset()

    def reset(self) -> None:
        self.index = 0
        self.steps = 0

    @property
    def phase(self) -> str:
        return self.phases[self.index].name

    def act(self, flat: np.ndarray) -> np.ndarray:
        """Noise-free 7-d action for the observation (advances the phase when it is over)."""
        o = Obs(flat, self.slices)
        while (self.index + 1 < len(self.phases)
               and self.phases[self.index].done(o, self.steps)):
            self.index += 1
            self.steps = 0
        phase = self.phases[self.index]
        target, frame = phase.target(o)
        current = o.eef if frame == 'eef' else o[frame.split(':', 1)[1]]
        action = np.zeros(7)
        action[:3] = np.clip(GAIN * (target - current), -1.0, 1.0)
        action[6] = phase.grip
        self.steps += 1
        return action


class OraclePolicy(Policy):
    """Scripted (one mode per episode) or mode-averaging oracle for a task.

    `mode` is the mode chosen at `reset` (None for the averaging oracle); `info` holds
    `mode` (its index, -1 when averaging) and `phase` (the index of the current phase of the
    first machine). For a camera task it acts as its base task's oracle, on the base task's
    state observation (`privileged`), and picks the same mode for the same seed.
    """

    def __init__(self, task: str, kind: str = 'scripted', seed: int | None = None,
                 mode_probs: list[float] | None = None, noise: float = DEFAULT_NOISE) -> None:
        if kind not in ORACLE_KINDS:
            raise UserError(f'unknown oracle kind {kind!r}; known kinds: '
                            f'{", ".join(ORACLE_KINDS)}')
        viewed = get_task(task)
        self.task_spec = get_task(viewed.family)
        self.privileged = viewed.family != viewed.name
        self.kind = kind
        self.modes = list(self.task_spec.modes)
        probs = np.full(len(self.modes), 1.0 / len(self.modes)) if mode_probs is None else \
            np.asarray(mode_probs, dtype=np.float64)
        if probs.shape != (len(self.modes),) or np.any(probs < 0) or probs.sum() <= 0:
            raise UserError(f'mode_probs must be {len(self.modes)} non-negative numbers with a '
                            f'positive sum (modes: {", ".join(self.modes)}), got {mode_probs}')
        self.mode_probs = probs / probs.sum()
        if not np.isfinite(noise) or noise < 0:
            raise UserError(f'noise must be a non-negative number, got {noise}')
        self.noise = float(noise)
        self.spec = PolicySpec(obs_fields=list(self.task_spec.obs_fields),
                               action_dim=self.task_spec.action_dim, task=viewed.name)
        slices = self.task_spec.obs_slices()
        self.machines = [PhaseMachine(_scripted_phases(self.task_spec, m), slices)
                         for m in self.modes]
        self._seed_rng = np.random.default_rng(seed)
        self._task_key = zlib.crc32(self.task_spec.name.encode())
        self.rng = np.random.default_rng(seed)
        self.mode: str | None = None
        self.mode_index = -1
        self.info: dict[str, float] = {}
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        # keyed apart from the environment's stream (same seed) and from the other tasks'
        if seed is None:
            seed = int(self._seed_rng.integers(2 ** 63))
        self.rng = np.random.default_rng([int(seed), 0x0AC1E, self._task_key])
        for machine in self.machines:
            machine.reset()
        if self.kind == 'scripted':
            self.mode_index = self.choose_mode(seed)
            self.mode = self.modes[self.mode_index]
        else:
            self.mode_index, self.mode = -1, None
        self.info = {'mode': float(self.mode_index), 'phase': 0.0}

    def choose_mode(self, seed: int) -> int:
        """The mode index of episode `seed`: the golden-ratio (Weyl) sequence over seeds,
        shifted per task, through the inverse CDF of `mode_probs`. Any run of consecutive
        seeds then follows the probabilities to within a few episodes, unlike independent
        draws (a 50-episode run of fair coins lands outside 40-60% about one time in eight)."""
        u = (int(seed) * _GOLDEN + self._task_key / 2 ** 32) % 1.0
        index = int(np.searchsorted(np.cumsum(self.mode_probs), u, side='right'))
        while self.mode_probs[min(index, len(self.modes) - 1)] == 0:  # float edge at the end
            index -= 1
        return min(index, len(self.modes) - 1)

    def act(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64).reshape(-1)
        if obs.shape[0] != self.spec.obs_dim:
            raise ValueError(f'observation has {obs.shape[0]} values, the {self.task_spec.name} '
                             f'oracle expects {self.spec.obs_dim}')
        if self.kind == 'scripted':
            machine = self.machines[self.mode_index]
            action = machine.act(obs)
        else:
            machine = self.machines[0]
            action = sum(p * m.act(obs) for p, m in zip(self.mode_probs, self.machines))
        if self.noise > 0:
            action[:3] += self.rng.normal(0.0, self.noise, 3)
        self.info = {'mode': float(self.mode_index), 'phase': float(machine.index)}
        return np.clip(action, -1.0, 1.0).astype(np.float32)


class StandardLiftOracle(Policy):
    """Scripted demonstrator of robosuite's standard Lift on robomimic's keys (LIFT_KEYS):
    above the cube, descend, grasp, lift 15 cm; one mode. `mode` is always None."""

    LIFT = 0.15

    def __init__(self, seed: int | None = None, noise: float = DEFAULT_NOISE) -> None:
        if not np.isfinite(noise) or noise < 0:
            raise UserError(f'noise must be a non-negative number, got {noise}')
        self.noise = float(noise)
        fields = [('robot0_eef_pos', 3), ('robot0_eef_quat', 4), ('robot0_gripper_qpos', 2),
                  ('object', 10)]
        self.spec = PolicySpec(obs_fields=fields, action_dim=7)
        # the cube's position is the first three values of `object` (robosuite object-state)
        slices = {'robot0_eef_pos': slice(0, 3), 'cube_pos': slice(9, 12)}

        def lift(o: Obs) -> tuple[np.ndarray, str]:
            return o['cube_pos'] * [1, 1, 0] + [0, 0, TABLE_Z + self.LIFT], 'cube:cube_pos'

        self.machine = PhaseMachine(_pick_phases('cube_pos') + [
            Phase('lift', lift, CLOSE, lambda o, n: False)], slices)
        self.mode = None
        self._seed_rng = np.random.default_rng(seed)
        self.rng = np.random.default_rng(seed)
        self.info: dict[str, float] = {}

    def reset(self, seed: int | None = None) -> None:
        if seed is None:
            seed = int(self._seed_rng.integers(2 ** 63))
        self.rng = np.random.default_rng([int(seed), 0x0AC1E, zlib.crc32(b'Lift')])
        self.machine.reset()

    def act(self, obs: np.ndarray) -> np.ndarray:
        action = self.machine.act(np.asarray(obs, dtype=np.float64).reshape(-1))
        if self.noise > 0:
            action[:3] += self.rng.normal(0.0, self.noise, 3)
        self.info = {'phase': float(self.machine.index)}
        return np.clip(action, -1.0, 1.0).astype(np.float32)


def make_oracle(task: str, kind: str = 'scripted', seed: int | None = None,
                mode_probs: list[float] | None = None, noise: float = DEFAULT_NOISE) -> Policy:
    """The task's scripted demonstrator (`kind='scripted'`) or its mode-averaging oracle;
    for 'Lift', robosuite's standard Lift (scripted only: it has one mode)."""
    if task == 'Lift':
        if kind != 'scripted' or mode_probs is not None:
            raise UserError("robosuite's standard Lift has one mode: only its scripted "
                            'demonstrator, without mode probabilities')
        return StandardLiftOracle(seed=seed, noise=noise)
    return OraclePolicy(task, kind=kind, seed=seed, mode_probs=mode_probs, noise=noise)
