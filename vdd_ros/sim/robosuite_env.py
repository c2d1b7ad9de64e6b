"""Any single-arm robosuite environment rebuilt from a dataset's `env_args` (robomimic layout).

`env_args` = {env_name, type: 1, env_kwargs: {robots, controller_configs, control_freq, ...}}.
Controller configurations of robosuite 1.5 (composite: `type` and `body_parts`) are used as
they are. Arm-part configurations of robosuite <= 1.4 are mapped where the mapping is exact:
OSC_POSE / OSC_POSITION with `control_delta` become `input_type` delta or absolute in the
world frame (where 1.4 read them), the joint controllers keep their fields; anything else is
refused with one line. Two-arm environments are refused.

`DatasetEnv` is the rollout runner's environment for such a dataset: seeded resets, a flat
observation from named keys (robomimic's `object` is robosuite's `object-state`), success
from the environment's own check, no behaviour modes, and the recorded MuJoCo states for
replay (`set_state`). robosuite is imported on first use only.
"""
from __future__ import annotations

import copy
import inspect
import json
from typing import Any

import numpy as np

from vdd_ros.errors import UserError
from vdd_ros.sim.env import MAKE_SEED, RobosuiteHolder, import_robosuite

# robomimic observation key -> robosuite observation key
ALIASES = {'object': 'object-state'}
# robosuite's standard Lift as robomimic records it: Panda, the default OSC pose controller,
# robomimic's usual low-dimensional keys (19 values; `object` = cube position, quaternion
# and gripper-to-cube vector)
LIFT_KEYS = ('robot0_eef_pos', 'robot0_eef_quat', 'robot0_gripper_qpos', 'object')
LIFT_HORIZON = 120


def standard_lift_args() -> dict[str, Any]:
    """`env_args` of robosuite's standard Lift (what `vdd-ros collect --task Lift` records)."""
    suite = import_robosuite()
    from robosuite.controllers import load_composite_controller_config
    return {'env_name': 'Lift', 'type': 1, 'robosuite_version': suite.__version__,
            'env_kwargs': {'robots': 'Panda', 'control_freq': 20, 'reward_shaping': False,
                           'use_object_obs': True, 'controller_configs':
                           load_composite_controller_config(controller=None, robot='Panda')}}
_EXACT_PARTS = ('OSC_POSE', 'OSC_POSITION', 'JOINT_POSITION', 'JOINT_VELOCITY',
                'JOINT_TORQUE')
# what the runner sets whatever the recording said: state only, no window, its own horizon
_OVERRIDES = {'has_renderer': False, 'use_camera_obs': False, 'ignore_done': True,
              'hard_reset': False}


