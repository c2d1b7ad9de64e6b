"""rosbag2 recordings -> robomimic datasets, through a binding (`vdd-ros bag2dataset`).

Bags written by `ros2 bag record` (sqlite3 or MCAP, zstd file/message compression or none)
are read with `rosbags` (no ROS install), one bag at a time, STREAMING in log-time order, and
only the topics the binding needs are decoded. MCAP chunks are read whole and their messages
located through the chunk's message index (rosbags' per-message generator is the bottleneck
otherwise); the message counts read are checked against the bag's index, so a damaged bag
that silently loses messages is still reported.

Time. Every message gets one time on the binding's clock: its header stamp when the source is
stamped by header, else its arrival: the bag's log time (`clock: system`) or the latest
`/clock` value logged before it (`clock: sim`). Header stamps must increase strictly per topic
(a duplicate or out-of-order stamp is an error naming the topic); /clock must not go back.

Episodes. Between `start` and `end` markers on the binding's episode topic (String JSON, see
vdd_ros/binding.py); a bag without markers is one episode. Messages outside episodes are not
decoded, and nothing crosses an episode boundary.

Resampling (`Resampler`). Ticks start when every source and every command topic has had a
message in the episode (t0 = the latest of their first times) and follow at the control
period; they stop before the end marker. At each tick every stream takes its latest message
at or before the tick, never a later one; older than its max_age_s, it is stale. A tick with
a stale stream is dropped: stale ticks between good ones are a gap, which splits the episode
into pieces (`on_gap='split'`) or drops it (`'drop'`); stale ticks at the end are trimmed.
A tick is emitted once every stream has a message after it (stamps increase, so nothing
earlier can follow), or once the stream is `lateness` behind the newest message seen (a
silent stream must not hold the others in memory); a message that arrives after its tick was
emitted is counted as late.

Decoding. The generic `deserialize_cdr` runs ~20 MB/s, so JointState, PoseStamped,
TwistStamped and Float64/Float32MultiArray are read by a small CDR reader: the first message
of a topic gives a layout (frame_id, joint names, labels and array counts, the byte offsets of
the values); every later message whose length and layout bytes are the same is decoded in a
batch with numpy, the rest (and every other type) through rosbags' deserializer and the
binding's own `extract`/`decode`. Messages with NaN/Inf are skipped and counted.

Output: robomimic's low-dim HDF5 layout as vdd_ros/core/data.py reads it, one demo per
episode piece (attrs: num_samples, seed and mode from the markers, bag, start_s), the binding
as JSON in `data.attrs['binding']`; written to a temporary file, renamed when complete.
"""
from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import os
import sqlite3
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from vdd_ros.binding import (CLOCK, FLOAT32_ARRAY, FLOAT64_ARRAY, JOINT_STATE, META_PREFIX,
                             POSE_FIELDS, POSE_STAMPED, STRING, TWIST_STAMPED, Binding,
                             BindingMismatch, InvalidValues, Sink, Source, check_frame,
                             parse_marker)
from vdd_ros.core.data import Demo, split_indices, write_demo
from vdd_ros.core.fields import split_cameras
from vdd_ros.errors import UserError

NS = 1_000_000_000
BATCH = 16384                  # raw messages buffered before a batch decode
MAX_LAYOUTS = 4                # fast-path layouts learnt per topic
ON_GAP = ('split', 'drop')
CLOCK_TOPIC = '/clock'


# -- a small CDR reader -----------------------------------------------------------------------
def _align(off: int, n: int) -> int:
    """CDR alignment is relative to the payload, which starts after the 4-byte header."""
    return off + (-(off - 4)) % n


def _string(raw: bytes, off: int) -> tuple[str, int, int]:
    """(text, offset of its length field, offset after it)."""
    off = _align(off, 4)
    (n,) = struct.unpack_from('<I', raw, off)
    return bytes(raw[off + 4:off + 3 + n]).decode(), off, off + 4 + n


@dataclass
class Layout:
    """Where the values sit in every message of a topic that shares these layout bytes."""

    length: int
    checks: list[tuple[int, int]]                 # byte ranges equal in every such message
    blocks: dict[str, tuple[int, int, str]]       # name -> (offset, count, dtype)
    template: bytes = b''
    frame_id: str | None = None
    names: list[str] = field(default_factory=list)               # JointState
    labels: dict[str, tuple[int, int]] = field(default_factory=dict)  # labelled arrays


def _doubles(raw: bytes, off: int, size: int) -> tuple[int, int, int, int]:
    """A sequence of primitives: (count field offset, count, data offset, offset after)."""
    off = _align(off, 4)
    (count,) = struct.unpack_from('<I', raw, off)
    data = _align(off + 4, size) if count else off + 4
    return off, count, data, data + count * size


def _parse_stamped(raw: bytes, values: int) -> Layout:
    """Header + a fixed run of doubles (PoseStamped: 7, TwistStamped: 6)."""
    frame, _, off = _string(raw, 12)
    off = _align(off, 8)
    return Layout(len(raw), [(0, 2), (12, off)], {'values': (off, values, '<f8')},
                  frame_id=frame)


def _parse_joint_state(raw: bytes) -> Layout:
    frame, _, off = _string(raw, 12)
    off = _align(off, 4)
    (count,) = struct.unpack_from('<I', raw, off)
    off += 4
    names = []
    for _ in range(count):
        name, _, off = _string(raw, off)
        names.append(name)
    checks = [(0, 2), (12, off)]
    blocks = {}
    for name in ('position', 'velocity', 'effort'):
        count_at, n, data, off = _doubles(raw, off, 8)
        checks.append((count_at, count_at + 4))
        blocks[name] = (data, n, '<f8')
    return Layout(len(raw), checks, blocks, frame_id=frame, names=names)


def _parse_multiarray(raw: bytes, size: int) -> Layout:
    (ndim,) = struct.unpack_from('<I', raw, 4)
    checks = [(0, 2), (4, 8)]
    off, labels, start = 8, {}, 0
    for _ in range(ndim):
        label, at, off = _string(raw, off)
        off = _align(off, 4)
        dim_size, _ = struct.unpack_from('<II', raw, off)
        meta = label.startswith(META_PREFIX)
        checks.append((at, off + (4 if meta else 8)))   # a metadata stride changes freely
        if not meta:
            labels[label] = (start, start + dim_size)
            start += dim_size
        off += 8
    checks.append((off, off + 4))                         # data_offset
    count_at, count, data, _ = _doubles(raw, off + 4, size)
    checks.append((count_at, count_at + 4))
    dtype = '<f8' if size == 8 else '<f4'
    return Layout(len(raw), checks, {'data': (data, count, dtype)}, labels=labels)


