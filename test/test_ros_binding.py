"""policy_node through a binding: standard messages in and out (JointState, PoseStamped,
TwistStamped, Float64MultiArray, JointTrajectory), staleness, rejection, the last gate, the
binding-vs-checkpoint check, and a closed loop over DDS on /clock."""
import copy
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import yaml
from geometry_msgs.msg import Pose
from hypothesis import given, settings
from hypothesis import strategies as st
from rclpy.parameter import Parameter
from rclpy.serialization import serialize_message
from std_msgs.msg import String

from vdd_ros.binding import (
    Binding,
    BindingMismatch,
    binding_for_task,
    labelled_binding,
    marker_json,
)
from vdd_ros.core.checkpoint import load_policy
from vdd_ros.core.policy import Policy
from vdd_ros.errors import UserError
from vdd_ros.ros.binding_io import (
    SourceBook,
    TopicReader,
    check_against_policy,
    source_messages,
    split_observation,
)
from vdd_ros.ros.policy_node import PolicyNode
from vdd_ros.ros.runtime import make_executor
from vdd_ros.ros.testing import (
    BindingProbe,
    ros_context,
    spin_for,
    spin_until,
)

NS = 1_000_000_000
BINDING = binding_for_task('lift_carry')
ARM = {f'robot0_joint{i}': 0.1 * i for i in range(1, 8)}
OBS = np.random.default_rng(0).normal(size=(16, BINDING.obs_dim))


def messages(obs, stamp_ns, binding=BINDING):
    return source_messages(binding, split_observation(binding, obs), stamp_ns, ARM)


def values_of(binding, obs):
    """The flat observation the binding assembles from `obs`'s source features."""
    return binding.assemble({k: np.asarray(v) for k, v in
                             split_observation(binding, obs).items()})


# -- reading ----------------------------------------------------------------------------------
ARRAYS = Binding.from_dict({'observation': [
    {'feature': 'a', 'topic': '/lab', 'type': 'std_msgs/Float32MultiArray', 'label': 'a',
     'size': 2},
    {'feature': 'b', 'topic': '/lab', 'type': 'std_msgs/Float32MultiArray', 'label': 'b',
     'size': 3},
    {'feature': 'c', 'topic': '/f64', 'type': 'std_msgs/Float64MultiArray', 'slice': [1, 3]},
    {'feature': 'v', 'topic': '/joint_states', 'type': 'sensor_msgs/JointState',
     'field': 'velocity', 'joints': ['j2', 'j1']},
    {'feature': 'q', 'topic': '/pose', 'type': 'geometry_msgs/PoseStamped',
     'field': 'orientation', 'frame_id': 'base'}],
    'action': [{'topic': '/cmd', 'type': 'std_msgs/Float64MultiArray', 'slice': [0, 1]}]})


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=12, max_size=12),
       st.integers(0, 2 ** 31 - 1), st.booleans())
def test_the_fast_path_reads_exactly_what_the_binding_reads(numbers, sec, pose):
    binding = BINDING if pose else ARRAYS
    obs = np.resize(np.asarray(numbers), binding.obs_dim)
    for stamp in (sec * NS + 7, sec * NS + 9):
        msgs = messages(obs, stamp, binding)
        for topic, kind in binding.observation_topics().items():
            reader = TopicReader(binding, topic, kind, 65536)
            raw = serialize_message(msgs[topic])
            first = reader.read(raw)
            second = reader.read(raw)            # from its bytes now
            assert reader.fast == 1
            want = binding.read(topic, msgs[topic])
            for got in (first[1], second[1]):
                assert got.keys() == want.keys()
                for k in want:
                    assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k])
            if kind in ('sensor_msgs/msg/JointState', 'geometry_msgs/msg/PoseStamped'):
                assert first[0] == second[0] == stamp


