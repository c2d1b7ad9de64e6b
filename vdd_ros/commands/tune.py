"""`vdd-ros tune`: candidate VDD-MoE settings scored on validation seeds (vdd_ros/pipeline/
tune.py); the test seeds stay sealed, so the reported table never informs a choice."""
from __future__ import annotations

import argparse
import signal
from pathlib import Path

from vdd_ros.errors import UserError
from vdd_ros.sim.tasks import TASKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--task', default='lift_carry',
                        help=f'{", ".join(TASKS)} (default: %(default)s)')
    parser.add_argument('--candidates', type=Path, default=None, metavar='F.yaml',
                        help='candidate settings (default: config/tune.yaml)')
    parser.add_argument('--only', nargs='+', default=None, metavar='NAME',
                        help='score only these candidates of the file')
    parser.add_argument('--config', type=Path, default=None,
                        help='pipeline config YAML (default: config/pipeline.yaml): the data, '
                        'the episode count and the shared training settings')
    parser.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE',
                        help='override pipeline config fields, e.g. eval_episodes=20')
    parser.add_argument('--results', type=Path, default=Path('results'),
                        help='results folder; outputs go to RESULTS/TASK/tune (default: '
                        '%(default)s)')
    parser.add_argument('--device', default='cpu', help='torch device (default: %(default)s)')
    parser.add_argument('--force', action='store_true', help='rerun every stage')
    parser.add_argument('--from', dest='rerun_from', metavar='STAGE', default=None,
                        help='rerun this stage and what reads it (e.g. tune/default/vdd_moe)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads, 0 for torch default (default: %(default)s)')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')


def run(args: argparse.Namespace) -> int:
    import torch

    from vdd_ros.commands.pipeline import _terminate
    from vdd_ros.core.config import parse_overrides
    from vdd_ros.pipeline import load_pipeline_config
    from vdd_ros.pipeline.tune import load_tune_config, run_tune
    if args.threads < 0:
        raise UserError(f'--threads must be >= 0, got {args.threads}')
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = load_pipeline_config(args.task, args.config, parse_overrides(args.set))
    study = 'tune' if args.candidates is None else args.candidates.stem
    if not study.replace('_', 'a').replace('-', 'a').isalnum() or not study.isascii():
        raise UserError(f'--candidates {args.candidates}: the file name names the study\'s '
                        f'report; use letters, digits, _ and - (e.g. tune_modes.yaml)')
    tune = load_tune_config(args.candidates)
    if args.only:
        unknown = [n for n in args.only if n not in tune.candidates]
        if unknown:
            raise UserError(f'--only: unknown candidate {unknown[0]!r} (candidates: '
                            f'{", ".join(tune.candidates)})')
        tune.candidates = {n: tune.candidates[n] for n in args.only}
    print(f'vdd-ros tune on {args.task} -> {args.results / args.task / "tune"}: '
          f'{len(tune.candidates)} candidate(s), {cfg.eval_episodes} validation episodes each')
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        run_tune(args.task, cfg, tune, args.results, device=args.device, force=args.force,
                 rerun_from=args.rerun_from, show_progress=not args.quiet, study=study)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