PARSERS = {
    JOINT_STATE: _parse_joint_state,
    POSE_STAMPED: lambda raw: _parse_stamped(raw, 7),
    TWIST_STAMPED: lambda raw: _parse_stamped(raw, 6),
    FLOAT64_ARRAY: lambda raw: _parse_multiarray(raw, 8),
    FLOAT32_ARRAY: lambda raw: _parse_multiarray(raw, 4),
}
HEADER_TYPES = (JOINT_STATE, POSE_STAMPED, TWIST_STAMPED)


def parse_layout(raw: bytes, msgtype: str) -> Layout | None:
    """The layout of one little-endian CDR message of a type the fast path reads, else None."""
    parse = PARSERS.get(msgtype)
    if parse is None or len(raw) < 4 or raw[1] != 1:
        return None
    try:
        layout = parse(raw)
    except (struct.error, UnicodeDecodeError):
        return None
    end = max(o + n * np.dtype(d).itemsize for o, n, d in layout.blocks.values())
    if end > len(raw):
        return None
    layout.template = bytes(raw)
    return layout


def decode_batch(raws: Sequence[bytes], layout: Layout, header: bool
                 ) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """Decode the messages that share `layout`: (row indices, header stamps in ns or None,
    {block: (rows, count) values}). Messages of another layout are left out."""
    n = len(raws)
    lengths = np.fromiter(map(len, raws), dtype=np.int64, count=n)
    rows = np.flatnonzero(lengths == layout.length)
    if rows.size == 0:
        return rows, None, {}
    joined = b''.join(raws) if rows.size == n else b''.join(raws[i] for i in rows)
    arr = np.frombuffer(joined, dtype=np.uint8).reshape(rows.size, layout.length)
    template = np.frombuffer(layout.template, dtype=np.uint8)
    same = np.ones(rows.size, dtype=bool)
    for a, b in layout.checks:
        same &= (arr[:, a:b] == template[a:b]).all(axis=1)
    if not same.all():
        rows, arr = rows[same], arr[same]
    stamps = None
    if header:
        sec = np.ascontiguousarray(arr[:, 4:8]).view('<i4')[:, 0].astype(np.int64)
        nsec = np.ascontiguousarray(arr[:, 8:12]).view('<u4')[:, 0].astype(np.int64)
        stamps = sec * NS + nsec
    blocks = {}
    for name, (off, count, dtype) in layout.blocks.items():
        width = count * np.dtype(dtype).itemsize
        blocks[name] = np.ascontiguousarray(arr[:, off:off + width]).view(dtype) \
            .astype(np.float64).reshape(rows.size, count)
    return rows, stamps, blocks


# -- resampling -------------------------------------------------------------------------------
@dataclass
class Ticks:
    """Rows at the control rate: tick times, each stream's values and message time (-1: none),
    and whether each stream was fresh."""

    ticks: np.ndarray
    values: dict[str, np.ndarray]
    times: dict[str, np.ndarray]
    fresh: dict[str, np.ndarray]

    @property
    def ok(self) -> np.ndarray:
        ok = np.ones(self.ticks.size, dtype=bool)
        for f in self.fresh.values():
            ok &= f
        return ok


class Resampler:
    """Streams of (time ns, values) in, ticks every `period_ns` out (see the module docstring).

    `push` takes each stream's messages in time order (non-decreasing), in any interleaving
    of streams and batch sizes; `advance` emits the ticks that no later message can change;
    `finish(end_ns)` emits the rest before `end_ns`. Messages before `start_ns` are ignored.
    """

    def __init__(self, streams: dict[str, tuple[int, int]], period_ns: int, start_ns: int,
                 lateness_ns: int) -> None:
        if period_ns < 1:
            raise ValueError(f'period must be at least 1 ns, got {period_ns}')
        self.size = {k: int(n) for k, (n, _) in streams.items()}
        self.max_age = {k: int(a) for k, (_, a) in streams.items()}
        self.period, self.start, self.lateness = int(period_ns), int(start_ns), int(lateness_ns)
        self.t = {k: np.zeros(0, dtype=np.int64) for k in streams}
        self.v = {k: np.zeros((0, n), dtype=np.float64) for k, n in self.size.items()}
        self.last = {k: -2 ** 62 for k in streams}
        self.newest = -2 ** 62
        self.next_tick: int | None = None
        self.emitted_until = -2 ** 62     # the last tick emitted
        self.late = 0

    def push(self, key: str, times: np.ndarray, values: np.ndarray) -> None:
        times = np.asarray(times, dtype=np.int64)
        keep = times >= self.start
        if not keep.all():
            times, values = times[keep], values[keep]
        if times.size == 0:
            return
        if times[0] < self.last[key] or (times.size > 1 and (np.diff(times) < 0).any()):
            raise ValueError(f'{key}: times go back')
        self.late += int(np.count_nonzero(times <= self.emitted_until))
        self.t[key] = np.concatenate([self.t[key], times])
        self.v[key] = np.concatenate([self.v[key], np.asarray(values, dtype=np.float64)
                                      .reshape(times.size, self.size[key])])
        self.last[key] = int(times[-1])
        self.newest = max(self.newest, self.last[key])

    def _anchor(self) -> bool:
        if self.next_tick is None:
            if any(t.size == 0 for t in self.t.values()):
                return False
            self.next_tick = max(int(t[0]) for t in self.t.values())
        return True

    def advance(self) -> Ticks | None:
        """The ticks no later message can change (None when there are none yet)."""
        if not self._anchor():
            return None
        floor = self.newest - self.lateness
        bound = min(max(self.last[k], floor) for k in self.t)   # ticks strictly before
        return self._emit(bound)

    def finish(self, end_ns: int) -> Ticks | None:
        """Every remaining tick before `end_ns`."""
        if not self._anchor():
            return None
        return self._emit(int(end_ns))

    def _emit(self, bound: int) -> Ticks | None:
        assert self.next_tick is not None
        if bound <= self.next_tick:
            return None
        count = (bound - 1 - self.next_tick) // self.period + 1
        ticks = self.next_tick + self.period * np.arange(count, dtype=np.int64)
        out = Ticks(ticks, {}, {}, {})
        for k, t in self.t.items():
            idx = np.searchsorted(t, ticks, side='right') - 1
            have = idx >= 0
            safe = np.maximum(idx, 0)
            used = np.where(have, t[safe] if t.size else -1, -1)
            out.times[k] = used
            out.fresh[k] = have & (ticks - used <= self.max_age[k])
            out.values[k] = self.v[k][safe] if t.size else np.zeros((count, self.size[k]))
            keep = int(max(idx[-1], 0))                # the latest message at the last tick
            if keep:
                self.t[k], self.v[k] = t[keep:], self.v[k][keep:]
        self.next_tick = int(ticks[-1]) + self.period
        self.emitted_until = int(ticks[-1])
        return out