def test_bad_messages_are_rejected_with_the_binding_error_after_the_layout_is_learnt():
    reader = TopicReader(BINDING, '/joint_states', 'sensor_msgs/msg/JointState', 4096)
    good = messages(OBS[0], NS)['/joint_states']
    reader.read(serialize_message(good))
    nan = messages(OBS[0], 2 * NS)['/joint_states']
    nan.position[nan.name.index('gripper0_right_finger_joint2')] = float('nan')
    with pytest.raises(BindingMismatch, match='/joint_states: non-finite'):
        reader.read(serialize_message(nan))     # same layout: the fast path defers
    missing = messages(OBS[0], 3 * NS)['/joint_states']
    keep = [i for i, n in enumerate(missing.name) if n != 'gripper0_right_finger_joint1']
    missing.name = [missing.name[i] for i in keep]
    missing.position = [missing.position[i] for i in keep]
    with pytest.raises(BindingMismatch, match="no joint 'gripper0_right_finger_joint1'"):
        reader.read(serialize_message(missing))
    pose = TopicReader(BINDING, '/eef_pose', 'geometry_msgs/msg/PoseStamped', 4096)
    wrong = messages(OBS[0], NS)['/eef_pose']
    wrong.header.frame_id = 'odom'
    with pytest.raises(BindingMismatch, match="/eef_pose: frame_id 'odom', the binding "
                       "expects 'world'"):
        pose.read(serialize_message(wrong))
    from vdd_ros.ros.conversions import InvalidMessage
    big = messages(OBS[0], NS)['/joint_states']
    big.name = [f'j{i}' for i in range(500)]
    big.position = [0.0] * 500
    with pytest.raises(InvalidMessage, match='bytes, more than the 4096 accepted'):
        reader.read(serialize_message(big))
    with pytest.raises(InvalidMessage, match='cannot decode'):
        reader.read(b'\x00\x01\x00\x00\xff\xff')


def test_a_joint_state_split_over_two_publishers_feeds_each_feature():
    b = Binding.from_dict({'observation': [
        {'feature': 'arm', 'topic': '/js', 'type': 'sensor_msgs/JointState',
         'joints': ['a1', 'a2']},
        {'feature': 'grip', 'topic': '/js', 'type': 'sensor_msgs/JointState',
         'joints': ['g1']}],
        'action': [{'topic': '/cmd', 'type': 'std_msgs/Float64MultiArray', 'slice': [0, 1]}]})
    from sensor_msgs.msg import JointState
    reader = TopicReader(b, '/js', 'sensor_msgs/msg/JointState', 4096)
    book = SourceBook(b)
    for k in range(3):
        arm = JointState(name=['a1', 'a2'], position=[1.0 + k, 2.0])
        arm.header.stamp.sec = 10 + k
        grip = JointState(name=['g1'], position=[0.5 + k])
        grip.header.stamp.sec = 10 + k
        for msg in (arm, grip):
            stamp, values = reader.read(serialize_message(msg))
            assert book.update('/js', stamp, values, True) == ''
        assert book.complete_stamp(0) == (10 + k) * NS
        assert book.observation().tolist() == [1.0 + k, 2.0, 0.5 + k]
    assert reader.fast == 4 and len(reader.layouts) == 2
    # a duplicate stamp and an older one are dropped
    stamp, values = reader.read(serialize_message(arm))
    assert book.update('/js', stamp, values, True) == 'duplicate'
    arm.header.stamp.sec = 5
    stamp, values = reader.read(serialize_message(arm))
    assert book.update('/js', stamp, values, True) == 'out of order'


