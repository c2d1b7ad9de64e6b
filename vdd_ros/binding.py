"""Bindings: which topic feeds which observation feature, and which topic each action slice
goes to (the YAML files in config/bindings/).

A binding is the one contract between a robot's topics and a policy's vectors; the policy
node, `vdd-ros record`, `vdd-ros bag2dataset` and the datasets they produce all read it, so
training and deployment cannot disagree about features. Example::

    observation:
      - {feature: joint_pos, topic: /joint_states, type: sensor_msgs/JointState,
         field: position, joints: [panda_joint1, panda_joint2], max_age_s: 0.05}
      - {feature: eef_pos, topic: /eef_pose, type: geometry_msgs/PoseStamped,
         field: position, frame_id: panda_link0}
      - {feature: cube_pos, topic: /cube_pose, type: geometry_msgs/PoseStamped,
         field: position}
      - {feature: eef_to_cube, difference: [eef_pos, cube_pos]}    # cube_pos - eef_pos
    action:
      - {topic: /arm/twist_cmd, type: geometry_msgs/TwistStamped, slice: [0, 6]}
      - {topic: /gripper/command, type: std_msgs/Float64MultiArray, slice: [6, 7]}

Observation entries, in order, make the flat observation (float32, like the simulator's).
Sources by type (types are written `pkg/Name` or `pkg/msg/Name`, kept as `pkg/msg/Name`):

- `sensor_msgs/JointState`: `field` position (default) | velocity | effort of `joints`,
  matched by NAME, in the binding's order; a message naming none of them is not for this
  source and is skipped (arm and gripper may publish apart on one topic), one naming only
  some of them is an error;
- `geometry_msgs/PoseStamped`: `field` position (3) | orientation (quaternion x y z w, 4) |
  pose (7, the default);
- `std_msgs/Float64MultiArray`, `std_msgs/Float32MultiArray`: `slice: [start, stop]` of data,
  or `label` + `size`: the field of a labelled array (vdd_ros's own wire format, see
  ros/conversions.py: one layout dimension per field, `@`-labelled dimensions carry metadata);
- `sensor_msgs/Image`: a camera, `width` x `height` pixels (square, at least 8x8), encoding
  `rgb8` (the feature is named `<camera>_image`, its values the pixels 0-255, row-major, as
  core/fields.py lays a camera out); another encoding (bgr8, mono8, ...), another size or a
  buffer shorter than `step * height` is rejected; no cv_bridge: the buffer is read with
  numpy;
- derived: `{feature: F, difference: [A, B]}` is B - A of two earlier features (`A_to_B`).

Every source has `max_age_s` (default 0.5): an older message is stale. Its time is the header
stamp (`stamp: header`, the default where the type has a header) or its arrival on the ROS
clock (`stamp: arrival`, always so for the arrays); `frame_id`, when given, must equal the
message's header.frame_id. `clock: sim` says the robot runs on `/clock` (use_sim_time), so
arrival times are /clock times; `clock: system` (default) uses the wall clock.

Action sinks cut `slice: [start, stop]` out of the action vector; the slices must tile
[0, action_dim) without gaps or overlaps:

- `std_msgs/Float64MultiArray` (ros2_control forward command controllers) and
  `std_msgs/Float32MultiArray` (with `label`: a labelled array, today's action format);
- `geometry_msgs/TwistStamped`: 6 values, linear x y z then angular x y z;
- `geometry_msgs/PoseStamped`: 7 values (position, quaternion x y z w; normalised on the way
  out) or 3 (position; the orientation is the sink's fixed `orientation`, default identity);
- `trajectory_msgs/JointTrajectory`: `joints` by name, one value per joint; the message
  carries the WHOLE predicted action chunk, point k (k = 0, 1, ...) at time_from_start
  (k + 1) * control period (`trajectory_times`).

Episodes: the marker topic (`episode_topic`, default /vdd/episode) carries std_msgs/String
JSON objects `{"event": "start"|"end", "episode": <int seed>, "success": <bool, on end>,
"mode": <str, optional>}` (`marker_json`, `parse_marker`).

Messages are read duck-typed (field names only), so the same code serves rclpy messages and
rosbags' deserialised dataclasses; nothing here imports rclpy or torch, and nothing builds a
message: the ROS layer fills messages from `Sink.values` / `Sink.chunk_values`.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import numpy as np

from vdd_ros.errors import ConfigError, UserError

JOINT_STATE = 'sensor_msgs/msg/JointState'
POSE_STAMPED = 'geometry_msgs/msg/PoseStamped'
FLOAT64_ARRAY = 'std_msgs/msg/Float64MultiArray'
FLOAT32_ARRAY = 'std_msgs/msg/Float32MultiArray'
TWIST_STAMPED = 'geometry_msgs/msg/TwistStamped'
JOINT_TRAJECTORY = 'trajectory_msgs/msg/JointTrajectory'
STRING = 'std_msgs/msg/String'
CLOCK = 'rosgraph_msgs/msg/Clock'
IMAGE = 'sensor_msgs/msg/Image'
IMAGE_ENCODING = 'rgb8'

SOURCE_TYPES = (JOINT_STATE, POSE_STAMPED, FLOAT64_ARRAY, FLOAT32_ARRAY, IMAGE)
SINK_TYPES = (FLOAT64_ARRAY, FLOAT32_ARRAY, TWIST_STAMPED, POSE_STAMPED, JOINT_TRAJECTORY)
ARRAYS = (FLOAT64_ARRAY, FLOAT32_ARRAY)
HAS_HEADER = (JOINT_STATE, POSE_STAMPED, TWIST_STAMPED, JOINT_TRAJECTORY, IMAGE)
POSE_FIELDS = {'position': 3, 'orientation': 4, 'pose': 7}
JOINT_FIELDS = ('position', 'velocity', 'effort')
DEFAULT_MAX_AGE_S = 0.5
EPISODE_TOPIC = '/vdd/episode'
CLOCKS = ('system', 'sim')
MARKER_EVENTS = ('start', 'end')
META_PREFIX = '@'
_TOPIC_RE = re.compile(r'^[~/]?[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$')
_TYPE_RE = re.compile(r'^([A-Za-z][A-Za-z0-9_]*)/(?:msg/)?([A-Z][A-Za-z0-9]*)$')


class BindingMismatch(UserError, ValueError):
    """A message does not hold what the binding says (type, joint, frame, size, NaN)."""


class InvalidValues(BindingMismatch):
    """A message of the right shape holds NaN or Inf (an invalid observation or command)."""


def normalise_type(name: str) -> str:
    """'sensor_msgs/JointState' or 'sensor_msgs/msg/JointState' -> 'sensor_msgs/msg/JointState'."""
    m = _TYPE_RE.match(str(name))
    if not m:
        raise ValueError(f'{name!r} is not a message type (expected pkg/Name or pkg/msg/Name)')
    return f'{m.group(1)}/msg/{m.group(2)}'


def _short(type_name: str) -> str:
    return type_name.replace('/msg/', '/')


# -- validation helpers -----------------------------------------------------------------------
class _Spec:
    """Reads one mapping of a binding file; every error names `where` and the key."""

    def __init__(self, data: Any, where: str, known: Sequence[str]) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f'{where}: expected a mapping, got {data!r}')
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f'{where}.{unknown[0]}: unknown key (known: {", ".join(known)})')
        self.data, self.where = data, where

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f'{self.where}.{key}: {msg}' if self.where else f'{key}: {msg}')

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def str(self, key: str, default: str | None = None, choices: Sequence[str] = ()) -> Any:
        if not self.has(key):
            if default is None:
                raise self.fail(key, 'required')
            return default
        value = self.data[key]
        if not isinstance(value, str) or not value:
            raise self.fail(key, f'expected a non-empty string, got {value!r}')
        if choices and value not in choices:
            raise self.fail(key, f'must be one of {list(choices)}, got {value!r}')
        return value

    def topic(self, key: str = 'topic') -> str:
        value = self.str(key)
        if not _TOPIC_RE.match(value):
            raise self.fail(key, f'{value!r} is not a valid ROS topic name')
        return value

    def type(self, allowed: Sequence[str]) -> str:
        value = self.str('type')
        try:
            value = normalise_type(value)
        except ValueError as exc:
            raise self.fail('type', str(exc)) from None
        if value not in allowed:
            raise self.fail('type', f'{_short(value)} is not supported here (supported: '
                            f'{", ".join(_short(t) for t in allowed)})')
        return value

    def number(self, key: str, default: float, positive: bool = True) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or (positive and value <= 0):
            raise self.fail(key, f'expected a {"positive " if positive else ""}number, '
                            f'got {value!r}')
        return float(value)

    def names(self, key: str) -> tuple[str, ...]:
        value = self.data.get(key)
        if not isinstance(value, (list, tuple)) or not value \
                or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, f'expected a non-empty list of names, got {value!r}')
        dup = sorted({v for v in value if list(value).count(v) > 1})
        if dup:
            raise self.fail(key, f'{dup[0]!r} is listed twice')
        return tuple(value)

    def slice(self, key: str = 'slice') -> tuple[int, int]:
        value = self.data.get(key)
        if not isinstance(value, (list, tuple)) or len(value) != 2 \
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) \
                or not 0 <= value[0] < value[1]:
            raise self.fail(key, f'expected [start, stop] with 0 <= start < stop, got {value!r}')
        return int(value[0]), int(value[1])

    def only(self, keys: Sequence[str], kind: str) -> None:
        for key in keys:
            if self.has(key):
                raise self.fail(key, f'not used by {kind}')


def _finite(values: np.ndarray, topic: str, what: str) -> np.ndarray:
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise InvalidValues(f'{topic}: non-finite {what} (value {bad} is {values[bad]})')
    return values


def _header_stamp_ns(msg: Any) -> int:
    stamp = msg.header.stamp
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def check_frame(frame_id: str, expected: str | None, topic: str) -> None:
    """Raise BindingMismatch when a message's frame_id is not the one the binding expects."""
    if expected is not None and frame_id != expected:
        raise BindingMismatch(f'{topic}: frame_id {frame_id!r}, the binding expects '
                              f'{expected!r}')


