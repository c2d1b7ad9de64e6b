"""`vdd-ros collect`: scripted demonstrations of a task into a robomimic-style HDF5 file."""
from __future__ import annotations

import argparse

from vdd_ros.core.io import check_writable
from vdd_ros.errors import UserError
from vdd_ros.sim.tasks import TASKS


def _probs(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {text!r}')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--task', required=True,
                        help=f"{', '.join(TASKS)}; or Lift: robosuite's standard Lift with "
                             "robomimic's observation keys (one mode)")
    parser.add_argument('--episodes', type=int, default=100,
                        help='successful demonstrations to keep (default 100)')
    parser.add_argument('--out', required=True, help='output .hdf5 file (written atomically)')
    parser.add_argument('--workers', type=int, default=1, help='worker processes (default 1)')
    parser.add_argument('--seed', type=int, default=0,
                        help='first episode seed; episodes use seed, seed+1, ... (default 0)')
    parser.add_argument('--mode-probs', type=_probs, default=None,
                        help='comma-separated probabilities of the task modes (default equal)')
    parser.add_argument('--noise', type=float, default=None,
                        help='std of the Gaussian noise on position actions (default 0.03)')
    parser.add_argument('--valid-fraction', type=float, default=0.1,
                        help='share of demonstrations in mask/valid (default 0.1)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
    import torch
    torch.set_num_threads(1)
    from vdd_ros.sim.collection import collect
    from vdd_ros.sim.demonstrators import DEFAULT_NOISE
    from vdd_ros.sim.tasks import get_task

    if args.task != 'Lift':
        get_task(args.task)
    if not 0.0 <= args.valid_fraction < 1.0:
        raise UserError(f'--valid-fraction must be in [0, 1), got {args.valid_fraction}')
    out = str(args.out)
    if not out.endswith(('.hdf5', '.h5')):
        raise UserError(f'--out must name an .hdf5 file, got {out}')
    check_writable(out, '--out', create_parents=False)
    summary = collect(args.task, args.episodes, out, workers=args.workers, seed=args.seed,
                      mode_probs=args.mode_probs,
                      noise=DEFAULT_NOISE if args.noise is None else args.noise,
                      valid_fraction=args.valid_fraction, show_progress=not args.quiet)
    modes = ', '.join(f'{m} {n}' for m, n in summary['mode_counts'].items()) or \
        'no modes defined'
    print(f"{summary['kept']} {args.task} demonstrations -> {out} "
          f"(discarded {summary['discarded']} failed of {summary['attempts']} episodes)")
    print(f"modes: {modes}; mean length {summary['mean_length']:.1f} steps")
    print(f"{summary['steps']} steps in {summary['wall_s']:.1f} s with {summary['workers']} "
          f"worker(s): {summary['steps_per_s']:.0f} steps/s overall, "
          f"{summary['busy_steps_per_s']:.0f} steps/s per busy worker")
    if not summary['complete']:
        print(f"warning: only {summary['kept']} of {args.episodes} requested episodes "
              f"succeeded")
        return 1
    return 0
