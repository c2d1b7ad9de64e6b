"""`vdd-ros record`: live topics into a rosbag2 that bag2dataset converts back into exactly
what was published; atomic output (a killed recorder leaves no bag, SIGTERM commits one);
bad input; scripted demonstrations recorded through sim_node and policy_node."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from vdd_ros.bags import bag_topics, convert
from vdd_ros.binding import binding_for_task, marker_json
from vdd_ros.cli import main
from vdd_ros.core.data import load_dataset
from vdd_ros.ros.recorder import record, recorded_topics

NS = 1_000_000_000
PERIOD = 50_000_000
BINDING = binding_for_task('lift_carry')
ROOT = Path(__file__).resolve().parents[1]


class Robot(threading.Thread):
    """Publishes lockstep-like episodes on the binding's topics from its own ROS context:
    /clock, every source stamped t, the commands answering it (twist stamped t), markers."""

    def __init__(self, steps: int, episodes: int = 1, start_after_s: float = 0.3,
                 wrong_type: str | None = None) -> None:
        super().__init__(daemon=True)
        self.steps, self.episodes, self.start_after_s = steps, episodes, start_after_s
        self.wrong_type = wrong_type
        rng = np.random.default_rng(1)
        self.obs = rng.normal(size=(episodes, steps, BINDING.obs_dim))
        self.actions = rng.uniform(-1, 1, size=(episodes, steps, BINDING.action_dim))
        self.stop = threading.Event()

    def run(self) -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from rclpy.signals import SignalHandlerOptions
        from rosgraph_msgs.msg import Clock
        from std_msgs.msg import String

        from vdd_ros.ros.binding_io import (SinkWriter, message_class, source_messages,
                                            split_observation, to_time)
        context = Context()
        rclpy.init(context=context, signal_handler_options=SignalHandlerOptions.NO)
        node = rclpy.create_node('robot', context=context)
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        pubs = {t: node.create_publisher(message_class(k), t, qos_profile_sensor_data)
                for t, k in BINDING.observation_topics().items()}
        sinks = [(SinkWriter(s), node.create_publisher(message_class(s.type), s.topic, reliable))
                 for s in BINDING.action]
        clock = node.create_publisher(Clock, '/clock', reliable)
        markers = node.create_publisher(String, BINDING.episode_topic, reliable)
        wrong = node.create_publisher(String, self.wrong_type, 10) if self.wrong_type else None
        arm = {f'robot0_joint{i}': 0.0 for i in range(1, 8)}
        everyone = [*pubs.values(), *(p for _, p in sinks), clock, markers]
        deadline = time.monotonic() + 60
        while any(p.get_subscription_count() < 1 for p in everyone) and \
                time.monotonic() < deadline and not self.stop.is_set():
            time.sleep(0.05)             # until the recorder listens on every topic
        time.sleep(self.start_after_s)
        t = 0
        for e in range(self.episodes):
            t += PERIOD
            clock.publish(Clock(clock=to_time(t)))
            markers.publish(String(data=marker_json('start', 100 + e)))
            time.sleep(0.05)
            for k in range(self.steps):
                if k:
                    t += PERIOD
                    clock.publish(Clock(clock=to_time(t)))
                time.sleep(0.004)
                msgs = source_messages(BINDING, split_observation(BINDING, self.obs[e, k]), t,
                                       arm)
                for topic, msg in msgs.items():
                    pubs[topic].publish(msg)
                if wrong is not None:
                    wrong.publish(String(data='x'))
                time.sleep(0.004)
                for writer, pub in sinks:
                    pub.publish(writer.message(writer.values(self.actions[e, k], None), t,
                                               PERIOD / NS))
                time.sleep(0.004)
            t += PERIOD
            clock.publish(Clock(clock=to_time(t)))
            markers.publish(String(data=marker_json('end', 100 + e, success=True,
                                                    mode='left')))
        while not self.stop.wait(0.05):
            pass
        node.destroy_node()
        rclpy.shutdown(context=context)


@pytest.mark.parametrize('storage,compress', [('mcap', False), ('mcap', True), ('sqlite3', True)])
def test_a_recording_converts_back_into_what_was_published(tmp_path, storage, compress):
    robot = Robot(steps=12, episodes=2)
    robot.start()
    try:
        summary = record(BINDING, tmp_path / 'bag', storage, compress, episodes=2,
                         duration_s=60, show_progress=False)
    finally:
        robot.stop.set()
        robot.join(10)
    assert summary.episodes == 2 and summary.successes == 2
    assert 'end marker' in summary.stopped_by
    topics = bag_topics(tmp_path / 'bag')
    assert set(topics) == set(recorded_topics(BINDING))
    assert topics['/eef_pose'] == ('geometry_msgs/msg/PoseStamped', 24)
    assert topics['/arm/twist_cmd'][1] == topics['/gripper/command'][1] == 24
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')], 'temporary left'
    out = tmp_path / 'demos.hdf5'
    convert([tmp_path / 'bag'], BINDING, out, show_progress=False)
    data = load_dataset(out)
    assert len(data.demos) == 2
    for e, demo in enumerate(data.demos):
        want = np.stack([BINDING.assemble({k: v for k, v in _split(o).items()})
                         for o in robot.obs[e]])
        assert np.array_equal(demo.obs, want)
        assert np.array_equal(demo.actions, robot.actions[e].astype(demo.actions.dtype))
        assert demo.seed == 100 + e


def _split(obs):
    from vdd_ros.ros.binding_io import split_observation
    return split_observation(BINDING, obs)


def _recorder(out: Path, *extra: str) -> subprocess.Popen:
    binding = ROOT / 'config' / 'bindings' / 'lift_carry.yaml'
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, '-m', 'vdd_ros.cli', 'record', '--binding',
                             str(binding), '--out', str(out), '--quiet', *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_killed_recorder_leaves_no_bag_and_sigterm_commits_one(tmp_path):
    out = tmp_path / 'bag'
    killed = _recorder(out)
    _wait_for(lambda: any(p.name.startswith('.bag.rec-') for p in tmp_path.iterdir()))
    time.sleep(0.5)
    killed.kill()
    killed.wait()
    assert not out.exists()
    proc = _recorder(out)
    # the next recording removes what the killed one left, then records its own
    _wait_for(lambda: [p for p in tmp_path.iterdir() if p.name.startswith('.bag.rec-')] and
              not any(p.name.startswith(f'.bag.rec-{killed.pid}_') for p in tmp_path.iterdir()))
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, text
    assert 'stopped by SIGTERM' in text and f'-> {out}' in text
    meta = yaml.safe_load((out / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
    assert meta['storage_identifier'] == 'mcap'
    assert [p.name for p in tmp_path.iterdir()] == ['bag']


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / 'exists').mkdir()
    binding = str(ROOT / 'config' / 'bindings' / 'lift_carry.yaml')
    cases = [
        (['--binding', binding, '--out', str(tmp_path / 'exists')], 'exists already'),
        (['--binding', str(tmp_path / 'none.yaml'), '--out', str(tmp_path / 'b')],
         'none.yaml'),
        (['--out', str(tmp_path / 'b')], '--binding is required'),
        (['--demonstrate', 'nope', '--episodes', '1', '--out', str(tmp_path / 'b')],
         "unknown task 'nope'"),
        (['--demonstrate', 'lift_carry', '--out', str(tmp_path / 'b')], 'needs --episodes'),
        (['--binding', binding, '--out', str(tmp_path / 'b'), '--duration', '0'],
         '--duration must be positive'),
    ]
    for args, text in cases:
        assert main(['record', *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and text in err[0], (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['exists']


def test_a_topic_of_another_type_stops_the_recording(tmp_path):
    robot = Robot(steps=30, episodes=1, start_after_s=0.3, wrong_type='/eef_pose_x')
    robot.start()
    # /eef_pose is advertised as PoseStamped by the robot; here another binding says String
    data = BINDING.to_dict()
    data['observation'][0]['topic'] = '/eef_pose_x'
    from vdd_ros.binding import Binding
    from vdd_ros.errors import UserError
    wrong = Binding.from_dict(data)
    try:
        with pytest.raises(UserError, match='/eef_pose_x is published as std_msgs/msg/String'):
            record(wrong, tmp_path / 'bag', duration_s=20, show_progress=False)
    finally:
        robot.stop.set()
        robot.join(10)
    assert list(tmp_path.iterdir()) == []


def test_demonstrations_recorded_through_the_nodes_convert_into_the_native_episodes(tmp_path):
    """sim_node (lockstep) and the scripted policy_node over the task binding, recorded and
    converted: bitwise the observations and actions of the in-process scripted episode."""
    from vdd_ros.ros.recorder import record_demonstrations
    from vdd_ros.sim.demonstrators import make_oracle
    from vdd_ros.sim.env import SimEnv
    from vdd_ros.sim.rollout import run_episode
    from vdd_ros.ros.testing import domain_id
    summary, episodes = record_demonstrations('lift_carry', tmp_path / 'demo', [7],
                                              show_progress=False, domain_id=domain_id())
    assert summary.episodes == 1 and [e['seed'] for e in episodes] == [7]
    out = tmp_path / 'demo.hdf5'
    convert([tmp_path / 'demo'], BINDING, out, show_progress=False)
    (demo,) = load_dataset(out).demos
    with SimEnv('lift_carry') as env:
        native = run_episode(env, make_oracle('lift_carry', 'scripted'), 7, record=True)
    assert native['success'] and demo.seed == 7 and demo.mode == native['policy_mode']
    assert np.array_equal(demo.obs, native['obs'])
    assert np.array_equal(demo.actions, native['actions'])


def test_log_times_are_publish_times_in_order_whatever_the_arrival_order(tmp_path):
    """A message delivered late (a reliable sample repaired after a loss) is logged at its
    publish time, before the /clock that followed it, as bag2dataset's timing needs."""
    from rclpy.serialization import serialize_message
    from rosbags.highlevel import AnyReader
    from rosgraph_msgs.msg import Clock
    from std_msgs.msg import Float64MultiArray

    from vdd_ros.ros.binding_io import to_time
    from vdd_ros.ros.recorder import BagRecorder
    from vdd_ros.ros.testing import ros_context
    arrivals = [('/clock', 1_000), ('/clock', 3_000), ('/gripper/command', 2_000),
                ('/clock', 5_000), ('/gripper/command', 4_000)]     # (topic, publish time)
    with ros_context() as context:
        rec = BagRecorder(BINDING, tmp_path / 'bag', context=context)
        for i, (topic, sent) in enumerate(arrivals):
            msg = Clock(clock=to_time(sent)) if topic == '/clock' else \
                Float64MultiArray(data=[float(sent)])
            rec._on_message(topic, serialize_message(msg),
                            {'source_timestamp': sent, 'received_timestamp': 10_000 + i})
        rec.close(commit=True)
    with AnyReader([tmp_path / 'bag']) as reader:
        logged = [(c.topic, t) for c, t, _ in reader.messages()]
    assert logged == sorted(arrivals, key=lambda a: a[1])
    assert rec.summary.late == 0