def _check_frame(msg: Any, frame_id: str | None, topic: str) -> None:
    if frame_id is not None:
        check_frame(msg.header.frame_id, frame_id, topic)


def labelled_offsets(msg: Any) -> dict[str, tuple[int, int]]:
    """{label: (start, stop)} of a labelled array's data fields (metadata labels skipped)."""
    out, start = {}, 0
    for dim in msg.layout.dim:
        if dim.label.startswith(META_PREFIX):
            continue
        size = int(dim.size)
        out[dim.label] = (start, start + size)
        start += size
    return out


def _labelled_field(msg: Any, label: str, size: int, topic: str,
                    offsets: Mapping[str, tuple[int, int]] | None) -> np.ndarray:
    offsets = labelled_offsets(msg) if offsets is None else offsets
    if label not in offsets:
        raise BindingMismatch(f'{topic}: labelled array has no field {label!r} (has: '
                              f'{", ".join(offsets) or "no labels"})')
    start, stop = offsets[label]
    data = np.asarray(msg.data)
    if stop - start != size or stop > data.size:
        raise BindingMismatch(f'{topic}: field {label!r} holds {stop - start} of '
                              f'{data.size} values, the binding expects {size}')
    return data[start:stop]


def _array_slice(msg: Any, start: int, stop: int, topic: str) -> np.ndarray:
    data = np.asarray(msg.data)
    if data.size < stop:
        raise BindingMismatch(f'{topic}: {data.size} values, the binding reads [{start}, '
                              f'{stop})')
    return data[start:stop]


