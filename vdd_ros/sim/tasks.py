"""Registry of the multimodal manipulation tasks (static metadata; never imports robosuite).

Every task is built on an existing robosuite environment with the Panda arm and the OSC
pose-delta controller. Each has two behaviour modes whose average fails:

- `lift_carry` (robosuite Lift): lift the cube and carry it to a virtual goal on the left or
  on the right; carrying it to the midpoint reaches neither.
- `pick_either` (robosuite Stack): lift either of two cubes placed far apart; reaching for the
  midpoint grasps nothing.
- `stack_either` (robosuite Stack): stack cube A on cube B or cube B on cube A.

Observation fields, thresholds and placement ranges live here so that learners, oracles and
ROS nodes agree on them without building an environment.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vdd_ros.errors import UserError

# Height of the robosuite table top (table_offset z) in metres.
TABLE_Z = 0.8

_ROBOT_FIELDS: list[tuple[str, int]] = [('robot0_eef_pos', 3), ('robot0_gripper_qpos', 2)]
_TWO_CUBE_FIELDS: list[tuple[str, int]] = _ROBOT_FIELDS + [
    ('cubeA_pos', 3), ('cubeB_pos', 3), ('eef_to_cubeA', 3), ('eef_to_cubeB', 3),
    ('cubeA_to_cubeB', 3)]


@dataclass(frozen=True)
class Region:
    """Axis-aligned box of table-frame (x, y) positions and a yaw range, in metres/radians."""

    x: tuple[float, float]
    y: tuple[float, float]
    yaw: tuple[float, float] = (-0.5, 0.5)


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one task.

    `obs_fields` names the slices of the flat observation in order (`X_to_Y` means Y - X).
    `horizon` is the episode length limit in control steps at `control_freq` Hz.
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
    # lift_carry only: goal placement (y is mirrored for the left goal) and success radius
    goal_region: tuple[tuple[float, float], tuple[float, float], tuple[float, float]] | None = None
    success_radius: float = 0.04
    # height a cube must rise above its resting height to count as lifted
    lift_height: float = 0.06

    @property
    def obs_dim(self) -> int:
        return int(sum(n for _, n in self.obs_fields))

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
        obs_fields=_ROBOT_FIELDS + [
            ('cube_pos', 3), ('goal_left_pos', 3), ('goal_right_pos', 3), ('eef_to_cube', 3),
            ('cube_to_goal_left', 3), ('cube_to_goal_right', 3)],
        regions={'cube': Region(x=(-0.03, 0.03), y=(-0.03, 0.03))},
        # (x range, |y| range, height above the table range)
        goal_region=((-0.04, 0.04), (0.18, 0.22), (0.14, 0.18)),
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
}


def get_task(name: str) -> TaskSpec:
    """The task called `name`; an unknown name raises UserError listing the known tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f'unknown task {name!r}; known tasks: {", ".join(TASKS)}') from None
