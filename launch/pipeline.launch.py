"""The whole pipeline, one stage after the other: teacher training, VDD distillation, then a
closed-loop evaluation of the distilled MoE (sim_node in lockstep with policy_node).

    ros2 launch vdd_ros pipeline.launch.py dataset:=data/lift_carry.hdf5 work_dir:=runs/a

Each stage starts only when the previous one exits with status 0 (a training node exits 0
once its checkpoint is saved, also after ~/stop); otherwise the launch shuts down. The
evaluation's episode results go to <work_dir>/evaluation.json, then everything stops.
Node parameters come from config/<node>.yaml; a launch argument overrides them only when it is
set. `observation` and `action` rename the topics between sim_node and policy_node.
"""
from pathlib import Path
from typing import Any

from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, EmitEvent, LogInfo, OpaqueFunction,
                            RegisterEventHandler)
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from vdd_ros.ros.launch_args import describe, node_parameters, remappings

CONFIG = Path(__file__).parent.parent / 'config'  # share/vdd_ros/config once installed
TOPICS = ['observation', 'action']
# launch argument -> (default, description); None: required; an empty argument passes nothing
ARGUMENTS = {
    'dataset': (None, 'demonstration dataset (HDF5, from vdd-ros collect); required'),
    'work_dir': ('vdd_ros_run', 'folder for the teacher, moe and evaluation outputs'),
    'train_config': ('', 'training config YAML; empty: the built-in defaults, which '
                         'config/train.yaml lists'),
    'task': ('', describe('task to evaluate on', CONFIG, 'sim_node', 'task')),
    'device': ('', describe('torch device for training and inference', CONFIG,
                            'teacher_training_node', 'device')),
    'episodes': ('50', 'evaluation episodes (seeds 1000000, 1000001, ...)'),
    'control_rate_hz': ('500.0', 'policy control rate in Hz during the evaluation'),
    'expert_mode': ('', "MoE expert choice; empty: the checkpoint's own"),
    'observation': ('observation', 'observation topic of the evaluation'),
    'action': ('action', 'action topic of the evaluation'),
}
TRAINING = {'dataset': ('dataset', str), 'device': ('device', str),
            'config': ('train_config', str)}
# node -> {parameter: (launch argument, type)}
PARAMETERS = {
    'teacher_training_node': TRAINING,
    'distillation_node': TRAINING,
    'sim_node': {'task': ('task', str), 'episodes': ('episodes', int)},
    'policy_node': {'task': ('task', str), 'device': ('device', str),
                    'control_rate_hz': ('control_rate_hz', float),
                    'expert_mode': ('expert_mode', str)},
}


def _then(process: Node, stage: str, next_actions: list[Any]) -> RegisterEventHandler:
    """Start `next_actions` when `process` exits with status 0; otherwise shut down."""
    def on_exit(event: Any, context: Any) -> list[Any]:
        if event.returncode == 0:
            return [LogInfo(msg=f'{stage} finished'), *next_actions]
        return [LogInfo(msg=f'{stage} failed (exit status {event.returncode}); stopping'),
                EmitEvent(event=Shutdown(reason=f'{stage} failed'))]
    return RegisterEventHandler(OnProcessExit(target_action=process, on_exit=on_exit))


def stages(context: Any) -> list[Any]:
    """The teacher node and the handlers that start each next stage."""
    values = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    config = Path(FindPackageShare('vdd_ros').perform(context)) / 'config'
    work = Path(values['work_dir'])
    # what the pipeline itself wires: where each stage writes and reads, and the lockstep
    # evaluation on the evaluation seeds of vdd-ros evaluate
    wiring: dict[str, dict[str, Any]] = {
        'teacher_training_node': {'out': str(work / 'teacher'), 'exit_on_finish': True},
        'distillation_node': {'teacher': str(work / 'teacher'), 'out': str(work / 'moe'),
                              'exit_on_finish': True},
        'sim_node': {'clock_mode': 'lockstep', 'seed': 1000000, 'exit_when_done': True,
                     'results_file': str(work / 'evaluation.json')},
        'policy_node': {'checkpoint': str(work / 'moe')},
    }

    def node(name: str, topics: bool = False) -> Node:
        return Node(package='vdd_ros', executable=name, name=name, output='screen',
                    parameters=[str(config / f'{name}.yaml'),
                                {**node_parameters(values, PARAMETERS[name]), **wiring[name]}],
                    remappings=remappings(values, TOPICS) if topics else [])

    teacher, distill = node('teacher_training_node'), node('distillation_node')
    policy, sim = node('policy_node', topics=True), node('sim_node', topics=True)
    evaluation_done = RegisterEventHandler(OnProcessExit(
        target_action=sim,
        on_exit=lambda event, context: [
            LogInfo(msg=f'evaluation finished (exit status {event.returncode})'),
            EmitEvent(event=Shutdown(reason='pipeline finished'))]))
    return [teacher,
            _then(teacher, 'teacher training', [distill]),
            _then(distill, 'distillation', [policy, sim]),
            evaluation_done]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=text)
         for name, (default, text) in ARGUMENTS.items()] + [OpaqueFunction(function=stages)])
