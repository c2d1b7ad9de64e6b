"""Multi-node data-parallel training: two torchrun agents ("nodes") meet at a c10d rendezvous
on 127.0.0.1 and train as one run of two ranks."""
import socket
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file

from ddpkit import TOLERANCE, close_to, torchrun_env
from vdd_ros.cli import main as cli_main
from vdd_ros.core.data import Demo, write_dataset

TINY = ['obs_horizon=1', 'action_horizon=2', 'action_exec=2', 'teacher.hidden_dim=32',
        'teacher.num_layers=1', 'teacher.batch_size=33', 'teacher.iterations=40']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_nodes_on_the_loopback_address_train_one_run(tmp_path):
    rng = np.random.default_rng(0)
    demos = [Demo(obs=rng.normal(size=(30, 4)).astype(np.float32),
                  actions=rng.uniform(-1, 1, size=(30, 2)).astype(np.float32))
             for _ in range(4)]
    dataset = tmp_path / 'd.hdf5'
    write_dataset(dataset, demos, [('x', 4)], {})
    job = ['train-teacher', '--dataset', str(dataset), '--quiet', '--set', *TINY]
    launch = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2',
              '--nproc-per-node', '1', '--rdzv-backend', 'c10d', '--rdzv-endpoint',
              f'127.0.0.1:{_free_port()}', '--rdzv-id', 'vdd_ros_test', '--local-addr',
              '127.0.0.1', '-m', 'vdd_ros.cli', *job, '--out', str(tmp_path / 'two')]
    nodes = [subprocess.Popen(launch, env=torchrun_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=300))
    finally:
        for node in nodes:
            node.kill()
    assert [n.returncode for n in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    # one run: rank 0 (on one of the nodes) alone wrote
    assert sum(out.count('wrote ') for out, _ in outputs) == 1
    assert cli_main([*job, '--out', str(tmp_path / 'one')]) == 0
    two = load_file(str(tmp_path / 'two' / 'model.safetensors'))
    one = load_file(str(tmp_path / 'one' / 'model.safetensors'))
    assert max(close_to(two[k], one[k]) for k in one) < TOLERANCE
    assert any(not torch.equal(two[k], one[k]) for k in one)  # two ranks did share the batch
