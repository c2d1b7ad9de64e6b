"""Pure conversions between ROS messages and numpy / plain Python values.

Labelled arrays. Observations and actions travel as `std_msgs/Float32MultiArray` (progress as
`Float64MultiArray`) whose layout names what the data holds:

- one dimension per field, in data order: `label` is the field name and `size` = `stride` =
  the field's number of values; the sizes add up to `len(data)`;
- dimensions whose label starts with `@` hold no data (`size` 0) and carry one unsigned 32-bit
  integer of metadata in `stride`: `@seq` (the observation's sequence number, echoed by the
  action that answers it), `@episode` (the episode's seed), `@step` (the step in the episode),
  `@infer_us` (the policy's inference time in microseconds).

A serialized labelled array is size-checked before it is decoded (`decode_labelled_array`):
decoding costs about 2 us per layout dimension, so a huge layout would stall the caller.

Nothing here touches a node, a clock or a global: every function maps values to values.
"""
from __future__ import annotations

import array
import json
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.serialization import deserialize_message
from std_msgs.msg import (Float32MultiArray, Float64MultiArray, MultiArrayDimension,
                          MultiArrayLayout, String)

META_PREFIX = '@'
UINT32_MAX = 2 ** 32 - 1
MAX_LAYOUT_DIMS = 128   # one dimension per field plus metadata: real layouts have a few tens
Fields = Sequence[tuple[str, int]]

# diagnostic levels by name (DiagnosticStatus constants are bytes)
LEVELS = {'OK': DiagnosticStatus.OK, 'WARN': DiagnosticStatus.WARN,
          'ERROR': DiagnosticStatus.ERROR, 'STALE': DiagnosticStatus.STALE}


class InvalidMessage(ValueError):
    """A message that does not hold what the receiver expects (length, fields, values);
    `meta` holds a labelled array's metadata when it decoded that far."""

    meta: dict[str, int] = {}


# -- labelled arrays --------------------------------------------------------------------------
def make_layout(fields: Fields | None, meta: Mapping[str, int] | None = None) -> MultiArrayLayout:
    """Layout naming each field, followed by the metadata dimensions."""
    dims = [MultiArrayDimension(label=str(name), size=int(size), stride=int(size))
            for name, size in (fields or [])]
    for key, value in (meta or {}).items():
        value = int(value)
        if not 0 <= value <= UINT32_MAX:
            raise ValueError(f'metadata {key!r} must fit in 32 unsigned bits, got {value}')
        dims.append(MultiArrayDimension(label=META_PREFIX + key, size=0, stride=value))
    return MultiArrayLayout(dim=dims, data_offset=0)


def array_to_msg(values: np.ndarray, fields: Fields | None = None,
                 meta: Mapping[str, int] | None = None,
                 msg_type: type = Float32MultiArray) -> Any:
    """A flat array as a labelled Float32MultiArray (or Float64MultiArray)."""
    code, dtype = ('f', np.float32) if msg_type is Float32MultiArray else ('d', np.float64)
    flat = np.ascontiguousarray(np.asarray(values, dtype=dtype).reshape(-1))
    if fields is not None and sum(int(n) for _, n in fields) != flat.size:
        raise ValueError(f'fields describe {sum(int(n) for _, n in fields)} values, the array '
                         f'has {flat.size}')
    msg = msg_type()
    msg.layout = make_layout(fields, meta)
    msg.data = array.array(code, flat.tobytes())
    return msg


def msg_fields(msg: Any) -> list[tuple[str, int]]:
    """The (name, size) fields a labelled array declares (empty when it declares none)."""
    return [(d.label, int(d.size)) for d in msg.layout.dim
            if not d.label.startswith(META_PREFIX)]


def msg_meta(msg: Any) -> dict[str, int]:
    """The integer metadata of a labelled array (`@seq` -> {'seq': ...})."""
    return {d.label[len(META_PREFIX):]: int(d.stride) for d in msg.layout.dim
            if d.label.startswith(META_PREFIX)}


def msg_to_array(msg: Any, expected_fields: Fields | None = None,
                 expected_dim: int | None = None) -> np.ndarray:
    """The data of a labelled array as float32, checked; raises InvalidMessage.

    Checks: the layout's fields (when it names any) add up to the data length and equal
    `expected_fields` (when given); the length equals `expected_dim`; every value is finite.
    A message without field labels is accepted when its length is right.
    """
    data = np.frombuffer(msg.data, dtype=np.float32) if isinstance(msg.data, array.array) \
        and msg.data.typecode == 'f' else np.asarray(msg.data, dtype=np.float32)
    fields = msg_fields(msg)
    if fields:
        if sum(n for _, n in fields) != data.size:
            raise InvalidMessage(f'layout names {sum(n for _, n in fields)} values, data has '
                                 f'{data.size}')
        if expected_fields is not None:
            want = [(str(k), int(n)) for k, n in expected_fields]
            if fields != want:
                raise InvalidMessage(f'fields {_describe(fields)} differ from the expected '
                                     f'{_describe(want)}')
    if expected_fields is not None and expected_dim is None:
        expected_dim = sum(int(n) for _, n in expected_fields)
    if expected_dim is not None and data.size != expected_dim:
        raise InvalidMessage(f'{data.size} values, expected {expected_dim}')
    if not np.all(np.isfinite(data)):
        bad = np.flatnonzero(~np.isfinite(data))
        raise InvalidMessage(f'{bad.size} non-finite value(s) (first at index {int(bad[0])})')
    return data.copy()


