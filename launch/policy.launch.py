"""sim_node and policy_node: the distilled policy (or any checkpoint) drives robosuite.

    ros2 launch vdd_ros policy.launch.py checkpoint:=runs/moe task:=lift_carry \
        control_rate_hz:=20.0 expert_mode:=per_episode observation:=/arm/obs
    ros2 launch vdd_ros policy.launch.py checkpoint:=runs/moe binding:=task:lift_carry \
        clock_mode:=lockstep act_on:=complete use_sim_time:=true

Parameters come from config/sim_node.yaml and config/policy_node.yaml; a launch argument
overrides them only when it is set (`--show-args` names each file's value). `observation` and
`action` rename the topics both nodes use.
"""
from pathlib import Path
from typing import Any

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from vdd_ros.ros.launch_args import describe, node_parameters, remappings
from vdd_ros.sim.tasks import TASKS

CONFIG = Path(__file__).parent.parent / 'config'  # share/vdd_ros/config once installed
TOPICS = ['observation', 'action']
# launch argument -> (default, description); an empty argument passes nothing
ARGUMENTS = {
    'task': ('', describe(f'task: {", ".join(TASKS)}', CONFIG,
                          'policy_node', 'task')),
    'checkpoint': ('', describe("checkpoint folder, or 'scripted' for the task's demonstrator",
                                CONFIG, 'policy_node', 'checkpoint')),
    'control_rate_hz': ('', describe('policy control rate in Hz', CONFIG, 'policy_node',
                                     'control_rate_hz')),
    'expert_mode': ('', 'MoE expert choice: sample, argmax, per_episode or an expert index; '
                        "empty: the checkpoint's own"),
    'clock_mode': ('', describe('sim_node clock: realtime or lockstep', CONFIG, 'sim_node',
                                'clock_mode')),
    'sim_rate_hz': ('', describe("sim_node realtime rate in Hz (0: the task's, real time)",
                                 CONFIG, 'sim_node', 'control_rate_hz')),
    'binding': ('', "binding YAML (or task:<name>) for standard messages in both nodes; empty: "
                    'the labelled observation/action arrays'),
    'act_on': ('', describe('policy_node: act at each tick (tick) or as each observation is '
                            'complete (complete)', CONFIG, 'policy_node', 'act_on')),
    'control_loop': ('', describe('policy_node tick driver: thread or timer', CONFIG,
                                  'policy_node', 'control_loop')),
    'on_out_of_distribution': ('', describe('policy_node: warn, or hold while the confidence '
                                            'level is ERROR', CONFIG, 'policy_node',
                                            'on_out_of_distribution')),
    'use_sim_time': ('', 'true: both nodes run on /clock (sim_node publishes it in lockstep '
                         'with a binding); empty: false'),
    'namespace': ('', 'namespace of both nodes'),
    'observation': ('observation', 'observation topic (relative names lie in the namespace)'),
    'action': ('action', 'action topic (relative names lie in the namespace)'),
}
# node -> {parameter: (launch argument, type)}
PARAMETERS = {
    'sim_node': {'task': ('task', str), 'clock_mode': ('clock_mode', str),
                 'control_rate_hz': ('sim_rate_hz', float), 'binding': ('binding', str),
                 'use_sim_time': ('use_sim_time', bool)},
    'policy_node': {'checkpoint': ('checkpoint', str), 'task': ('task', str),
                    'control_rate_hz': ('control_rate_hz', float),
                    'expert_mode': ('expert_mode', str), 'binding': ('binding', str),
                    'act_on': ('act_on', str), 'control_loop': ('control_loop', str),
                    'on_out_of_distribution': ('on_out_of_distribution', str),
                    'use_sim_time': ('use_sim_time', bool)},
}


def nodes(context: Any) -> list[Node]:
    """Both nodes with the parameters and remappings of the arguments that are set."""
    values = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    config = Path(FindPackageShare('vdd_ros').perform(context)) / 'config'
    return [Node(package='vdd_ros', executable=node, name=node, output='screen',
                 namespace=values['namespace'] or None,
                 parameters=[str(config / f'{node}.yaml'), node_parameters(values, table)],
                 remappings=remappings(values, TOPICS))
            for node, table in PARAMETERS.items()]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=text)
         for name, (default, text) in ARGUMENTS.items()] + [OpaqueFunction(function=nodes)])