# -- observation ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One observation feature read from one topic (see the module docstring)."""

    feature: str
    topic: str
    type: str
    field: str | None = None               # JointState / PoseStamped
    joints: tuple[str, ...] = ()           # JointState
    slice: tuple[int, int] | None = None   # arrays
    label: str | None = None               # labelled arrays
    size: int = 0
    max_age_s: float = DEFAULT_MAX_AGE_S
    frame_id: str | None = None
    stamp_from: str = 'header'             # 'header' or 'arrival'
    width: int = 0                         # Image
    height: int = 0                        # Image
    _index: dict = dc_field(default_factory=dict, compare=False, repr=False)

    KEYS = ('feature', 'topic', 'type', 'field', 'joints', 'slice', 'label', 'size',
            'max_age_s', 'frame_id', 'stamp', 'width', 'height')

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Source:
        s = _Spec(data, where, cls.KEYS)
        kind = s.type(SOURCE_TYPES)
        common: dict[str, Any] = {
            'feature': s.str('feature'), 'topic': s.topic(), 'type': kind,
            'max_age_s': s.number('max_age_s', DEFAULT_MAX_AGE_S),
            'stamp_from': s.str('stamp', 'header' if kind in HAS_HEADER else 'arrival',
                             ('header', 'arrival'))}
        if common['stamp_from'] == 'header' and kind not in HAS_HEADER:
            raise s.fail('stamp', f'{_short(kind)} has no header: use stamp: arrival')
        if kind in HAS_HEADER and s.has('frame_id'):
            common['frame_id'] = s.str('frame_id')
        if kind == JOINT_STATE:
            s.only(('slice', 'label', 'size', 'width', 'height'), 'JointState')
            joints = s.names('joints')
            return cls(**common, field=s.str('field', 'position', JOINT_FIELDS),
                       joints=joints, size=len(joints))
        if kind == POSE_STAMPED:
            s.only(('slice', 'label', 'size', 'joints', 'width', 'height'), 'PoseStamped')
            fld = s.str('field', 'pose', tuple(POSE_FIELDS))
            return cls(**common, field=fld, size=POSE_FIELDS[fld])
        if kind == IMAGE:
            s.only(('slice', 'label', 'size', 'joints', 'field'), 'Image')
            if not common['feature'].endswith('_image'):
                raise s.fail('feature', f'a camera feature is named <camera>_image, got '
                             f'{common["feature"]!r}')
            width, height = (int(s.number(k, 0)) for k in ('width', 'height'))
            if width != s.data['width'] or height != s.data['height']:
                raise s.fail('width', 'width and height are whole numbers of pixels')
            if width != height or width < 8:
                raise s.fail('width', f'camera images are square, at least 8x8 (the image '
                                      f'encoders read square frames), got {width}x{height}: '
                                      f'crop or resize upstream')
            return cls(**common, width=width, height=height, size=width * height * 3)
        s.only(('field', 'joints', 'frame_id', 'width', 'height'), _short(kind))
        if s.has('label'):
            s.only(('slice',), 'a labelled array (give label and size)')
            size = s.data.get('size')
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise s.fail('size', f'expected the field\'s number of values (>= 1), got '
                             f'{size!r}')
            return cls(**common, label=s.str('label'), size=size)
        if s.has('size'):
            raise s.fail('size', 'only with label (a slice gives the size)')
        start, stop = s.slice()
        return cls(**common, slice=(start, stop), size=stop - start)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {'feature': self.feature, 'topic': self.topic, 'type': self.type}
        if self.field is not None:
            out['field'] = self.field
        if self.joints:
            out['joints'] = list(self.joints)
        if self.slice is not None:
            out['slice'] = list(self.slice)
        if self.label is not None:
            out.update(label=self.label, size=self.size)
        if self.type == IMAGE:
            out.update(width=self.width, height=self.height)
        if self.frame_id is not None:
            out['frame_id'] = self.frame_id
        out['max_age_s'] = self.max_age_s
        out['stamp'] = self.stamp_from
        return out

    def extract(self, msg: Any,
                offsets: Mapping[str, tuple[int, int]] | None = None) -> np.ndarray:
        """This feature's values from a message (float64, float32 for Float32MultiArray):
        checks frame_id, joint names, sizes and finiteness; raises BindingMismatch.
        `offsets` (labelled arrays) reuses one `labelled_offsets(msg)` for several features."""
        kind = self.type
        if self.frame_id is not None:
            _check_frame(msg, self.frame_id, self.topic)
        if kind == JOINT_STATE:
            values = self._joint_values(msg)
        elif kind == POSE_STAMPED:
            pose = msg.pose
            p, q = pose.position, pose.orientation
            if self.field == 'position':
                values = np.array((p.x, p.y, p.z), dtype=np.float64)
            elif self.field == 'orientation':
                values = np.array((q.x, q.y, q.z, q.w), dtype=np.float64)
            else:
                values = np.array((p.x, p.y, p.z, q.x, q.y, q.z, q.w), dtype=np.float64)
        elif kind == IMAGE:
            return self._pixels(msg)
        elif self.label is not None:
            values = _labelled_field(msg, self.label, self.size, self.topic, offsets)
        else:
            values = _array_slice(msg, self.slice[0], self.slice[1], self.topic)
        return _finite(values, self.topic, f'{self.feature}')

    def _pixels(self, msg: Any) -> np.ndarray:
        """An rgb8 image's pixels, row-major (float32, 0-255); the buffer read with numpy,
        rows past `width * 3` bytes of each `step` (padding) skipped."""
        if msg.encoding != IMAGE_ENCODING:
            raise BindingMismatch(f'{self.topic}: encoding {msg.encoding!r}, the binding '
                                  f'expects {IMAGE_ENCODING}')
        if (msg.width, msg.height) != (self.width, self.height):
            raise BindingMismatch(f'{self.topic}: a {msg.width}x{msg.height} image, the '
                                  f'binding expects {self.width}x{self.height}')
        row = self.width * 3
        if msg.step < row:
            raise BindingMismatch(f'{self.topic}: step {msg.step} bytes is shorter than a '
                                  f'row of {self.width} rgb8 pixels ({row})')
        data = np.asarray(msg.data, dtype=np.uint8) if isinstance(msg.data, (list, tuple)) \
            else np.frombuffer(msg.data, dtype=np.uint8)
        if data.size < msg.step * self.height:
            raise BindingMismatch(f'{self.topic}: truncated image: {data.size} bytes, '
                                  f'{self.height} rows of step {msg.step} need '
                                  f'{msg.step * self.height}')
        rows = data[:msg.step * self.height].reshape(self.height, msg.step)[:, :row]
        return rows.reshape(-1).astype(np.float32)

    def applies(self, msg: Any) -> bool:
        """Whether a message is for this source: always, except a JointState that names none
        of its joints (drivers may publish arm and gripper separately on one topic)."""
        return self.type != JOINT_STATE or self.names_any(msg.name)

    def names_any(self, names: Sequence[str]) -> bool:
        return any(j in names for j in self.joints)

    def joint_index(self, names: Sequence[str]) -> np.ndarray:
        """Indices of the binding's joints in a JointState's `name` list (cached); a missing
        joint raises BindingMismatch naming it and the topic."""
        key = tuple(names)
        index = self._index.get(key)
        if index is None:
            lookup = {n: i for i, n in enumerate(names)}
            missing = [j for j in self.joints if j not in lookup]
            if missing:
                raise BindingMismatch(f'{self.topic}: no joint {missing[0]!r} (the message '
                                      f'names: {", ".join(names) or "none"})')
            index = np.array([lookup[j] for j in self.joints], dtype=np.intp)
            if len(self._index) > 16:
                self._index.clear()
            self._index[key] = index
        return index

    def _joint_values(self, msg: Any) -> np.ndarray:
        names = msg.name
        index = self.joint_index(names)
        data = np.asarray(getattr(msg, self.field), dtype=np.float64)
        if data.size != len(names):
            raise BindingMismatch(f'{self.topic}: {data.size} {self.field} values for '
                                  f'{len(names)} joint names')
        return data[index]

    def stamp_ns(self, msg: Any) -> int | None:
        """The header stamp in integer nanoseconds; None when the source's time is arrival."""
        return _header_stamp_ns(msg) if self.stamp_from == 'header' else None

    def stamp(self, msg: Any) -> float | None:
        """The header stamp in seconds; None when the source's time is arrival."""
        ns = self.stamp_ns(msg)
        return None if ns is None else ns * 1e-9


