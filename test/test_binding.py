"""Bindings: validation with file/field errors, feature extraction from rclpy messages and
rosbags dataclasses alike, action sinks, episode markers, and the shipped task bindings
reproducing the simulator's observation exactly."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from bagkit import KINDS, Rclpy

from vdd_ros.binding import (Binding, BindingMismatch, Derived, Source, binding_for_task,
                             bindings_dir, labelled_binding, load_binding, marker_json,
                             normalise_type, parse_marker, trajectory_times)
from vdd_ros.errors import ConfigError
from vdd_ros.sim.tasks import TASKS

ARM = [f'j{i}' for i in range(1, 8)]


def _binding(observation, action=None, **top):
    action = action or [{'topic': '/cmd', 'type': 'std_msgs/Float64MultiArray',
                         'slice': [0, 2]}]
    return Binding.from_dict({'observation': observation, 'action': action, **top}, 'arm.yaml')


JS = {'feature': 'q', 'topic': '/joint_states', 'type': 'sensor_msgs/JointState',
      'field': 'position', 'joints': ['j3', 'j1']}
POSE = {'feature': 'eef', 'topic': '/eef_pose', 'type': 'geometry_msgs/PoseStamped',
        'field': 'position', 'frame_id': 'base'}


# -- validation -------------------------------------------------------------------------------
def test_types_are_normalised_to_the_rosbags_form():
    assert normalise_type('sensor_msgs/JointState') == 'sensor_msgs/msg/JointState'
    assert normalise_type('sensor_msgs/msg/JointState') == 'sensor_msgs/msg/JointState'
    with pytest.raises(ValueError):
        normalise_type('JointState')


@pytest.mark.parametrize('patch, expect', [
    ({'observation': [dict(JS, joints=[])]}, r'arm\.yaml: observation\[0\]\.joints: expected'),
    ({'observation': [dict(JS, joints=['j1', 'j1'])]}, (r"observation\[0\]\.joints: 'j1' is "
                                                       'listed twice')),
    ({'observation': [dict(JS, field='torque')]}, r"observation\[0\]\.field: must be one of"),
    ({'observation': [dict(JS, type='sensor_msgs/Imu')]}, (r'observation\[0\]\.type: '
                                                          'sensor_msgs/Imu is not supported')),
    ({'observation': [dict(JS, colour=1)]}, r'observation\[0\]\.colour: unknown key'),
    ({'observation': [dict(JS, max_age_s=0)]}, (r'observation\[0\]\.max_age_s: expected a '
                                               'positive')),
    ({'observation': [dict(JS, topic='bad topic')]}, r'observation\[0\]\.topic: .* not a valid'),
    ({'observation': [JS, dict(POSE, feature='q')]}, (r"observation\[1\]\.feature: 'q' is "
                                                     'defined twice')),
    ({'observation': [JS, dict(POSE, topic='/joint_states')]}, (r'observation\[1\]\.type: '
                                                               '/joint_states is')),
    ({'observation': [{'feature': 'a', 'topic': '/a', 'type': 'std_msgs/Float64MultiArray',
                       'slice': [3, 1]}]}, r'observation\[0\]\.slice: expected \[start, stop\]'),
    ({'observation': [{'feature': 'a', 'topic': '/a', 'type': 'std_msgs/Float64MultiArray',
                       'slice': [0, 2], 'stamp': 'header'}]}, (r'observation\[0\]\.stamp: .*no '
                                                              'header')),
    ({'observation': [JS, {'feature': 'd', 'difference': ['q', 'x']}]},
     r"observation\[1\]\.difference: 'x' is not an earlier feature"),
    ({'observation': [JS, POSE, {'feature': 'd', 'difference': ['q', 'eef']}]},
     r"observation\[2\]\.difference: 'q' has 2 values, 'eef' 3"),
    ({'action': [{'topic': '/c', 'type': 'std_msgs/Float64MultiArray', 'slice': [0, 2]},
                 {'topic': '/g', 'type': 'std_msgs/Float64MultiArray', 'slice': [1, 3]}]},
     r'action: the slices must tile \[0, 3\) once; action value 1 is sent 2 times'),
    ({'action': [{'topic': '/c', 'type': 'std_msgs/Float64MultiArray', 'slice': [1, 2]}]},
     r'action value 0 is sent 0 times'),
    ({'action': [{'topic': '/c', 'type': 'geometry_msgs/TwistStamped', 'slice': [0, 3]}]},
     r'action\[0\]\.slice: TwistStamped takes 6 values'),
    ({'action': [{'topic': '/c', 'type': 'trajectory_msgs/JointTrajectory', 'slice': [0, 2],
                  'joints': ['a']}]}, r'action\[0\]\.joints: 1 joints for a slice of 2'),
    ({'action': [{'topic': '/joint_states', 'type': 'std_msgs/Float64MultiArray',
                  'slice': [0, 2]}]}, (r'action\[0\]\.topic: /joint_states is also an '
                                      'observation topic')),
    ({'clock': 'gps'}, r"arm\.yaml: clock: must be one of \['system', 'sim'\]"),
    ({'speed': 1}, r'arm\.yaml: speed: unknown key'),
])
def test_bad_bindings_name_the_file_and_the_field(tmp_path, patch, expect):
    data = {'observation': [JS, POSE],
            'action': [{'topic': '/cmd', 'type': 'std_msgs/Float64MultiArray',
                        'slice': [0, 2]}]}
    data.update(patch)
    path = tmp_path / 'arm.yaml'
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=expect):
        load_binding(path)


def test_missing_binding_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match='nope.yaml: config file not found'):
        load_binding(tmp_path / 'nope.yaml')


@pytest.mark.parametrize('path', sorted((Path(__file__).parents[1] / 'config' / 'bindings')
                                        .glob('*.yaml')), ids=lambda p: p.stem)
def test_shipped_bindings_load_and_round_trip_through_dict_and_json(path):
    b = load_binding(path)
    assert Binding.from_dict(b.to_dict(), 'copy') == b
    assert Binding.from_json(json.loads(json.dumps(b.to_json()))) == b
    assert b.obs_dim == sum(n for _, n in b.obs_fields) and b.action_dim >= 1


def test_example_arm_binding_describes_a_seven_joint_arm_with_a_gripper():
    b = load_binding(bindings_dir() / 'example_panda_arm.yaml')
    joints = b.sources_of('/joint_states')
    assert [s.feature for s in joints] == ['joint_pos', 'joint_vel', 'gripper_pos']
    assert len(joints[0].joints) == 7 and joints[1].field == 'velocity'
    assert b.sources_of('/eef_pose')[0].frame_id == 'panda_link0'
    assert b.action_dim == 8
    assert [s.slice for s in b.action] == [(0, 7), (7, 8)]


# -- extraction -------------------------------------------------------------------------------
@pytest.mark.parametrize('kind', KINDS, ids=lambda k: k.name)
def test_joint_state_features_are_matched_by_name_in_the_bindings_order(kind):
    b = _binding([JS, dict(JS, feature='qd', field='velocity', joints=['j2'])])
    msg = kind.joint_state(['j1', 'j2', 'j3'], position=[1.0, 2.0, 3.0],
                           velocity=[10.0, 20.0, 30.0], stamp_ns=1_500_000_000)
    got = b.read('/joint_states', msg)
    assert got['q'].tolist() == [3.0, 1.0] and got['qd'].tolist() == [20.0]
    assert b.sources[0].stamp(msg) == 1.5
    # another order of names on the wire, same values by name
    msg2 = kind.joint_state(['j3', 'j2', 'j1'], position=[3.0, 2.0, 1.0],
                            velocity=[30.0, 20.0, 10.0])
    assert b.read('/joint_states', msg2)['q'].tolist() == [3.0, 1.0]


@pytest.mark.parametrize('kind', KINDS, ids=lambda k: k.name)
def test_joint_state_errors_name_the_joint_and_the_topic(kind):
    b = _binding([JS])
    with pytest.raises(BindingMismatch, match=r"/joint_states: no joint 'j3' \(the message "
                                              r'names: j1, j2\)'):
        b.read('/joint_states', kind.joint_state(['j1', 'j2'], position=[0.0, 0.0]))
    with pytest.raises(BindingMismatch, match='/joint_states: non-finite q'):
        b.read('/joint_states', kind.joint_state(['j1', 'j3'], position=[0.0, float('nan')]))
    vel = _binding([dict(JS, field='velocity')])
    with pytest.raises(BindingMismatch, match='0 velocity values for 2 joint names'):
        vel.read('/joint_states', kind.joint_state(['j1', 'j3'], position=[0.0, 0.0]))


@pytest.mark.parametrize('kind', KINDS, ids=lambda k: k.name)
def test_pose_fields_and_frame_check(kind):
    b = _binding([POSE, dict(POSE, feature='q', field='orientation'),
                  dict(POSE, feature='p', field='pose')])
    msg = kind.pose([1, 2, 3], [0.0, 0.0, 0.6, 0.8], stamp_ns=2_000_000_001, frame_id='base')
    got = b.read('/eef_pose', msg)
    assert got['eef'].tolist() == [1, 2, 3] and got['q'].tolist() == [0, 0, 0.6, 0.8]
    assert got['p'].tolist() == [1, 2, 3, 0, 0, 0.6, 0.8]
    assert b.sources[0].stamp_ns(msg) == 2_000_000_001
    with pytest.raises(BindingMismatch, match="/eef_pose: frame_id 'world', the binding "
                                              "expects 'base'"):
        b.read('/eef_pose', kind.pose([1, 2, 3], frame_id='world'))
    with pytest.raises(BindingMismatch, match='non-finite'):
        b.read('/eef_pose', kind.pose([1, float('inf'), 3], frame_id='base'))


@pytest.mark.parametrize('kind', KINDS, ids=lambda k: k.name)
def test_array_slices_and_labelled_fields(kind):
    b = _binding([{'feature': 'a', 'topic': '/arr', 'type': 'std_msgs/Float64MultiArray',
                   'slice': [1, 3]}])
    assert b.sources[0].stamp(kind.array([0.0])) is None   # arrays: time of arrival
    assert b.read('/arr', kind.array([0.0, 1.0, 2.0, 3.0]))['a'].tolist() == [1.0, 2.0]
    with pytest.raises(BindingMismatch, match=r'/arr: 2 values, the binding reads \[1, 3\)'):
        b.read('/arr', kind.array([0.0, 1.0]))
    lab = labelled_binding([('x', 2), ('y', 1)], 3)
    msg = kind.array([1, 2, 3], f32=True, dims=[('x', 2, 2), ('@seq', 0, 9), ('y', 1, 1)])
    got = lab.read('observation', msg)
    assert got['x'].tolist() == [1, 2] and got['y'].tolist() == [3]
    with pytest.raises(BindingMismatch, match="observation: labelled array has no field 'y'"):
        lab.read('observation', kind.array([1, 2], f32=True, dims=[('x', 2, 2)]))


def test_labelled_binding_reads_todays_wire_format_exactly():
    from vdd_ros.ros.conversions import msg_to_array, observation_to_msg
    spec = TASKS['pick_either']
    obs = np.random.default_rng(0).normal(size=spec.obs_dim).astype(np.float32)
    msg = observation_to_msg(obs, spec.obs_fields, seq=3, episode=4, step=5)
    b = labelled_binding(spec.obs_fields, spec.action_dim)
    assert b.obs_fields == list(spec.obs_fields)
    flat = b.assemble(b.read('observation', msg))
    assert flat.dtype == np.float32 and np.array_equal(flat, msg_to_array(msg, spec.obs_fields))


def test_derived_difference_is_b_minus_a_and_assemble_keeps_the_order():
    b = _binding([POSE, dict(POSE, feature='cube', topic='/cube'),
                  {'feature': 'eef_to_cube', 'difference': ['eef', 'cube']}])
    assert isinstance(b.observation[2], Derived)
    assert b.obs_fields == [('eef', 3), ('cube', 3), ('eef_to_cube', 3)]
    obs = b.assemble({'eef': np.array([1.0, 2.0, 3.0]), 'cube': np.array([1.5, 2.0, 1.0])})
    assert obs.dtype == np.float32 and obs.tolist() == [1, 2, 3, 1.5, 2, 1, 0.5, 0, -2]
    with pytest.raises(BindingMismatch, match="no value yet for 'cube'"):
        b.assemble({'eef': np.zeros(3)})


@pytest.mark.parametrize('task', sorted(TASKS))
def test_task_binding_has_the_tasks_features_in_order(task):
    b = binding_for_task(task)
    assert b.obs_fields == list(TASKS[task].obs_fields)
    assert b.action_dim == TASKS[task].action_dim and b.rate_hz == TASKS[task].control_freq
    assert b.observation_topics()['/joint_states'] == 'sensor_msgs/msg/JointState'


@pytest.mark.parametrize('task', ['lift_carry', 'pick_either', 'carry_four'])
def test_task_binding_reproduces_the_simulators_observation_bitwise(task):
    """Standard messages built from the robosuite state (joints by their robosuite names)
    give exactly SimEnv's flat observation."""
    from vdd_ros.sim.env import SimEnv
    b = binding_for_task(task)
    with SimEnv(task, seed=3) as env:
        env.reset(3)
        model, data = env._env.sim.model, env._env.sim.data
        joints = [model.joint_id2name(i) for i in range(model.njnt)]
        rng = np.random.default_rng(0)
        for _ in range(3):
            env.step(rng.uniform(-1, 1, size=7))
            raw = env._raw
            qpos = [float(data.qpos[model.get_joint_qpos_addr(j)]) for j in joints
                    if not j.endswith('joint0')]
            msgs = {'/joint_states': Rclpy.joint_state(joints[:len(qpos)], position=qpos),
                    '/eef_pose': Rclpy.pose(raw['robot0_eef_pos'])}
            for name in env._cubes:
                msgs[f'/objects/{name}/pose'] = Rclpy.pose(env.cube_pos(name))
            for name, goal in env.goals.items():
                msgs[f'/goals/{name}/pose'] = Rclpy.pose(goal)
            latest = {}
            for topic in b.observation_topics():
                latest.update(b.read(topic, msgs[topic]))
            assert np.array_equal(b.assemble(latest), env.observation())


