"""Registry of the multimodal manipulation tasks (static metadata; never imports robosuite).

Every task is built on an existing robosuite environment with the Panda arm and the OSC
pose-delta controller. Each has two or more behaviour modes whose average fails:

- `lift_carry` (robosuite Lift): lift the cube and carry it to a virtual goal on the left or
  on the right; carrying it to the midpoint reaches neither.
- `pick_either` (robosuite Stack): lift either of two cubes placed far apart; reaching for the
  midpoint grasps nothing.
- `stack_either` (robosuite Stack): stack cube A on cube B or cube B on cube A.
- `carry_four` (robosuite Lift): lift the cube and carry it to one of four virtual goals,
  front-left, front-right, back-left or back-right of it (front: +x, away from the robot;
  left: +y, as in lift_carry); the average of the four, straight above the cube, and the
  average of any two reach none.
- `pick_either_image`: pick_either seen through cameras, the agentview and the wrist camera
  (32x32 RGB), with the robot's proprioception and no object state. Its scenes, modes,
  success and scripted demonstrator (which reads the simulator's state) are pick_either's.

Observation fields, thresholds and placement ranges live here so that learners, oracles and
ROS nodes agree on them without building an environment.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from vdd_ros.errors import UserError

# Height of the robosuite table top (table_offset z) in metres.
TABLE_Z = 0.8

_ROBOT_FIELDS: list[tuple[str, int]] = [('robot0_eef_pos', 3), ('robot0_gripper_qpos', 2)]
_TWO_CUBE_FIELDS: list[tuple[str, int]] = _ROBOT_FIELDS + [
    ('cubeA_pos', 3), ('cubeB_pos', 3), ('eef_to_cubeA', 3), ('eef_to_cubeB', 3),
    ('cubeA_to_cubeB', 3)]

# carry_four's goals: (x sign, y sign) of each quadrant; front is +x (away from the robot)
_FOUR: dict[str, tuple[float, float]] = {
    'front_left': (1.0, 1.0), 'front_right': (1.0, -1.0),
    'back_left': (-1.0, 1.0), 'back_right': (-1.0, -1.0)}


@dataclass(frozen=True)
class Region:
    """Axis-aligned box of table-frame (x, y) positions and a yaw range, in metres/radians."""

    x: tuple[float, float]
    y: tuple[float, float]
    yaw: tuple[float, float] = (-0.5, 0.5)


@dataclass(frozen=True)
class Goal:
    """Placement of one virtual goal (a point in space the held cube must reach).

    Drawn from the environment's generator in the order x, y, height: x = sign[0] * U(x),
    y = sign[1] * U(y) (world metres; the table centre is at x = y = 0) and z = TABLE_Z +
    U(height), U uniform over the range. Goals that share the ranges and differ in sign mirror
    each other draw for draw.
    """

    name: str
    x: tuple[float, float]
    y: tuple[float, float]
    height: tuple[float, float]
    sign: tuple[float, float] = (1.0, 1.0)


def _goal_fields(names: list[str]) -> list[tuple[str, int]]:
    """Observation of a carry-to-a-goal task: the cube, every goal (in order), the cube seen
    from the end effector, then every goal seen from the cube."""
    return (_ROBOT_FIELDS + [('cube_pos', 3)] + [(f'goal_{n}_pos', 3) for n in names]
            + [('eef_to_cube', 3)] + [(f'cube_to_goal_{n}', 3) for n in names])


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one task.

    `obs_fields` names the slices of the flat observation in order (`X_to_Y` means Y - X).
    `horizon` is the episode length limit in control steps at `control_freq` Hz.
    Carry tasks (`goals` not empty) have one mode per goal, named and ordered like the goals:
    success is the lifted cube within `success_radius` of any goal.
    """

    name: str
    description: str
    env_name: str
    modes: list[str]
    horizon: int
    obs_fields: list[tuple[str, int]]
    control_freq: int = 20
    action_dim: int = 7
    # cube placement per robosuite object name (relative to the table centre)
    regions: dict[str, Region] = field(default_factory=dict)
    # carry tasks only: the virtual goals (sampled in this order) and the success radius
    goals: tuple[Goal, ...] = ()
    success_radius: float = 0.04
    # height a cube must rise above its resting height to count as lifted
    lift_height: float = 0.06
    # camera tasks: the state task they view (its scenes, modes, success and demonstrator),
    # the robosuite cameras (each an obs field `<camera>_image`) and their side in pixels
    base: str = ''
    cameras: tuple[str, ...] = ()
    image_side: int = 64

    def __post_init__(self) -> None:
        if self.goals and list(self.modes) != [g.name for g in self.goals]:
            raise ValueError(f'{self.name}: a carry task has one mode per goal, in order')

    @property
    def obs_dim(self) -> int:
        return int(sum(n for _, n in self.obs_fields))

    @property
    def family(self) -> str:
        """The state task whose behaviour this is (its own name, or a camera task's base)."""
        return self.base or self.name

    def obs_slices(self) -> dict[str, slice]:
        """Slice of the flat observation for each field name."""
        out, start = {}, 0
        for key, size in self.obs_fields:
            out[key] = slice(start, start + size)
            start += size
        return out


