"""Property tests of policy_node: whatever arrives, whatever is set, only safe actions leave it.

The node runs in a private context; generated serialized observations go straight into its
subscription callback, the control tick is called directly, and every message it publishes on
`action` is recorded and checked: `action_dim` values, all finite. Generated `hold_action`
values at start and parameter sets at runtime are checked the same way. Each property counts
its generated cases and the module counts published and non-finite actions (printed at the end
with `-s`; the non-finite count must stay 0).
"""
import math
import uuid
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from rclpy.parameter import Parameter
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import Float32MultiArray, MultiArrayDimension

from vdd_ros.errors import UserError
from vdd_ros.ros.conversions import MAX_LAYOUT_DIMS, array_to_msg
from vdd_ros.ros.policy_node import PolicyNode
from vdd_ros.ros.testing import ros_context
from vdd_ros.sim.tasks import get_task

SPEC = get_task('lift_carry')
FIELDS = list(SPEC.obs_fields)
RATE = 500.0
CASES: Counter = Counter()
ACTIONS: Counter = Counter()   # published / non_finite / wrong_length
SETTINGS = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])


class Recorder:
    """Stands in for the action publisher: keeps what the node publishes."""

    def __init__(self) -> None:
        self.msgs: list[Float32MultiArray] = []

    def publish(self, msg: Float32MultiArray | bytes) -> None:
        self.msgs.append(deserialize_message(msg, Float32MultiArray)
                         if isinstance(msg, bytes) else msg)


def published(node: PolicyNode) -> list[np.ndarray]:
    """The actions published since the last call, counted and checked."""
    out = []
    for msg in node.action_pub.msgs:
        action = np.asarray(msg.data, dtype=np.float64)
        ACTIONS['published'] += 1
        ACTIONS['non_finite'] += int(not np.all(np.isfinite(action)))
        ACTIONS['wrong_length'] += int(action.size != SPEC.action_dim)
        assert action.size == SPEC.action_dim and np.all(np.isfinite(action)), action
        out.append(action)
    node.action_pub.msgs.clear()
    return out


def make_node(context, checkpoint, **params) -> PolicyNode:
    params.setdefault('checkpoint', checkpoint)
    params.setdefault('control_rate_hz', RATE)
    node = PolicyNode(context=context, namespace=f'/f_{uuid.uuid4().hex[:8]}',
                      parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    node.action_pub = Recorder()
    return node


@pytest.fixture(scope='module')
def context():
    with ros_context() as ctx:
        yield ctx
    print('\ngenerated cases per property:', dict(CASES))
    print('actions published:', dict(ACTIONS))
    assert ACTIONS['non_finite'] == 0 and ACTIONS['wrong_length'] == 0


@pytest.fixture(scope='module')
def node(context, checkpoint):
    node = make_node(context, checkpoint, obs_timeout_s=5.0)
    yield node
    s = node.stats
    print(f'\nshared node: {s.received} observations, {s.rejected} rejected, {s.resends} '
          f'resends dropped, {s.computed} actions computed, {s.holds} hold answers, '
          f'{s.errors} policy errors, {s.unsafe} replaced at the gate')
    node.destroy_node()


# -- generated observations -------------------------------------------------------------------
values = st.floats(width=32, allow_nan=True, allow_infinity=True)
finite_values = st.floats(-1e3, 1e3, width=32)
metadata = st.fixed_dictionaries({}, optional={'seq': st.integers(0, 3),
                                               'episode': st.integers(0, 2),
                                               'step': st.integers(0, 2 ** 32 - 1)})


@st.composite
def observation(draw) -> bytes:
    """A serialized observation: valid, subtly wrong, oversized, or any bytes."""
    kind = draw(st.sampled_from(['valid', 'valid', 'values', 'fields', 'length', 'unlabelled',
                                 'layout', 'dims', 'bytes']))
    meta = draw(metadata)
    if kind == 'bytes':
        return draw(st.binary(max_size=600))
    if kind == 'dims':
        msg = Float32MultiArray()
        msg.layout.dim = [MultiArrayDimension(label='x', size=1, stride=1)
                          for _ in range(draw(st.integers(MAX_LAYOUT_DIMS + 1, 400)))]
        msg.data = [0.0] * len(msg.layout.dim)
        return serialize_message(msg)
    n = SPEC.obs_dim
    if kind == 'length':
        n = draw(st.integers(0, 3 * SPEC.obs_dim).filter(lambda k: k != SPEC.obs_dim))
    obs = draw(arrays(np.float32, n, elements=values if kind == 'values' else finite_values))
    fields = FIELDS
    if kind == 'fields':
        fields = draw(st.permutations(FIELDS).filter(lambda f: f != FIELDS))
    if kind in ('length', 'unlabelled'):
        fields = None
    msg = array_to_msg(obs, fields, meta)
    if kind == 'layout':
        msg.layout.dim = draw(st.lists(st.builds(
            lambda label, size, stride: MultiArrayDimension(label=label, size=size,
                                                            stride=stride),
            st.text(max_size=8), st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 32 - 1)),
            max_size=12))
    return serialize_message(msg)


