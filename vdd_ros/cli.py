"""`vdd-ros <command>`: the command-line entry point.

Subcommands live in `vdd_ros.commands.<module>` and are imported only when used, so
`vdd-ros toy` never loads robosuite or rclpy.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from vdd_ros.core.progress import DivergenceError
from vdd_ros.errors import UserError

# command name -> (module in vdd_ros.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    'toy': ('toy', 'distill on a conditional 8-mode ring toy and report mode recovery'),
    'bench': ('bench', 'per-action inference latency: MoE against the teacher'),
    'export': ('export', 'export a checkpoint to ONNX for the torch-free onnxruntime acting '
               'path'),
    'train-teacher': ('train_teacher', 'train the diffusion teacher on a demonstration dataset'),
    'distill': ('distill', 'distil a teacher checkpoint into a VDD Mixture of Experts'),
    'collect': ('collect', 'collect scripted demonstrations of a task into an HDF5 file'),
    'evaluate': ('evaluate', 'roll a policy out on a task: success, modes, latency'),
    'confidence': ('confidence', 'fit, calibrate and test out-of-distribution signals of an '
                   'MoE (stored with the checkpoint for policy_node)'),
    'pipeline': ('pipeline', 'the whole job on one task: collect, train, distil, baselines, '
                 'evaluate, report'),
    'tune': ('tune', 'score candidate VDD-MoE settings on validation seeds (the test seeds '
             'stay sealed): the tuning protocol and the ablation table'),
    'report': ('report', 'redraw task reports and write the cross-task summary'),
    'bag2dataset': ('bag2dataset', 'convert rosbag2 recordings into a dataset through a '
                    'binding'),
    'record': ('record', 'record live topics of a binding into a rosbag2, or scripted '
               'demonstrations through sim_node and policy_node'),
    'convert-robosuite': ('convert_robosuite', 'raw robosuite demonstrations (states, actions) '
                          'to the robomimic layout by state replay'),
    'dataset-info': ('dataset_info', 'describe a dataset: demos, lengths, keys, actions, env'),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='vdd-ros', description='Variational Diffusion Distillation for ROS 2.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage or the unknown-command error and exits
    name = argv[0]
    module = importlib.import_module(f'vdd_ros.commands.{COMMANDS[name][0]}')
    cmd_parser = argparse.ArgumentParser(prog=f'vdd-ros {name}', description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f'vdd-ros {name}: error: {exc}', file=sys.stderr)
        return 2
    except DivergenceError as exc:
        print(f'vdd-ros {name}: error: training diverged: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'vdd-ros {name}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