def test_the_binding_must_match_the_checkpoint_and_names_the_first_difference():
    fields = BINDING.obs_fields
    check_against_policy(BINDING, fields, 7)
    swapped = [fields[2], fields[1], fields[0]] + fields[3:]
    with pytest.raises(UserError, match=r'observation feature 0 is robot0_eef_pos\[3\], the '
                       r'policy expects cube_pos\[3\]'):
        check_against_policy(BINDING, swapped, 7)
    with pytest.raises(UserError, match=r'feature 8 is nothing, the policy expects x\[1\]'):
        check_against_policy(BINDING, fields + [('x', 1)], 7)
    with pytest.raises(UserError, match='the action sinks take 7 values, the policy gives 6'):
        check_against_policy(BINDING, fields, 6)
    with pytest.raises(UserError, match=r"feature 1 is robot0_gripper_qpos\[2\], the policy "
                       r"expects robot0_gripper_qpos\[3\]"):
        check_against_policy(BINDING, [fields[0], ('robot0_gripper_qpos', 3)] + fields[2:], 7)


# -- the node, its callbacks called directly ------------------------------------------------
class Recorder:
    """Stands in for a publisher: keeps a copy of each message (rclpy's publish serializes
    at once, so the node refills one message object per sink)."""

    def __init__(self):
        self.msgs = []

    def publish(self, msg):
        self.msgs.append(copy.deepcopy(msg))


