"""ROS glue of a binding (vdd_ros/binding.py) for the nodes: message classes, fast reading of
raw source messages, the latest value and time of every source feature, sink messages.

Reading (`TopicReader`). Source messages arrive serialized (raw subscriptions), so a message
larger than the node's limit is rejected before anything decodes it. The first message of a
topic is decoded by rclpy and read by the binding (`Binding.read`: joint names, frame_id,
sizes, NaN/Inf); its CDR layout is then learnt: the bytes of the frame_id, joint names,
labels and sequence counts, and where the numbers sit, kept only when reading that message
from its bytes gives exactly the binding's values. A later message with the same layout bytes
is read straight from its bytes with numpy (~10x faster than rclpy's decoding); anything else
(another layout, a non-finite value) takes the full path again, which gives the binding's own
error. A few layouts are kept per topic (a driver may publish arm and gripper apart on one
JointState topic).

Time (`SourceBook`). Every feature keeps its latest values and its time in integer
nanoseconds on the node clock: the header stamp, or the arrival for headerless sources. A
header-stamped message whose stamp is not newer than the feature's latest is dropped (a
duplicate, or out of order). A source is `ok`, `waiting` (no message yet), `invalid` (the
topic's last message was rejected) or `stale` (age > max_age_s, or stamped more than
max_age_s in the future: a clock mismatch).

Nothing here decides when to act: policy_node does (see its docstring).
"""
from __future__ import annotations

import array
import importlib
import struct
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from builtin_interfaces.msg import Duration, Time
from rclpy.serialization import deserialize_message, serialize_message

from vdd_ros.binding import (FLOAT32_ARRAY, FLOAT64_ARRAY, HAS_HEADER, JOINT_STATE,
                             JOINT_TRAJECTORY, POSE_STAMPED, TWIST_STAMPED, Binding,
                             Sink, Source, binding_for_task, load_binding,
                             trajectory_times)
from vdd_ros.errors import UserError
from vdd_ros.ros.conversions import (META_PREFIX, InvalidMessage, action_to_msg, array_to_msg,
                                     decode_labelled_array, msg_meta, msg_to_array)

NS = 1_000_000_000
MAX_LAYOUTS = 4          # learnt layouts kept per topic
POSE_PART = {'position': slice(0, 3), 'orientation': slice(3, 7), 'pose': slice(0, 7)}


def resolve_binding(value: str) -> Binding:
    """The binding a `binding` parameter names: a YAML file, or `task:<name>` for the task's
    shipped config/bindings/<name>.yaml; UserError naming the parameter."""
    try:
        if value.startswith('task:'):
            return binding_for_task(value[len('task:'):])
        return load_binding(value)
    except UserError as exc:
        raise UserError(f'parameter binding: {exc}') from None


def check_against_policy(binding: Binding, obs_fields: Sequence[tuple[str, int]],
                         action_dim: int) -> None:
    """UserError naming the first difference between the binding's observation features or
    action size and the policy's."""
    where = f'parameter binding: {binding.name or "binding"}'
    for i, (have, want) in enumerate(zip_longest(binding.obs_fields, obs_fields)):
        want = None if want is None else (str(want[0]), int(want[1]))
        if have != want:
            def name(f: tuple[str, int] | None) -> str:
                return 'nothing' if f is None else f'{f[0]}[{f[1]}]'
            raise UserError(f'{where}: observation feature {i} is {name(have)}, the policy '
                            f'expects {name(want)}')
    if binding.action_dim != action_dim:
        raise UserError(f'{where}: the action sinks take {binding.action_dim} values, the '
                        f'policy gives {action_dim}')


def message_class(type_name: str) -> type:
    """The rclpy class of 'pkg/msg/Name'; UserError when its package is not installed."""
    pkg, _, name = type_name.partition('/msg/')
    try:
        return getattr(importlib.import_module(f'{pkg}.msg'), name)
    except (ImportError, AttributeError):
        raise UserError(f'message type {type_name} is not installed (no python package '
                        f'{pkg})') from None


def header_stamp_ns(raw: bytes) -> int | None:
    """The header stamp of a little-endian serialized stamped message, without decoding."""
    if len(raw) < 12 or raw[1] != 1:
        return None
    sec, nsec = struct.unpack_from('<iI', raw, 4)
    return sec * NS + nsec


