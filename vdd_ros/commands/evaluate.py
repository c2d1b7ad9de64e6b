"""`vdd-ros evaluate`: closed-loop success, behaviour modes and latency of a policy."""
from __future__ import annotations

import argparse
from typing import Any

from vdd_ros.core.io import check_writable, write_json
from vdd_ros.ros.evaluation import add_via_ros_arguments, evaluate_from_args
from vdd_ros.sim.tasks import TASKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--policy', required=True,
                        help="checkpoint folder, 'scripted' or 'averaged' (the task's oracles)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument('--task', help=', '.join(TASKS))
    where.add_argument('--dataset-env', metavar='F.hdf5',
                       help="the robosuite environment this dataset was recorded in (its "
                            "env_args; observation keys from the policy's checkpoint)")
    parser.add_argument('--horizon', type=int, default=None,
                        help='with --dataset-env: control steps per episode (default: the '
                             "dataset's longest demonstration)")
    parser.add_argument('--episodes', type=int, default=50,
                        help='rollouts on the fixed evaluation seeds (default 50)')
    parser.add_argument('--workers', type=int, default=1, help='worker processes (default 1)')
    parser.add_argument('--json', default=None, help='write the metrics here (atomically)')
    parser.add_argument('--video', default=None,
                        help='write a GIF of the first evaluation episode here')
    parser.add_argument('--device', default='cpu', help='torch device of the policy')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    add_via_ros_arguments(parser)


def format_table(m: dict[str, Any]) -> str:
    """The metrics as an aligned two-column table."""
    wins = m['successes']
    modes = ', '.join(f'{k} {v} ({v / wins:.0%})' if wins else f'{k} 0'
                      for k, v in m['mode_counts'].items()) or 'no modes defined'
    entropy = f"{m['mode_entropy']:.3f}" if m.get('modes_defined', True) else \
        'no modes defined'
    rows = [
        ('task', m['task']),
        ('policy', m['policy']),
        ('episodes', str(m['episodes'])),
        ('success rate', f"{m['success_rate']:.3f} ({wins}/{m['episodes']})"),
        ('modes (successes)', modes),
        ('mode entropy', entropy),
        ('mean length', f"{m['mean_length']:.1f} steps"),
        ('latency per action', f"p50 {m['latency_ms_p50']:.3f} ms, "
                               f"p99 {m['latency_ms_p99']:.3f} ms"),
        ('wall time', f"{m['wall_s']:.1f} s ({m['workers']} worker(s))"),
    ]
    if m.get('video'):
        rows.append(('video', m['video']))
    width = max(len(k) for k, _ in rows)
    return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def run(args: argparse.Namespace) -> int:
    import torch
    torch.set_num_threads(1)
    from vdd_ros.errors import UserError
    from vdd_ros.sim.rollout import dataset_env, evaluate
    from vdd_ros.sim.tasks import get_task

    for flag, value in (('--json', args.json), ('--video', args.video)):
        if value is not None:
            check_writable(value, flag, create_parents=False)
    if args.dataset_env:
        if args.via_ros:
            raise UserError('--via-ros runs the registered tasks in sim_node: drop it with '
                            '--dataset-env')
        env = dataset_env(args.dataset_env, args.horizon)
    else:
        if args.horizon is not None:
            raise UserError("--horizon applies to --dataset-env (a task has its own)")
        get_task(args.task)
        env = args.task
    metrics = evaluate_from_args(args) if args.via_ros else evaluate(
        args.policy, env, args.episodes, workers=args.workers, video=args.video,
        show_progress=not args.quiet, device=args.device)
    print(format_table(metrics))
    if args.json:
        write_json(args.json, metrics)
        print(f'metrics -> {args.json}')
    return 0
