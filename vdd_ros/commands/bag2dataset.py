"""`vdd-ros bag2dataset`: rosbag2 recordings -> a robomimic-layout HDF5 dataset via a binding."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bags', nargs='+', metavar='BAG',
                        help='rosbag2 folders (or single .mcap / .db3 files): sqlite3 or MCAP, '
                             'zstd-compressed or not')
    parser.add_argument('--binding', required=True,
                        help='binding YAML (topics -> features, action slices -> topics)')
    parser.add_argument('--rate', type=float, default=None, metavar='HZ',
                        help="control rate to resample to (default: the binding's rate_hz)")
    parser.add_argument('--out', required=True, help='output .hdf5 file (written atomically)')
    parser.add_argument('--task', default=None,
                        help="task recorded in the dataset's env_args (default: the binding's "
                             'name when it names a task)')
    parser.add_argument('--on-gap', choices=('split', 'drop'), default='split',
                        help='a stale source inside an episode splits it into pieces (default) '
                             'or drops the episode')
    parser.add_argument('--min-steps', type=int, default=2,
                        help='pieces shorter than this are dropped (default 2)')
    parser.add_argument('--keep-failed', action='store_true',
                        help='keep episodes whose end marker says success: false')
    parser.add_argument('--valid-fraction', type=float, default=0.1,
                        help='share of demonstrations in mask/valid (default 0.1)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
    from vdd_ros.bags import convert
    from vdd_ros.binding import load_binding
    from vdd_ros.errors import UserError
    from vdd_ros.sim.tasks import TASKS, get_task

    out = str(args.out)
    if not out.endswith(('.hdf5', '.h5')):
        raise UserError(f'--out must name an .hdf5 file, got {out}')
    if args.rate is not None and not args.rate > 0:
        raise UserError(f'--rate must be positive, got {args.rate}')
    binding = load_binding(args.binding)
    task = args.task if args.task is not None else (
        binding.name if binding.name in TASKS else None)
    if task is not None:
        get_task(task)
    summary = convert(args.bags, binding, out, rate_hz=args.rate, on_gap=args.on_gap,
                      min_steps=args.min_steps, keep_failed=args.keep_failed,
                      valid_fraction=args.valid_fraction,
                      env_args={'task': task} if task is not None else None,
                      show_progress=not args.quiet)
    for line in summary.lines():
        print(line)
    print(f'-> {out}')
    return 0