def bare(context, checkpoint, **params):
    """A binding policy node whose callbacks the test calls (nothing spins); its sink
    publishers record."""
    params.setdefault('checkpoint', checkpoint)
    params.setdefault('binding', 'task:lift_carry')
    node = PolicyNode(context=context, namespace=f'/t_{uuid.uuid4().hex[:8]}',
                      parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    node.sink_pubs = [Recorder() for _ in node.sink_pubs]
    return node


def deliver(node, msgs):
    for topic, msg in msgs.items():
        node._on_source(node.readers[topic], serialize_message(msg))


def published(node):
    """[(stamp_ns, action)] of what the node published on /arm/twist_cmd + /gripper/command."""
    twist, grip = (r.msgs for r in node.sink_pubs)
    assert len(twist) == len(grip)
    out = []
    for t, g in zip(twist, grip):
        assert t.header.frame_id == 'robot0_base'
        lin, ang = t.twist.linear, t.twist.angular
        out.append((t.header.stamp.sec * NS + t.header.stamp.nanosec,
                    np.array([lin.x, lin.y, lin.z, ang.x, ang.y, ang.z, *g.data])))
    return out


def test_complete_mode_answers_each_stamp_once_with_the_policys_action(context, checkpoint):
    node = bare(context, checkpoint, act_on='complete')
    reference = load_policy(checkpoint)
    try:
        node._on_marker(String(data=marker_json('start', 7)))
        reference.reset(7)
        t0 = node._now_ns()
        for k in range(4):
            stamp = t0 + k * 1_000_000
            msgs = messages(OBS[k], stamp)
            topics = list(msgs)
            deliver(node, {t: msgs[t] for t in topics[:-1]})
            assert len(published(node)) == k       # incomplete: nothing yet
            deliver(node, {topics[-1]: msgs[topics[-1]]})
            deliver(node, msgs)                      # the same stamp again: dropped
            want = reference.act(values_of(BINDING, OBS[k]))
            (got_stamp, got), = published(node)[k:]
            assert got_stamp == stamp
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        assert node.stats.computed == 4 and node.stats.resends == 4 * 5
        assert sum(r.fast for r in node.readers.values()) >= 3 * 5
        level, message, values = node.status()
        assert level == 'OK' and values['source /eef_pose'] == 'ok'
        assert 0 <= float(values['source /joint_states age_s']) < 5.0
    finally:
        node.destroy_node()


def test_tick_mode_answers_with_the_oldest_stamp_and_never_republishes(context, checkpoint):
    node = bare(context, checkpoint, act_on='tick', control_rate_hz=100.0)
    try:
        now = node._now_ns()
        msgs = messages(OBS[0], now)
        msgs['/goals/left/pose'] = messages(OBS[0], now - 50_000_000)['/goals/left/pose']
        node._on_binding_tick()
        assert published(node) == []                # nothing yet: nothing out
        deliver(node, msgs)
        node._on_binding_tick()
        node._on_binding_tick()                     # nothing new: nothing out
        (stamp, action), = published(node)
        assert stamp == now - 50_000_000 and node.stats.computed == 1
        assert np.all(np.isfinite(action)) and np.any(action[:6] != 0.0)
    finally:
        node.destroy_node()


def test_a_stale_source_is_answered_by_the_hold_with_a_warning_naming_it(context, checkpoint):
    node = bare(context, checkpoint, act_on='tick', control_rate_hz=100.0)
    try:
        now = node._now_ns()
        deliver(node, messages(OBS[0], now))
        node._on_binding_tick()
        gripper = published(node)[-1][1][6]
        time.sleep(0.25)              # the cube pose (max_age_s 0.2) goes stale
        msgs = messages(OBS[1], node._now_ns())
        deliver(node, {t: m for t, m in msgs.items() if t != '/objects/cube/pose'})
        node._on_binding_tick()
        stamp, hold = published(node)[-1]
        assert np.all(hold[:6] == 0.0) and hold[6] == gripper
        assert node.stats.holds == 1 and node.stats.computed == 1
        level, message, values = node.status()
        assert level == 'WARN' and '/objects/cube/pose stale' in message
        assert values['source /objects/cube/pose'].startswith('stale: age ')
        assert values['source /eef_pose'] == 'ok'
    finally:
        node.destroy_node()


@pytest.mark.parametrize('problem', ['nan', 'frame', 'joint'])
def test_an_invalid_source_is_rejected_and_held_until_it_is_valid_again(context, checkpoint,
                                                                        problem):
    node = bare(context, checkpoint, act_on='complete')
    try:
        t0 = node._now_ns()
        deliver(node, messages(OBS[0], t0))
        gripper = published(node)[-1][1][6]
        msgs = messages(OBS[1], t0 + 1000)
        js, pose = msgs['/joint_states'], msgs['/eef_pose']
        topic = '/eef_pose' if problem == 'frame' else '/joint_states'
        if problem == 'nan':
            js.position[js.name.index('gripper0_right_finger_joint1')] = float('nan')
            why = 'non-finite robot0_gripper_qpos'
        elif problem == 'frame':
            pose.header.frame_id = 'map'
            why = "frame_id 'map', the binding expects 'world'"
        else:
            i = js.name.index('gripper0_right_finger_joint2')
            js.name = js.name[:i] + js.name[i + 1:]
            js.position = js.position[:i] + js.position[i + 1:]
            why = "no joint 'gripper0_right_finger_joint2'"
        deliver(node, msgs)
        stamp, hold = published(node)[-1]
        assert stamp == t0 + 1000 and len(published(node)) == 2     # answered at once
        assert np.all(hold[:6] == 0.0) and hold[6] == gripper
        assert node.stats.rejected == 1 and why in node.book.errors[topic]
        level, message, values = node.status()
        assert level == 'WARN' and topic in message and why in message
        assert values['source ' + topic].startswith('invalid: ')
        deliver(node, messages(OBS[2], t0 + 2000))                   # valid again
        assert published(node)[-1][0] == t0 + 2000 and node.stats.computed == 2
        assert node.status()[2]['source ' + topic] == 'ok'
    finally:
        node.destroy_node()


@pytest.fixture(scope='module')
def fuzz_node(context, checkpoint):
    node = bare(context, checkpoint, act_on='complete')
    yield node
    node.destroy_node()


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_mangled_source_messages_never_put_a_non_finite_value_on_any_topic(fuzz_node, data):
    node = fuzz_node
    before = [len(r.msgs) for r in node.sink_pubs]
    stamp = node._now_ns() + data.draw(st.integers(0, 10 ** 6))
    raws = {t: bytearray(serialize_message(m)) for t, m in messages(OBS[4], stamp).items()}
    for _ in range(data.draw(st.integers(1, 6))):
        topic = data.draw(st.sampled_from(sorted(raws)))
        raw = raws[topic]
        # every byte but the header stamp (a stamp moved ahead would rightly make the
        # clean observation below out of order; see the test of future stamps)
        i = data.draw(st.integers(0, len(raw) - 1).filter(lambda i: not 4 <= i < 12))
        raw[i] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            raws[topic] = raw[:data.draw(st.integers(1, len(raw)))]
    for topic, raw in raws.items():
        node._on_source(node.readers[topic], bytes(raw))
    clean = node._now_ns() + 2 * 10 ** 6
    deliver(node, messages(OBS[5], clean))      # and the next valid observation is answered
    twist, grip = (r.msgs[n:] for r, n in zip(node.sink_pubs, before))
    assert len(twist) == len(grip) and twist
    for t, g in zip(twist, grip):
        lin, ang = t.twist.linear, t.twist.angular
        assert np.all(np.isfinite([lin.x, lin.y, lin.z, ang.x, ang.y, ang.z, *g.data]))
        assert len(g.data) == 1
    assert twist[-1].header.stamp.sec * NS + twist[-1].header.stamp.nanosec == clean
    assert np.any([twist[-1].twist.linear.x, g.data[0]])   # the policy's, not the hold



def test_a_message_stamped_ahead_of_the_node_clock_is_rejected(context, checkpoint):
    """Kept, a far-future stamp would make every later message out of order."""
    node = bare(context, checkpoint, act_on='complete')
    try:
        now = node._now_ns()
        msgs = messages(OBS[0], now)
        msgs['/eef_pose'] = messages(OBS[0], now + 5 * NS)['/eef_pose']
        deliver(node, msgs)
        assert node.stats.rejected == 1
        assert 'stamped 5 s ahead of the node clock' in node.book.errors['/eef_pose']
        (stamp, hold), = published(node)
        assert now <= stamp < now + NS and np.all(hold == 0.0)    # not the future stamp
        later = node._now_ns()
        deliver(node, messages(OBS[1], later))
        assert published(node)[-1][0] == later and node.stats.computed == 1
    finally:
        node.destroy_node()


def test_the_last_gate_covers_every_sink(context, checkpoint):
    node = bare(context, checkpoint, act_on='complete')
    try:
        t0 = node._now_ns()
        deliver(node, messages(OBS[0], t0))
        gripper = published(node)[-1][1][6]
        for k, bad in enumerate((np.full(7, np.nan), np.full(7, np.inf), np.zeros(3), None)):
            node._compute = lambda *a, bad=bad, **kw: (bad, 0.0)
            deliver(node, messages(OBS[1], t0 + k + 1))
            stamp, out = published(node)[-1]
            assert stamp == t0 + k + 1
            assert np.all(out[:6] == 0.0) and out[6] == np.float32(gripper)
        assert node.stats.unsafe == 4
        level, message, _ = node.status()
        assert level == 'ERROR' and 'unsafe action' in message
    finally:
        node.destroy_node()


@pytest.mark.parametrize('act_on', ['tick', 'complete'])
def test_the_watchdog_holds_at_each_tick_on_the_node_clock_and_recovers(context, checkpoint,
                                                                        act_on):
    node = bare(context, checkpoint, act_on=act_on, control_rate_hz=100.0,
                obs_timeout_s=0.05)
    try:
        node._last_valid_ns = node._now_ns() - NS
        for _ in range(3):
            node._on_binding_tick()
        assert node._tripped and len(published(node)) == 3
        assert all(np.all(a == 0.0) for _, a in published(node))
        level, message, _ = node.status()
        assert level == 'WARN' and 'no valid observation' in message
        assert '/eef_pose waiting' in message
        # valid observations come: the node acts again and the watchdog resets
        now = node._now_ns()
        deliver(node, messages(OBS[0], now))
        node._on_binding_tick()
        assert not node._tripped and node.stats.computed == 1
        assert published(node)[-1][0] == now and len(published(node)) == 4
        node._on_binding_tick()
        assert len(published(node)) == 4           # nothing new: nothing out
        assert node.status()[0] == 'OK'
    finally:
        node.destroy_node()


# -- JointTrajectory: the whole chunk ------------------------------------------------------
class Chunky(Policy):
    """Answers action k of a known chunk; `pending()` is the chunk's rest."""

    def __init__(self, spec, chunk):
        self.spec, self.chunk, self.info, self.k = spec, chunk, {}, 0

    def reset(self, seed=None):
        self.k = 0

    def act(self, obs):
        self.k += 1
        return self.chunk[self.k - 1].copy()

    def pending(self):
        return self.chunk[self.k:].copy()


def test_a_joint_trajectory_sink_carries_the_whole_chunk_at_the_control_period(
        context, checkpoint, tmp_path):
    data = BINDING.to_dict()
    joints = [f'robot0_joint{i}' for i in range(1, 7)]
    data['action'] = [
        {'topic': '/arm/trajectory', 'type': 'trajectory_msgs/JointTrajectory',
         'slice': [0, 6], 'joints': joints, 'frame_id': 'robot0_base'},
        {'topic': '/gripper/command', 'type': 'std_msgs/Float64MultiArray', 'slice': [6, 7]}]
    path = tmp_path / 'trajectory.yaml'
    path.write_text(yaml.safe_dump(data))
    node = bare(context, checkpoint, binding=str(path), act_on='complete',
                control_rate_hz=40.0)
    chunk = np.arange(4 * 7, dtype=np.float32).reshape(4, 7) / 100
    node.policy = Chunky(node.policy.spec, chunk)
    try:
        t0 = node._now_ns()
        deliver(node, messages(OBS[0], t0))
        deliver(node, messages(OBS[1], t0 + 1))
        traj, grip = (r.msgs for r in node.sink_pubs)
        assert len(traj) == len(grip) == 2
        first, second = traj
        assert first.joint_names == joints and first.header.frame_id == 'robot0_base'
        assert first.header.stamp.sec * NS + first.header.stamp.nanosec == t0
        points = np.array([p.positions for p in first.points])
        np.testing.assert_array_equal(points, chunk[:, :6].astype(np.float64))
        times = [(p.time_from_start.sec, p.time_from_start.nanosec) for p in first.points]
        assert times == [(0, 25_000_000), (0, 50_000_000), (0, 75_000_000), (0, 100_000_000)]
        assert len(second.points) == 3 and second.points[0].positions[0] == chunk[1, 0]
        assert grip[1].data.tolist() == [float(chunk[1, 6])]
        # a non-finite value anywhere in the chunk: the safe hold, one point, on every sink
        node.policy = Chunky(node.policy.spec, np.vstack([chunk[:1], np.full((2, 7), np.nan)]))
        deliver(node, messages(OBS[2], t0 + 2))
        assert len(traj[-1].points) == 1 and list(traj[-1].points[0].positions) == [0.0] * 6
        assert grip[-1].data.tolist() == [float(chunk[0, 6])]   # the last finite gripper
        assert node.stats.unsafe == 1
    finally:
        node.destroy_node()


# -- start-up checks ------------------------------------------------------------------------
def test_a_binding_that_differs_from_the_checkpoint_is_one_fatal_line_and_exit_2(checkpoint,
                                                                               tmp_path):
    data = BINDING.to_dict()
    data['observation'][0], data['observation'][2] = data['observation'][2], \
        data['observation'][0]
    path = tmp_path / 'swapped.yaml'
    path.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, '-m', 'vdd_ros.ros.policy_node', '--ros-args', '-p',
           f'checkpoint:={checkpoint}', '-p', f'binding:={path}']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    fatal = [line for line in out.splitlines() if 'FATAL' in line]
    assert len(fatal) == 1, out
    assert ('parameter binding: lift_carry: observation feature 0 is cube_pos[3], the policy '
            'expects robot0_eef_pos[3]') in fatal[0]
    assert 'Traceback' not in out


