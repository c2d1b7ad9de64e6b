"""`vdd-ros train-teacher`: train the diffusion teacher on a dataset (the code the
teacher_training_node runs).

Data-parallel: `torchrun --nproc-per-node N -m vdd_ros.cli train-teacher ...` (or `distill`);
every rank runs the job, rank 0 alone prints, shows progress and writes. Under torchrun SIGTERM
stops like Ctrl-C (torchrun forwards the signal it receives to every rank).
"""
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
    parser.add_argument('--filter-key', default=None, metavar='KEY',
                        help="train on the demos of mask/KEY (robomimic's filter keys); "
                             'mask/valid gives the validation loss either way')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    parser.add_argument('--resume', action='store_true',
                        help='continue from the training state in OUT.state (saved every '
                        '--checkpoint-every iterations and when stopped), with any number of '
                        'ranks; without one, start afresh')
    parser.epilog = ('Data-parallel on N processes: torchrun --nproc-per-node N -m vdd_ros.cli '
                     f'{parser.prog.split()[-1]} ... (gloo on CPU, NCCL with --device cuda); '
                     'the global batch stays the configured one.')


def run_job(job: Callable[..., Path], args: argparse.Namespace, *positional: Any,
            **options: Any) -> int:
    """Run a training job; the first Ctrl-C stops it early (it still saves), the second aborts.

    Under torchrun only rank 0 prints, and SIGTERM is handled like Ctrl-C.
    """
    import torch

    from vdd_ros.core.distributed import launched, rank_from_env
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.checkpoint_every < 1:
        raise UserError(f'--checkpoint-every must be >= 1, got {args.checkpoint_every}')
    main = rank_from_env() == 0
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        if main:
            print('stopping after this iteration and saving (Ctrl-C again to abort)',
                  file=sys.stderr)

    handled = [signal.SIGINT, *([signal.SIGTERM] if launched() else [])]
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        path = job(*positional, args.out, args.config, overrides=parse_overrides(args.set),
                   device=args.device, stop=stop, show_bar=not args.quiet,
                   checkpoint_every=args.checkpoint_every, resume=args.resume,
                   filter_key=args.filter_key, **options)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if main:
        from vdd_ros.core.checkpoint import read_meta
        valid = (read_meta(path).get('metrics') or {}).get('valid_loss')
        print(f'{"stopped early; " if stop.is_set() else ""}wrote {path}'
              + ('' if valid is None else f' (validation loss {valid:.4g})'))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument('--obs-keys', nargs='+', default=None, metavar='KEY',
                        help="observation keys in order, as robomimic configs choose their "
                             "low-dimensional keys (default: the dataset's recorded "
                             'obs_fields, else every low-dimensional key, sorted); the '
                             'distilled and evaluated policies keep them')


def run(args: argparse.Namespace) -> int:
    from vdd_ros.core.jobs import train_teacher_job
    return run_job(train_teacher_job, args, args.dataset, obs_keys=args.obs_keys)
