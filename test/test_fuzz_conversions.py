"""Property tests of the labelled-array conversions: any data, any layout, any labels, any bytes.

The only exception a conversion may raise on bad input is the documented InvalidMessage, and
an accepted array is always finite and equal to the data it came from. Each property counts
its generated cases (printed at the end of the module with `-s`).
"""
import array
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from rclpy.serialization import serialize_message
from std_msgs.msg import (Float32MultiArray, Float64MultiArray, MultiArrayDimension,
                          MultiArrayLayout)

from vdd_ros.ros.conversions import (MAX_LAYOUT_DIMS, UINT32_MAX, InvalidMessage, array_to_msg,
                                     decode_labelled_array, msg_fields, msg_meta, msg_to_array,
                                     msg_to_dict)

CASES: Counter = Counter()
SETTINGS = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

labels = st.one_of(st.sampled_from(['eef', 'cube', 'gripper', '@seq', '@episode', '@step',
                                    '@stage:teacher', '@', '']),
                   st.text(st.characters(blacklist_categories=('Cs',)), max_size=12))
uint32 = st.one_of(st.integers(0, 8), st.integers(0, UINT32_MAX))
dims = st.builds(lambda label, size, stride: MultiArrayDimension(label=label, size=size,
                                                                 stride=stride),
                 labels, uint32, uint32)
floats32 = arrays(np.float32, st.integers(0, 24),
                  elements=st.floats(width=32, allow_nan=True, allow_infinity=True))
fields = st.lists(st.tuples(labels, st.integers(0, 8)), max_size=6)


@st.composite
def labelled(draw, msg_type=Float32MultiArray):
    """A message with any data and a layout that is right, slightly wrong, or anything."""
    data = draw(floats32)
    msg = msg_type()
    kind = draw(st.sampled_from(['right', 'any']))
    if kind == 'right' and data.size:
        cut = sorted(draw(st.lists(st.integers(0, data.size), max_size=4)))
        sizes = np.diff([0, *cut, data.size])
        msg.layout.dim = [MultiArrayDimension(label=f'f{i}', size=int(n), stride=int(n))
                          for i, n in enumerate(sizes)]
    else:
        msg.layout.dim = draw(st.lists(dims, max_size=8))
    msg.layout.dim.extend(draw(st.lists(st.builds(
        lambda k, v: MultiArrayDimension(label='@' + k, size=0, stride=v),
        st.sampled_from(['seq', 'episode', 'step']), uint32), max_size=3)))
    code = 'f' if msg_type is Float32MultiArray else 'd'
    msg.data = array.array(code, data.astype(np.float32 if code == 'f' else np.float64).tobytes())
    return msg


@pytest.fixture(scope='module', autouse=True)
def report_counts():
    yield
    print('\ngenerated cases per property:', dict(CASES))


@SETTINGS
@given(msg=labelled(), expected=st.one_of(st.none(), fields),
       expected_dim=st.one_of(st.none(), st.integers(0, 30)), as_list=st.booleans())
def test_msg_to_array_raises_only_invalid_message_and_returns_only_finite_data(
        msg, expected, expected_dim, as_list):
    CASES['msg_to_array'] += 1
    data = np.frombuffer(msg.data, dtype=np.float32)
    if as_list:  # the form a message has when built from Python lists
        msg.data = data.tolist()
    try:
        out = msg_to_array(msg, expected, expected_dim)
    except InvalidMessage:
        return
    assert out.dtype == np.float32 and out.ndim == 1
    assert np.all(np.isfinite(out))
    assert np.array_equal(out, data)
    if expected_dim is not None:
        assert out.size == expected_dim
    if expected is not None and msg_fields(msg):
        assert msg_fields(msg) == [(str(k), int(n)) for k, n in expected]


@SETTINGS
@given(msg=labelled())
def test_metadata_is_always_unsigned_32_bit(msg):
    CASES['msg_meta'] += 1
    meta = msg_meta(msg)
    assert all(isinstance(v, int) and 0 <= v <= UINT32_MAX for v in meta.values())
    assert set(meta) == {d.label[1:] for d in msg.layout.dim if d.label.startswith('@')}


@SETTINGS
@given(msg=labelled(Float64MultiArray))
def test_msg_to_dict_raises_only_invalid_message(msg):
    CASES['msg_to_dict'] += 1
    try:
        out = msg_to_dict(msg)
    except InvalidMessage:
        return
    assert isinstance(out, dict)


