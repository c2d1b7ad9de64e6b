"""Training nodes with real rclpy: progress, ~/stop, checkpoints; the CLI runs the same jobs."""
import math
import uuid

import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.parameter import Parameter
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import Trigger

from vdd_ros.cli import main as cli_main
from vdd_ros.core.checkpoint import load_policy, read_meta
from vdd_ros.ros.conversions import level_name, msg_to_dict, status_values
from vdd_ros.ros.runtime import make_executor
from vdd_ros.ros.testing import (TINY_TRAINING, spin_for, spin_until,
                                 tiny_dataset)
from vdd_ros.ros.training_nodes import LATCHED, DistillationNode, TeacherTrainingNode


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp('data') / 'tiny.hdf5')


class Watcher:
    """Subscribes to one training node's progress, checkpoint and diagnostics."""

    def __init__(self, context, ns, node_name):
        self.node = rclpy.create_node(f'watch_{uuid.uuid4().hex[:6]}', namespace=ns,
                                      context=context)
        self.progress, self.checkpoints, self.status = [], [], []
        full = f'{ns}/{node_name}'
        self.node.create_subscription(Float64MultiArray, f'{full}/progress',
                                      lambda m: self.progress.append(msg_to_dict(m)), 10)
        self.node.create_subscription(String, f'{full}/checkpoint',
                                      lambda m: self.checkpoints.append(m.data), LATCHED)
        self.node.create_subscription(
            DiagnosticArray, '/diagnostics',
            lambda m: self.status.extend((level_name(s.level), s.message, status_values(s))
                                         for s in m.status if s.name == full.lstrip('/')), 50)


def run_node(context, cls, params, ns, until_done=True, timeout=90.0):
    node = cls(context=context, namespace=ns, parameter_overrides=[
        Parameter(k, value=v) for k, v in params.items()])
    watcher = Watcher(context, ns, node.get_name())
    executor = make_executor(context)
    executor.add_node(node)
    executor.add_node(watcher.node)
    if until_done:
        assert spin_until(executor, node.finished.is_set, timeout), node.state
        if node.state != 'failed':
            spin_until(executor, lambda: watcher.checkpoints, 3.0)
    return node, watcher, executor


def close(node, watcher, executor):
    node.shutdown()
    executor.shutdown()
    node.destroy_node()
    watcher.node.destroy_node()


def test_teacher_then_distillation_nodes_publish_progress_and_write_loadable_checkpoints(
        context, dataset, tmp_path):
    ns = f'/t_{uuid.uuid4().hex[:8]}'
    teacher_out = tmp_path / 'teacher'
    node, watcher, executor = run_node(context, TeacherTrainingNode, {
        'dataset': str(dataset), 'out': str(teacher_out), 'progress_period_s': 0.2,
        'overrides': TINY_TRAINING + ['teacher.iterations=400']}, ns)
    try:
        assert node.exit_code == 0 and node.state == 'finished'
        assert watcher.checkpoints == [str(teacher_out)]
        last = watcher.progress[-1]
        assert last['stage'] == 'teacher' and last['iteration'] == last['total'] == 400
        assert math.isfinite(last['loss']) and last['eta_s'] == 0.0
        assert any(s[0] == 'OK' and 'iteration' in s[2] for s in watcher.status)
    finally:
        close(node, watcher, executor)
    teacher = load_policy(teacher_out)
    assert read_meta(teacher_out)['kind'] == 'teacher'

    moe_out = tmp_path / 'moe'
    node, watcher, executor = run_node(context, DistillationNode, {
        'teacher': str(teacher_out), 'dataset': str(dataset), 'out': str(moe_out),
        'overrides': TINY_TRAINING + ['vdd.iterations=60'], 'checkpoint_every': 20}, ns)
    try:
        assert node.exit_code == 0 and watcher.checkpoints == [str(moe_out)]
        assert watcher.progress and watcher.progress[-1]['stage'] == 'vdd'
    finally:
        close(node, watcher, executor)
    moe = load_policy(moe_out, expert_mode='argmax')
    assert moe.model.num_experts == 2 and moe.spec.obs_dim == teacher.spec.obs_dim
    assert read_meta(moe_out)['method'] == 'vdd_moe'


def test_stop_service_ends_training_early_and_still_saves(context, dataset, tmp_path):
    ns = f'/t_{uuid.uuid4().hex[:8]}'
    out = tmp_path / 'teacher'
    node, watcher, executor = run_node(context, TeacherTrainingNode, {
        'dataset': str(dataset), 'out': str(out),
        'overrides': TINY_TRAINING + ['teacher.iterations=1000000']}, ns, until_done=False)
    try:
        assert spin_until(executor, lambda: watcher.progress, 60.0)
        # progress at least once a second (the default period is 0.5 s)
        first = len(watcher.progress)
        spin_for(executor, 2.2)
        assert len(watcher.progress) - first >= 3
        iterations = [p['iteration'] for p in watcher.progress]
        assert iterations == sorted(iterations) and iterations[-1] > iterations[0]
        assert 0 < watcher.progress[-1]['eta_s'] < math.inf
        client = watcher.node.create_client(Trigger, f'{ns}/teacher_training_node/stop')
        assert client.wait_for_service(timeout_sec=10.0)
        future = client.call_async(Trigger.Request())
        assert spin_until(executor, future.done, 10.0) and future.result().success
        assert spin_until(executor, node.finished.is_set, 30.0)
        spin_until(executor, lambda: watcher.checkpoints, 3.0)
        assert node.state == 'stopped' and node.exit_code == 0
        assert watcher.checkpoints == [str(out)]
        assert watcher.progress[-1]['iteration'] < 1000000
        again = client.call_async(Trigger.Request())
        assert spin_until(executor, again.done, 10.0) and not again.result().success
    finally:
        close(node, watcher, executor)
    assert load_policy(out).spec.obs_dim > 0


