"""Message <-> numpy conversions: pure functions, real message types, no node."""
import math

import numpy as np
import pytest
from std_msgs.msg import Float32MultiArray

from vdd_ros.ros.conversions import (InvalidMessage, action_to_msg, array_to_msg,
                                     diagnostic_status, level_name, msg_fields, msg_meta,
                                     msg_to_array, msg_to_dict, msg_to_json, json_to_msg,
                                     observation_to_msg, percentiles, progress_to_msg,
                                     status_values)
from vdd_ros.sim.tasks import get_task

FIELDS = [('eef', 3), ('gripper', 2), ('cube', 3)]


def test_observation_round_trip_keeps_values_fields_and_metadata():
    obs = np.random.default_rng(0).normal(size=8).astype(np.float32)
    msg = observation_to_msg(obs, FIELDS, seq=41, episode=1_000_003, step=7)
    assert isinstance(msg, Float32MultiArray)
    assert msg_fields(msg) == FIELDS
    assert msg_meta(msg) == {'seq': 41, 'episode': 1_000_003, 'step': 7}
    assert [d.label for d in msg.layout.dim] == ['eef', 'gripper', 'cube', '@seq', '@episode',
                                                 '@step']
    back = msg_to_array(msg, FIELDS)
    assert back.dtype == np.float32 and np.array_equal(back, obs)


def test_task_observation_is_labelled_by_every_field():
    spec = get_task('lift_carry')
    msg = observation_to_msg(np.zeros(spec.obs_dim), spec.obs_fields, 1, 2, 0)
    assert msg_fields(msg) == list(spec.obs_fields)
    assert sum(d.size for d in msg.layout.dim) == spec.obs_dim == len(msg.data)


@pytest.mark.parametrize('values, expect', [
    ([0.0] * 7 + [float('nan')], 'non-finite'),
    ([0.0] * 7 + [float('inf')], 'non-finite'),
])
def test_non_finite_values_are_rejected(values, expect):
    msg = array_to_msg(np.asarray(values), FIELDS)
    with pytest.raises(InvalidMessage, match=expect):
        msg_to_array(msg, FIELDS)


def test_wrong_length_and_wrong_fields_are_rejected():
    short = Float32MultiArray(data=[0.0] * 5)
    with pytest.raises(InvalidMessage, match='5 values, expected 8'):
        msg_to_array(short, FIELDS)
    renamed = array_to_msg(np.zeros(8), [('eef', 3), ('gripper', 2), ('other', 3)])
    with pytest.raises(InvalidMessage, match='differ'):
        msg_to_array(renamed, FIELDS)
    lying = array_to_msg(np.zeros(8), FIELDS)
    lying.data = [0.0] * 9
    with pytest.raises(InvalidMessage, match='layout names 8 values'):
        msg_to_array(lying)


def test_unlabelled_array_of_the_right_length_is_accepted():
    msg = Float32MultiArray(data=[1.0] * 8)
    assert msg_to_array(msg, FIELDS).tolist() == [1.0] * 8
    assert msg_meta(msg) == {} and msg_fields(msg) == []


def test_action_echoes_metadata_and_rejects_out_of_range_metadata():
    msg = action_to_msg(np.arange(7), {'seq': 3, 'episode': 9, 'infer_us': 120})
    assert msg_fields(msg) == [('action', 7)]
    assert msg_meta(msg) == {'seq': 3, 'episode': 9, 'infer_us': 120}
    assert msg_to_array(msg, expected_dim=7).tolist() == list(range(7))
    with pytest.raises(ValueError, match='32 unsigned bits'):
        action_to_msg(np.zeros(7), {'seq': 2 ** 32})
    with pytest.raises(ValueError, match='fields describe'):
        array_to_msg(np.zeros(3), FIELDS)


def test_progress_message_round_trip():
    msg = progress_to_msg('vdd', 10, 200, 0.25, 3.0, math.inf, {'lr': 1e-4})
    out = msg_to_dict(msg)
    assert out == {'iteration': 10.0, 'total': 200.0, 'loss': 0.25, 'elapsed_s': 3.0,
                   'eta_s': math.inf, 'lr': 1e-4, 'stage': 'vdd'}


def test_diagnostic_status_levels_and_values():
    status = diagnostic_status('policy_node', 'WARN', 'holding',
                               {'p50': 0.123456, 'ok': True, 'n': 3, 'eta': math.inf})
    assert level_name(status.level) == 'WARN'
    assert status_values(status) == {'p50': '0.1235', 'ok': 'true', 'n': '3', 'eta': 'inf'}
    with pytest.raises(ValueError):
        diagnostic_status('x', 'LOUD', '', {})


def test_json_messages_and_percentiles():
    assert msg_to_json(json_to_msg({'seed': 1, 'success': True})) == {'seed': 1,
                                                                      'success': True}
    with pytest.raises(InvalidMessage):
        msg_to_json(json_to_msg([1, 2]))  # type: ignore[arg-type]
    assert percentiles([]) == [0.0, 0.0]
    assert percentiles([1.0, 2.0, 3.0], (50,)) == [2.0]