@SETTINGS
@given(data=st.one_of(st.binary(max_size=200),
                      st.binary(min_size=8, max_size=64).map(lambda b: b'\x00\x01\x00\x00' + b)),
       max_bytes=st.integers(1, 300))
def test_decoding_any_bytes_gives_a_message_or_invalid_message(data, max_bytes):
    CASES['decode bytes'] += 1
    try:
        msg = decode_labelled_array(data, max_bytes)
    except InvalidMessage:
        return
    assert isinstance(msg, Float32MultiArray) and len(data) <= max_bytes
    assert len(msg.layout.dim) <= MAX_LAYOUT_DIMS


@SETTINGS
@given(msg=labelled(), extra=st.integers(0, 2 * MAX_LAYOUT_DIMS))
@example(msg=Float32MultiArray(layout=MultiArrayLayout(dim=[
    MultiArrayDimension(label='eef\x00x', size=0, stride=0)])), extra=0)
def test_serialized_arrays_decode_to_the_same_message_or_are_rejected_by_size(msg, extra):
    CASES['decode serialized'] += 1
    msg.layout.dim.extend(MultiArrayDimension(label='x', size=0, stride=0)
                          for _ in range(extra))
    blob = serialize_message(msg)
    try:
        back = decode_labelled_array(blob, 4096)
    except InvalidMessage:
        assert len(blob) > 4096 or len(msg.layout.dim) > MAX_LAYOUT_DIMS
        return
    # a ROS string ends at its first NUL (CDR strings are C strings): that is what travels
    sent = [MultiArrayDimension(label=d.label.split('\x00')[0], size=d.size, stride=d.stride)
            for d in msg.layout.dim]
    assert list(back.layout.dim) == sent and back.layout.data_offset == msg.layout.data_offset
    assert back.data.tobytes() == msg.data.tobytes()   # compared as bytes: NaN != NaN