@pytest.mark.parametrize('params, problem', [
    ({'act_on': 'sometimes'}, "parameter act_on: must be one of ['tick', 'complete']"),
    ({'binding': '/no/such.yaml'}, 'parameter binding: /no/such.yaml: config file not found'),
    ({'binding': 'task:juggle'}, 'parameter binding: '),
])
def test_bad_binding_parameters_stop_the_node(context, checkpoint, params, problem):
    with pytest.raises(UserError) as err:
        bare(context, checkpoint, **params)
    assert str(err.value).startswith(problem), err.value


def test_the_labelled_binding_works_through_the_binding_path_too(context, checkpoint,
                                                                 tmp_path):
    """Today's wire format written as a binding file: arrival-timed labelled arrays."""
    fields = BINDING.obs_fields
    b = labelled_binding(fields, 7, obs_topic='obs_in', action_topic='act_out')
    path = tmp_path / 'labelled.yaml'
    path.write_text(yaml.safe_dump(b.to_dict()))
    node = bare(context, checkpoint, binding=str(path), act_on='complete')
    try:
        obs = values_of(BINDING, OBS[3])
        msgs = source_messages(b, split_observation(b, obs), 0)
        deliver(node, msgs)
        (out,) = node.sink_pubs[0].msgs
        assert [d.label for d in out.layout.dim] == ['action'] and len(out.data) == 7
        assert node.stats.computed == 1
    finally:
        node.destroy_node()