# -- streams of one topic ---------------------------------------------------------------------
class _Topic:
    """One bag topic the binding reads: its sources (or its sink), decoded in batches."""

    def __init__(self, topic: str, msgtype: str, sources: list[Source], sink: Sink | None,
                 action_key: str) -> None:
        self.topic, self.type = topic, msgtype
        self.sources, self.sink, self.action_key = sources, sink, action_key
        stamp = sink.stamp_from if sink is not None else sources[0].stamp_from
        self.header = stamp == 'header'
        self.layouts: list[Layout] = []
        self.fast = msgtype in PARSERS
        self.last_stamp = dict.fromkeys(self.keys(), -2 ** 63)
        self.invalid = 0
        self.decoded = 0
        self.slow = 0

    def keys(self) -> dict[str, tuple[int, int]]:
        """{stream key: (size, max age ns)}."""
        if self.sink is not None:
            return {self.action_key: (self.sink.size, round(self.sink.max_age_s * NS))}
        return {s.feature: (s.size, round(s.max_age_s * NS)) for s in self.sources}

    # values from a fast batch
    def _from_blocks(self, blocks: dict[str, np.ndarray], layout: Layout
                     ) -> dict[str, np.ndarray]:
        out = {}
        if self.sink is not None:
            sink = self.sink
            if sink.frame_id is not None:
                check_frame(layout.frame_id or '', sink.frame_id, self.topic)
            if self.type in (POSE_STAMPED, TWIST_STAMPED):
                out[self.action_key] = blocks['values'][:, :sink.size]
            else:
                out[self.action_key] = self._array(blocks['data'], layout, sink.label,
                                                   sink.size, None)
            return out
        for src in self.sources:
            if src.frame_id is not None:
                check_frame(layout.frame_id or '', src.frame_id, self.topic)
            if self.type == JOINT_STATE:
                if not src.names_any(layout.names):
                    continue                     # a message for other joints
                data = blocks[src.field]
                if data.shape[1] != len(layout.names):
                    raise BindingMismatch(f'{self.topic}: {data.shape[1]} {src.field} values '
                                          f'for {len(layout.names)} joint names')
                out[src.feature] = data[:, src.joint_index(layout.names)]
            elif self.type == POSE_STAMPED:
                a = {'position': 0, 'orientation': 3, 'pose': 0}[src.field]
                out[src.feature] = blocks['values'][:, a:a + POSE_FIELDS[src.field]]
            else:
                out[src.feature] = self._array(blocks['data'], layout, src.label, src.size,
                                               src.slice)
        return out

    def _array(self, data: np.ndarray, layout: Layout, label: str | None, size: int,
               cut: tuple[int, int] | None) -> np.ndarray:
        if label is not None:
            if label not in layout.labels:
                raise BindingMismatch(f'{self.topic}: labelled array has no field {label!r} '
                                      f'(has: {", ".join(layout.labels) or "no labels"})')
            a, b = layout.labels[label]
            if b - a != size or b > data.shape[1]:
                raise BindingMismatch(f'{self.topic}: field {label!r} holds {b - a} of '
                                      f'{data.shape[1]} values, the binding expects {size}')
            return data[:, a:b]
        if cut is None:                                 # an array sink: all of it
            if data.shape[1] != size:
                raise BindingMismatch(f'{self.topic}: {data.shape[1]} values, the binding '
                                      f'expects {size}')
            return data
        if data.shape[1] < cut[1]:
            raise BindingMismatch(f'{self.topic}: {data.shape[1]} values, the binding reads '
                                  f'[{cut[0]}, {cut[1]})')
        return data[:, cut[0]:cut[1]]

    # values from one deserialised message
    def _from_msg(self, msg: Any) -> tuple[int | None, dict[str, np.ndarray]]:
        if self.sink is not None:
            return self.sink.stamp_ns(msg), {self.action_key: self.sink.decode(msg)}
        values = {}
        offsets = None
        if any(s.label for s in self.sources):
            from vdd_ros.binding import labelled_offsets
            offsets = labelled_offsets(msg)
        for src in self.sources:
            if src.applies(msg):
                values[src.feature] = src.extract(msg, offsets)
        return self.sources[0].stamp_ns(msg), values

    def decode(self, raws: list[bytes], deserialize: Any
               ) -> tuple[np.ndarray | None, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Header stamps of the messages (None when the topic is timed by arrival) and, per
        stream key, (rows, values) of the messages that feed it, in message order. A message
        with NaN/Inf is dropped from every key and counted."""
        n = len(raws)
        stamps = np.zeros(n, dtype=np.int64) if self.header else None
        shapes = self.keys()
        have = {k: np.zeros(n, dtype=bool) for k in shapes}
        vals = {k: np.zeros((n, size)) for k, (size, _) in shapes.items()}
        todo = np.ones(n, dtype=bool)
        if self.fast:
            self._decode_fast(raws, todo, stamps, have, vals)
        valid = np.ones(n, dtype=bool)
        rest = np.flatnonzero(todo)
        self.slow += int(rest.size)
        for i in rest.tolist():
            msg = deserialize(raws[i], self.type)
            try:
                stamp, values = self._from_msg(msg)
            except InvalidValues:
                valid[i] = False
                continue
            if stamps is not None:
                stamps[i] = stamp
            for k, v in values.items():
                have[k][i] = True
                vals[k][i] = v
        for k in shapes:
            bad = have[k] & ~np.isfinite(vals[k]).all(axis=1)
            valid &= ~bad
        self.invalid += int(np.count_nonzero(~valid))
        out = {}
        for k in shapes:
            rows = np.flatnonzero(have[k] & valid)
            out[k] = (rows, vals[k][rows])
        return stamps, out

    def _decode_fast(self, raws: list[bytes], todo: np.ndarray, stamps: np.ndarray | None,
                     have: dict[str, np.ndarray], vals: dict[str, np.ndarray]) -> None:
        """Decode, in place, the messages of every known layout; learn up to MAX_LAYOUTS
        layouts from messages no known one fits (e.g. arm and gripper JointStates)."""
        tried: set[int] = set()
        while todo.any():
            rest = np.flatnonzero(todo)
            layout = next((x for x in self.layouts if id(x) not in tried), None)
            if layout is None:
                if len(self.layouts) >= MAX_LAYOUTS:
                    return
                layout = parse_layout(raws[int(rest[0])], self.type)
                if layout is None:
                    return
                self.layouts.append(layout)
            tried.add(id(layout))
            batch = raws if rest.size == len(raws) else [raws[i] for i in rest.tolist()]
            rows, got, blocks = decode_batch(batch, layout, self.header)
            if not rows.size:
                continue                            # (a learnt layout fits its own message)
            rows = rest[rows]
            todo[rows] = False
            if stamps is not None and got is not None:
                stamps[rows] = got
            for k, v in self._from_blocks(blocks, layout).items():
                have[k][rows] = True
                vals[k][rows] = v


# -- output -----------------------------------------------------------------------------------
class _Writer:
    """Demos into a robomimic-layout HDF5 file (temporary until `close(commit=True)`)."""

    def __init__(self, out: Path, binding: Binding, env_args: dict[str, Any]) -> None:
        self.out = out
        self.tmp = out.with_name(f'.{out.name}.tmp{os.getpid()}')
        self.file = h5py.File(self.tmp, 'w')
        self.data = self.file.create_group('data')
        self.data.attrs['env_args'] = json.dumps(env_args)
        self.data.attrs['obs_fields'] = json.dumps(binding.obs_fields)
        self.data.attrs['binding'] = binding.to_json()
        self.fields = binding.obs_fields
        self.count = 0
        self.total = 0

    def add(self, obs: np.ndarray, actions: np.ndarray, attrs: dict[str, Any],
            success: bool | None) -> None:
        """A demo of flat observations (camera pixels inline, 0-255) and actions; `attrs`
        (None values left out) go to its group, a successful end gets reward 1."""
        T = int(obs.shape[0])
        low, frames = split_cameras(obs, self.fields)
        rewards = np.zeros(T)
        if success:
            rewards[-1] = 1.0
        g = self.data.create_group(f'demo_{self.count}')
        write_demo(g, Demo(obs=low, actions=actions, rewards=rewards, frames=frames),
                   self.fields)
        for k, v in attrs.items():
            if v is not None:
                g.attrs[k] = v
        self.count += 1
        self.total += T

    def close(self, commit: bool, valid_fraction: float) -> None:
        try:
            if commit:
                self.data.attrs['total'] = self.total
                names = [f'demo_{i}' for i in range(self.count)]
                train, valid = split_indices(self.count, valid_fraction)
                mask = self.file.create_group('mask')
                mask.create_dataset('train', data=np.array([names[i] for i in train], dtype='S'))
                mask.create_dataset('valid', data=np.array([names[i] for i in valid], dtype='S'))
            self.file.close()
            if commit:
                os.replace(self.tmp, self.out)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


# -- conversion -------------------------------------------------------------------------------
@dataclass
class Summary:
    """What a conversion did; `lines()` is the printed report."""

    bags: int = 0
    bytes: int = 0
    wall_s: float = 0.0
    messages: int = 0
    episodes: int = 0
    demos: int = 0
    samples: int = 0
    split: int = 0                  # episodes cut into pieces at gaps
    dropped_gap: int = 0            # episodes dropped at a gap (on_gap='drop')
    dropped_failed: int = 0         # episodes whose end marker says success: false
    dropped_short: int = 0          # pieces shorter than min_steps (or never complete)
    gaps: dict[str, int] = field(default_factory=dict)       # stale ticks per feature/topic
    trimmed: int = 0                # stale ticks at the ends of episodes
    invalid: dict[str, int] = field(default_factory=dict)    # NaN/Inf messages per topic
    late: int = 0
    slow: int = 0                   # messages decoded by the generic deserializer
    unmatched_markers: int = 0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.wall_s if self.wall_s > 0 else 0.0

    def lines(self) -> list[str]:
        out = [(f'{self.bags} bag(s), {self.bytes / 1e6:.1f} MB, {self.messages} messages in '
                f'{self.wall_s:.1f} s: {self.mb_per_s:.1f} MB/s'),
               (f'{self.episodes} episode(s) -> {self.demos} demo(s), {self.samples} samples; '
                f'split {self.split}, dropped {self.dropped_gap} at a gap, '
                f'{self.dropped_failed} failed, {self.dropped_short} too short')]
        if self.gaps:
            out.append('stale ticks by feature: ' + ', '.join(
                f'{k} {v}' for k, v in sorted(self.gaps.items())))
        if self.trimmed:
            out.append(f'{self.trimmed} stale tick(s) trimmed at episode ends')
        if self.invalid:
            out.append('messages skipped for NaN/Inf: ' + ', '.join(
                f'{k} {v}' for k, v in sorted(self.invalid.items())))
        if self.late:
            out.append(f'{self.late} message(s) arrived after their tick was written')
        if self.unmatched_markers:
            out.append(f'{self.unmatched_markers} unmatched episode marker(s) ignored')
        return out


@dataclass
class _Episode:
    start_ns: int
    seed: int | None = None
    mode: str | None = None
    pieces: list[tuple[list, list]] = field(default_factory=list)
    cur_obs: list = field(default_factory=list)
    cur_act: list = field(default_factory=list)
    stale_run: int = 0
    gaps: int = 0
    start_s: float | None = None


def bag_files(path: Path) -> list[Path]:
    """The storage files of a bag (a directory with metadata.yaml, or one .mcap/.db3 file)."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    return [path]


BAG_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, struct.error, KeyError,
                                               IndexError, sqlite3.Error)
