"""Shared test settings (one torch thread on 2-core machines, headless matplotlib) and the
fixtures of the ROS tests: a tiny MoE checkpoint and a private rclpy context per module."""
import os

import matplotlib
import pytest
import torch

matplotlib.use('Agg')
torch.set_num_threads(1)
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """An untrained 3-expert VDD-MoE checkpoint for lift_carry (see tiny_moe_checkpoint)."""
    from vdd_ros.ros.testing import tiny_moe_checkpoint
    return str(tiny_moe_checkpoint(tmp_path_factory.mktemp('ckpt') / 'moe'))


@pytest.fixture(scope='module')
def context():
    """A private rclpy context for the module's nodes."""
    from vdd_ros.ros.testing import ros_context
    with ros_context() as ctx:
        yield ctx
