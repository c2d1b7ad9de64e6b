"""The whole pipeline, one stage after the other: teacher training, VDD distillation, then a
closed-loop evaluation of the distilled MoE (sim_node in lockstep with policy_node).

    ros2 launch vdd_ros pipeline.launch.py dataset:=data/lift_carry.hdf5 work_dir:=runs/a

Each stage starts only when the previous one exits with status 0 (a training node exits 0
once its checkpoint is saved, also after ~/stop); otherwise the launch shuts down. The
evaluation's episode results go to <work_dir>/evaluation.json, then everything stops.
"""
from typing import Any

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, LogInfo, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

ARGUMENTS = {
    'dataset': (None, 'demonstration dataset (HDF5, from vdd-ros collect); required'),
    'work_dir': ('vdd_ros_run', 'folder for the teacher, moe and evaluation outputs'),
    'train_config': (None, 'training config YAML (default: config/train.yaml of this package)'),
    'task': ('lift_carry', 'task to evaluate on'),
    'device': ('cpu', 'torch device for training and inference'),
    'episodes': ('50', 'evaluation episodes'),
    'control_rate_hz': ('500.0', 'policy control rate in Hz during the evaluation'),
    'expert_mode': ('', "MoE expert choice ('' keeps the checkpoint's)"),
}


def _then(process: Node, stage: str, next_actions: list[Any]) -> RegisterEventHandler:
    """Start `next_actions` when `process` exits with status 0; otherwise shut down."""
    def on_exit(event: Any, context: Any) -> list[Any]:
        if event.returncode == 0:
            return [LogInfo(msg=f'{stage} finished'), *next_actions]
        return [LogInfo(msg=f'{stage} failed (exit status {event.returncode}); stopping'),
                EmitEvent(event=Shutdown(reason=f'{stage} failed'))]
    return RegisterEventHandler(OnProcessExit(target_action=process, on_exit=on_exit))


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare('vdd_ros')
    config = PathJoinSubstitution([share, 'config'])
    arg = LaunchConfiguration
    work = arg('work_dir')
    teacher_dir = PathJoinSubstitution([work, 'teacher'])
    moe_dir = PathJoinSubstitution([work, 'moe'])
    common = {'dataset': arg('dataset'), 'device': arg('device'), 'exit_on_finish': True}

    teacher = Node(
        package='vdd_ros', executable='teacher_training_node', name='teacher_training_node',
        output='screen',
        parameters=[PathJoinSubstitution([config, 'teacher_training_node.yaml']),
                    {**common, 'out': teacher_dir, 'config': arg('train_config')}])
    distill = Node(
        package='vdd_ros', executable='distillation_node', name='distillation_node',
        output='screen',
        parameters=[PathJoinSubstitution([config, 'distillation_node.yaml']),
                    {**common, 'teacher': teacher_dir, 'out': moe_dir,
                     'config': arg('train_config')}])
    sim = Node(
        package='vdd_ros', executable='sim_node', name='sim_node', output='screen',
        parameters=[PathJoinSubstitution([config, 'sim_node.yaml']), {
            # seeds 1000000, 1000001, ...: the evaluation seeds of vdd-ros evaluate
            'task': arg('task'), 'clock_mode': 'lockstep', 'seed': 1000000,
            'episodes': ParameterValue(arg('episodes'), value_type=int),
            'exit_when_done': True,
            'results_file': PathJoinSubstitution([work, 'evaluation.json'])}])
    policy = Node(
        package='vdd_ros', executable='policy_node', name='policy_node', output='screen',
        parameters=[PathJoinSubstitution([config, 'policy_node.yaml']), {
            'checkpoint': moe_dir, 'task': arg('task'), 'device': arg('device'),
            'control_rate_hz': ParameterValue(arg('control_rate_hz'), value_type=float),
            'expert_mode': ParameterValue(arg('expert_mode'), value_type=str)}])
    evaluation_done = RegisterEventHandler(OnProcessExit(
        target_action=sim,
        on_exit=lambda event, context: [
            LogInfo(msg=f'evaluation finished (exit status {event.returncode})'),
            EmitEvent(event=Shutdown(reason='pipeline finished'))]))
    defaults = {'train_config': PathJoinSubstitution([config, 'train.yaml'])}
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=defaults.get(name, default),
                               description=text)
         for name, (default, text) in ARGUMENTS.items()]
        + [teacher,
           _then(teacher, 'teacher training', [distill]),
           _then(distill, 'distillation', [policy, sim]),
           evaluation_done])