_BAG_MODULES = ('rosbags', 'backports.zstd', 'compression.zstd', 'zstandard', 'lz4')


def _bag_error(exc: BaseException) -> bool:
    """Whether an exception comes from reading a damaged bag (not from this code)."""
    return isinstance(exc, BAG_ERRORS) or type(exc).__module__.startswith(_BAG_MODULES)


@contextmanager
def open_bag(path: Path) -> Iterator[Any]:
    """An open rosbags AnyReader of one bag; a bag it cannot read is a UserError."""
    from rosbags.highlevel import AnyReader, AnyReaderError
    from rosbags.rosbag2 import ReaderError
    if not path.exists():
        raise UserError(f'{path}: no such bag')
    try:
        reader = AnyReader([path])
        reader.open()
    except Exception as exc:
        if isinstance(exc, (AnyReaderError, ReaderError)) or _bag_error(exc):
            raise UserError(f'{path}: not a readable rosbag2 ({_why(exc)})') from None
        raise
    try:
        yield reader
    finally:
        with contextlib.suppress(Exception):   # a broken bag's close must not hide the error
            reader.close()


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ''
    return f'{type(exc).__name__}: {text}' if text else type(exc).__name__


def bag_topics(path: Path) -> dict[str, tuple[str, int]]:
    """{topic: (type, message count)} of a bag, from metadata.yaml where there is one (no
    decompression), else from the storage file's own index."""
    meta = path / 'metadata.yaml'
    if path.is_dir() and meta.is_file():
        import yaml
        try:
            info = yaml.safe_load(meta.read_text())['rosbag2_bagfile_information']
            return {t['topic_metadata']['name']: (t['topic_metadata']['type'],
                                                  int(t['message_count']))
                    for t in info['topics_with_message_count']}
        except (yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f'{path}: not a readable rosbag2 (metadata.yaml: '
                            f'{_why(exc)})') from None
    with open_bag(path) as reader:
        out: dict[str, tuple[str, int]] = {}
        for c in reader.connections:
            kind, n = out.get(c.topic, (c.msgtype, 0))
            out[c.topic] = (kind, n + int(c.msgcount))
        return out


