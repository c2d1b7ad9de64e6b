"""Every node's parameters through the parameter services, as `ros2 param dump` reads them.

rclpy 9.1 answers a GetParameters request with an empty list when any requested parameter was
declared by type without a value; VddNode.param declares every parameter with a value (an
unset array parameter: an empty list of its type). Each node kind is built in-process; a client
node lists and gets all its parameters over the services.
"""
import uuid

import pytest
import rclpy
from rcl_interfaces.msg import ParameterType
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient

from vdd_ros.ros.runtime import VddNode, make_executor
from vdd_ros.ros.testing import (TINY_TRAINING, spin_until, tiny_dataset,
                                 tiny_moe_checkpoint)

ARRAYS = {'policy_node': ('hold_action', ParameterType.PARAMETER_DOUBLE_ARRAY),
          'sim_node': ('seeds', ParameterType.PARAMETER_INTEGER_ARRAY),
          'teacher_training_node': ('overrides', ParameterType.PARAMETER_STRING_ARRAY),
          'distillation_node': ('overrides', ParameterType.PARAMETER_STRING_ARRAY)}


def build(kind, context, tmp_path, **params):
    ns = f'/p_{uuid.uuid4().hex[:8]}'
    if kind == 'policy_node':
        from vdd_ros.ros.policy_node import PolicyNode as cls
        params.setdefault('checkpoint', str(tiny_moe_checkpoint(tmp_path / 'moe')))
    elif kind == 'sim_node':
        from vdd_ros.ros.sim_node import SimNode as cls
    else:   # training fails at once on a missing dataset: only the parameters matter here
        from vdd_ros.ros.training_nodes import DistillationNode, TeacherTrainingNode
        cls = TeacherTrainingNode if kind == 'teacher_training_node' else DistillationNode
        params.update(dataset=str(tmp_path / 'missing.hdf5'), out=str(tmp_path / 'out'),
                      teacher=str(tmp_path / 'none'))
        if kind == 'teacher_training_node':
            del params['teacher']
    return cls(context=context, namespace=ns,
               parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])


def dump(context, node):
    """(names, values, descriptors) of all of `node`'s parameters, through its services."""
    client_node = rclpy.create_node(f'dump_{uuid.uuid4().hex[:6]}', context=context)
    executor = make_executor(context)
    executor.add_node(node)
    executor.add_node(client_node)
    try:
        client = AsyncParameterClient(client_node, node.get_fully_qualified_name())
        assert client.wait_for_services(10.0)
        answers = []
        future = client.list_parameters()
        assert spin_until(executor, future.done, 10.0)
        names = list(future.result().result.names)
        for call in (client.get_parameters, client.describe_parameters):
            future = call(names)
            assert spin_until(executor, future.done, 10.0)
            answers.append(future.result())
        return names, list(answers[0].values), list(answers[1].descriptors)
    finally:
        executor.remove_node(node)
        client_node.destroy_node()
        executor.shutdown()


@pytest.mark.parametrize('kind', list(ARRAYS))
def test_every_declared_parameter_comes_back_with_a_value_and_a_description(
        kind, context, tmp_path):
    node = build(kind, context, tmp_path)
    try:
        declared = set(node.get_parameters_by_prefix(''))
        names, values, descriptors = dump(context, node)
        assert set(names) == declared
        assert len(values) == len(names), 'the parameter service answered an empty list'
        for name, value in zip(names, values):
            assert value.type != ParameterType.PARAMETER_NOT_SET, name
        ours = declared - {'use_sim_time', 'start_type_description_service'}
        assert all(d.description for d in descriptors if d.name in ours)
        array, kind_type = ARRAYS[kind]
        value = values[names.index(array)]
        assert value.type == kind_type
        assert node.get_parameter(array).value == []
    finally:
        node.shutdown()
        node.destroy_node()


def test_an_array_parameter_set_at_start_keeps_its_type_and_stays_read_only(context, tmp_path):
    hold = [0.0] * 6 + [-1.0]
    node = build('policy_node', context, tmp_path, hold_action=hold)
    try:
        names, values, _ = dump(context, node)
        assert list(values[names.index('hold_action')].double_array_value) == hold
        assert list(node.hold_action) == hold
        result = node.set_parameters([Parameter('hold_action', value=[0.0] * 7)])[0]
        assert not result.successful and 'read-only' in result.reason
    finally:
        node.destroy_node()


def test_a_writable_array_parameter_can_be_set_like_ros2_param_set(context):
    node = VddNode(f'arrays_{uuid.uuid4().hex[:6]}', context=context)
    try:
        assert node.param('gains', 'float[]', 'gains') == []
        assert node.param('names', 'str[]', 'names', read_only=True) == []
        assert node.describe_parameter('gains').type == ParameterType.PARAMETER_DOUBLE_ARRAY
        assert node.set_parameters([Parameter('gains', value=[1.0, 2.5])])[0].successful
        assert list(node.get_parameter('gains').value) == [1.0, 2.5]
        wrong = node.set_parameters([Parameter('gains', value=['a'])])[0]
        assert not wrong.successful and 'type' in wrong.reason
        assert not node.set_parameters([Parameter('names', value=['x'])])[0].successful
    finally:
        node.destroy_node()


def test_an_array_parameter_of_the_wrong_type_is_one_clear_error(context):
    from vdd_ros.errors import UserError
    node = VddNode(f'arrays_{uuid.uuid4().hex[:6]}', context=context,
                   parameter_overrides=[Parameter('seeds', value=['a', 'b'])])
    try:
        with pytest.raises(UserError, match='^parameter seeds: '):
            node.param('seeds', 'int[]', 'seeds')
    finally:
        node.destroy_node()


def test_tiny_training_overrides_still_reach_the_training_node(context, tmp_path):
    dataset = tiny_dataset(tmp_path / 'd.hdf5')
    from vdd_ros.ros.training_nodes import TeacherTrainingNode
    node = TeacherTrainingNode(context=context, namespace=f'/p_{uuid.uuid4().hex[:8]}',
                               parameter_overrides=[
                                   Parameter('dataset', value=str(dataset)),
                                   Parameter('out', value=str(tmp_path / 'out')),
                                   Parameter('overrides', value=TINY_TRAINING +
                                             ['teacher.iterations=1'])])
    try:
        assert node.get_parameter('overrides').value[-1] == 'teacher.iterations=1'
        assert node.describe_parameter('overrides').read_only
    finally:
        node.shutdown()
        node.destroy_node()
