"""`vdd-ros train-teacher`: train the diffusion teacher on a dataset (the code the
teacher_training_node runs)."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from vdd_ros.core.config import parse_overrides
from vdd_ros.errors import UserError


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by train-teacher and distill."""
    parser.add_argument('--dataset', type=Path, required=True, help='demonstrations (HDF5)')
    parser.add_argument('--out', type=Path, required=True, help='checkpoint folder to write')
    parser.add_argument('--config', type=Path, help='training config YAML (default: built-in '
                        'defaults, as in config/train.yaml)')
    parser.add_argument('--device', default='cpu', help='torch device (default: %(default)s)')
    parser.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE',
                        help='override config fields, e.g. teacher.iterations=500')
    parser.add_argument('--checkpoint-every', type=int, default=1000, metavar='N',
                        help='write the checkpoint every N iterations (default: %(default)s)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads, 0 for torch default (default: %(default)s)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')


def run_job(job: Callable[..., Path], args: argparse.Namespace, *positional: Any) -> int:
    """Run a training job; the first Ctrl-C stops it early (it still saves), the second aborts."""
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.checkpoint_every < 1:
        raise UserError(f'--checkpoint-every must be >= 1, got {args.checkpoint_every}')
    stop = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print('stopping after this iteration and saving (Ctrl-C again to abort)',
              file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        path = job(*positional, args.out, args.config, overrides=parse_overrides(args.set),
                   device=args.device, stop=stop, show_bar=not args.quiet,
                   checkpoint_every=args.checkpoint_every)
    finally:
        signal.signal(signal.SIGINT, previous)
    print(f'{"stopped early; " if stop.is_set() else ""}wrote {path}')
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from vdd_ros.core.jobs import train_teacher_job
    return run_job(train_teacher_job, args, args.dataset)