def check_bag(path: Path, topics: dict[str, tuple[str, int]], binding: Binding) -> list[str]:
    """The topics a conversion reads from a bag ({topic: (type, count)}); a topic the binding
    needs that the bag lacks, or of another type, is a UserError naming it."""
    want = dict(binding.observation_topics())
    want.update(binding.action_topics())
    for topic, msgtype in want.items():
        if topic not in topics:
            users = [s.feature for s in binding.sources_of(topic)] or ['the action']
            raise UserError(f'{path}: topic {topic} ({", ".join(users)}) is not in the bag '
                            f'(it has: {", ".join(sorted(topics)) or "no topics"})')
        if topics[topic][0] != msgtype:
            raise UserError(f'{path}: {topic} is {topics[topic][0]} in the bag, the binding '
                            f'says {msgtype}')
    out = list(want)
    marker = topics.get(binding.episode_topic)
    if marker is not None and marker[1]:
        if marker[0] != STRING:
            raise UserError(f'{path}: {binding.episode_topic} is {marker[0]} in the bag, '
                            f'episode markers are {STRING}')
        out.append(binding.episode_topic)
    arrival = any(s.stamp_from == 'arrival' for s in binding.sources) or any(
        s.stamp_from == 'arrival' for s in binding.action) or binding.episode_topic in out
    if binding.clock == 'sim' and arrival:
        clock = topics.get(CLOCK_TOPIC)
        if clock is None or not clock[1]:
            raise UserError(f'{path}: the binding runs on sim time (clock: sim) but the bag has '
                            f'no {CLOCK_TOPIC} messages to time the arrival of unstamped ones')
        if clock[0] != CLOCK:
            raise UserError(f'{path}: {CLOCK_TOPIC} is {clock[0]}, expected {CLOCK}')
        out.append(CLOCK_TOPIC)
    return out


