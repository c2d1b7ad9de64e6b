"""Jobs launched on torchrun ranks as a subprocess: the pipeline's training stages with nproc 2;
teacher_training_node with nproc 2, which publishes rank 0's progress, and whose ~/stop ends
every rank with the checkpoint and the training state saved."""
import json
import math
import uuid

import rclpy
import torch
from ddpkit import TOLERANCE, close_to
from rclpy.parameter import Parameter
from safetensors.torch import load_file
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import Trigger

from vdd_ros.core.checkpoint import load_policy, read_training
from vdd_ros.core.config import parse_overrides
from vdd_ros.core.jobs import baseline_job
from vdd_ros.core.train_state import state_folder
from vdd_ros.ros.conversions import msg_to_dict
from vdd_ros.ros.runtime import make_executor
from vdd_ros.ros.testing import TINY_TRAINING, ros_context, spin_until, tiny_dataset
from vdd_ros.ros.training_nodes import LATCHED, TeacherTrainingNode


def test_two_rank_node_reports_rank_0_progress_and_stops_every_rank(tmp_path, monkeypatch):
    monkeypatch.setenv('GLOO_SOCKET_IFNAME', 'lo')
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    dataset = tiny_dataset(tmp_path / 'tiny.hdf5')
    out = tmp_path / 'teacher'
    ns = f'/d_{uuid.uuid4().hex[:8]}'
    with ros_context() as context:
        node = TeacherTrainingNode(context=context, namespace=ns, parameter_overrides=[
            Parameter('dataset', value=str(dataset)), Parameter('out', value=str(out)),
            Parameter('nproc', value=2), Parameter('checkpoint_every', value=100),
            Parameter('progress_period_s', value=0.2),
            Parameter('overrides', value=TINY_TRAINING + ['teacher.iterations=100000000'])])
        watcher = rclpy.create_node(f'w_{uuid.uuid4().hex[:6]}', context=context)
        progress, checkpoints = [], []
        full = f'{ns}/teacher_training_node'
        watcher.create_subscription(Float64MultiArray, f'{full}/progress',
                                    lambda m: progress.append(msg_to_dict(m)), 10)
        watcher.create_subscription(String, f'{full}/checkpoint',
                                    lambda m: checkpoints.append(m.data), LATCHED)
        executor = make_executor(context)
        executor.add_node(node)
        executor.add_node(watcher)
        try:
            # past the first checkpoint (every 100 iterations) on both ranks
            assert spin_until(executor, lambda: progress and progress[-1]['iteration'] > 150,
                              180.0), node.state
            assert progress[-1]['stage'] == 'teacher' and math.isfinite(progress[-1]['loss'])
            client = watcher.create_client(Trigger, f'{full}/stop')
            assert client.wait_for_service(timeout_sec=10.0)
            future = client.call_async(Trigger.Request())
            assert spin_until(executor, future.done, 10.0) and future.result().success
            assert spin_until(executor, node.finished.is_set, 60.0)
            spin_until(executor, lambda: checkpoints, 3.0)
            assert node.state == 'stopped' and node.exit_code == 0, node.error
            assert checkpoints == [str(out)]
        finally:
            node.shutdown()
            executor.shutdown()
            node.destroy_node()
            watcher.destroy_node()
    [gen] = state_folder(out).glob('gen-*')
    meta = json.loads((gen / 'state.json').read_text())
    assert meta['world_size'] == 2 and meta['iteration'] > 150
    history = json.loads((out / 'curves.json').read_text())['loss_history']
    assert history[-1][0] + 1 == meta['iteration']   # saved on stop, after the last iteration
    assert load_policy(out).spec.obs_dim > 0


def test_a_pipeline_training_stage_on_two_ranks(tmp_path, monkeypatch):
    from vdd_ros.pipeline import Context, load_pipeline_config
    from vdd_ros.pipeline.stages import _train
    monkeypatch.setenv('GLOO_SOCKET_IFNAME', 'lo')
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    tiny_dataset(tmp_path / 'demos.hdf5')
    cfg = load_pipeline_config('lift_carry', None, parse_overrides(
        [f'train.{item}' for item in TINY_TRAINING + ['em_moe.iterations=30',
                                                      'em_moe.batch_size=31']]))
    logged = []
    ctx = Context('lift_carry', tmp_path, cfg, cfg.train_config(), show_progress=False,
                  log=logged.append, nproc=2)
    info = _train('em_moe', ctx)
    assert info['iterations'] == 30 and logged[-1].startswith('  30 iterations')
    assert read_training(tmp_path / 'seed_0' / 'em_moe')['iterations'] == 30
    assert not state_folder(tmp_path / 'seed_0' / 'em_moe').exists()
    # two ranks shared each batch: within the tolerance of one process, and not bitwise equal
    baseline_job('em_moe', tmp_path / 'demos.hdf5', tmp_path / 'one', overrides=cfg.train,
                 show_bar=False)
    two = load_file(str(tmp_path / 'seed_0' / 'em_moe' / 'model.safetensors'))
    one = load_file(str(tmp_path / 'one' / 'model.safetensors'))
    assert max(close_to(two[k], one[k]) for k in one) < TOLERANCE
    assert any(not torch.equal(two[k], one[k]) for k in one)