# -- over DDS ---------------------------------------------------------------------------------
@pytest.fixture
def rig(context, checkpoint):
    """make(**params) -> (node, probe, executor) in a fresh namespace."""
    made = []

    def make(**params):
        ns = f'/t_{uuid.uuid4().hex[:8]}'
        params.setdefault('checkpoint', checkpoint)
        params.setdefault('binding', 'task:lift_carry')
        node = PolicyNode(context=context, namespace=ns, parameter_overrides=[
            Parameter(k, value=v) for k, v in params.items()])
        probe = BindingProbe(context, node.binding, ns, extra_joints=ARM)
        executor = make_executor(context)
        executor.add_node(node)
        executor.add_node(probe.node)
        made.append((node, probe, executor))
        topics = [*node.binding.observation_topics(), node.binding.episode_topic]
        assert spin_until(executor, lambda: all(probe.node.count_subscribers(t) > 0
                                                for t in topics)
                          and all(node.count_subscribers(s.topic) > 0
                                  for s in node.binding.action), 10.0)
        return node, probe, executor

    yield make
    for node, probe, executor in made:
        executor.shutdown()
        node.destroy_node()
        probe.destroy()


def test_closed_loop_on_sim_time_through_joint_state_and_pose_stamped(rig, checkpoint):
    """Lockstep like sim_node: /clock, then every source at that stamp; the answers on
    /arm/twist_cmd + /gripper/command carry the stamp and equal policy.act on the same flat
    observation, episode after episode (the start marker reseeds)."""
    node, probe, executor = rig(act_on='complete', use_sim_time=True, control_rate_hz=50.0)
    reference = load_policy(checkpoint)
    period = 50_000_000
    t = 1000 * NS
    for episode in (11, 12):
        probe.marker('start', episode)
        reference.reset(episode)
        spin_for(executor, 0.1)
        for k in range(5):
            t += period
            probe.clock(t)
            spin_for(executor, 0.02)
            probe.send(OBS[k], t)
            assert spin_until(executor, lambda: probe.answered(t), 5.0), k
            (action,) = probe.answers(t)
            np.testing.assert_allclose(action, reference.act(values_of(BINDING, OBS[k])),
                                       rtol=1e-6, atol=1e-7)
        probe.marker('end', episode, success=False)
    assert node.stats.computed == 10 and node.stats.holds == 0
    # sim time stops: nothing goes stale, the watchdog stays quiet
    spin_for(executor, 0.6)
    assert not node._tripped
    level, message, values = node.status()
    assert values['source /eef_pose'] == 'ok' and float(values['source /eef_pose age_s']) == 0
    # /clock moves on by more than max_age_s: the sources are stale
    probe.clock(t + NS)
    spin_for(executor, 0.1)
    level, message, values = node.status()
    assert level == 'WARN' and values['source /eef_pose'].startswith('stale: age 1 s')
    # the simulation restarts: /clock goes back, every source is forgotten, and the earlier
    # stamps are answered again rather than dropped as out of order
    t = 10 * NS
    probe.clock(t)
    spin_for(executor, 0.1)
    assert node.book.latest == {}
    probe.send(OBS[0], t)
    assert spin_until(executor, lambda: probe.answered(t), 5.0)
    assert node.stats.out_of_order == 0 and node.stats.computed == 11