def decode_labelled_array(data: bytes, max_bytes: int, msg_type: type = Float32MultiArray,
                          max_dims: int = MAX_LAYOUT_DIMS) -> Any:
    """A serialized (CDR) labelled array as a message; raises InvalidMessage.

    Rejected before decoding: more than `max_bytes` bytes, or (plain CDR, read from the
    header) a layout of more than `max_dims` dimensions; then anything that does not decode.
    """
    if len(data) > max_bytes:
        raise InvalidMessage(f'{len(data)} bytes, more than the {max_bytes} accepted')
    if len(data) >= 8 and data[0] == 0 and data[1] in (0, 1):  # CDR, big / little endian
        dims = int.from_bytes(data[4:8], 'little' if data[1] else 'big')
        if dims > max_dims:
            raise InvalidMessage(f'layout of {dims} dimensions, more than the {max_dims} '
                                 'accepted')
    try:
        return deserialize_message(data, msg_type)
    except Exception as exc:  # rclpy raises RMWError (and others) for malformed data
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise InvalidMessage(f'cannot decode {len(data)} bytes as {msg_type.__name__}: '
                             f'{reason}') from None


def _describe(fields: Fields) -> str:
    text = ', '.join(f'{k}[{n}]' for k, n in fields)
    return text if len(text) < 200 else text[:197] + '...'


def observation_to_msg(obs: np.ndarray, fields: Fields, seq: int, episode: int,
                       step: int) -> Float32MultiArray:
    """A simulator observation, labelled by field, with its sequence number and episode."""
    return array_to_msg(obs, fields, {'seq': seq, 'episode': episode, 'step': step})


def action_to_msg(action: np.ndarray, meta: Mapping[str, int] | None = None) -> Float32MultiArray:
    """A policy action (`action` field); `meta` echoes the observation it answers."""
    action = np.asarray(action, dtype=np.float32).reshape(-1)
    return array_to_msg(action, [('action', action.size)], meta)


# -- progress ---------------------------------------------------------------------------------
PROGRESS_KEYS = ('iteration', 'total', 'loss', 'elapsed_s', 'eta_s')


def progress_to_msg(stage: str, iteration: int, total: int, loss: float, elapsed_s: float,
                    eta_s: float, metrics: Mapping[str, float] | None = None
                    ) -> Float64MultiArray:
    """A training progress report as a labelled Float64MultiArray (one value per label).

    The first five labels are PROGRESS_KEYS, then `metrics`; the stage is the `@stage:<name>`
    label of an empty dimension.
    """
    values = [float(iteration), float(total), float(loss), float(elapsed_s), float(eta_s)]
    names = list(PROGRESS_KEYS)
    for key, value in (metrics or {}).items():
        names.append(str(key))
        values.append(float(value))
    msg = array_to_msg(np.asarray(values), [(n, 1) for n in names], msg_type=Float64MultiArray)
    msg.layout.dim.append(MultiArrayDimension(label=f'{META_PREFIX}stage:{stage}', size=0,
                                              stride=0))
    return msg


def msg_to_dict(msg: Any) -> dict[str, Any]:
    """A labelled array with one value per label as a dict (plus `stage` when present);
    raises InvalidMessage when the layout names more values than the data holds."""
    data = np.asarray(msg.data, dtype=np.float64)
    out: dict[str, Any] = {}
    offset = 0
    for dim in msg.layout.dim:
        if dim.label.startswith(f'{META_PREFIX}stage:'):
            out['stage'] = dim.label.split(':', 1)[1]
            continue
        if dim.label.startswith(META_PREFIX):
            continue
        size = int(dim.size)
        if offset + size > data.size:
            raise InvalidMessage(f'layout names more than the {data.size} values of the data')
        chunk = data[offset:offset + size]
        out[dim.label] = float(chunk[0]) if size == 1 else chunk.tolist()
        offset += size
    return out


# -- diagnostics ------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    """A diagnostic value as text: floats with 4 significant digits, the rest as str()."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return f'{value:.4g}' if math.isfinite(value) else str(value)
    return str(value)


def diagnostic_status(name: str, level: str, message: str, values: Mapping[str, Any],
                      hardware_id: str = '') -> DiagnosticStatus:
    """One DiagnosticStatus; `level` is OK, WARN, ERROR or STALE."""
    if level not in LEVELS:
        raise ValueError(f'level must be one of {list(LEVELS)}, got {level!r}')
    return DiagnosticStatus(level=LEVELS[level], name=name, message=message,
                            hardware_id=hardware_id,
                            values=[KeyValue(key=str(k), value=format_value(v))
                                    for k, v in values.items()])


def diagnostic_array(statuses: Iterable[DiagnosticStatus], stamp: Any = None) -> DiagnosticArray:
    msg = DiagnosticArray(status=list(statuses))
    if stamp is not None:
        msg.header.stamp = stamp
    return msg


def level_name(level: Any) -> str:
    """The name of a DiagnosticStatus level (bytes or int)."""
    raw = level[0] if isinstance(level, (bytes, bytearray)) else int(level)
    for name, value in LEVELS.items():
        value = value[0] if isinstance(value, (bytes, bytearray)) else int(value)
        if value == raw:
            return name
    return str(raw)


def status_values(status: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


# -- episode results --------------------------------------------------------------------------
def json_to_msg(data: Mapping[str, Any]) -> String:
    """A JSON object as std_msgs/String (episode results)."""
    return String(data=json.dumps(data, separators=(',', ':')))


def msg_to_json(msg: String) -> dict[str, Any]:
    try:
        out = json.loads(msg.data)
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f'not JSON: {exc}') from None
    if not isinstance(out, dict):
        raise InvalidMessage('expected a JSON object')
    return out


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 99)) -> list[float]:
    """Percentiles of `values` (zeros when empty)."""
    if len(values) == 0:
        return [0.0 for _ in qs]
    return [float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), qs)]