@dataclass(frozen=True)
class Derived:
    """A feature computed from two earlier ones: `difference: [a, b]` is b - a."""

    feature: str
    a: str
    b: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {'feature': self.feature, 'difference': [self.a, self.b]}


# -- action -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sink:
    """One slice of the action vector out to one topic (see the module docstring)."""

    topic: str
    type: str
    slice: tuple[int, int]
    joints: tuple[str, ...] = ()                            # JointTrajectory
    label: str | None = None                                # labelled Float32MultiArray
    frame_id: str | None = None                             # stamped types
    orientation: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0)  # 3-d PoseStamped
    max_age_s: float = DEFAULT_MAX_AGE_S                    # bag2dataset: a command's life
    stamp_from: str = 'header'

    KEYS = ('topic', 'type', 'slice', 'joints', 'label', 'frame_id', 'orientation',
            'max_age_s', 'stamp')

    @property
    def size(self) -> int:
        return self.slice[1] - self.slice[0]

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Sink:
        s = _Spec(data, where, cls.KEYS)
        kind = s.type(SINK_TYPES)
        start, stop = s.slice()
        n = stop - start
        out: dict[str, Any] = {
            'topic': s.topic(), 'type': kind, 'slice': (start, stop),
            'max_age_s': s.number('max_age_s', DEFAULT_MAX_AGE_S),
            'stamp_from': s.str('stamp', 'header' if kind in HAS_HEADER else 'arrival',
                             ('header', 'arrival'))}
        if out['stamp_from'] == 'header' and kind not in HAS_HEADER:
            raise s.fail('stamp', f'{_short(kind)} has no header: use stamp: arrival')
        if kind in HAS_HEADER and s.has('frame_id'):
            out['frame_id'] = s.str('frame_id')
        elif s.has('frame_id'):
            raise s.fail('frame_id', f'{_short(kind)} has no header')
        if kind != JOINT_TRAJECTORY:
            s.only(('joints',), _short(kind))
        if kind != FLOAT32_ARRAY:
            s.only(('label',), _short(kind))
        if kind != POSE_STAMPED:
            s.only(('orientation',), _short(kind))
        if kind == TWIST_STAMPED and n != 6:
            raise s.fail('slice', f'TwistStamped takes 6 values (linear xyz, angular xyz), '
                         f'the slice has {n}')
        if kind == POSE_STAMPED:
            if n not in (3, 7):
                raise s.fail('slice', f'PoseStamped takes 7 values (position, quaternion '
                             f'xyzw) or 3 (position), the slice has {n}')
            if s.has('orientation'):
                if n == 7:
                    raise s.fail('orientation', 'only for a 3-value (position) slice')
                q = s.data['orientation']
                if not isinstance(q, (list, tuple)) or len(q) != 4 or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) for v in q) \
                        or not math.isclose(math.hypot(*q), 1.0, abs_tol=1e-6):
                    raise s.fail('orientation', f'expected a unit quaternion [x, y, z, w], '
                                 f'got {q!r}')
                out['orientation'] = tuple(float(v) for v in q)
        if kind == JOINT_TRAJECTORY:
            joints = s.names('joints')
            if len(joints) != n:
                raise s.fail('joints', f'{len(joints)} joints for a slice of {n} values')
            out['joints'] = joints
        if kind == FLOAT32_ARRAY and s.has('label'):
            out['label'] = s.str('label')
        return cls(**out)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {'topic': self.topic, 'type': self.type,
                               'slice': list(self.slice)}
        if self.joints:
            out['joints'] = list(self.joints)
        if self.label is not None:
            out['label'] = self.label
        if self.frame_id is not None:
            out['frame_id'] = self.frame_id
        if self.type == POSE_STAMPED and self.size == 3:
            out['orientation'] = list(self.orientation)
        out['max_age_s'] = self.max_age_s
        out['stamp'] = self.stamp_from
        return out

    def values(self, action: np.ndarray) -> np.ndarray:
        """The numbers of this sink's message for one action, in message order (float64):
        array data; Twist linear then angular; Pose position then unit quaternion xyzw;
        a trajectory point's positions."""
        part = np.asarray(action, dtype=np.float64).reshape(-1)[self.slice[0]:self.slice[1]]
        if part.size != self.size:
            raise ValueError(f'{self.topic}: action has no values [{self.slice[0]}, '
                             f'{self.slice[1]})')
        if self.type == POSE_STAMPED:
            if self.size == 3:
                return np.concatenate([part, self.orientation])
            norm = float(np.linalg.norm(part[3:]))
            if not norm > 1e-9:
                raise ValueError(f'{self.topic}: the action\'s quaternion has norm {norm}')
            part = part.copy()
            part[3:] /= norm
        return part

    def chunk_values(self, chunk: np.ndarray) -> np.ndarray:
        """(H, n) values of every step of an action chunk (H, action_dim), for a
        JointTrajectory."""
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim == 1:
            chunk = chunk[None]
        return chunk[:, self.slice[0]:self.slice[1]]

    def decode(self, msg: Any) -> np.ndarray:
        """The action slice a recorded command message holds (float64; a trajectory's first
        point); raises BindingMismatch when the message does not fit the sink."""
        if self.frame_id is not None:
            _check_frame(msg, self.frame_id, self.topic)
        kind = self.type
        if kind == TWIST_STAMPED:
            lin, ang = msg.twist.linear, msg.twist.angular
            values = np.array((lin.x, lin.y, lin.z, ang.x, ang.y, ang.z), dtype=np.float64)
        elif kind == POSE_STAMPED:
            p, q = msg.pose.position, msg.pose.orientation
            values = np.array((p.x, p.y, p.z, q.x, q.y, q.z, q.w)[:self.size],
                              dtype=np.float64)
        elif kind == JOINT_TRAJECTORY:
            values = self._first_point(msg)
        elif self.label is not None:
            values = np.asarray(_labelled_field(msg, self.label, self.size, self.topic, None),
                                dtype=np.float64)
        else:
            data = np.asarray(msg.data, dtype=np.float64)
            if data.size != self.size:
                raise BindingMismatch(f'{self.topic}: {data.size} values, the binding expects '
                                      f'{self.size}')
            values = data
        return _finite(values, self.topic, 'command')

    def _first_point(self, msg: Any) -> np.ndarray:
        names = list(msg.joint_names)
        missing = [j for j in self.joints if j not in names]
        if missing:
            raise BindingMismatch(f'{self.topic}: no joint {missing[0]!r} (the trajectory '
                                  f'names: {", ".join(names) or "none"})')
        if not len(msg.points):
            raise BindingMismatch(f'{self.topic}: trajectory without points')
        positions = np.asarray(msg.points[0].positions, dtype=np.float64)
        if positions.size != len(names):
            raise BindingMismatch(f'{self.topic}: {positions.size} positions for '
                                  f'{len(names)} joint names')
        return positions[[names.index(j) for j in self.joints]]

    def stamp_ns(self, msg: Any) -> int | None:
        return _header_stamp_ns(msg) if self.stamp_from == 'header' else None