def to_time(ns: int) -> Time:
    return Time(sec=ns // NS, nanosec=ns % NS)


# -- reading ----------------------------------------------------------------------------------
def _align(off: int, n: int) -> int:
    """CDR alignment is relative to the payload, which starts after the 4-byte header."""
    return off + (-(off - 4)) % n


class _Cursor:
    """Walks one little-endian CDR message, noting the byte ranges that must be equal in
    every message of the same layout (the encapsulation header with its options, string
    lengths and texts, sequence counts; never the alignment padding, which serializers leave
    uninitialised)."""

    def __init__(self, raw: bytes, off: int) -> None:
        self.raw, self.off = raw, off
        self.checks: list[tuple[int, int]] = [(0, 4)]

    def uint(self, check: bool = True) -> int:
        self.off = _align(self.off, 4)
        (value,) = struct.unpack_from('<I', self.raw, self.off)
        if check:
            self.checks.append((self.off, self.off + 4))
        self.off += 4
        return value

    def string(self) -> str:
        n = self.uint(check=False)
        self.checks.append((self.off - 4, self.off + n))
        text = bytes(self.raw[self.off:self.off + max(n - 1, 0)]).decode()
        self.off += n
        return text

    def numbers(self, count: int, size: int) -> int:
        """Skip `count` numbers of `size` bytes; their offset."""
        if count:
            self.off = _align(self.off, size)
        at = self.off
        self.off += count * size
        if self.off > len(self.raw):
            raise struct.error('past the end')
        return at


@dataclass
class _Layout:
    """Where one source's values sit in every message with the same layout bytes."""

    length: int
    checks: list[tuple[int, int]]
    template: bytes
    reads: list[tuple[str, int, int, str, Any]]   # feature, offset, count, dtype, selection


def _layout(raw: bytes, type_name: str, sources: Sequence[Source], msg: Any) -> _Layout | None:
    """The layout of a message the binding read without error (None: a type or encoding the
    fast path does not read)."""
    if len(raw) < 8 or raw[0:2] != b'\x00\x01':        # plain CDR, little endian
        return None
    reads = []
    try:
        if type_name in (JOINT_STATE, POSE_STAMPED):
            cur = _Cursor(raw, 12)
            cur.string()                                   # frame_id
            if type_name == POSE_STAMPED:
                at = cur.numbers(7, 8)
                for s in sources:
                    reads.append((s.feature, at, 7, '<f8', POSE_PART[s.field]))
            else:
                names = [cur.string() for _ in range(cur.uint())]
                blocks = {}
                for fld in ('position', 'velocity', 'effort'):
                    n = cur.uint()
                    blocks[fld] = (cur.numbers(n, 8), n)
                for s in sources:
                    if s.applies(msg):
                        at, n = blocks[s.field]
                        reads.append((s.feature, at, n, '<f8', s.joint_index(names)))
        elif type_name in (FLOAT64_ARRAY, FLOAT32_ARRAY):
            cur = _Cursor(raw, 4)
            labels, start = {}, 0
            for _ in range(cur.uint()):
                label = cur.string()
                size = cur.uint(check=not label.startswith('@'))
                cur.uint(check=False)                      # stride: metadata rides here
                if not label.startswith('@'):
                    labels[label] = (start, start + size)
                    start += size
            cur.uint()                                     # data_offset
            size, dtype = (8, '<f8') if type_name == FLOAT64_ARRAY else (4, '<f4')
            n = cur.uint()
            at = cur.numbers(n, size)
            for s in sources:
                lo, hi = labels[s.label] if s.label else s.slice
                reads.append((s.feature, at, n, dtype, slice(lo, hi)))
        else:
            return None
    except (struct.error, UnicodeDecodeError, KeyError):
        return None
    return _Layout(len(raw), cur.checks, bytes(raw), reads)


def _read_fast(raw: bytes, layout: _Layout) -> dict[str, np.ndarray] | None:
    """The values of a message with `layout`'s bytes, else None (also for NaN/Inf: the full
    path names the bad value)."""
    if len(raw) != layout.length:
        return None
    template = layout.template
    for a, b in layout.checks:
        if raw[a:b] != template[a:b]:
            return None
    out = {}
    for feature, offset, count, dtype, select in layout.reads:
        values = np.frombuffer(raw, dtype, count, offset)[select]
        if not np.isfinite(values).all():
            return None
        out[feature] = values.astype(np.float32 if dtype == '<f4' else np.float64, copy=False)
    return out


class LabelledReader:
    """Reads serialized labelled observations (conversions.py) into (values, metadata), as
    TopicReader reads a source: a message is decoded by rclpy and checked by `msg_to_array`,
    its layout learnt (labels, sizes, where the numbers and the metadata sit); a later message
    with the same layout bytes is read from its bytes. `read` raises InvalidMessage (its
    `meta` holds the metadata when the message decoded)."""

    def __init__(self, fields: Sequence[tuple[str, int]], obs_dim: int, max_bytes: int) -> None:
        self.fields, self.obs_dim, self.max_bytes = list(fields), int(obs_dim), int(max_bytes)
        self.layouts: list[_Labelled] = []
        self.fast = 0          # messages read from their bytes

    def read(self, raw: bytes) -> tuple[np.ndarray, dict[str, int]]:
        for layout in self.layouts:
            got = layout.read(raw)
            if got is not None:
                self.fast += 1
                return got
        msg = decode_labelled_array(raw, self.max_bytes)
        meta = msg_meta(msg)
        try:
            obs = msg_to_array(msg, self.fields if msg.layout.dim else None, self.obs_dim)
        except InvalidMessage as exc:
            exc.meta = meta
            raise
        layout = _Labelled.learn(raw)
        fast = None if layout is None else layout.read(raw)
        if fast is not None and np.array_equal(fast[0], obs) and fast[1] == meta:
            if len(self.layouts) >= MAX_LAYOUTS:
                self.layouts.pop(0)
            self.layouts.append(layout)
        return obs, meta


class LabelledWriter:
    """Serialized labelled actions (`action_to_msg`): rclpy serializes one message per set of
    metadata keys, and each later action is that template with its values and metadata
    written in (publishing bytes skips rclpy's message conversion)."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.templates: dict[tuple[str, ...], _Labelled] = {}

    def serialize(self, values: np.ndarray, meta: Mapping[str, int]) -> bytes:
        """`size` float32 values and uint32 metadata as the bytes of `action_to_msg`."""
        keys = tuple(meta)
        layout = self.templates.get(keys)
        if layout is None:
            zero = np.zeros(self.size, dtype=np.float32)
            layout = _Labelled.learn(serialize_message(action_to_msg(zero, dict.fromkeys(keys,
                                                                                      0))))
            if layout is None or layout.count != self.size:
                raise ValueError(f'no template for an action of {self.size} values')
            self.templates[keys] = layout
        blob = bytearray(layout.template)
        blob[layout.data_at:layout.data_at + 4 * self.size] = \
            np.asarray(values, dtype='<f4').reshape(self.size).tobytes()
        for key, at in layout.meta_at:
            struct.pack_into('<I', blob, at, meta[key])
        return bytes(blob)


@dataclass
class _Labelled:
    """Where the values and the metadata sit in every labelled array of one layout."""

    length: int
    checks: list[tuple[int, int]]
    template: bytes
    data_at: int
    count: int
    meta_at: list[tuple[str, int]]

    @classmethod
    def learn(cls, raw: bytes) -> '_Labelled | None':
        if len(raw) < 8 or raw[0:2] != b'\x00\x01':        # plain CDR, little endian
            return None
        try:
            cur = _Cursor(raw, 4)
            meta_at = []
            for _ in range(cur.uint()):
                label = cur.string()
                cur.uint()                                  # size
                meta = label.startswith(META_PREFIX)
                cur.uint(check=not meta)                    # stride: metadata rides here
                if meta:
                    meta_at.append((label[len(META_PREFIX):], cur.off - 4))
            cur.uint()                                      # data_offset
            count = cur.uint()
            at = cur.numbers(count, 4)
        except (struct.error, UnicodeDecodeError):
            return None
        return cls(len(raw), cur.checks, bytes(raw), at, count, meta_at)

    def read(self, raw: bytes) -> tuple[np.ndarray, dict[str, int]] | None:
        """(values, metadata) of a message with this layout's bytes, else None (also for
        NaN/Inf: the full path names the bad value)."""
        if len(raw) != self.length:
            return None
        template = self.template
        for a, b in self.checks:
            if raw[a:b] != template[a:b]:
                return None
        values = np.frombuffer(raw, '<f4', self.count, self.data_at)
        if not np.isfinite(values).all():
            return None
        return values.copy(), {k: int.from_bytes(raw[o:o + 4], 'little')
                               for k, o in self.meta_at}


class TopicReader:
    """Reads one topic's serialized messages into {feature: values} (see the module
    docstring); `read` raises InvalidMessage or BindingMismatch naming the topic."""

    def __init__(self, binding: Binding, topic: str, type_name: str, max_bytes: int) -> None:
        self.binding, self.topic, self.type = binding, topic, type_name
        self.cls = message_class(type_name)
        self.sources = binding.sources_of(topic)
        self.header = type_name in HAS_HEADER and self.sources[0].stamp_from == 'header'
        self.max_bytes = int(max_bytes)
        self.max_age_ns = round(min(s.max_age_s for s in self.sources) * NS)
        self.layouts: list[_Layout] = []
        self.fast = 0          # messages read from their bytes

    def read(self, raw: bytes) -> tuple[int | None, dict[str, np.ndarray]]:
        """(header stamp in ns, or None for arrival-timed sources; {feature: values}) of every
        source this message is for (none: a JointState naming none of the topic's joints)."""
        if len(raw) > self.max_bytes:
            raise InvalidMessage(f'{self.topic}: {len(raw)} bytes, more than the '
                                 f'{self.max_bytes} accepted')
        for layout in self.layouts:
            values = _read_fast(raw, layout)
            if values is not None:
                self.fast += 1
                return (header_stamp_ns(raw) if self.header else None), values
        try:
            msg = deserialize_message(raw, self.cls)
        except Exception as exc:  # rclpy raises RMWError (and others) for malformed data
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
            raise InvalidMessage(f'{self.topic}: cannot decode {len(raw)} bytes as '
                                 f'{self.type}: {reason}') from None
        values = self.binding.read(self.topic, msg)
        self._learn(raw, msg, values)
        stamp = self.sources[0].stamp_ns(msg) if self.header else None
        return stamp, values

    def _learn(self, raw: bytes, msg: Any, values: Mapping[str, np.ndarray]) -> None:
        """Keep the layout of a message the binding read, if reading it from its bytes gives
        exactly the binding's values (so the fast path can never read differently)."""
        layout = _layout(raw, self.type, self.sources, msg)
        if layout is None:
            return
        fast = _read_fast(raw, layout)
        if fast is None or fast.keys() != values.keys() or not all(
                np.array_equal(fast[k], values[k]) and fast[k].dtype == values[k].dtype
                for k in values):
            return
        if len(self.layouts) >= MAX_LAYOUTS:
            self.layouts.pop(0)
        self.layouts.append(layout)


# -- the latest of every source ---------------------------------------------------------------
@dataclass
class _Latest:
    values: np.ndarray
    stamp_ns: int          # header stamp or arrival, node clock
    serial: int            # SourceBook.serial when it was set


class SourceBook:
    """The latest values and times of a binding's source features, and their state."""

    def __init__(self, binding: Binding) -> None:
        self.binding = binding
        self.sources = binding.sources
        self.by_topic: dict[str, list[Source]] = {t: binding.sources_of(t)
                                                  for t in binding.observation_topics()}
        self.header = {s.feature: s.stamp_from == 'header' for s in self.sources}
        self.latest: dict[str, _Latest] = {}
        self.errors: dict[str, str] = {}       # topic -> why its last message was rejected
        self.serial = 0                        # valid updates so far

    def update(self, topic: str, stamp_ns: int, values: Mapping[str, np.ndarray],
               header: bool) -> str:
        """Store a valid message's values: '' when stored, else why not ('duplicate' or
        'out of order': a header stamp not newer than the feature's latest)."""
        if header:
            for feature in values:
                old = self.latest.get(feature)
                if old is not None and stamp_ns <= old.stamp_ns:
                    return 'duplicate' if stamp_ns == old.stamp_ns else 'out of order'
        self.serial += 1
        for feature, v in values.items():
            self.latest[feature] = _Latest(v, stamp_ns, self.serial)
        self.errors.pop(topic, None)
        return ''

    def reject(self, topic: str, reason: str) -> None:
        self.errors[topic] = reason

    def complete_stamp(self, since: int) -> int | None:
        """The stamp of a complete observation, else None: every header-stamped feature holds
        one same stamp, every arrival-timed one was updated after serial `since`, and no
        topic's last message was rejected (only arrival-timed features: the oldest arrival)."""
        if self.errors or len(self.latest) < len(self.sources):
            return None
        stamps = set()
        for s in self.sources:
            latest = self.latest[s.feature]
            if self.header[s.feature]:
                stamps.add(latest.stamp_ns)
            elif latest.serial <= since:
                return None
        if len(stamps) > 1:
            return None
        return stamps.pop() if stamps else self.stamp_ns()

    def problems(self, now_ns: int) -> list[str]:
        """Why the sources cannot make an observation now, one entry per topic (empty: all
        valid and fresh)."""
        out = []
        for topic in self.by_topic:
            state, detail = self.state(topic, now_ns)
            if state != 'ok':
                out.append(f'{topic} {state}{f" ({detail})" if detail else ""}')
        return out

    def state(self, topic: str, now_ns: int) -> tuple[str, str]:
        """(ok | waiting | invalid | stale, detail) of a topic's sources."""
        if topic in self.errors:
            return 'invalid', self.errors[topic]
        for s in self.by_topic[topic]:
            latest = self.latest.get(s.feature)
            if latest is None:
                return 'waiting', f'no message for {s.feature}'
            age = (now_ns - latest.stamp_ns) / NS
            if age > s.max_age_s:
                return 'stale', f'age {age:.3g} s > {s.max_age_s:g} s'
            if age < -s.max_age_s:
                return 'stale', f'stamped {-age:.3g} s in the future: clock mismatch'
        return 'ok', ''

    def age_s(self, topic: str, now_ns: int) -> float | None:
        """Age of the topic's oldest feature (None before its first message)."""
        stamps = [self.latest[s.feature].stamp_ns for s in self.by_topic[topic]
                  if s.feature in self.latest]
        return None if not stamps else (now_ns - min(stamps)) / NS

    def stamp_ns(self) -> int | None:
        """The observation's time: the OLDEST of its features' times (a command never claims
        fresher data than it used); None before every feature has a value."""
        if len(self.latest) < len(self.sources):
            return None
        return min(self.latest[s.feature].stamp_ns for s in self.sources)

    def observation(self) -> np.ndarray:
        """The flat float32 observation of the latest values (derived features computed)."""
        return self.binding.assemble({k: v.values for k, v in self.latest.items()})


def split_observation(binding: Binding, obs: np.ndarray) -> dict[str, np.ndarray]:
    """{feature: values} of the source features of a flat observation (derived ones left
    out): what the source topics carry for that observation."""
    obs = np.asarray(obs, dtype=np.float64).reshape(-1)
    if obs.size != binding.obs_dim:
        raise ValueError(f'observation has {obs.size} values, the binding {binding.obs_dim}')
    out, start = {}, 0
    sources = {s.feature for s in binding.sources}
    for feature, size in binding.obs_fields:
        if feature in sources:
            out[feature] = obs[start:start + size]
        start += size
    return out


def source_messages(binding: Binding, values: Mapping[str, np.ndarray], stamp_ns: int,
                    extra_joints: Mapping[str, float] | None = None) -> dict[str, Any]:
    """{topic: message} carrying `values` ({feature: values} of every source) with header
    stamp `stamp_ns` and each source's frame_id: what a robot publishes for that observation.
    A JointState carries its sources' joints (other fields zero) plus `extra_joints`; a
    PoseStamped with only a position has the identity orientation; arrays carry their
    slices or labelled fields."""
    out = {}
    for topic, type_name in binding.observation_topics().items():
        sources = binding.sources_of(topic)
        msg = message_class(type_name)()
        if type_name in HAS_HEADER:
            msg.header.stamp = to_time(stamp_ns)
            frame = next((s.frame_id for s in sources if s.frame_id is not None), None)
            msg.header.frame_id = frame or ''
        if type_name == JOINT_STATE:
            joints: dict[str, dict[str, float]] = {}
            for s in sources:
                for name, v in zip(s.joints, np.asarray(values[s.feature], np.float64)):
                    joints.setdefault(name, {})[s.field] = float(v)
            for name, v in (extra_joints or {}).items():
                joints.setdefault(name, {}).setdefault('position', float(v))
            msg.name = list(joints)
            for fld in ('position', 'velocity', 'effort'):
                if any(fld in j for j in joints.values()):
                    setattr(msg, fld, [j.get(fld, 0.0) for j in joints.values()])
        elif type_name == POSE_STAMPED:
            pose = np.array([0, 0, 0, 0, 0, 0, 1], dtype=np.float64)
            for s in sources:
                pose[POSE_PART[s.field]] = values[s.feature]
            p, q = msg.pose.position, msg.pose.orientation
            p.x, p.y, p.z, q.x, q.y, q.z, q.w = (float(v) for v in pose)
        else:
            if any(s.label for s in sources):
                fields = [(s.label, s.size) for s in sources]
                flat = np.concatenate([values[s.feature] for s in sources])
                msg = array_to_msg(flat, fields, msg_type=message_class(type_name))
            else:
                data = np.zeros(max(s.slice[1] for s in sources))
                for s in sources:
                    data[s.slice[0]:s.slice[1]] = values[s.feature]
                msg.data = data.tolist()
        out[topic] = msg
    return out


# -- sinks ------------------------------------------------------------------------------------
class SinkWriter:
    """Builds one sink's messages with the rclpy classes: `message(values, stamp_ns,
    period_s)` where `values` is `Sink.values` of one action, or for a JointTrajectory
    `Sink.chunk_values` of the chunk (H, n)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.cls = message_class(sink.type)
        self.frame = sink.frame_id or ''
        self.msg = self.cls()     # refilled for every message (publishing copies it out)
        if sink.type in HAS_HEADER:
            self.msg.header.frame_id = self.frame
        self.build: Callable[[np.ndarray, int, float], Any] = {
            FLOAT64_ARRAY: self._array, FLOAT32_ARRAY: self._array,
            TWIST_STAMPED: self._twist, POSE_STAMPED: self._pose,
            JOINT_TRAJECTORY: self._trajectory}[sink.type]

    def values(self, action: np.ndarray, chunk: np.ndarray | None) -> np.ndarray:
        """The numbers of this sink for `action` (and the chunk it starts, for a trajectory);
        ValueError when they cannot be made (e.g. a zero quaternion)."""
        if self.sink.type == JOINT_TRAJECTORY:
            return self.sink.chunk_values(action[None] if chunk is None else chunk)
        return self.sink.values(action)

    def message(self, values: np.ndarray, stamp_ns: int, period_s: float) -> Any:
        return self.build(values, stamp_ns, period_s)

    def _array(self, values: np.ndarray, stamp_ns: int, period_s: float) -> Any:
        if self.sink.label is not None:
            return array_to_msg(values, [(self.sink.label, values.size)])
        msg = self.msg
        code, dtype = ('f', np.float32) if self.sink.type == FLOAT32_ARRAY else ('d', np.float64)
        msg.data = array.array(code, np.asarray(values, dtype=dtype).tobytes())
        return msg

    def _stamped(self, stamp_ns: int) -> Any:
        stamp = self.msg.header.stamp
        stamp.sec, stamp.nanosec = divmod(stamp_ns, NS)
        return self.msg

    def _twist(self, values: np.ndarray, stamp_ns: int, period_s: float) -> Any:
        msg = self._stamped(stamp_ns)
        lin, ang = msg.twist.linear, msg.twist.angular
        lin.x, lin.y, lin.z, ang.x, ang.y, ang.z = (float(v) for v in values)
        return msg

    def _pose(self, values: np.ndarray, stamp_ns: int, period_s: float) -> Any:
        msg = self._stamped(stamp_ns)
        p, q = msg.pose.position, msg.pose.orientation
        p.x, p.y, p.z, q.x, q.y, q.z, q.w = (float(v) for v in values)
        return msg

    def _trajectory(self, values: np.ndarray, stamp_ns: int, period_s: float) -> Any:
        from trajectory_msgs.msg import JointTrajectoryPoint
        msg = self._stamped(stamp_ns)
        msg.joint_names = list(self.sink.joints)
        msg.points = [JointTrajectoryPoint(positions=row.tolist(),
                                           time_from_start=Duration(sec=sec, nanosec=nsec))
                      for row, (sec, nsec) in zip(values, trajectory_times(len(values),
                                                                            period_s))]
        return msg