def _mcap_batches(storage: Any, kind_of: dict[str, int]
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, list[bytes]]] | None:
    """Chunk by chunk message batches of an indexed MCAP file whose chunks do not overlap in
    time (what rosbag2 writes): ~10x faster than a per-message generator. None when the file
    does not qualify (the caller falls back on rosbags' reader)."""
    from rosbags.rosbag2.errors import ReaderError
    from rosbags.rosbag2.storage_mcap import decompress
    chunks = sorted(getattr(storage, 'chunks', None) or [],
                    key=lambda c: (c.message_start_time, c.chunk_start_offset))
    if not chunks or any(b.message_start_time < a.message_end_time
                         for a, b in itertools.pairwise(chunks)):
        return None
    kind = {cid: kind_of[ch.topic] for cid, ch in storage.channels.items()
            if ch.topic in kind_of}

    def read_chunk(chunk: Any) -> bytes:
        bio = storage.bio
        bio.seek(chunk.chunk_start_offset + 9 + 24)
        (crc,) = struct.unpack('<I', bio.read(4))
        bio.seek(chunk.chunk_start_offset + 9 + 40 + len(chunk.compression))
        data = bio.read(chunk.compressed_size)
        if len(data) != chunk.compressed_size:
            raise ReaderError('chunk extends past the end of the file')
        return decompress(data, chunk.compression, chunk.uncompressed_size, crc)

    def indexed(chunk: Any, cids: list[int]) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
        """The chunk's wanted messages located through its message indexes (vectorised)."""
        bio = storage.bio
        parts = []
        for cid in cids:
            bio.seek(chunk.message_index_offsets[cid])
            head = bio.read(15)
            if len(head) != 15 or head[0] != 0x07:
                raise ReaderError('invalid message index record')
            (size,) = struct.unpack_from('<I', head, 11)
            pairs = np.frombuffer(bio.read(size), dtype='<u8')
            if pairs.size * 8 != size or size % 16:
                raise ReaderError('truncated message index')
            pairs = pairs.reshape(-1, 2).astype(np.int64)
            parts.append((pairs[:, 0], pairs[:, 1], np.full(len(pairs), kind[cid]),
                          np.full(len(pairs), cid)))
        buf = read_chunk(chunk)
        logs, offs, kinds, chans = (np.concatenate([p[i] for p in parts]) for i in range(4))
        order = np.lexsort((offs, logs))
        logs, offs, kinds, chans = logs[order], offs[order], kinds[order], chans[order]
        arr = np.frombuffer(buf, dtype=np.uint8)
        if offs.size and (offs.min() < 0 or offs.max() + 31 > arr.size):
            raise ReaderError('message index points outside its chunk')
        head = arr[offs[:, None] + np.arange(11)]
        lengths = head[:, 1:9].copy().view('<u8')[:, 0].astype(np.int64)
        ends = offs + 9 + lengths
        if (head[:, 0] != 0x05).any() or (head[:, 9:11].copy().view('<u2')[:, 0] != chans).any() \
                or (lengths < 22).any() or (ends > arr.size).any():
            raise ReaderError('message index does not match its chunk')
        starts = (offs + 31).tolist()
        raws = [buf[a:b] for a, b in zip(starts, ends.tolist())]
        return kinds, logs, raws

    def scanned(chunk: Any) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
        """The chunk's wanted messages by walking its records (no message index)."""
        buf = read_chunk(chunk)
        kinds: list[int] = []
        logs: list[int] = []
        raws: list[bytes] = []
        off, end = 0, len(buf)
        while off < end:
            if off + 23 <= end:
                op, length, cid, _, log_ns = unpack_message(buf, off)
            else:
                op, length = unpack_record(buf, off)
            body = off + 9
            off = body + length
            if op == 0x05:
                if length < 22 or off > end:
                    raise ReaderError(f'invalid message record length {length}')
                k = kind.get(cid)
                if k is not None:
                    kinds.append(k)
                    logs.append(log_ns)
                    raws.append(buf[body + 22:off])
        if off != end:
            raise ReaderError('a record runs past the end of its chunk')
        k_arr, l_arr = np.asarray(kinds, dtype=np.int64), np.asarray(logs, dtype=np.int64)
        if (np.diff(l_arr) < 0).any():
            order = np.argsort(l_arr, kind='stable')
            k_arr, l_arr, raws = k_arr[order], l_arr[order], [raws[i] for i in order]
        return k_arr, l_arr, raws

    unpack_record = struct.Struct('<BQ').unpack_from
    unpack_message = struct.Struct('<BQHIQ').unpack_from   # record header + message's

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, list[bytes]]]:
        for chunk in chunks:
            if chunk.message_index_offsets:
                cids = [c for c in kind if c in chunk.message_index_offsets]
                if not cids:
                    continue
                out = indexed(chunk, cids)
            else:
                out = scanned(chunk)
            if out[0].size:
                yield out
    return batches()


def message_batches(reader: Any, kind_of: dict[str, int], size: int = 8192
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[bytes]]]:
    """(kinds, log times, raw messages) of the topics in `kind_of` ({topic: kind}), in
    log-time order, in batches; rosbag2's split files one after the other."""
    bag = reader.readers[0]
    storage = bag.storage
    storages = getattr(storage, 'storages', [storage])
    if bag.compression_mode != 'message' and all(getattr(s, 'chunks', None)
                                                  for s in storages):
        fast = [_mcap_batches(s, kind_of) for s in storages]
        if all(f is not None for f in fast):
            for f in fast:
                yield from f  # type: ignore[misc]
            return
    conns = [c for c in reader.connections if c.topic in kind_of]
    kinds: list[int] = []
    logs: list[int] = []
    raws: list[bytes] = []
    for conn, log_ns, raw in bag.messages(connections=conns):
        kinds.append(kind_of[conn.topic])
        logs.append(log_ns)
        raws.append(raw)
        if len(raws) >= size:
            yield np.asarray(kinds, dtype=np.int64), np.asarray(logs, dtype=np.int64), raws
            kinds, logs, raws = [], [], []
    if raws:
        yield np.asarray(kinds, dtype=np.int64), np.asarray(logs, dtype=np.int64), raws


