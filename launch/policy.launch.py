"""sim_node and policy_node: the distilled policy (or any checkpoint) drives robosuite.

    ros2 launch vdd_ros policy.launch.py checkpoint:=runs/moe task:=lift_carry \
        control_rate_hz:=20.0 expert_mode:=per_episode

Parameters come from config/sim_node.yaml and config/policy_node.yaml; the launch arguments
override them.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

ARGUMENTS = {
    'task': ('lift_carry', 'task: lift_carry, pick_either or stack_either'),
    'checkpoint': ('scripted', "checkpoint folder, or 'scripted' for the task's demonstrator"),
    'control_rate_hz': ('20.0', 'policy control rate in Hz'),
    'expert_mode': ('', "MoE expert choice: sample, argmax, per_episode or an expert index "
                        "('' keeps the checkpoint's)"),
    'clock_mode': ('realtime', 'sim_node clock: realtime or lockstep'),
    'sim_rate_hz': ('0.0', "sim_node realtime rate in Hz (0: the task's, real time)"),
    'namespace': ('', 'namespace of both nodes'),
}


def generate_launch_description() -> LaunchDescription:
    config = PathJoinSubstitution([FindPackageShare('vdd_ros'), 'config'])
    arg = LaunchConfiguration
    sim = Node(
        package='vdd_ros', executable='sim_node', name='sim_node', namespace=arg('namespace'),
        output='screen',
        parameters=[PathJoinSubstitution([config, 'sim_node.yaml']), {
            'task': arg('task'),
            'clock_mode': arg('clock_mode'),
            'control_rate_hz': ParameterValue(arg('sim_rate_hz'), value_type=float),
        }])
    policy = Node(
        package='vdd_ros', executable='policy_node', name='policy_node',
        namespace=arg('namespace'), output='screen',
        parameters=[PathJoinSubstitution([config, 'policy_node.yaml']), {
            'checkpoint': arg('checkpoint'),
            'task': arg('task'),
            'control_rate_hz': ParameterValue(arg('control_rate_hz'), value_type=float),
            'expert_mode': ParameterValue(arg('expert_mode'), value_type=str),
        }])
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=text)
         for name, (default, text) in ARGUMENTS.items()] + [sim, policy])