def test_a_source_published_with_another_type_is_an_error_naming_the_topic(rig):
    import rclpy
    node, probe, executor = rig(act_on='tick')
    with ros_context() as elsewhere:   # one participant cannot hold both types of a topic
        other = rclpy.create_node(f'other_{uuid.uuid4().hex[:6]}', context=elsewhere)
        other.create_publisher(Pose, '/eef_pose', 10)
        assert spin_until(executor, lambda: node.count_publishers('/eef_pose') > 1, 10.0)
        level, message, values = node.status()
        other.destroy_node()
    assert level == 'ERROR'
    assert message == ('/eef_pose: published as geometry_msgs/msg/Pose, the binding expects '
                       'geometry_msgs/msg/PoseStamped')
    assert values['source /joint_states'] == 'waiting: no message yet'


def test_the_latency_bench_runs_the_binding_path(checkpoint):
    """`python -m vdd_ros.ros.bench --binding task:lift_carry` in small: separate processes,
    every source topic per step, answers matched by stamp."""
    from vdd_ros.ros.bench import benchmark_latency
    from vdd_ros.ros.testing import domain_id
    result = benchmark_latency(checkpoint, 100.0, duration_s=1.5, domain_id=domain_id(),
                               binding='task:lift_carry', act_on='complete', raw_source=True)
    assert result['policy_exit_status'] == 0 and result['path'].startswith('binding')
    assert result['answered_fraction'] >= 0.5, result
    assert 0 < result['obs_to_action_ms_p50'] < 50.0, result