TASKS: dict[str, TaskSpec] = {
    'lift_carry': TaskSpec(
        name='lift_carry',
        description='lift the cube and carry it to the left or the right goal',
        env_name='Lift',
        modes=['left', 'right'],
        horizon=90,
        obs_fields=_goal_fields(['left', 'right']),
        regions={'cube': Region(x=(-0.03, 0.03), y=(-0.03, 0.03))},
        goals=tuple(Goal(name, x=(-0.04, 0.04), y=(0.18, 0.22), height=(0.14, 0.18),
                         sign=(1.0, sy)) for name, sy in (('left', 1.0), ('right', -1.0))),
        success_radius=0.04,
    ),
    'pick_either': TaskSpec(
        name='pick_either',
        description='lift either of two cubes placed far apart',
        env_name='Stack',
        modes=['cubeA', 'cubeB'],
        horizon=80,
        obs_fields=list(_TWO_CUBE_FIELDS),
        regions={'cubeA': Region(x=(-0.05, 0.05), y=(-0.14, -0.09)),
                 'cubeB': Region(x=(-0.05, 0.05), y=(0.09, 0.14))},
    ),
    'stack_either': TaskSpec(
        name='stack_either',
        description='stack cube A on cube B or cube B on cube A',
        env_name='Stack',
        modes=['A_on_B', 'B_on_A'],
        horizon=140,
        obs_fields=list(_TWO_CUBE_FIELDS),
        regions={'cubeA': Region(x=(-0.05, 0.05), y=(-0.14, -0.09)),
                 'cubeB': Region(x=(-0.05, 0.05), y=(0.09, 0.14))},
    ),
    'carry_four': TaskSpec(
        name='carry_four',
        description='lift the cube and carry it to the front-left, front-right, back-left or '
                    'back-right goal',
        env_name='Lift',
        modes=list(_FOUR),
        horizon=90,  # scripted episodes take 33-43 steps (200 seeds)
        obs_fields=_goal_fields(list(_FOUR)),
        regions={'cube': Region(x=(-0.03, 0.03), y=(-0.03, 0.03))},
        goals=tuple(Goal(name, x=(0.12, 0.16), y=(0.12, 0.16), height=(0.14, 0.18), sign=sign)
                    for name, sign in _FOUR.items()),
        success_radius=0.04,
    ),
}


def _camera_task(base: str, cameras: tuple[str, ...], side: int) -> TaskSpec:
    """`base` seen through `cameras` (proprioception and images, no object state)."""
    spec = TASKS[base]
    return replace(spec, name=f'{base}_image', base=base, cameras=cameras, image_side=side,
                   description=f'{spec.description}, seen through cameras',
                   obs_fields=_ROBOT_FIELDS + [(f'{c}_image', side * side * 3)
                                               for c in cameras])


# 32x32 keeps the shared training configuration (6000 batches of 256 for the teacher) within
# the camera pipeline's hour on 2 CPU cores; at 64x64 an encoder step costs 4x as much
TASKS['pick_either_image'] = _camera_task('pick_either', ('agentview', 'robot0_eye_in_hand'), 32)


def get_task(name: str) -> TaskSpec:
    """The task called `name`; an unknown name raises UserError listing the known tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f'unknown task {name!r}; known tasks: {", ".join(TASKS)}') from None
