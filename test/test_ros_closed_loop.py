"""sim_node and policy_node in closed loop over DDS (separate processes, robosuite)."""
import json
import uuid

import numpy as np
import pytest

from vdd_ros.cli import main as cli_main
from vdd_ros.ros.evaluation import NodeProcess, evaluate_via_ros
from vdd_ros.ros.testing import domain_id
from vdd_ros.sim.rollout import evaluate, evaluation_seeds

KEYS = ('episodes', 'success_rate', 'mode_counts', 'mode_entropy', 'mean_length',
        'latency_ms_p50', 'latency_ms_p99', 'episodes_detail')


def _detail(metrics):
    return [(d['seed'], d['success'], d['mode'], d['length'])
            for d in metrics['episodes_detail']]


def test_lockstep_episodes_through_ros_succeed_and_match_the_in_process_runner(tmp_path):
    out = tmp_path / 'metrics.json'
    assert cli_main(['evaluate', '--policy', 'scripted', '--task', 'lift_carry',
                     '--episodes', '2', '--via-ros', '--control-rate-hz', '500', '--quiet',
                     '--domain-id', str(domain_id()), '--json', str(out)]) == 0
    via_ros = json.loads(out.read_text())
    assert via_ros['success_rate'] == 1.0
    for key in KEYS + ('obs_to_action_ms_p50', 'obs_to_action_ms_p99'):
        assert key in via_ros, key
    assert 0 < via_ros['obs_to_action_ms_p50'] <= via_ros['obs_to_action_ms_p99'] < 1000
    assert via_ros['via_ros'] and via_ros['clock_mode'] == 'lockstep'
    in_process = evaluate('scripted', 'lift_carry', 2, show_progress=False)
    assert _detail(via_ros) == _detail(in_process)
    assert [d['seed'] for d in via_ros['episodes_detail']] == evaluation_seeds(2)


def test_realtime_clock_steps_at_the_control_rate(tmp_path):
    """Both nodes at 40 Hz with the sim's clock in charge: one episode with the oracle."""
    ns = f'/t_{uuid.uuid4().hex[:8]}'
    results = tmp_path / 'results.json'
    policy = NodeProcess('policy_node', 'policy_node', {
        'checkpoint': 'scripted', 'task': 'lift_carry', 'control_rate_hz': 40.0}, tmp_path,
        domain_id(), ns)
    sim = NodeProcess('sim_node', 'sim_node', {
        'task': 'lift_carry', 'clock_mode': 'realtime', 'control_rate_hz': 40.0,
        'seeds': [evaluation_seeds(1)[0]], 'exit_when_done': True,
        'results_file': str(results)}, tmp_path, domain_id(), ns)
    try:
        code = sim.proc.wait(timeout=90)
    finally:
        sim.stop()
        assert policy.stop() == 0, policy.log_tail()
    assert code == 0, sim.log_tail()
    (record,) = json.loads(results.read_text())['episodes']
    assert record['success'], record
    # realtime: the clock waits for no one; the oracle's answers arrive within a period
    assert 0 < record['obs_to_action_ms_p50'] < 25.0 + 5.0
    assert len(record['obs_to_action_ms']) >= 0.8 * record['length']
    assert record['stale_steps'] <= record['length'] // 4
    assert 'Traceback' not in sim.log_file.read_text()


def test_lockstep_moe_episode_is_bitwise_the_in_process_one(tmp_path):
    """A sampling MoE through ROS ends in exactly the state the in-process runner reaches."""
    from vdd_ros.ros.testing import tiny_moe_checkpoint
    from vdd_ros.sim.env import SimEnv
    from vdd_ros.sim.rollout import build_policy, run_episode
    checkpoint = str(tiny_moe_checkpoint(tmp_path / 'moe', hidden_dim=64))
    seed = evaluation_seeds(1)[0]
    ns = f'/t_{uuid.uuid4().hex[:8]}'
    results = tmp_path / 'results.json'
    policy = NodeProcess('policy_node', 'policy_node', {
        'checkpoint': checkpoint, 'task': 'lift_carry', 'control_rate_hz': 500.0,
        'expert_mode': 'sample'}, tmp_path, domain_id(), ns)
    sim = NodeProcess('sim_node', 'sim_node', {
        'task': 'lift_carry', 'clock_mode': 'lockstep', 'seeds': [seed],
        'exit_when_done': True, 'results_file': str(results)}, tmp_path, domain_id(), ns)
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
    assert record['length'] == local['length']
    assert np.array_equal(np.asarray(record['final_obs'], dtype=np.float32), final)


def test_evaluate_via_ros_rejects_what_a_process_cannot_run():
    from vdd_ros.errors import UserError
    with pytest.raises(UserError, match='no such checkpoint'):
        evaluate_via_ros('/nonexistent/ckpt', 'lift_carry', 1, show_progress=False)
    with pytest.raises(UserError, match='expert_mode applies'):
        evaluate_via_ros('scripted', 'lift_carry', 1, expert_mode='argmax',
                         show_progress=False)
    assert cli_main(['evaluate', '--policy', 'scripted', '--task', 'lift_carry', '--via-ros',
                     '--workers', '2']) == 2
