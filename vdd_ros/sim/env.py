"""robosuite environments for the multimodal tasks, behind one small interface.

`SimEnv` builds the task's robosuite environment (Panda, OSC pose-delta controller),
places the cubes in the task's regions, samples virtual goals where the task has them,
flattens the observation into named fields, and classifies success and behaviour mode from
the simulator state. A camera task's observation is the robot's proprioception and its
cameras' pixels (cameras.py; each image `H * W * 3` values 0-255 in the flat vector); its
base task's state observation stays available to scripted oracles (`state_observation`).
robosuite is imported on first use only.
"""
from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import numpy as np

from vdd_ros.sim.cameras import CameraRig
from vdd_ros.sim.tasks import TABLE_Z, TaskSpec, get_task

# Every robosuite environment is built with this seed, so that model-time randomness (the
# Lift cube's size) is identical in every process; episodes are seeded on reset instead.
MAKE_SEED = 0
# render_frame's goal marker colours, by the goal's index in the task (lift_carry: left blue,
# right orange)
GOAL_COLOURS = [(40, 90, 230), (240, 140, 20), (40, 170, 60), (200, 40, 170)]
_ROBOSUITE: Any = None


def _quiet_robosuite_logger() -> None:
    """Drop robosuite's import-time warnings (private macros, optional robots, IK)."""
    logger = logging.getLogger('robosuite_logs')
    if not any(getattr(f, 'vdd_ros', False) for f in logger.filters):
        class _Filter(logging.Filter):
            vdd_ros = True

            def filter(self, record: logging.LogRecord) -> bool:
                return record.levelno >= logging.ERROR

        logger.addFilter(_Filter())


def import_robosuite() -> Any:
    """Import robosuite quietly (once per process) and return the module."""
    global _ROBOSUITE
    if _ROBOSUITE is None:
        _quiet_robosuite_logger()
        import robosuite
        _ROBOSUITE = robosuite
    return _ROBOSUITE


def robosuite_kwargs(spec: TaskSpec, render: bool = False) -> dict[str, Any]:
    """Keyword arguments of `robosuite.make` for a task (JSON-serialisable)."""
    import_robosuite()
    from robosuite.controllers import load_composite_controller_config
    return dict(
        robots='Panda',
        controller_configs=load_composite_controller_config(controller=None, robot='Panda'),
        has_renderer=False,
        has_offscreen_renderer=bool(render),
        use_camera_obs=False,
        use_object_obs=True,
        reward_shaping=False,
        control_freq=spec.control_freq,
        horizon=spec.horizon,
        ignore_done=False,
        hard_reset=False,
        seed=MAKE_SEED,
    )


class _CubePlacement:
    """Placement sampler for robosuite's soft reset: each cube uniform in its own region.

    Draws from the environment's own generator, which `SimEnv.reset(seed)` re-seeds.
    """

    def __init__(self, env: Any, spec: TaskSpec) -> None:
        self.env = env
        self.objects = [(getattr(env, name), region) for name, region in spec.regions.items()]

    def reset(self) -> None:
        pass

    def sample(self, *args: Any, **kwargs: Any) -> dict[str, tuple]:
        rng = self.env.rng
        ox, oy, oz = (float(v) for v in self.env.table_offset)
        out = {}
        for obj, region in self.objects:
            x = ox + rng.uniform(*region.x)
            y = oy + rng.uniform(*region.y)
            yaw = rng.uniform(*region.yaw)
            z = oz + 0.01 - float(obj.bottom_offset[2])
            quat = np.array([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])
            out[obj.name] = (np.array([x, y, z]), quat, obj)
        return out