def test_an_out_of_distribution_observation_holds_every_sink(context, checkpoint, tmp_path):
    """on_out_of_distribution:=hold on the binding path: zero motion, the last gripper
    command, an ERROR level naming the signal; the policy acts again once back in range."""
    import shutil

    from vdd_ros.core.confidence import Calibration, ObservationDensity, save_confidence
    folder = tmp_path / 'moe'
    shutil.copytree(checkpoint, folder)
    data = np.random.default_rng(3).normal(size=(3000, BINDING.obs_dim))
    density = ObservationDensity.fit(data, components=1)
    top = float(density.score_batch(data).max())
    save_confidence(folder, density, Calibration('density', top, 2 * top, sustain=1))
    node = bare(context, str(folder), act_on='complete', on_out_of_distribution='hold')
    try:
        t0 = node._now_ns()
        for k, obs in enumerate([OBS[0], 30 * OBS[1], OBS[2]]):
            deliver(node, messages(obs, t0 + k * 1_000_000))
            if k == 1:
                level, message, values = node.status()
        (_, first), (_, held), (_, after) = published(node)
        assert np.all(held[:6] == 0.0) and held[6] == first[6]
        assert np.any(after[:6] != 0.0) and node.stats.ood_holds == 1
        assert level == 'ERROR' and '(holding)' in message
        assert values['confidence_level'] == 'ERROR' and values['ood_holds'] == 1
    finally:
        node.destroy_node()