@SETTINGS
@given(values=arrays(np.float32, st.integers(1, 24),
                     elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
       meta=st.dictionaries(st.sampled_from(['seq', 'episode', 'step']),
                            st.integers(0, UINT32_MAX)))
def test_finite_arrays_round_trip_through_bytes(values, meta):
    CASES['round trip'] += 1
    fields = [('a', 1), ('b', values.size - 1)]
    blob = serialize_message(array_to_msg(values, fields, meta))
    msg = decode_labelled_array(blob, 1 << 16)
    assert msg_meta(msg) == meta
    assert np.array_equal(msg_to_array(msg, fields), values)


def slow_read(raw, fields, dim):
    """The reference: rclpy's decoding and msg_to_array, as (values, meta) or the error."""
    try:
        msg = decode_labelled_array(raw, 1 << 16)
        return msg_to_array(msg, fields if msg.layout.dim else None, dim), msg_meta(msg)
    except InvalidMessage as exc:
        return exc


READER_FIELDS = [('eef', 3), ('cube', 2)]


@SETTINGS
@given(st.lists(st.tuples(arrays(np.float32, 5, elements=st.floats(
                              width=32, allow_nan=False, allow_infinity=False)),
                          st.fixed_dictionaries({}, optional={
                              'seq': uint32, 'episode': uint32, 'step': uint32})),
                min_size=1, max_size=4),
       st.lists(st.tuples(st.integers(0, 160), st.integers(0, 255)), max_size=6),
       st.booleans())
@example(values=[(np.zeros(5, np.float32), {})], flips=[(3, 1)], relabel=False)  # CDR options
def test_the_labelled_fast_reader_reads_exactly_what_the_full_path_reads(values, flips, relabel):
    """LabelledReader (policy_node's labelled path) against rclpy and msg_to_array: valid
    messages teach it layouts, then any of them with bytes changed anywhere (or a renamed
    field) gives the same values and metadata, or the same InvalidMessage."""
    from vdd_ros.ros.binding_io import LabelledReader
    reader = LabelledReader(READER_FIELDS, 5, 1 << 16)
    blobs = [serialize_message(array_to_msg(v, READER_FIELDS, meta)) for v, meta in values]
    for blob in blobs:                     # learnt from valid messages
        obs, meta = reader.read(blob)
        expected = slow_read(blob, READER_FIELDS, 5)
        assert np.array_equal(obs, expected[0]) and meta == expected[1]
    fast = reader.fast
    reader.read(blobs[0])                  # a learnt layout: read from its bytes
    assert reader.fast == fast + 1
    for i, (at, byte) in enumerate(flips):
        raw = bytearray(blobs[i % len(blobs)])
        if at < len(raw):
            raw[at] = byte
        if relabel:
            raw = bytearray(raw.replace(b'cube', b'cubE'))
        expected = slow_read(bytes(raw), READER_FIELDS, 5)
        try:
            got = reader.read(bytes(raw))
        except InvalidMessage as exc:
            CASES['fast reader: rejected'] += 1
            assert isinstance(expected, InvalidMessage) and str(exc) == str(expected)
            continue
        CASES['fast reader: read'] += 1
        assert not isinstance(expected, InvalidMessage), expected
        assert np.array_equal(got[0], expected[0]) and got[1] == expected[1]


@SETTINGS
@given(st.lists(st.tuples(arrays(np.float32, 7, elements=st.floats(width=32)),
                          st.fixed_dictionaries({}, optional={
                              'seq': uint32, 'episode': uint32, 'infer_us': uint32})),
                min_size=1, max_size=5))
def test_the_labelled_writer_serializes_what_action_to_msg_holds(actions):
    """LabelledWriter (policy_node's actions) against rclpy: the bytes decode to the same
    values (bit for bit, NaN included) and metadata as `action_to_msg`, whatever came before."""
    from vdd_ros.ros.binding_io import LabelledWriter
    from vdd_ros.ros.conversions import action_to_msg
    writer = LabelledWriter(7)
    for values, meta in actions:
        got = decode_labelled_array(writer.serialize(values, meta), 1 << 16)
        want = action_to_msg(values, meta)
        CASES['writer'] += 1
        assert np.asarray(got.data, np.float32).tobytes() == values.tobytes()
        assert [(d.label, d.size, d.stride) for d in got.layout.dim] == \
            [(d.label, d.size, d.stride) for d in want.layout.dim]


CAMERA_BINDING = {
    'name': 'camera', 'rate_hz': 20,
    'observation': [{'feature': 'front_image', 'topic': '/front/image_raw',
                     'type': 'sensor_msgs/Image', 'width': 8, 'height': 8}],
    'action': [{'topic': '/cmd', 'type': 'std_msgs/Float64MultiArray', 'slice': [0, 2]}]}


@SETTINGS
@given(width=st.one_of(st.just(8), st.integers(0, 10)),
       height=st.one_of(st.just(8), st.integers(0, 10)),
       step=st.one_of(st.integers(24, 30), st.integers(0, 40)),
       encoding=st.one_of(st.just('rgb8'),
                          st.sampled_from(['bgr8', 'mono8', 'rgba8', '16UC1', ''])),
       extra=st.one_of(st.integers(0, 20), st.integers(-40, 20)), seed=st.integers(0, 2 ** 16))
@example(width=8, height=8, step=24, encoding='rgb8', extra=0, seed=0)
@example(width=8, height=8, step=26, encoding='rgb8', extra=0, seed=1)
@example(width=8, height=8, step=24, encoding='rgb8', extra=-1, seed=2)
def test_any_image_is_read_exactly_or_rejected_by_name(width, height, step, encoding, extra,
                                                      seed):
    """A camera source reads any sensor_msgs/Image (any size, row step, encoding, buffer
    length) into exactly its rgb8 pixels, or rejects it with one error naming the topic."""
    from sensor_msgs.msg import Image

    from vdd_ros.binding import Binding, BindingMismatch
    from vdd_ros.ros.binding_io import TopicReader
    CASES['image'] += 1
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, max(step * height + extra, 0), dtype=np.uint8)
    msg = Image(width=width, height=height, step=step, encoding=encoding, data=data.tobytes())
    binding = Binding.from_dict(CAMERA_BINDING, 'camera.yaml')
    reader = TopicReader(binding, '/front/image_raw', 'sensor_msgs/msg/Image', 1 << 20)
    try:
        _, values = reader.read(serialize_message(msg))
    except (InvalidMessage, BindingMismatch) as exc:
        assert '/front/image_raw' in str(exc)
        return
    CASES['image accepted'] += 1
    pixels = data[:step * height].reshape(height, step)[:, :width * 3].reshape(-1)
    assert (width, height, encoding) == (8, 8, 'rgb8') and step >= 24
    assert values['front_image'].dtype == np.float32
    assert np.array_equal(values['front_image'], pixels.astype(np.float32))