def _image(width=8, height=8, encoding='rgb8', step=None, data=None):
    step = width * 3 if step is None else step
    pixels = np.arange(height * step, dtype=np.uint8) if data is None else data
    return SimpleNamespace(header=SimpleNamespace(stamp=SimpleNamespace(sec=1, nanosec=0),
                                                  frame_id='cam'),
                           width=width, height=height, encoding=encoding, step=step,
                           is_bigendian=0, data=bytes(pixels))


CAMERA = {'feature': 'front_image', 'topic': '/cam/image_raw', 'type': 'sensor_msgs/Image',
          'width': 8, 'height': 8}


def test_an_image_source_reads_rgb8_pixels_row_major_skipping_row_padding():
    src = Source.from_dict(CAMERA, 'obs[0]')
    assert src.size == 192 and src.to_dict()['width'] == 8
    assert Source.from_dict(src.to_dict(), 'again') == src
    plain = src.extract(_image())
    assert plain.dtype == np.float32 and plain.tolist() == list(range(192))
    padded = src.extract(_image(step=26))          # 2 bytes of padding per row
    rows = np.arange(208).reshape(8, 26)[:, :24].reshape(-1)
    assert padded.tolist() == rows.tolist()


@pytest.mark.parametrize('msg, text', [
    (_image(encoding='bgr8'), "encoding 'bgr8', the binding expects rgb8"),
    (_image(encoding='mono8'), "encoding 'mono8', the binding expects rgb8"),
    (_image(width=5), 'a 5x8 image, the binding expects 8x8'),
    (_image(data=np.zeros(30, np.uint8)), 'truncated image: 30 bytes, 8 rows of step 24 '
                                          'need 192'),
    (_image(step=6), 'step 6 bytes is shorter than a row of 8 rgb8 pixels'),
])
def test_a_wrong_image_is_one_error_naming_the_topic(msg, text):
    with pytest.raises(BindingMismatch, match=re.escape(f'/cam/image_raw: {text}')):
        Source.from_dict(CAMERA, 'obs[0]').extract(msg)