class _Converter:
    def __init__(self, binding: Binding, rate_hz: float, writer: _Writer, on_gap: str,
                 min_steps: int, keep_failed: bool, summary: Summary) -> None:
        self.b = binding
        self.period = round(NS / rate_hz)
        self.writer, self.on_gap, self.min_steps = writer, on_gap, min_steps
        self.keep_failed, self.s = keep_failed, summary
        ages = [s.max_age_s for s in binding.sources] + [k.max_age_s for k in binding.action]
        self.lateness = int(max(1.0, 4 * max(ages)) * NS)

    # -- one bag
    def run_bag(self, path: Path, bar: tqdm) -> None:
        with open_bag(path) as reader:
            topics: dict[str, tuple[str, int]] = {}
            for c in reader.connections:
                kind, n = topics.get(c.topic, (c.msgtype, 0))
                topics[c.topic] = (kind, n + int(c.msgcount))
            wanted = check_bag(path, topics, self.b)
            conns = {c.topic: c for c in reader.connections if c.topic in wanted}
            try:
                counts = self._read(path, reader, conns, bar)
            except UserError:
                raise
            except Exception as exc:
                if _bag_error(exc):
                    raise UserError(f'{path}: corrupt or truncated bag ({_why(exc)})') from None
                raise
            for topic in conns:
                if counts.get(topic, 0) != topics[topic][1]:
                    raise UserError(f'{path}: corrupt or truncated bag (read '
                                    f'{counts.get(topic, 0)} of the {topics[topic][1]} '
                                    f'messages its index lists on {topic})')

    def _read(self, path: Path, reader: Any, conns: dict[str, Any], bar: tqdm
              ) -> dict[str, int]:
        """Stream one bag; returns the number of messages read per topic."""
        b = self.b
        self.path = path
        self.topics: dict[str, _Topic] = {}
        for topic, msgtype in b.observation_topics().items():
            self.topics[topic] = _Topic(topic, msgtype, b.sources_of(topic), None, '')
        for i, sink in enumerate(b.action):
            self.topics[sink.topic] = _Topic(sink.topic, sink.type, [], sink, f'@action{i}')
        self.deserialize = reader.deserialize
        self.clock_log: list[int] = []
        self.clock_val: list[int] = []
        self.pending: dict[str, tuple[list[bytes], list[np.ndarray]]] = {
            t: ([], []) for t in self.topics}
        self.episode: _Episode | None = None
        self.resampler: Resampler | None = None
        markers = b.episode_topic in conns
        if not markers:
            self._start(-2 ** 62, None, None)
        start, duration = reader.start_time, max(reader.duration, 1)
        size = sum(p.stat().st_size for p in bag_files(path))
        done = 0.0
        names = list(self.topics) + [CLOCK_TOPIC, b.episode_topic]
        kind_of = {t: i for i, t in enumerate(names) if t in conns}
        clock_kind, marker_kind = len(self.topics), len(self.topics) + 1
        totals = np.zeros(len(names), dtype=np.int64)
        for kinds, logs, raws in message_batches(reader, kind_of):
            totals += np.bincount(kinds, minlength=len(names))
            cuts = np.flatnonzero(kinds == marker_kind).tolist()
            a = 0
            for cut in cuts + [kinds.size]:
                self._segment(kinds[a:cut], logs[a:cut], raws, a, clock_kind)
                if cut < kinds.size:
                    self._flush()
                    self._marker(raws[cut], int(logs[cut]))
                a = cut + 1
            frac = (int(logs[-1]) - start) / duration * size
            bar.update(max(frac - done, 0))
            done = max(done, frac)
        self._flush()
        if self.episode is not None:
            self._end(None, None, None)
        self.s.messages += int(totals.sum())
        bar.update(max(size - done, 0))
        for t in self.topics.values():
            self.s.slow += t.slow
            if t.invalid:
                self.s.invalid[t.topic] = self.s.invalid.get(t.topic, 0) + t.invalid
        return {t: int(totals[k]) for t, k in kind_of.items()}

    def _segment(self, kinds: np.ndarray, logs: np.ndarray, raws: list[bytes], offset: int,
                 clock_kind: int) -> None:
        """Messages between two markers: /clock values noted, topic messages queued."""
        for i in np.flatnonzero(kinds == clock_kind).tolist():
            sec, nsec = struct.unpack_from('<iI', raws[offset + i], 4)
            value = sec * NS + nsec
            if self.clock_val and value < self.clock_val[-1]:
                raise UserError(f'{self.path}: {CLOCK_TOPIC} goes back from '
                                f'{self.clock_val[-1] / NS:.9f} s to {value / NS:.9f} s')
            self.clock_log.append(int(logs[i]))
            self.clock_val.append(value)
        if self.episode is None:
            return
        queued = 0
        for k, (topic_raws, topic_logs) in enumerate(self.pending.values()):
            sel = np.flatnonzero(kinds == k)
            if sel.size:
                topic_raws.extend([raws[offset + i] for i in sel.tolist()])
                topic_logs.append(logs[sel])
            queued = max(queued, len(topic_raws))
        if queued >= BATCH:
            self._flush()

    def _arrival(self, log_ns: np.ndarray) -> np.ndarray:
        """Arrival times on the binding's clock (-1: before the first /clock)."""
        if self.b.clock == 'system':
            return log_ns
        if not self.clock_log:
            return np.full(log_ns.shape, -1, dtype=np.int64)
        idx = np.searchsorted(np.asarray(self.clock_log), log_ns, side='right') - 1
        vals = np.asarray(self.clock_val, dtype=np.int64)[np.maximum(idx, 0)]
        return np.where(idx >= 0, vals, -1)

    def _flush(self) -> None:
        if self.resampler is None:
            for lst in self.pending.values():
                lst[0].clear()
                lst[1].clear()
            return
        flushed = -1
        for topic, (raws, logs) in self.pending.items():
            if not raws:
                continue
            t = self.topics[topic]
            stamps, per_key = t.decode(raws, self.deserialize)
            times = stamps if stamps is not None else self._arrival(np.concatenate(logs))
            for key, (rows, values) in per_key.items():
                if not rows.size:
                    continue
                when = times[rows]
                if t.header:
                    self._check_order(t, key, when)
                else:
                    good = when >= 0                # arrival before the first /clock: unknown
                    if not good.all():
                        when, values = when[good], values[good]
                self.resampler.push(key, when, values)
            flushed = max(flushed, int(logs[-1][-1]))
            raws.clear()
            logs.clear()
        # keep the /clock entries still needed: from the last one before what was flushed
        drop = bisect.bisect_right(self.clock_log, flushed) - 1
        if drop > 0:
            del self.clock_log[:drop], self.clock_val[:drop]
        self._take(self.resampler.advance())

    def _check_order(self, t: _Topic, key: str, stamps: np.ndarray) -> None:
        prev = np.concatenate([[t.last_stamp[key]], stamps[:-1]])
        bad = np.flatnonzero(stamps <= prev)
        if bad.size:
            k = int(bad[0])
            what = 'duplicate' if stamps[k] == prev[k] else 'out-of-order'
            raise UserError(f'{self.path}: {t.topic}: {what} header stamp {stamps[k] / NS:.9f} s '
                            f'after {prev[k] / NS:.9f} s')
        t.last_stamp[key] = int(stamps[-1])

    # -- episodes
    def _marker(self, raw: bytes, log_ns: int) -> None:
        text, _, _ = _string(raw, 4)
        try:
            marker = parse_marker(text)
        except BindingMismatch as exc:
            raise UserError(f'{self.path}: {exc}') from None
        t = int(self._arrival(np.asarray([log_ns], dtype=np.int64))[0])
        if marker.event == 'start':
            if self.episode is not None:             # no end marker: close it where it is
                self.s.unmatched_markers += 1
                self._end(t, None, None)
            self._start(t if t >= 0 else -2 ** 62, marker.episode, marker.mode)
        elif self.episode is None:
            self.s.unmatched_markers += 1
        else:
            self._end(t, marker.success, marker.mode, marker.episode)

    def _start(self, start_ns: int, seed: int | None, mode: str | None) -> None:
        streams: dict[str, tuple[int, int]] = {}
        for t in self.topics.values():
            streams.update(t.keys())
        self.resampler = Resampler(streams, self.period, start_ns, self.lateness)
        self.episode = _Episode(start_ns, seed, mode)
        self.s.episodes += 1

    def _take(self, ticks: Ticks | None) -> None:
        if ticks is None or self.episode is None:
            return
        ep = self.episode
        if ep.start_s is None:
            ep.start_s = float(ticks.ticks[0]) / NS
        ok = ticks.ok
        for key, fresh in ticks.fresh.items():
            stale = int(np.count_nonzero(~fresh))
            if stale:
                name = key if not key.startswith('@action') else \
                    self.b.action[int(key[len('@action'):])].topic
                ep_gaps = self.s.gaps
                ep_gaps[name] = ep_gaps.get(name, 0) + stale
        obs = self.b.assemble({k: ticks.values[k] for k, _ in self._source_keys()})
        act = np.zeros((ticks.ticks.size, self.b.action_dim), dtype=np.float64)
        for i, sink in enumerate(self.b.action):
            act[:, sink.slice[0]:sink.slice[1]] = ticks.values[f'@action{i}']
        # runs of good ticks; a stale run between good ones is a gap
        edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
        pos = 0
        for a, b in zip(edges[::2], edges[1::2]):
            if a > pos:
                self._stale(a - pos)
            if ep.stale_run and (ep.cur_obs or ep.pieces):
                if ep.cur_obs:
                    ep.pieces.append((ep.cur_obs, ep.cur_act))
                    ep.cur_obs, ep.cur_act = [], []
                ep.gaps += 1
            elif ep.stale_run:                          # stale before the first good tick
                self.s.trimmed += ep.stale_run
            ep.stale_run = 0
            ep.cur_obs.append(obs[a:b])
            ep.cur_act.append(act[a:b])
            pos = b
        if pos < ok.size:
            self._stale(ok.size - pos)

    def _stale(self, n: int) -> None:
        assert self.episode is not None
        self.episode.stale_run += int(n)

    def _source_keys(self) -> list[tuple[str, int]]:
        return [(s.feature, s.size) for s in self.b.sources]

    def _end(self, end_ns: int | None, success: bool | None, mode: str | None,
             seed: int | None = None) -> None:
        assert self.resampler is not None and self.episode is not None
        self._flush()
        r = self.resampler
        end = end_ns if end_ns is not None and end_ns >= 0 else r.newest + 1
        self._take(r.finish(end))
        ep = self.episode
        self.s.late += r.late
        self.s.trimmed += ep.stale_run
        if ep.cur_obs:
            ep.pieces.append((ep.cur_obs, ep.cur_act))
        self.episode, self.resampler = None, None
        seed = ep.seed if seed is None else seed
        mode = ep.mode if mode is None else mode
        if success is False and not self.keep_failed:
            self.s.dropped_failed += 1
            return
        if ep.gaps and self.on_gap == 'drop':
            self.s.dropped_gap += 1
            return
        if ep.gaps:
            self.s.split += 1
        kept = 0
        for obs_parts, act_parts in ep.pieces:
            obs, act = np.concatenate(obs_parts), np.concatenate(act_parts)
            if obs.shape[0] < self.min_steps:
                self.s.dropped_short += 1
                continue
            self.writer.add(obs, act, {'seed': seed, 'mode': mode, 'bag': self.path.name,
                                       'piece': kept, 'start_s': ep.start_s}, success)
            kept += 1
            self.s.demos += 1
            self.s.samples += int(obs.shape[0])
        if not ep.pieces:
            self.s.dropped_short += 1