class RobosuiteHolder:
    """Owns one robosuite environment (`_env`): `close()` releases it, also as a context
    manager; `seed_episode` re-seeds the generator its placement samplers draw from."""

    _env: Any
    _done: bool
    action_dim: int
    t: int

    def seed_episode(self, seed: int | None) -> None:
        fresh = np.random.default_rng(None if seed is None else int(seed))
        self._env.rng.bit_generator.state = fresh.bit_generator.state

    def _step_robosuite(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool]:
        """One control step of `action_dim` finite values (clipped to [-1, 1]): robosuite's
        (observation, reward, done); counts `t`."""
        if self._done:
            raise RuntimeError('the episode is over: call reset() before step()')
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape[0] != self.action_dim or not np.all(np.isfinite(action)):
            raise ValueError(f'action must be {self.action_dim} finite values, got {action}')
        raw, reward, done, _ = self._env.step(np.clip(action, -1.0, 1.0))
        self.t += 1
        return raw, float(reward), bool(done)

    def close(self) -> None:
        env, self._env = getattr(self, '_env', None), None
        if env is not None:
            env.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SimEnv(RobosuiteHolder):
    """One task's robosuite environment with a flat observation and success/mode classifiers.

    `reset(seed)` re-seeds the episode (placement and goals), so the same seed gives the same
    episode in any process and after any history. `step` returns `(obs, reward, done)` with
    reward 1 on success; `done` when the task succeeds or the horizon is reached.
    """

    def __init__(self, task: str, seed: int | None = None, render: bool = False,
                 camera: str = 'agentview', width: int = 256, height: int = 256) -> None:
        self.spec = get_task(task)
        self.task = self.spec.name
        self.obs_fields: list[tuple[str, int]] = list(self.spec.obs_fields)
        self.obs_dim = self.spec.obs_dim
        self.action_dim = self.spec.action_dim
        self.modes: list[str] = list(self.spec.modes)
        self.horizon = self.spec.horizon
        self.render_enabled = bool(render)
        self.camera, self.width, self.height = camera, int(width), int(height)
        suite = import_robosuite()
        self.env_kwargs = robosuite_kwargs(self.spec, render)
        self._env = suite.make(self.spec.env_name, **self.env_kwargs)
        self._env.placement_initializer = _CubePlacement(self._env, self.spec)
        self._gripper = self._env.robots[0].gripper
        if self.spec.env_name == 'Lift':
            self._cubes = {'cube': (self._env.cube, self._env.cube_body_id)}
        else:
            self._cubes = {'cubeA': (self._env.cubeA, self._env.cubeA_body_id),
                           'cubeB': (self._env.cubeB, self._env.cubeB_body_id)}
        self.half_sizes = {k: float(obj.size[2]) for k, (obj, _) in self._cubes.items()}
        self._rig: CameraRig | None = None
        if self.spec.cameras:
            self._rig = CameraRig(self._env.sim, self.spec.cameras, self.spec.image_side)
        self._next_seed = seed
        self._seeded = False
        self.goals: dict[str, np.ndarray] = {}
        self.t = 0
        self._done = True
        self._success = False
        self._raw: dict[str, np.ndarray] = {}
        self._obs = np.zeros(self.obs_dim, dtype=np.float32)

    def close(self) -> None:
        rig, self._rig = self._rig, None
        if rig is not None:
            rig.close()
        super().close()

    # -- episode -----------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode and return the flat observation. A seed (here or, for the first
        episode, in the constructor) makes it reproducible; without one the episode continues
        the environment's random stream (fresh entropy if it was never seeded)."""
        if seed is None:
            seed, self._next_seed = self._next_seed, None
        if seed is not None or not self._seeded:  # (never seeded: fresh entropy, not the
            self.seed_episode(seed)               # stream of MAKE_SEED)
        self._seeded = True
        self._raw = self._env.reset()
        self.goals = self._sample_goals(self._env.rng)
        self.t = 0
        self._done = False
        self._success = self._check_success()
        return self._observe()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """Apply one 7-d action for one control step."""
        self._raw, _, env_done = self._step_robosuite(action)
        self._success = self._check_success()
        self._done = bool(self._success or env_done or self.t >= self.horizon)
        return self._observe(), float(self._success), self._done

    @property
    def done(self) -> bool:
        return self._done

    def success(self) -> bool:
        """Whether the task is solved in the current state."""
        return self._success

    def observation(self) -> np.ndarray:
        """The latest flat observation."""
        return self._obs.copy()

    def state_observation(self) -> np.ndarray:
        """The latest observation of the base task (cube and goal positions): what scripted
        oracles read; `observation()` itself for a state task."""
        return self._flatten(self._raw)

    def raw_observation(self) -> dict[str, np.ndarray]:
        """The latest observation as named fields (the flat vector split by `obs_fields`)."""
        return {k: self._obs[s] for k, s in self.spec.obs_slices().items()}

    def robot_state(self) -> dict[str, Any]:
        """The latest state by robosuite's names, float64 (what a robot's standard topics
        carry; flattening it gives exactly `observation()`): `joints` (arm joints, then the
        gripper fingers), their `position` and `velocity`, `eef_pos`, `eef_quat` (x y z w),
        `objects` {cube: (position, quaternion x y z w)}, `goals` {name: position} and, for a
        camera task, `cameras` {camera: the step's (H, W, 3) uint8 frame}."""
        robot, raw = self._env.robots[0], self._raw
        gripper = self._gripper[robot.arms[0]] if isinstance(self._gripper, dict) \
            else self._gripper
        return {
            'joints': list(robot.robot_joints) + list(gripper.joints),
            'position': np.concatenate([raw['robot0_joint_pos'], raw['robot0_gripper_qpos']]),
            'velocity': np.concatenate([raw['robot0_joint_vel'], raw['robot0_gripper_qvel']]),
            'eef_pos': raw['robot0_eef_pos'], 'eef_quat': raw['robot0_eef_quat'],
            'objects': {k: (raw[f'{k}_pos'], raw[f'{k}_quat']) for k in self._cubes},
            'goals': dict(self.goals),
            **({'cameras': self.frames()} if self._rig is not None else {})}

    def frames(self) -> dict[str, np.ndarray]:
        """{camera: (H, W, 3) uint8} of the latest observation (a camera task's)."""
        fields = self.raw_observation()
        side = self.spec.image_side
        return {c: fields[f'{c}_image'].reshape(side, side, 3).astype(np.uint8)
                for c in self.spec.cameras}

    def get_state(self) -> np.ndarray:
        """The flattened MuJoCo state (time, qpos, qvel), as robomimic stores it."""
        return np.asarray(self._env.sim.get_state().flatten(), dtype=np.float64)

    # -- perturbations (out-of-distribution studies) -----------------------------------------
    def displace_object(self, name: str, offset: np.ndarray) -> np.ndarray:
        """Move cube `name` by `offset` (x, y, z metres), at rest; the new flat observation."""
        joint = self._cubes[name][0].joints[0]
        data = self._env.sim.data
        qpos = np.array(data.get_joint_qpos(joint), dtype=np.float64)
        qpos[:3] += np.asarray(offset, dtype=np.float64)
        data.set_joint_qpos(joint, qpos)
        data.set_joint_qvel(joint, np.zeros(6))
        self._env.sim.forward()
        self._raw = self._env._get_observations(force_update=True)
        return self._observe()

    def object_physics(self, name: str, friction: float | None = None,
                       mass: float | None = None) -> tuple[np.ndarray, float]:
        """Scale the sliding friction of cube `name`'s contacts with the gripper (its geoms'
        and the fingers': MuJoCo takes the larger of the two) by `friction`, and set its
        mass (None keeps each). Returns the previous (friction rows, mass) for
        `restore_physics`; the model keeps changes across soft resets."""
        model = self._env.sim.model
        geoms, body = self._contact_geoms(name), self._cubes[name][1]
        before = (np.array(model.geom_friction[geoms]), float(model.body_mass[body]))
        if friction is not None:
            model.geom_friction[geoms, 0] = before[0][:, 0] * float(friction)
        if mass is not None:
            model.body_mass[body] = float(mass)
        return before

    def restore_physics(self, name: str, before: tuple[np.ndarray, float]) -> None:
        model = self._env.sim.model
        model.geom_friction[self._contact_geoms(name)] = before[0]
        model.body_mass[self._cubes[name][1]] = before[1]

    def _contact_geoms(self, name: str) -> list[int]:
        gripper = self._gripper[self._env.robots[0].arms[0]] \
            if isinstance(self._gripper, dict) else self._gripper
        names = [*self._cubes[name][0].contact_geoms, *gripper.contact_geoms]
        return [self._env.sim.model.geom_name2id(g) for g in names]

    @property
    def objects(self) -> list[str]:
        """The cubes' names."""
        return list(self._cubes)

    def env_args(self) -> dict[str, Any]:
        """robomimic-style `env_args` (env name, type 1 = robosuite, make kwargs) plus the
        vdd_ros `task` name."""
        return {'env_name': self.spec.env_name, 'type': 1,
                'env_kwargs': dict(self.env_kwargs),
                'task': self.task,
                'robosuite_version': getattr(import_robosuite(), '__version__', 'unknown')}

    def render_frame(self, goal_markers: bool = True) -> np.ndarray:
        """Upright HxWx3 uint8 frame from the offscreen camera (needs render=True). Virtual
        goals, which have no body in the scene, are drawn as small squares coloured by the
        goal's index (GOAL_COLOURS: the first blue, the second orange, ...)."""
        if not self.render_enabled:
            raise RuntimeError('SimEnv was built without render=True')
        img = self._env.sim.render(camera_name=self.camera, width=self.width,
                                   height=self.height)
        frame = np.array(np.asarray(img, dtype=np.uint8)[::-1])
        if goal_markers:
            for i, goal in enumerate(self.goals.values()):
                px = self.project(goal)
                if px is not None:
                    r, c = px
                    frame[max(r - 3, 0):r + 4, max(c - 3, 0):c + 4] = \
                        GOAL_COLOURS[i % len(GOAL_COLOURS)]
        return frame

    def project(self, point: np.ndarray) -> tuple[int, int] | None:
        """(row, column) of a world point in the upright camera image; None when it is out of
        view."""
        sim = self._env.sim
        cam = sim.model.camera_name2id(self.camera)
        rot = np.asarray(sim.data.cam_xmat[cam]).reshape(3, 3)
        local = rot.T @ (np.asarray(point, dtype=np.float64) - sim.data.cam_xpos[cam])
        if local[2] >= -1e-6:  # behind the camera (it looks along its -z axis)
            return None
        focal = 0.5 * self.height / math.tan(math.radians(float(sim.model.cam_fovy[cam])) / 2)
        col = int(round(self.width / 2 + focal * local[0] / -local[2]))
        row = int(round(self.height / 2 - focal * local[1] / -local[2]))
        if 0 <= row < self.height and 0 <= col < self.width:
            return row, col
        return None

    # -- observation -------------------------------------------------------------------------
    def _sample_goals(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The task's goals in order, each drawn x, y, height (see tasks.Goal)."""
        goals = {}
        for g in self.spec.goals:
            goals[g.name] = np.array([g.sign[0] * rng.uniform(*g.x), g.sign[1] * rng.uniform(*g.y),
                                      TABLE_Z + rng.uniform(*g.height)])
        return goals

    def _observe(self) -> np.ndarray:
        """Compute (and keep) the flat observation of the current state; a camera task
        renders its cameras here, once per step."""
        if self._rig is None:
            self._obs = self._flatten(self._raw)
        else:
            frames = self._rig.render()
            self._obs = np.concatenate([
                (frames[k] if k in frames else np.asarray(self._raw[k])).reshape(-1)
                for k, _ in self.spec.obs_fields]).astype(np.float32)
        return self._obs.copy()

    def _flatten(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        """The base task's state observation of robosuite's observation `raw`."""
        eef = raw['robot0_eef_pos']
        parts = [eef, raw['robot0_gripper_qpos']]
        if self.spec.env_name == 'Lift':
            cube, goals = raw['cube_pos'], list(self.goals.values())
            parts += [cube, *goals, cube - eef, *(g - cube for g in goals)]
        else:
            a, b = raw['cubeA_pos'], raw['cubeB_pos']
            parts += [a, b, a - eef, b - eef, b - a]
        return np.concatenate(parts).astype(np.float32)

    # -- classifiers -------------------------------------------------------------------------
    def cube_pos(self, name: str) -> np.ndarray:
        return np.array(self._env.sim.data.body_xpos[self._cubes[name][1]])

    def _lifted(self, name: str, margin: float) -> bool:
        return self.cube_pos(name)[2] > TABLE_Z + self.half_sizes[name] + margin

    def _grasped(self, name: str) -> bool:
        return bool(self._env._check_grasp(gripper=self._gripper,
                                           object_geoms=self._cubes[name][0]))

    def _stacked(self, top: str, bottom: str) -> bool:
        pt, pb = self.cube_pos(top), self.cube_pos(bottom)
        gap = pt[2] - pb[2] - self.half_sizes[top] - self.half_sizes[bottom]
        if np.linalg.norm(pt[:2] - pb[:2]) > 0.025 or abs(gap) > 0.01:
            return False
        if self._lifted(bottom, 0.01):
            return False
        return (not self._grasped(top)
                and bool(self._env.check_contact(self._cubes[top][0], self._cubes[bottom][0])))

    def _check_success(self) -> bool:
        name = self.spec.family
        if self.spec.goals:
            if not self._lifted('cube', 0.03):
                return False
            cube = self.cube_pos('cube')
            return any(np.linalg.norm(cube - g) < self.spec.success_radius
                       for g in self.goals.values())
        if name == 'pick_either':
            up = [c for c in ('cubeA', 'cubeB') if self._lifted(c, self.spec.lift_height)]
            if len(up) != 1:
                return False
            other = 'cubeB' if up[0] == 'cubeA' else 'cubeA'
            return not self._lifted(other, 0.01) and self._grasped(up[0])
        if name == 'stack_either':
            return self._stacked('cubeA', 'cubeB') or self._stacked('cubeB', 'cubeA')
        raise AssertionError(name)

    def mode(self) -> str | None:
        """The behaviour mode the current state shows, or None when it shows none.

        On success this is the mode that succeeded; otherwise a mode is named only when the
        state has committed to it (carry tasks: the lifted cube within a quarter of the shortest
        goal-to-goal distance of one goal; two-cube tasks: exactly one cube lifted).
        """
        name = self.spec.family
        if self.spec.goals:
            if not self._lifted('cube', 0.03):
                return None
            cube = self.cube_pos('cube')
            dist = {m: float(np.linalg.norm(cube - g)) for m, g in self.goals.items()}
            best = min(dist, key=dist.get)
            quarter = 0.25 * min(float(np.linalg.norm(a - b))
                                 for a, b in itertools.combinations(self.goals.values(), 2))
            return best if dist[best] < quarter else None
        if name == 'stack_either':
            if self._stacked('cubeA', 'cubeB'):
                return 'A_on_B'
            if self._stacked('cubeB', 'cubeA'):
                return 'B_on_A'
        up = [c for c in ('cubeA', 'cubeB') if self._lifted(c, 0.02)]
        if len(up) != 1:
            return None
        if name == 'pick_either':
            return up[0]
        return 'A_on_B' if up[0] == 'cubeA' else 'B_on_A'