def trajectory_times(steps: int, period_s: float) -> list[tuple[int, int]]:
    """time_from_start (sec, nanosec) of the points of a chunk: (k + 1) * period_s."""
    out = []
    for k in range(steps):
        ns = round((k + 1) * period_s * 1e9)
        out.append((ns // 1_000_000_000, ns % 1_000_000_000))
    return out


# -- episode markers --------------------------------------------------------------------------
@dataclass(frozen=True)
class Marker:
    """One episode marker: `event` start or end, the episode's seed, success and mode."""

    event: str
    episode: int | None = None
    success: bool | None = None
    mode: str | None = None


def marker_json(event: str, episode: int | None = None, success: bool | None = None,
                mode: str | None = None) -> str:
    """The JSON text of an episode marker (the `data` of a std_msgs/String)."""
    if event not in MARKER_EVENTS:
        raise ValueError(f'event must be one of {list(MARKER_EVENTS)}, got {event!r}')
    out: dict[str, Any] = {'event': event}
    if episode is not None:
        out['episode'] = int(episode)
    if success is not None:
        out['success'] = bool(success)
    if mode is not None:
        out['mode'] = str(mode)
    return json.dumps(out, separators=(',', ':'))


def parse_marker(text: str) -> Marker:
    """An episode marker from its JSON text; raises BindingMismatch when malformed."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BindingMismatch(f'episode marker is not JSON ({exc}): {text[:80]!r}') from None
    if not isinstance(data, dict) or data.get('event') not in MARKER_EVENTS:
        raise BindingMismatch(f'episode marker needs "event": "start" or "end": {text[:80]!r}')
    episode, success, mode = data.get('episode'), data.get('success'), data.get('mode')
    if episode is not None and (isinstance(episode, bool) or not isinstance(episode, int)):
        raise BindingMismatch(f'episode marker: "episode" must be an integer: {text[:80]!r}')
    if success is not None and not isinstance(success, bool):
        raise BindingMismatch(f'episode marker: "success" must be true or false: '
                              f'{text[:80]!r}')
    if mode is not None and not isinstance(mode, str):
        raise BindingMismatch(f'episode marker: "mode" must be a string: {text[:80]!r}')
    return Marker(data['event'], episode, success, mode)


# -- binding ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Binding:
    """Observation entries (sources and derived features, in order), action sinks, the
    episode marker topic, the clock and an optional default control rate."""

    observation: tuple[Source | Derived, ...]
    action: tuple[Sink, ...]
    episode_topic: str = EPISODE_TOPIC
    clock: str = 'system'
    rate_hz: float | None = None
    name: str = ''

    KEYS = ('name', 'observation', 'action', 'episode_topic', 'clock', 'rate_hz')

    # -- construction
    @classmethod
    def from_dict(cls, data: Any, where: str = 'binding') -> Binding:
        """Build and validate; errors read `<where>: observation[2].joints: ...`."""
        try:
            return cls._build(data, where)
        except ConfigError as exc:
            raise ConfigError(f'{where}: {exc}') from None

    @classmethod
    def _build(cls, data: Any, where: str) -> Binding:
        if not isinstance(data, Mapping):
            raise ConfigError('expected a mapping at the top level')
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            raise ConfigError(f'{unknown[0]}: unknown key (known: {", ".join(cls.KEYS)})')
        obs, act = data.get('observation'), data.get('action')
        if not isinstance(obs, list) or not obs:
            raise ConfigError('observation: expected a non-empty list of features')
        if not isinstance(act, list) or not act:
            raise ConfigError('action: expected a non-empty list of sinks')
        top = _Spec(data, '', cls.KEYS)
        entries: list[Source | Derived] = []
        sizes: dict[str, int] = {}
        topic_types: dict[str, str] = {}
        topic_stamps: dict[str, str] = {}
        for i, item in enumerate(obs):
            here = f'observation[{i}]'
            if isinstance(item, Mapping) and 'difference' in item:
                entry: Source | Derived = cls._derived(item, here, sizes)
            else:
                entry = Source.from_dict(item, here)
                seen = topic_types.setdefault(entry.topic, entry.type)
                if seen != entry.type:
                    raise ConfigError(f'{here}.type: {entry.topic} is {_short(seen)} in an '
                                      f'earlier entry')
                stamp = topic_stamps.setdefault(entry.topic, entry.stamp_from)
                if stamp != entry.stamp_from:
                    raise ConfigError(f'{here}.stamp: {entry.topic} is timed by {stamp} in an '
                                      f'earlier entry')
            if entry.feature in sizes:
                raise ConfigError(f'{here}.feature: {entry.feature!r} is defined twice')
            sizes[entry.feature] = entry.size
            entries.append(entry)
        sinks = [Sink.from_dict(item, f'action[{i}]') for i, item in enumerate(act)]
        covered: list[int] = []
        for i, sink in enumerate(sinks):
            if sink.topic in topic_types:
                raise ConfigError(f'action[{i}].topic: {sink.topic} is also an observation '
                                  f'topic')
            if any(sink.topic == other.topic for other in sinks[:i]):
                raise ConfigError(f'action[{i}].topic: {sink.topic} has two sinks')
            covered += range(*sink.slice)
        dim = max(s.slice[1] for s in sinks)
        if sorted(covered) != list(range(dim)):
            counts = np.bincount(covered, minlength=dim)
            k = int(np.flatnonzero(counts != 1)[0])
            raise ConfigError(f'action: the slices must tile [0, {dim}) once; action value '
                              f'{k} is sent {int(counts[k])} times')
        clock = top.str('clock', 'system', CLOCKS)
        episode_topic = top.topic('episode_topic') if top.has('episode_topic') \
            else EPISODE_TOPIC
        if episode_topic in topic_types or any(s.topic == episode_topic for s in sinks):
            raise ConfigError(f'episode_topic: {episode_topic} is also a feature or action '
                              f'topic')
        rate = top.number('rate_hz', 1.0) if top.has('rate_hz') else None
        name = top.str('name', '') if top.has('name') else ''
        return cls(tuple(entries), tuple(sinks), episode_topic, clock, rate, name)

    @staticmethod
    def _derived(item: Mapping, where: str, sizes: Mapping[str, int]) -> Derived:
        s = _Spec(item, where, ('feature', 'difference'))
        feature = s.str('feature')
        pair = item.get('difference')
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 \
                or not all(isinstance(v, str) for v in pair):
            raise s.fail('difference', f'expected [a, b] (two feature names; the value is '
                         f'b - a), got {pair!r}')
        for name in pair:
            if name not in sizes:
                raise s.fail('difference', f'{name!r} is not an earlier feature')
        if sizes[pair[0]] != sizes[pair[1]]:
            raise s.fail('difference', f'{pair[0]!r} has {sizes[pair[0]]} values, '
                         f'{pair[1]!r} {sizes[pair[1]]}')
        return Derived(feature, pair[0], pair[1], sizes[pair[0]])

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict (YAML/JSON) form; `Binding.from_dict(b.to_dict())` equals `b`."""
        out: dict[str, Any] = {}
        if self.name:
            out['name'] = self.name
        if self.rate_hz is not None:
            out['rate_hz'] = self.rate_hz
        out['clock'] = self.clock
        out['episode_topic'] = self.episode_topic
        out['observation'] = [e.to_dict() for e in self.observation]
        out['action'] = [s.to_dict() for s in self.action]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(',', ':'))

    @classmethod
    def from_json(cls, text: str, where: str = 'binding') -> Binding:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f'{where}: binding is not JSON ({exc})') from None
        return cls.from_dict(data, where)

    # -- layout
    @property
    def sources(self) -> list[Source]:
        return [e for e in self.observation if isinstance(e, Source)]

    @property
    def obs_fields(self) -> list[tuple[str, int]]:
        """(feature, size) of the flat observation, in order."""
        return [(e.feature, e.size) for e in self.observation]

    @property
    def obs_dim(self) -> int:
        return int(sum(e.size for e in self.observation))

    @property
    def action_dim(self) -> int:
        return max(s.slice[1] for s in self.action)

    def observation_topics(self) -> dict[str, str]:
        """{topic: type} of every observation source, in first-use order."""
        out: dict[str, str] = {}
        for src in self.sources:
            out.setdefault(src.topic, src.type)
        return out

    def action_topics(self) -> dict[str, str]:
        return {s.topic: s.type for s in self.action}

    def sources_of(self, topic: str) -> list[Source]:
        return [s for s in self.sources if s.topic == topic]

    # -- values
    def read(self, topic: str, msg: Any) -> dict[str, np.ndarray]:
        """{feature: values} of every source fed by `topic` that the message is for (see
        `Source.applies`); raises BindingMismatch."""
        sources = self.sources_of(topic)
        offsets = labelled_offsets(msg) if any(s.label for s in sources) else None
        return {s.feature: s.extract(msg, offsets) for s in sources if s.applies(msg)}

    def assemble(self, latest: Mapping[str, np.ndarray]) -> np.ndarray:
        """The flat float32 observation from the latest values of every source feature
        (derived features are computed here, in float64, then everything is cast). Values
        may carry leading batch axes ((K, n) each gives (K, obs_dim))."""
        values: dict[str, np.ndarray] = {}
        parts = []
        for e in self.observation:
            if isinstance(e, Derived):
                v = np.asarray(values[e.b], dtype=np.float64) - values[e.a]
            else:
                try:
                    v = latest[e.feature]
                except KeyError:
                    raise BindingMismatch(f'no value yet for {e.feature!r} ({e.topic})') \
                        from None
            values[e.feature] = v
            parts.append(v)
        return np.concatenate(parts, axis=-1).astype(np.float32)

    def describe(self) -> str:
        """One line per topic (for logs and --help output)."""
        lines = [f'{t} ({_short(k)}): ' + ', '.join(s.feature for s in self.sources_of(t))
                 for t, k in self.observation_topics().items()]
        lines += [f'{s.topic} ({_short(s.type)}) <- action[{s.slice[0]}:{s.slice[1]}]'
                  for s in self.action]
        return '\n'.join(lines)