def check_env_args(env_args: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(env name, keyword arguments) of a dataset's `env_args`; UserError naming `where`."""
    if not isinstance(env_args, dict) or not env_args.get('env_name'):
        raise UserError(f'{where}: no env_args with an env_name (the robosuite environment '
                        'to rebuild is unknown; convert raw robosuite demonstrations with '
                        'vdd-ros convert-robosuite)')
    if env_args.get('type', 1) != 1:
        raise UserError(f'{where}: env_args type {env_args.get("type")!r}: only robosuite '
                        'environments (type 1) can be rebuilt')
    name = str(env_args['env_name'])
    suite = import_robosuite()
    from robosuite.environments.base import REGISTERED_ENVS
    if name not in REGISTERED_ENVS:
        raise UserError(f'{where}: robosuite {suite.__version__} has no environment '
                        f'{name!r}')
    if name.startswith('TwoArm'):
        raise UserError(f'{where}: {name} is a two-arm environment; only single-arm '
                        'environments are supported')
    kwargs = env_args.get('env_kwargs', {})
    if not isinstance(kwargs, dict):
        raise UserError(f'{where}: env_kwargs: expected an object')
    robots = kwargs.get('robots', 'Panda')
    robots = [robots] if isinstance(robots, str) else list(robots)
    if len(robots) != 1:
        raise UserError(f'{where}: {len(robots)} robots: only single-arm environments are '
                        'supported')
    out = {k: v for k, v in kwargs.items() if k not in ('controller_configs',)}
    out['robots'] = robots[0]
    out['controller_configs'] = controller_config(kwargs.get('controller_configs'),
                                                  robots[0], where)
    accepted = inspect.signature(REGISTERED_ENVS[name].__init__).parameters
    unknown = sorted(k for k in out if k not in accepted)
    if unknown:
        raise UserError(f'{where}: env_kwargs {unknown[0]!r} is not an argument of '
                        f'robosuite {name}')
    return name, out


def controller_config(cfg: Any, robot: str, where: str) -> dict[str, Any]:
    """A robosuite 1.5 composite controller configuration for `cfg` (see the module
    docstring); the robot's default when `cfg` is None."""
    import_robosuite()
    from robosuite.controllers import load_composite_controller_config
    from robosuite.controllers.composite.composite_controller_factory import \
        refactor_composite_controller_config
    if cfg is None:
        return load_composite_controller_config(controller=None, robot=robot)
    if not isinstance(cfg, dict):
        raise UserError(f'{where}: controller_configs: expected an object, got '
                        f'{type(cfg).__name__}')
    if 'body_parts' in cfg:
        if 'type' not in cfg:
            raise UserError(f'{where}: controller_configs: a composite configuration needs '
                            'a type')
        return copy.deepcopy(cfg)
    kind = cfg.get('type')
    if kind not in _EXACT_PARTS:
        raise UserError(f'{where}: controller_configs: type {kind!r} from robosuite <= 1.4 '
                        f'has no exact robosuite 1.5 equivalent (mapped: '
                        f'{", ".join(_EXACT_PARTS)})')
    part = copy.deepcopy(cfg)
    delta = part.pop('control_delta', True)
    if kind.startswith('OSC'):
        part['input_type'] = 'delta' if delta else 'absolute'
        part.setdefault('input_ref_frame', 'world')
    elif not delta:
        raise UserError(f'{where}: controller_configs: {kind} with control_delta false has '
                        'no robosuite 1.5 equivalent')
    return refactor_composite_controller_config(part, robot, ['right'])


def make_robosuite(env_args: Any, where: str, horizon: int,
                   render: bool = False) -> Any:
    """The robosuite environment of `env_args` (see `check_env_args`)."""
    name, kwargs = check_env_args(env_args, where)
    kwargs.update(_OVERRIDES, has_offscreen_renderer=bool(render), horizon=int(horizon),
                  seed=MAKE_SEED)
    suite = import_robosuite()
    try:
        return suite.make(name, **kwargs)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise UserError(f'{where}: robosuite cannot build {name} ({type(exc).__name__}: '
                        f'{str(exc).splitlines()[0] if str(exc) else ""})') from None


class DatasetEnv(RobosuiteHolder):
    """The environment a dataset was recorded in, for the rollout runner (see SimEnv)."""

    def __init__(self, env_args: dict[str, Any], obs_keys: list[str], horizon: int,
                 where: str = 'env_args', render: bool = False, camera: str = 'agentview',
                 width: int = 256, height: int = 256) -> None:
        self._env_args = env_args
        self.task = f'{env_args.get("env_name")}'
        self.horizon = int(horizon)
        self.modes: list[str] = []
        self.render_enabled = bool(render)
        self.camera, self.width, self.height = camera, int(width), int(height)
        self._env = make_robosuite(env_args, where, self.horizon, render)
        self.action_dim = int(self._env.action_dim)
        self._raw = self._env.reset()
        missing = [k for k in obs_keys if ALIASES.get(k, k) not in self._raw]
        if missing:
            raise UserError(f'{where}: {self.task} provides no observation {missing[0]!r} '
                            f'(it has {", ".join(sorted(self._raw))})')
        self.obs_keys = list(obs_keys)
        self.obs_fields = [(k, int(np.asarray(self._raw[ALIASES.get(k, k)]).size))
                           for k in obs_keys]
        self.obs_dim = sum(n for _, n in self.obs_fields)
        self.state_dim = int(self._env.sim.get_state().flatten().size)
        self.t = 0
        self._done = True
        self._success = False

    def reset(self, seed: int | None = None) -> np.ndarray:
        self.seed_episode(seed)
        self._raw = self._env.reset()
        self.t = 0
        self._done = False
        self._success = bool(self._env._check_success())
        return self.observation()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        self._raw, reward, _ = self._step_robosuite(action)
        self._success = bool(self._env._check_success())
        self._done = self._success or self.t >= self.horizon
        return self.observation(), float(reward), self._done

    @property
    def done(self) -> bool:
        return self._done

    def success(self) -> bool:
        return self._success

    def mode(self) -> None:
        return None

    def observation(self) -> np.ndarray:
        return np.concatenate([np.zeros(0)] + [  # no keys: an empty observation
            np.asarray(self._raw[ALIASES.get(k, k)], dtype=np.float64).reshape(-1)
            for k in self.obs_keys]).astype(np.float32)

    def raw(self) -> dict[str, np.ndarray]:
        """Every observation the environment gives, by robosuite's names."""
        return dict(self._raw)

    def get_state(self) -> np.ndarray:
        return np.asarray(self._env.sim.get_state().flatten(), dtype=np.float64)

    def set_state(self, state: np.ndarray) -> np.ndarray:
        """Put the simulator in a recorded flat MuJoCo state; the observation there."""
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        if state.size != self.state_dim:
            raise UserError(f'a recorded state has {state.size} values, {self.task} has '
                            f'{self.state_dim} (recorded with another robot or model?)')
        self._env.sim.set_state_from_flattened(state)
        self._env.sim.forward()
        self._raw = self._env._get_observations(force_update=True)
        return self.observation()

    def env_args(self) -> dict[str, Any]:
        """The `env_args` this environment was built from (as recorded in datasets)."""
        return copy.deepcopy(self._env_args)

    def check_success(self) -> bool:
        return bool(self._env._check_success())

    def render_frame(self, goal_markers: bool = True) -> np.ndarray:
        if not self.render_enabled:
            raise RuntimeError('DatasetEnv was built without render=True')
        img = self._env.sim.render(camera_name=self.camera, width=self.width,
                                   height=self.height)
        return np.array(np.asarray(img, dtype=np.uint8)[::-1])

    def describe(self) -> str:
        return json.dumps({'env_name': self.task, 'horizon': self.horizon,
                           'obs_keys': self.obs_keys})

