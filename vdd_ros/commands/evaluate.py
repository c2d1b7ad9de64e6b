"""`vdd-ros evaluate`: closed-loop success, behaviour modes and latency of a policy."""
from __future__ import annotations

import argparse
from typing import Any

from vdd_ros.core.io import check_writable, write_json
from vdd_ros.ros.evaluation import add_via_ros_arguments, evaluate_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--policy', required=True,
                        help="checkpoint folder, 'scripted' or 'averaged' (the task's oracles)")
    parser.add_argument('--task', required=True, help='lift_carry, pick_either or stack_either')
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
                      for k, v in m['mode_counts'].items())
    rows = [
        ('task', m['task']),
        ('policy', m['policy']),
        ('episodes', str(m['episodes'])),
        ('success rate', f"{m['success_rate']:.3f} ({wins}/{m['episodes']})"),
        ('modes (successes)', modes),
        ('mode entropy', f"{m['mode_entropy']:.3f}"),
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
    from vdd_ros.sim.rollout import evaluate
    from vdd_ros.sim.tasks import get_task

    get_task(args.task)
    for flag, value in (('--json', args.json), ('--video', args.video)):
        if value is not None:
            check_writable(value, flag, create_parents=False)
    metrics = evaluate_from_args(args) if args.via_ros else evaluate(
        args.policy, args.task, args.episodes, workers=args.workers, video=args.video,
        show_progress=not args.quiet, device=args.device)
    print(format_table(metrics))
    if args.json:
        write_json(args.json, metrics)
        print(f'metrics -> {args.json}')
    return 0