def convert(bags: Sequence[str | os.PathLike], binding: Binding, out: str | os.PathLike,
            rate_hz: float | None = None, on_gap: str = 'split', min_steps: int = 2,
            keep_failed: bool = False, valid_fraction: float = 0.1,
            env_args: dict[str, Any] | None = None, show_progress: bool = True) -> Summary:
    """Convert rosbag2 recordings into one robomimic-layout dataset (see the module docstring).
    Every bag is checked against the binding before anything is written; bad input is a
    UserError and leaves no file."""
    rate = rate_hz if rate_hz is not None else binding.rate_hz
    if rate is None or not rate > 0:
        raise UserError('the control rate is not set: pass --rate HZ or set rate_hz in the '
                        'binding')
    if on_gap not in ON_GAP:
        raise UserError(f'on_gap must be one of {list(ON_GAP)}, got {on_gap!r}')
    if min_steps < 1:
        raise UserError(f'min_steps must be at least 1, got {min_steps}')
    if not 0.0 <= valid_fraction < 1.0:
        raise UserError(f'valid fraction must be in [0, 1), got {valid_fraction}')
    if not bags:
        raise UserError('no bags given')
    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f'cannot write {out}: folder {out.parent} does not exist')
    paths = [Path(p) for p in bags]
    for path in paths:                                # every bag checked before work starts
        if not path.exists():
            raise UserError(f'{path}: no such bag')
        check_bag(path, bag_topics(path), binding)
    summary = Summary(bags=len(paths), bytes=sum(p.stat().st_size for path in paths
                                                 for p in bag_files(path)))
    args = {'source': 'bag2dataset', 'binding': binding.name, 'rate_hz': rate,
            'bags': [p.name for p in paths]}
    args.update(env_args or {})
    writer = _Writer(out, binding, args)
    commit = False
    start = time.perf_counter()
    bar = tqdm(total=summary.bytes, desc='bag2dataset', unit='B', unit_scale=True,
               disable=not show_progress, dynamic_ncols=True, leave=False)
    try:
        conv = _Converter(binding, rate, writer, on_gap, min_steps, keep_failed, summary)
        for path in paths:
            conv.run_bag(path, bar)
        if writer.count == 0:
            why = ''
            if summary.gaps:
                worst = max(summary.gaps, key=summary.gaps.get)
                why = (f'; most stale: {worst} ({summary.gaps[worst]} ticks older than its '
                       f'max_age_s: check its rate and clock)')
            raise UserError(f'no demonstration survived the conversion ({summary.episodes} '
                            f'episode(s) found, {summary.dropped_failed} failed{why}); {out} '
                            f'was not written')
        commit = True
    finally:
        bar.close()
        writer.close(commit, valid_fraction)
    summary.wall_s = time.perf_counter() - start
    return summary


def dataset_binding(path: str | os.PathLike) -> Binding | None:
    """The binding stored in a dataset by bag2dataset (None when it has none)."""
    with h5py.File(path, 'r') as f:
        text = f['data'].attrs.get('binding') if 'data' in f else None
    if text is None:
        return None
    return Binding.from_json(text.decode() if isinstance(text, bytes) else str(text),
                             f'{Path(path).name}: binding')