def test_a_failing_job_reports_an_error_and_exits_with_status_1(context, tmp_path):
    ns = f'/t_{uuid.uuid4().hex[:8]}'
    node, watcher, executor = run_node(context, TeacherTrainingNode, {
        'dataset': str(tmp_path / 'missing.hdf5'), 'out': str(tmp_path / 'x'),
        'progress_period_s': 0.1}, ns)
    try:
        spin_for(executor, 0.3)
        assert node.exit_code == 1 and node.state == 'failed'
        assert any(s[0] == 'ERROR' and 'missing.hdf5' in s[1] for s in watcher.status)
        assert not watcher.checkpoints
    finally:
        close(node, watcher, executor)


def test_missing_required_parameters_are_user_errors(context):
    from vdd_ros.errors import UserError
    with pytest.raises(UserError, match='teacher'):
        DistillationNode(context=context, namespace='/t_missing', parameter_overrides=[
            Parameter('dataset', value='d.hdf5'), Parameter('out', value='o')])


def test_cli_train_teacher_and_distill_run_the_same_jobs(dataset, tmp_path):
    teacher, moe = tmp_path / 'teacher', tmp_path / 'moe'
    tiny = TINY_TRAINING
    assert cli_main(['train-teacher', '--dataset', str(dataset), '--out', str(teacher),
                     '--quiet', '--set', *tiny, 'teacher.iterations=50']) == 0
    assert cli_main(['distill', '--teacher', str(teacher), '--dataset', str(dataset),
                     '--out', str(moe), '--quiet', '--set', *tiny, 'vdd.iterations=20']) == 0
    assert read_meta(teacher)['kind'] == 'teacher' and read_meta(moe)['method'] == 'vdd_moe'
    assert cli_main(['train-teacher', '--dataset', str(tmp_path / 'none.hdf5'), '--out',
                     str(tmp_path / 'x'), '--quiet']) == 2
    assert cli_main(['distill', '--teacher', str(teacher), '--dataset', str(dataset),
                     '--out', str(tmp_path / 'y'), '--set', 'vdd.iterations']) == 2


# launch escalates to SIGTERM 5 s after its SIGINT; a node must be gone well before that, its
# final checkpoint saved (the interpreter's unloading of torch and rclpy alone took 1-4.6 s
# under load before the executables skipped it)
SIGINT_EXIT_S = 2.0


@pytest.mark.parametrize('stage', ['teacher', 'vdd'])
def test_sigint_mid_training_saves_and_exits_0_within_the_bound_even_with_a_second_signal(
        stage, dataset, tmp_path):
    import signal
    import time

    from vdd_ros.ros.evaluation import NodeProcess
    from vdd_ros.ros.testing import domain_id
    out = tmp_path / stage
    params = {'dataset': str(dataset), 'out': str(out), 'checkpoint_every': 50}
    if stage == 'teacher':
        module = 'teacher_training_node'
        params['overrides'] = TINY_TRAINING + ['teacher.iterations=100000000']
    else:
        module = 'distillation_node'
        teacher = tmp_path / 'teacher'
        assert cli_main(['train-teacher', '--dataset', str(dataset), '--out', str(teacher),
                         '--quiet', '--set', *TINY_TRAINING, 'teacher.iterations=5']) == 0
        params.update(teacher=str(teacher), overrides=TINY_TRAINING + [
            'vdd.init_em_iterations=0', 'vdd.iterations=100000000'])
    proc = NodeProcess(module, module, params, tmp_path, domain_id(),
                       f'/t_{uuid.uuid4().hex[:8]}')
    try:
        end = time.monotonic() + 60
        # mid-training: past a periodic checkpoint (every 50 iterations)
        while not (out / 'config.yaml').exists() or \
                f'{stage} training:' not in proc.log_file.read_text():
            assert proc.poll() is None and time.monotonic() < end, proc.log_tail()
            time.sleep(0.05)
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
        proc.proc.send_signal(signal.SIGINT)
        code = proc.proc.wait(timeout=30)
        took = time.monotonic() - started
    finally:
        proc.stop()
    log = proc.log_file.read_text()
    assert code == 0 and 'Traceback' not in log, log
    assert f'{stage}: stopped, checkpoint {out}' in log
    assert took < SIGINT_EXIT_S, f'exit {took:.2f} s after SIGINT\n{log}'
    saved = read_meta(out)  # the final save: periodic ones record no training summary
    assert saved['kind'] == ('teacher' if stage == 'teacher' else 'moe')
    assert saved['metrics']['iterations'] >= 50
    assert load_policy(out).spec.obs_dim > 0
