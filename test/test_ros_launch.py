"""Launch files and parameter files.

The launch files need `launch` and `launch_ros` (a ROS 2 install). Here they are compiled, and
run against small stand-ins of the launch classes they use (the upstream signatures), which
record what each node would get; with launch_ros they are also built for real. The parameter
files are loaded into the real nodes through `--params-file`, as `ros2 launch` and `ros2 run`
pass them.
"""
import importlib.util
import py_compile
import sys
import types
import uuid
from pathlib import Path
from typing import Any

import pytest
import rclpy
import yaml
from rclpy.context import Context
from rclpy.parameter import Parameter

from vdd_ros.errors import UserError
from vdd_ros.ros.launch_args import describe, node_parameters, remappings, typed
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
    from launch import LaunchContext, LaunchDescription
    from launch_ros.actions import Node
    spec = importlib.util.spec_from_file_location(path.stem.replace('.', '_'), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    assert isinstance(description, LaunchDescription)
    arguments = description.get_launch_arguments()
    assert {'task', 'control_rate_hz', 'expert_mode', 'observation', 'action'} <= {
        a.name for a in arguments}
    context = LaunchContext()
    if 'dataset' in {a.name for a in arguments}:
        context.launch_configurations['dataset'] = 'd.hdf5'  # required
    for argument in arguments:
        argument.execute(context)  # the default, unless set
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    try:
        get_package_share_directory('vdd_ros')
    except (PackageNotFoundError, OSError):
        return  # FindPackageShare needs the package installed (colcon test has it)
    entities = description.entities[-1].execute(context)  # the OpaqueFunction
    assert isinstance(entities[0], Node)


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


# -- the launch files against stand-ins of launch and launch_ros -------------------------------
class _Entity:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class _Description:
    def __init__(self, initial_entities=None, *, deprecated_reason=None):
        self.entities = list(initial_entities or [])

    def get_launch_arguments(self):
        return [e for e in self.entities if isinstance(e, _Argument)]


class _Argument(_Entity):
    def __init__(self, name, *, default_value=None, description=None, choices=None, **kwargs):
        self.name, self.default_value, self.description = name, default_value, description


class _Opaque(_Entity):
    def __init__(self, *, function, args=None, kwargs=None, **left_over):
        self.function = function


class _Configuration:
    def __init__(self, variable_name, *, default=None):
        self.name = variable_name

    def perform(self, context):
        return context.launch_configurations[self.name]


class _PackageShare:
    def __init__(self, package):
        assert package == 'vdd_ros'

    def perform(self, context):
        return str(ROOT)


class _Node:
    def __init__(self, *, executable, package=None, name=None, namespace=None, exec_name=None,
                 parameters=None, remappings=None, ros_arguments=None, arguments=None,
                 **kwargs):
        assert package == 'vdd_ros' and name == executable
        self.name, self.namespace = name, namespace
        self.parameters, self.remappings = list(parameters or []), list(remappings or [])


class _OnProcessExit:
    def __init__(self, *, target_action=None, on_exit, **kwargs):
        self.target_action, self.on_exit = target_action, on_exit


class _Register(_Entity):
    def __init__(self, event_handler, **kwargs):
        self.handler = event_handler


class _Shutdown:
    def __init__(self, *, reason='reason not given', due_to_sigint=False):
        self.reason = reason


class _Emit(_Entity):
    def __init__(self, *, event, **kwargs):
        self.event = event


class _Log(_Entity):
    def __init__(self, *, msg, **kwargs):
        self.msg = msg


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


@pytest.fixture
def stand_ins(monkeypatch):
    """`launch` and `launch_ros` replaced by the stand-ins above, for this test only."""
    modules = {
        'launch': _module('launch', LaunchDescription=_Description),
        'launch.actions': _module('launch.actions', DeclareLaunchArgument=_Argument,
                                  OpaqueFunction=_Opaque, LogInfo=_Log, EmitEvent=_Emit,
                                  RegisterEventHandler=_Register),
        'launch.event_handlers': _module('launch.event_handlers', OnProcessExit=_OnProcessExit),
        'launch.events': _module('launch.events', Shutdown=_Shutdown),
        'launch.substitutions': _module('launch.substitutions',
                                        LaunchConfiguration=_Configuration),
        'launch_ros': _module('launch_ros'),
        'launch_ros.actions': _module('launch_ros.actions', Node=_Node),
        'launch_ros.substitutions': _module('launch_ros.substitutions',
                                            FindPackageShare=_PackageShare),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def _launch(name: str, **values: str) -> tuple[Any, list[Any]]:
    """The launch file's module and the entities its OpaqueFunction returns for `values`."""
    path = ROOT / 'launch' / name
    spec = importlib.util.spec_from_file_location(path.stem.replace('.', '_'), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    arguments = {a.name: a for a in description.get_launch_arguments()}
    unknown = set(values) - set(arguments)
    assert not unknown, unknown
    context = types.SimpleNamespace(launch_configurations={
        n: a.default_value for n, a in arguments.items() if a.default_value is not None})
    context.launch_configurations.update(values)
    [opaque] = [e for e in description.entities if isinstance(e, _Opaque)]
    return module, opaque.function(context)


def _yaml(node: str) -> dict:
    return yaml.safe_load((ROOT / 'config' / f'{node}.yaml').read_text())['/**'][
        'ros__parameters']


@pytest.mark.parametrize('path', LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_arguments_show_plain_defaults_and_the_parameter_files_values(path, stand_ins):
    module, _ = _launch(path.name, **({'dataset': 'd.hdf5'} if 'pipeline' in path.name else {}))
    arguments = module.generate_launch_description().get_launch_arguments()
    for argument in arguments:
        # `--show-args` prints each default: a plain string, never a substitution
        assert argument.default_value is None or isinstance(argument.default_value, str)
        assert argument.description, argument.name
    by_name = {a.name: a for a in arguments}
    assert by_name['observation'].default_value == 'observation'
    assert by_name['action'].default_value == 'action'
    assert by_name['task'].default_value == ''
    assert f".yaml's {_yaml('sim_node')['task']}" in by_name['task'].description
    if path.name == 'policy.launch.py':
        rate = _yaml('policy_node')['control_rate_hz']
        assert f"config/policy_node.yaml's {rate!r}" in by_name['control_rate_hz'].description
    else:
        assert by_name['train_config'].default_value == ''
        assert by_name['dataset'].default_value is None  # required


def test_policy_launch_passes_only_the_arguments_that_are_set(stand_ins):
    _, nodes = _launch('policy.launch.py')
    assert [n.name for n in nodes] == ['sim_node', 'policy_node']
    for node in nodes:
        assert node.parameters == [str(ROOT / 'config' / f'{node.name}.yaml'), {}]
        assert node.remappings == [] and node.namespace is None

    _, (sim, policy) = _launch('policy.launch.py', task='pick_either', control_rate_hz='30',
                               expert_mode='2', sim_rate_hz='0', clock_mode='lockstep',
                               checkpoint='runs/moe', namespace='arm',
                               observation='/arm/obs', action='cmd')
    assert sim.parameters[1] == {'task': 'pick_either', 'clock_mode': 'lockstep',
                                 'control_rate_hz': 0.0}
    assert policy.parameters[1] == {'checkpoint': 'runs/moe', 'task': 'pick_either',
                                    'control_rate_hz': 30.0, 'expert_mode': '2'}
    assert type(policy.parameters[1]['control_rate_hz']) is float
    for node in (sim, policy):
        assert node.remappings == [('observation', '/arm/obs'), ('action', 'cmd')]
        assert node.namespace == 'arm'
    with pytest.raises(UserError, match="launch argument control_rate_hz: expected a number, "
                                        "got 'fast'"):
        _launch('policy.launch.py', control_rate_hz='fast')

    _, (sim, policy) = _launch('policy.launch.py', binding='task:lift_carry', act_on='complete',
                               use_sim_time='true', clock_mode='lockstep',
                               control_loop='timer')
    assert sim.parameters[1] == {'clock_mode': 'lockstep', 'binding': 'task:lift_carry',
                                 'use_sim_time': True}
    assert policy.parameters[1] == {'binding': 'task:lift_carry', 'act_on': 'complete',
                                    'control_loop': 'timer', 'use_sim_time': True}
    with pytest.raises(UserError, match='launch argument use_sim_time: expected true or false'):
        _launch('policy.launch.py', use_sim_time='yes')


def test_pipeline_launch_chains_the_stages_and_passes_only_what_is_set(stand_ins):
    _, entities = _launch('pipeline.launch.py', dataset='d.hdf5')
    teacher, after_teacher, after_distill, evaluation_done = entities
    work = Path('vdd_ros_run')
    assert teacher.name == 'teacher_training_node'
    assert teacher.parameters == [str(ROOT / 'config' / 'teacher_training_node.yaml'), {
        'dataset': 'd.hdf5', 'out': str(work / 'teacher'), 'exit_on_finish': True}]
    assert after_teacher.handler.target_action is teacher

    failed = after_teacher.handler.on_exit(types.SimpleNamespace(returncode=1), None)
    assert isinstance(failed[-1], _Emit) and 'failed' in failed[-1].event.reason
    _, distill = after_teacher.handler.on_exit(types.SimpleNamespace(returncode=0), None)
    assert distill.name == 'distillation_node' and distill.parameters[1] == {
        'dataset': 'd.hdf5', 'teacher': str(work / 'teacher'), 'out': str(work / 'moe'),
        'exit_on_finish': True}
    assert after_distill.handler.target_action is distill
    _, policy, sim = after_distill.handler.on_exit(types.SimpleNamespace(returncode=0), None)
    assert policy.parameters[1] == {'control_rate_hz': 500.0, 'checkpoint': str(work / 'moe')}
    assert sim.parameters[1] == {'episodes': 50, 'clock_mode': 'lockstep', 'seed': 1000000,
                                 'exit_when_done': True,
                                 'results_file': str(work / 'evaluation.json')}
    assert evaluation_done.handler.target_action is sim
    assert all(n.remappings == [] for n in (teacher, distill, policy, sim))

    _, entities = _launch('pipeline.launch.py', dataset='d.hdf5', work_dir='runs/a',
                          train_config='my.yaml', device='cuda', task='stack_either',
                          expert_mode='argmax', observation='/o', action='/a')
    teacher, after_teacher, after_distill, _ = entities
    _, distill = after_teacher.handler.on_exit(types.SimpleNamespace(returncode=0), None)
    _, policy, sim = after_distill.handler.on_exit(types.SimpleNamespace(returncode=0), None)
    for node in (teacher, distill):
        assert node.parameters[1]['config'] == 'my.yaml'
        assert node.parameters[1]['device'] == 'cuda' and node.remappings == []
    assert policy.parameters[1]['task'] == sim.parameters[1]['task'] == 'stack_either'
    assert policy.parameters[1]['expert_mode'] == 'argmax'
    assert sim.parameters[1]['results_file'] == str(Path('runs/a') / 'evaluation.json')
    for node in (policy, sim):
        assert node.remappings == [('observation', '/o'), ('action', '/a')]


def test_launch_argument_helpers():
    assert typed('n', '7', int) == 7 and typed('x', '1e-3', float) == 1e-3
    assert typed('b', 'True', bool) is True and typed('s', '2', str) == '2'
    with pytest.raises(UserError, match="launch argument n: expected an integer, got '7.5'"):
        typed('n', '7.5', int)
    with pytest.raises(UserError, match='launch argument b: expected true or false'):
        typed('b', 'yes', bool)
    table = {'episodes': ('episodes', int), 'task': ('task', str)}
    assert node_parameters({'episodes': '', 'task': 'lift_carry'}, table) == {
        'task': 'lift_carry'}
    assert remappings({'observation': 'observation', 'action': ''},
                      ['observation', 'action']) == []
    assert describe('rate', ROOT / 'nowhere', 'policy_node', 'control_rate_hz') == \
        "rate; empty: config/policy_node.yaml's value"