steps = st.lists(st.one_of(observation().map(lambda b: ('obs', b)),
                           st.integers(1, 3).map(lambda n: ('tick', n)),
                           st.just(('reset', None))), min_size=1, max_size=12)


@settings(max_examples=500, **SETTINGS)
@given(sequence=steps)
def test_any_observation_sequence_publishes_only_finite_actions_of_the_right_length(
        node, sequence):
    CASES['observations'] += 1
    for step, arg in sequence:
        if step == 'obs':
            node._on_observation(arg)
        elif step == 'tick':
            for _ in range(arg):
                node._on_tick()
        else:
            node._on_reset(None, type('R', (), {})())
        assert len(published(node)) == (arg if step == 'tick' else 0)


# -- hold_action at start ---------------------------------------------------------------------
holds = st.one_of(
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=SPEC.action_dim,
             max_size=SPEC.action_dim),
    st.lists(st.floats(-1e40, 1e40), min_size=SPEC.action_dim, max_size=SPEC.action_dim),
    st.lists(st.floats(-2.0, 2.0), max_size=2 * SPEC.action_dim),
    st.lists(st.integers(-3, 3), min_size=1, max_size=SPEC.action_dim))


def valid_hold(hold: list) -> bool:
    if len(hold) != SPEC.action_dim or not all(isinstance(v, float) for v in hold):
        return False
    with np.errstate(over='ignore'):
        return bool(np.all(np.isfinite(np.asarray(hold, dtype=np.float32))))


@settings(max_examples=120, **SETTINGS)
@given(hold=holds, bad=observation())
def test_hold_action_is_checked_at_start_and_published_exactly(context, checkpoint, hold, bad):
    CASES['hold_action at start'] += 1
    try:
        node = make_node(context, checkpoint, hold_action=hold)
    except UserError as exc:
        assert not valid_hold(hold), hold
        assert str(exc).startswith('parameter hold_action:')
        return
    try:
        assert valid_hold(hold) or hold == [], hold
        node._on_tick()                      # nothing received yet: the hold action
        node._on_observation(bad)
        node._on_tick()
        node._last_valid -= 10.0             # the watchdog trips: the hold action
        node._on_tick()
        first, *_, last = published(node)
        expected = np.asarray(hold, dtype=np.float32) if hold else np.zeros(SPEC.action_dim)
        assert np.array_equal(first, expected) and np.array_equal(last, expected)
    finally:
        node.destroy_node()


# -- parameter sets at runtime ----------------------------------------------------------------
any_value = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-2 ** 63, 2 ** 63 - 1),
    st.integers(-3, 5), st.booleans(),
    st.sampled_from(['', 'sample', 'argmax', 'per_episode', '0', '2', '3', '-1', ' 1 ', 'x']),
    st.text(max_size=6), st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=8))
names = st.sampled_from(['obs_timeout_s', 'expert_mode', 'model_diagnostics', 'hold_action',
                         'control_rate_hz', 'diagnostics_period_s', 'max_observation_bytes',
                         'seed'])
READ_ONLY = {'hold_action', 'control_rate_hz', 'diagnostics_period_s', 'max_observation_bytes',
             'seed'}


@settings(max_examples=500, **SETTINGS)
@given(sets=st.lists(st.tuples(names, any_value), min_size=1, max_size=4),
       obs=arrays(np.float32, SPEC.obs_dim, elements=finite_values))
@example(sets=[('expert_mode', '\u00b2')], obs=np.zeros(SPEC.obs_dim, np.float32))  # a digit
def test_runtime_parameter_sets_are_validated_and_actions_stay_safe(node, sets, obs):
    CASES['runtime parameter sets'] += 1
    for name, value in sets:
        before = node.get_parameter(name).value
        result = node.set_parameters([Parameter(name, value=value)])[0]
        if name in READ_ONLY:
            assert not result.successful
        if name == 'obs_timeout_s':
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) \
                and 2.0 / RATE <= value <= 3600.0
            assert result.successful == ok, (value, result.reason)
        if name == 'expert_mode' and result.successful and value == '':
            assert node.model.expert_mode == node._own_mode
        if not result.successful:
            assert result.reason
            assert node.get_parameter(name).value == before or (
                isinstance(before, float) and math.isnan(before))
        assert 2.0 / RATE <= node.obs_timeout <= 3600.0
        mode = node.model.expert_mode
        assert mode in ('sample', 'argmax', 'per_episode') or 0 <= mode < 3
    node._accepted = None
    node._on_observation(serialize_message(array_to_msg(obs, FIELDS, {'seq': 1})))
    node._on_tick()
    assert len(published(node)) == 1