def labelled_binding(obs_fields: Sequence[tuple[str, int]], action_dim: int,
                     obs_topic: str = 'observation', action_topic: str = 'action',
                     max_age_s: float = DEFAULT_MAX_AGE_S, name: str = 'labelled') -> Binding:
    """vdd_ros's own wire format as a binding: one labelled Float32MultiArray in (a field per
    feature), one out (field `action`)."""
    obs = [{'feature': k, 'topic': obs_topic, 'type': FLOAT32_ARRAY, 'label': k,
            'size': int(n), 'max_age_s': max_age_s} for k, n in obs_fields]
    act = [{'topic': action_topic, 'type': FLOAT32_ARRAY, 'label': 'action',
            'slice': [0, int(action_dim)], 'max_age_s': max_age_s}]
    return Binding.from_dict({'name': name, 'observation': obs, 'action': act}, name)


def load_binding(path: str | os.PathLike) -> Binding:
    """Read and validate a binding YAML file; errors name the file and the field."""
    from vdd_ros.core.config import read_yaml_mapping
    path = Path(path)
    return Binding.from_dict(read_yaml_mapping(path), path.name)


def bindings_dir() -> Path | None:
    """config/bindings of the source tree, else of the installed package's share."""
    from vdd_ros.core.io import package_config
    return package_config('bindings')


def binding_for_task(task: str) -> Binding:
    """The shipped binding of a task (config/bindings/<task>.yaml): sim_node's standard
    topics, reproducing the task's observation exactly."""
    from vdd_ros.sim.tasks import get_task
    spec = get_task(task)
    folder = bindings_dir()
    path = None if folder is None else folder / f'{spec.name}.yaml'
    if path is None or not path.is_file():
        raise UserError(f'no shipped binding for task {task!r} (config/bindings/'
                        f'{spec.name}.yaml not found)')
    return load_binding(path)
