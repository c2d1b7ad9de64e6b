"""Launch files and parameter files.

The launch files need `launch` and `launch_ros` (a ROS 2 install); here they are at least
compiled, and built when launch_ros can be imported. The parameter files are loaded into the
real nodes through `--params-file`, as `ros2 launch` and `ros2 run` pass them.
"""
import importlib.util
import py_compile
import uuid
from pathlib import Path

import pytest
import rclpy
import yaml
from rclpy.context import Context
from rclpy.parameter import Parameter

from vdd_ros.ros.testing import TINY_TRAINING, domain_id, tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILES = sorted((ROOT / 'launch').glob('*.launch.py'))
PARAM_FILES = sorted((ROOT / 'config').glob('*_node.yaml'))


def test_launch_files_exist_and_compile(tmp_path):
    assert {p.name for p in LAUNCH_FILES} >= {'policy.launch.py', 'pipeline.launch.py'}
    for path in LAUNCH_FILES:
        py_compile.compile(str(path), doraise=True, cfile=str(tmp_path / f'{path.name}c'))


@pytest.mark.skipif(importlib.util.find_spec('launch_ros') is None,
                    reason='launch_ros is not installed (it has no PyPI wheel; it comes with '
                           'a ROS 2 install)')
@pytest.mark.parametrize('path', LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_files_build_a_launch_description(path):
    from launch import LaunchDescription
    from launch_ros.actions import Node
    spec = importlib.util.spec_from_file_location(path.stem.replace('.', '_'), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    assert isinstance(description, LaunchDescription)
    names = {a.name for a in description.get_launch_arguments()}
    assert {'task', 'control_rate_hz', 'expert_mode'} <= names
    if path.name == 'policy.launch.py':
        assert 'checkpoint' in names
        assert sum(isinstance(e, Node) for e in description.entities) == 2


def test_parameter_files_are_keyed_by_wildcard():
    assert {p.stem for p in PARAM_FILES} == {'policy_node', 'sim_node',
                                            'teacher_training_node', 'distillation_node'}
    for path in PARAM_FILES:
        data = yaml.safe_load(path.read_text())
        assert list(data) == ['/**'] and 'ros__parameters' in data['/**'], path


def _node_with_params_file(cls, path, overrides, **kwargs):
    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain_id(),
               args=['--ros-args', '--params-file', str(path)],
               signal_handler_options=rclpy.signals.SignalHandlerOptions.NO)
    node = cls(context=ctx, namespace=f'/t_{uuid.uuid4().hex[:8]}',
               parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()],
               **kwargs)
    return ctx, node


@pytest.mark.parametrize('name', ['policy_node', 'teacher_training_node',
                                  'distillation_node', 'sim_node'])
def test_every_parameter_file_entry_is_a_declared_parameter_of_its_node(name, tmp_path):
    path = ROOT / 'config' / f'{name}.yaml'
    values = yaml.safe_load(path.read_text())['/**']['ros__parameters']
    overrides: dict = {}
    if name == 'policy_node':
        from vdd_ros.ros.policy_node import PolicyNode as cls
    elif name == 'sim_node':
        from vdd_ros.ros.sim_node import SimNode as cls
    else:
        from vdd_ros.ros.training_nodes import DistillationNode, TeacherTrainingNode
        cls = TeacherTrainingNode if name == 'teacher_training_node' else DistillationNode
        overrides = {'dataset': str(tiny_dataset(tmp_path / 'd.hdf5')),
                     'out': str(tmp_path / 'out'), 'teacher': str(tmp_path / 'none'),
                     'overrides': TINY_TRAINING + ['teacher.iterations=1']}
    ctx, node = _node_with_params_file(cls, path, overrides)
    try:
        for key, value in values.items():
            assert node.has_parameter(key), f'{path.name}: {key} is not a parameter'
            if key not in overrides:
                assert node.get_parameter(key).value == value, key
            assert node.describe_parameter(key).description, f'{key} has no description'
    finally:
        node.shutdown()
        node.destroy_node()
        ctx.try_shutdown()
