"""sim_node with a binding: the robosuite robot on standard topics (JointState, PoseStamped,
/clock, episode markers) that assemble exactly SimEnv's observation, stepped by the binding's
commands (TwistStamped + Float64MultiArray) in lockstep; bad bindings are one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message, serialize_message

from vdd_ros.binding import Binding, binding_for_task, parse_marker
from vdd_ros.errors import UserError
from vdd_ros.ros.binding_io import SinkWriter, message_class
from vdd_ros.ros.sim_binding import check_binding, state_messages
from vdd_ros.ros.testing import ros_context, spin_until
from vdd_ros.sim.env import SimEnv

PERIOD = 50_000_000


@pytest.mark.parametrize('task', ['lift_carry', 'pick_either', 'carry_four',
                                  'pick_either_image'])
def test_the_standard_messages_assemble_the_simulators_observation_bitwise(task):
    binding = binding_for_task(task)
    rng = np.random.default_rng(0)
    with SimEnv(task) as env:
        env.reset(11)
        state = env.robot_state()
        check_binding(binding, state, env.action_dim)
        assert state['joints'][-2:] == ['gripper0_right_finger_joint1',
                                        'gripper0_right_finger_joint2']
        for k in range(4):
            msgs = state_messages(env.robot_state(), k * PERIOD)
            latest = {}
            for topic, kind in binding.observation_topics().items():
                wire = deserialize_message(serialize_message(msgs[topic]), message_class(kind))
                assert wire.header.stamp.nanosec == k * PERIOD
                latest.update(binding.read(topic, wire))
            assert np.array_equal(binding.assemble(latest), env.observation())
            env.step(rng.uniform(-1, 1, size=env.action_dim))


def test_a_binding_the_simulator_cannot_feed_is_rejected_naming_what_is_missing():
    base = binding_for_task('lift_carry').to_dict()
    with SimEnv('lift_carry') as env:
        env.reset(0)
        state = env.robot_state()
        cases = [
            (('observation', 0, 'topic'), '/tool_pose', 'publishes no /tool_pose'),
            (('observation', 1, 'joints'), ['gripper0_right_finger_joint1', 'panda_finger'],
             "no joint 'panda_finger'"),
            (('observation', 0, 'frame_id'), 'base_link', "expects 'base_link'"),
            (('action', 1, 'slice'), [6, 8], 'the sinks take 8 action values'),
        ]
        for (section, i, key), value, text in cases:
            data = json.loads(json.dumps(base))
            data[section][i][key] = value
            with pytest.raises(UserError, match=text):
                check_binding(Binding.from_dict(data), state, env.action_dim)


def test_camera_sources_must_match_the_simulators_cameras():
    base = binding_for_task('pick_either_image').to_dict()
    with SimEnv('pick_either_image') as env:
        env.reset(0)
        state = env.robot_state()
        assert state['cameras']['agentview'].shape == (32, 32, 3)
        for change, text in [
                ({'width': 64, 'height': 64}, r'/cameras/agentview/image_raw carries 32x32 '
                                              r'images, the binding expects 64x64'),
                ({'frame_id': 'world'}, "published in frame 'agentview', the binding expects "
                                        "'world'"),
                ({'topic': '/cameras/front/image_raw'}, 'publishes no /cameras/front/image_raw')]:
            data = json.loads(json.dumps(base))
            data['observation'][2].update(change)
            with pytest.raises(UserError, match=text):
                check_binding(Binding.from_dict(data, 'b.yaml'), state, env.action_dim)


def test_lockstep_sim_node_publishes_the_observation_and_steps_on_the_commands():
    from rosgraph_msgs.msg import Clock
    from std_msgs.msg import String

    from vdd_ros.ros.runtime import make_executor
    from vdd_ros.ros.sim_node import SimNode
    binding = binding_for_task('lift_carry')
    seed = 21
    with ros_context() as context:
        sim = SimNode(context=context, parameter_overrides=[
            Parameter('task', value='lift_carry'), Parameter('clock_mode', value='lockstep'),
            Parameter('binding', value='task:lift_carry'), Parameter('seeds', value=[seed]),
            Parameter('lockstep_resend_s', value=60.0), Parameter('wait_for_subscribers',
                                                                  value=1),
            Parameter('marker_wait_s', value=0.5)])
        import rclpy
        node = rclpy.create_node('commander', context=context)
        seen = {'clock': [], 'markers': [], 'msgs': {}}
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        node.create_subscription(Clock, '/clock', lambda m: seen['clock'].append(
            m.clock.sec * 10**9 + m.clock.nanosec), reliable)
        node.create_subscription(String, binding.episode_topic, lambda m: seen['markers'].append(
            parse_marker(m.data)), reliable)
        for topic, kind in binding.observation_topics().items():
            node.create_subscription(message_class(kind), topic,
                                     lambda m, t=topic: seen['msgs'].setdefault(
                                         m.header.stamp.nanosec + m.header.stamp.sec * 10**9,
                                         {}).__setitem__(t, m), reliable)
        sinks = [(SinkWriter(s), node.create_publisher(message_class(s.type), s.topic, reliable))
                 for s in binding.action]
        executor = make_executor(context)
        executor.add_node(sim)
        executor.add_node(node)

        def observation(stamp):
            msgs = seen['msgs'].get(stamp, {})
            if len(msgs) < len(binding.observation_topics()):
                return None
            latest = {}
            for topic, msg in msgs.items():
                latest.update(binding.read(topic, msg))
            return binding.assemble(latest)
        try:
            t = PERIOD   # the first reset is the first tick
            assert spin_until(executor, lambda: observation(t) is not None, 30)
            assert seen['markers'][0].event == 'start' and seen['markers'][0].episode == seed
            assert seen['clock'][0] == t
            rng = np.random.default_rng(5)
            with SimEnv('lift_carry') as env:
                assert np.array_equal(observation(t), env.reset(seed))
                for _ in range(3):
                    action = rng.uniform(-1, 1, size=7)
                    # a command stamped for another observation does not step the simulation
                    twist, twist_pub = sinks[0]
                    twist_pub.publish(twist.message(twist.values(action, None), t - 1, 0.05))
                    spin_until(executor, lambda: False, 0.3)
                    assert observation(t + PERIOD) is None
                    for writer, pub in sinks:
                        pub.publish(writer.message(writer.values(action, None), t, 0.05))
                    t += PERIOD
                    assert spin_until(executor, lambda: observation(t) is not None, 10)
                    want, _, _ = env.step(action)
                    assert np.array_equal(observation(t), want)
                    assert seen['clock'][-1] == t
        finally:
            executor.shutdown()
            sim.shutdown()
            sim.destroy_node()
            node.destroy_node()


def test_a_bad_binding_parameter_is_one_fatal_line(tmp_path):
    bad = binding_for_task('lift_carry').to_dict()
    bad['observation'][1]['joints'] = ['gripper0_right_finger_joint1', 'finger_x']
    path = tmp_path / 'bad.yaml'
    path.write_text(json.dumps(bad))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, '-m', 'vdd_ros.ros.sim_node', '--ros-args', '-p',
                           'task:=lift_carry', '-p', f'binding:={path}'], capture_output=True,
                          text=True, timeout=60, env={**os.environ, 'PYTHONPATH': str(root)})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if 'FATAL' in line]
    assert len(lines) == 1 and "no joint 'finger_x'" in lines[0]
    assert 'Traceback' not in proc.stderr


def test_a_sampling_moe_through_standard_messages_is_bitwise_the_in_process_episode(tmp_path):
    """sim_node and policy_node over the task binding (act_on complete, sim time): the
    episode ends in exactly the state the in-process runner reaches with the same seed."""
    from vdd_ros.ros.evaluation import NodeProcess
    from vdd_ros.ros.testing import domain_id, tiny_moe_checkpoint
    from vdd_ros.sim.rollout import build_policy, evaluation_seeds, run_episode
    checkpoint = str(tiny_moe_checkpoint(tmp_path / 'moe', hidden_dim=64))
    seed = evaluation_seeds(1)[0]
    results = tmp_path / 'results.json'
    policy = NodeProcess('policy_node', 'policy_node', {
        'checkpoint': checkpoint, 'task': 'lift_carry', 'expert_mode': 'sample',
        'binding': 'task:lift_carry', 'act_on': 'complete', 'use_sim_time': True},
        tmp_path, domain_id())
    sim = NodeProcess('sim_node', 'sim_node', {
        'task': 'lift_carry', 'clock_mode': 'lockstep', 'seeds': [seed],
        'binding': 'task:lift_carry', 'wait_for_subscribers': 1, 'exit_when_done': True,
        'results_file': str(results)}, tmp_path, domain_id())
    try:
        code = sim.proc.wait(timeout=90)
    finally:
        sim.stop()
        policy.stop()
    assert code == 0, sim.log_tail()
    (record,) = json.loads(results.read_text())['episodes']
    with SimEnv('lift_carry') as env:
        local = run_episode(env, build_policy(checkpoint, 'lift_carry'), seed)
        final = env.observation()
    assert record['length'] == local['length'] == 90
    assert np.array_equal(np.asarray(record['final_obs'], dtype=np.float32), final)
    assert len(record['obs_to_action_ms']) == 90
