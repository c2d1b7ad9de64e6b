"""`vdd-ros pipeline`: demonstrations to a results report on one task, resumable by stage
(`--via-bags`: the same job over standard ROS 2 messages and rosbag2 recordings; `--seeds N`:
every policy trained with N seeds, reported with intervals; see vdd_ros/pipeline/)."""
from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

from vdd_ros.errors import UserError
from vdd_ros.policies import EVALUATIONS, POLICY_KINDS
from vdd_ros.sim.tasks import TASKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument('--task', default=None,
                       help=f'{", ".join(TASKS)} (default: lift_carry)')
    where.add_argument('--dataset', type=Path, default=None, metavar='F.hdf5',
                       help="your robomimic-layout dataset: trained on, and every policy "
                            "evaluated in the robosuite environment its env_args describe; "
                            'results in RESULTS/<file stem>')
    parser.add_argument('--obs-keys', nargs='+', default=None, metavar='KEY',
                        help="with --dataset: observation keys in order (default: the file's "
                             'recorded obs_fields, else every low-dimensional key, sorted)')
    parser.add_argument('--filter-key', default=None, metavar='KEY',
                        help="with --dataset: train on the demos of mask/KEY (robomimic's "
                             'filter keys); mask/valid stays the validation split')
    parser.add_argument('--device', default='cpu', help='torch device for training and the '
                        'policies (default: %(default)s)')
    parser.add_argument('--force', action='store_true',
                        help='rerun every stage, even those whose outputs are cached')
    parser.add_argument('--from', dest='rerun_from', metavar='STAGE', default=None,
                        help='rerun this stage and every stage that reads its outputs '
                        '(collect, record and bag2dataset with --via-bags, or dataset with '
                        f'--dataset; {", ".join(POLICY_KINDS)}, '
                        f'{", ".join("eval_" + e for e in EVALUATIONS)}, latency, video, '
                        'report; a training, evaluation or latency stage in every seed, or one '
                        'seed\'s as seed_<s>/<stage>)')
    parser.add_argument('--seeds', type=int, default=None, metavar='N',
                        help='train and evaluate every policy with N training seeds (train.seed '
                        'onwards) and report means with 95%% intervals (default: the config\'s '
                        '`seeds`, 1)')
    parser.add_argument('--via-bags', action='store_true',
                        help='everything over standard ROS 2 messages: record the scripted '
                        "demonstrations through sim_node and policy_node with the task's "
                        'binding, convert the bags with bag2dataset, evaluate the teacher and '
                        'the VDD-MoE through the nodes; results in RESULTS/via_bags/TASK')
    parser.add_argument('--config', type=Path, default=None,
                        help='pipeline config YAML (default: config/pipeline.yaml)')
    parser.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE',
                        help='override config fields, e.g. eval_episodes=20 or '
                        'train.teacher.iterations=2000')
    parser.add_argument('--results', type=Path, default=Path('results'),
                        help='results folder; outputs go to RESULTS/TASK (default: %(default)s)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads, 0 for torch default (default: %(default)s)')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    parser.add_argument('--nproc', type=int, default=1, metavar='N',
                        help='run the training stages data-parallel on N torchrun ranks '
                        '(default: %(default)s, in this process)')


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C, so worker processes and ROS nodes are stopped."""
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    import torch

    from vdd_ros.core.config import parse_overrides
    from vdd_ros.pipeline import describe_config, load_pipeline_config, run_pipeline
    if args.nproc < 1:
        raise UserError(f'--nproc must be >= 1, got {args.nproc}')
    if args.threads < 0:
        raise UserError(f'--threads must be >= 0, got {args.threads}')
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'--device {args.device}: CUDA is not available')
    from vdd_ros.pipeline import dataset_source, results_root
    dataset = None
    if args.dataset is not None:
        if args.via_bags:
            raise UserError('--via-bags records the registered tasks: drop it with --dataset')
        dataset = dataset_source(args.dataset, args.obs_keys, args.filter_key)
        name = args.dataset.stem
    else:
        if args.obs_keys or args.filter_key:
            raise UserError('--obs-keys and --filter-key apply to --dataset (a task has its '
                            'own observation)')
        name = args.task or 'lift_carry'
    overrides = parse_overrides(args.set)
    if args.seeds is not None:
        if args.seeds < 1:
            raise UserError(f'--seeds must be >= 1, got {args.seeds}')
        overrides['seeds'] = args.seeds
    cfg = load_pipeline_config(None if dataset else name, args.config, overrides)
    folder = results_root(args.results, args.via_bags) / name
    print(f'vdd-ros pipeline on {name}{" via bags" if args.via_bags else ""} -> {folder} '
          f'(device {args.device})')
    print('\n'.join(f'  {line}' for line in describe_config(cfg).splitlines()))
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        metrics = run_pipeline(name, cfg, args.results, device=args.device,
                               force=args.force, rerun_from=args.rerun_from,
                               show_progress=not args.quiet, via_bags=args.via_bags,
                               nproc=args.nproc, dataset=dataset)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not metrics['targets_met']:
        print('some per-task targets were MISSED (see the report)')
        return 1
    return 0
