"""`vdd-ros report`: redraw task reports from their metrics.json; the cross-task summary."""
from __future__ import annotations

import argparse
from pathlib import Path

from vdd_ros.core.io import check_writable
from vdd_ros.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--results', type=Path, default=Path('results'),
                        help='results folder of `vdd-ros pipeline` (default: %(default)s)')
    which = parser.add_mutually_exclusive_group()
    which.add_argument('--task', action='append', default=[],
                       help='redraw report.md and the plots of this task (repeatable)')
    which.add_argument('--all', action='store_true',
                       help='redraw the report of every task folder with a metrics.json')


def run(args: argparse.Namespace) -> int:
    from vdd_ros.report import (ALL_TASKS, CONSISTENCY_WINS, CROSS_TASK_WINS,
                                consistency_status, cross_task_status, format_summary,
                                render_task_report, task_metrics, write_summary)
    tasks = task_metrics(args.results)
    if not tasks:
        raise UserError(f'{args.results}: no task folder with a metrics.json '
                        f'(run `vdd-ros pipeline` first)')
    for name in args.task:
        if name not in tasks:
            raise UserError(f'{args.results / name / "metrics.json"}: missing')
    check_writable(args.results / 'summary.md', '--results', create_parents=False)
    for name in (list(tasks) if args.all else args.task):
        check_writable(args.results / name / 'report.md', '--results', create_parents=False)
    for name in (list(tasks) if args.all else args.task):
        print(f'wrote {render_task_report(args.results / name)}')
    for metrics in tasks.values():
        print(format_summary(metrics))
    statuses = [cross_task_status(tasks), consistency_status(tasks)]
    print(f'cross-task targets: VDD-MoE success above every baseline on >= {CROSS_TASK_WINS} '
          f'of {ALL_TASKS} tasks: {statuses[0]}; mode entropy above consistency '
          f'distillation\'s on >= {CONSISTENCY_WINS} of {ALL_TASKS} tasks: {statuses[1]}')
    print(f'wrote {write_summary(args.results)}')
    return 1 if 'MISSED' in statuses else 0