@pytest.mark.parametrize('change, text', [
    ({'feature': 'front'}, 'a camera feature is named <camera>_image'),
    ({'width': 0}, 'width: expected a positive number'),
    ({'height': 2.5}, 'width and height are whole numbers'),
    ({'height': 6}, 'camera images are square, at least 8x8 (the image encoders read square '
                    'frames), got 8x6'),
    ({'width': 4, 'height': 4}, 'at least 8x8'),
    ({'joints': ['a']}, 'joints: not used by Image'),
])
def test_image_sources_are_validated(change, text):
    with pytest.raises(ConfigError, match=re.escape(text)):
        Source.from_dict({**CAMERA, **change}, 'observation[0]')


# -- action -----------------------------------------------------------------------------------
TWIST = {'topic': '/arm/twist_cmd', 'type': 'geometry_msgs/TwistStamped', 'slice': [0, 6],
         'frame_id': 'base'}
GRIP = {'topic': '/gripper/command', 'type': 'std_msgs/Float64MultiArray', 'slice': [6, 7]}


@pytest.mark.parametrize('kind', KINDS, ids=lambda k: k.name)
def test_twist_and_array_sinks_round_trip_an_action(kind):
    b = _binding([JS], [TWIST, GRIP])
    assert b.action_dim == 7
    action = np.arange(7, dtype=np.float32) / 10
    twist, grip = b.action
    assert twist.values(action).tolist() == pytest.approx(action[:6].tolist())
    assert grip.values(action).tolist() == pytest.approx([0.6])
    msg = kind.twist(twist.values(action), frame_id='base')
    assert np.allclose(twist.decode(msg), action[:6])
    assert np.allclose(grip.decode(kind.array(grip.values(action))), [0.6])
    with pytest.raises(BindingMismatch, match="/arm/twist_cmd: frame_id 'tool'"):
        twist.decode(kind.twist(np.zeros(6), frame_id='tool'))
    with pytest.raises(BindingMismatch, match='/gripper/command: 2 values, the binding '
                                              'expects 1'):
        grip.decode(kind.array([0.0, 1.0]))


def test_pose_sink_normalises_the_quaternion_or_fills_a_fixed_orientation():
    full = _binding([JS], [{'topic': '/target', 'type': 'geometry_msgs/PoseStamped',
                            'slice': [0, 7]}]).action[0]
    out = full.values([1, 2, 3, 0, 0, 0, 2])
    assert out.tolist() == [1, 2, 3, 0, 0, 0, 1]
    with pytest.raises(ValueError, match='quaternion has norm'):
        full.values(np.zeros(7))
    pos = _binding([JS], [{'topic': '/target', 'type': 'geometry_msgs/PoseStamped',
                           'slice': [0, 3], 'orientation': [1, 0, 0, 0]}]).action[0]
    assert pos.values([1, 2, 3]).tolist() == [1, 2, 3, 1, 0, 0, 0]
    assert np.allclose(pos.decode(Rclpy.pose([1, 2, 3], [1, 0, 0, 0])), [1, 2, 3])


@pytest.mark.parametrize('kind', KINDS, ids=lambda k: k.name)
def test_trajectory_sink_carries_the_chunk_and_decodes_its_first_point_by_name(kind):
    sink = _binding([JS], [{'topic': '/traj', 'type': 'trajectory_msgs/JointTrajectory',
                            'slice': [0, 2], 'joints': ['a', 'b']}]).action[0]
    chunk = np.arange(8, dtype=np.float32).reshape(4, 2)
    assert np.array_equal(sink.chunk_values(chunk), chunk.astype(np.float64))
    assert trajectory_times(3, 0.05) == [(0, 50_000_000), (0, 100_000_000),
                                         (0, 150_000_000)]
    # recorded with the joints in another order: values still go by name
    msg = kind.trajectory(['b', 'a'], [[1.0, 0.0], [3.0, 2.0]])
    assert sink.decode(msg).tolist() == [0.0, 1.0]
    with pytest.raises(BindingMismatch, match="/traj: no joint 'b'"):
        sink.decode(kind.trajectory(['a'], [[1.0]]))
    with pytest.raises(BindingMismatch, match='/traj: trajectory without points'):
        sink.decode(kind.trajectory(['a', 'b'], []))


def test_labelled_action_sink_decodes_todays_action_format():
    from vdd_ros.ros.conversions import action_to_msg
    sink = labelled_binding([('x', 1)], 7).action[0]
    action = np.linspace(-1, 1, 7).astype(np.float32)
    assert np.array_equal(sink.decode(action_to_msg(action, {'seq': 1})),
                          action.astype(np.float64))


# -- markers ----------------------------------------------------------------------------------
def test_markers_round_trip_and_reject_malformed_text():
    m = parse_marker(marker_json('end', episode=7, success=True, mode='left'))
    assert (m.event, m.episode, m.success, m.mode) == ('end', 7, True, 'left')
    assert parse_marker(marker_json('start', 3)).success is None
    for text in ('nope', '{"event": "pause"}', '{"event": "end", "episode": "7"}',
                 '{"event": "end", "success": 1}', '[1]'):
        with pytest.raises(BindingMismatch, match='episode marker'):
            parse_marker(text)
    with pytest.raises(ValueError):
        marker_json('pause')
