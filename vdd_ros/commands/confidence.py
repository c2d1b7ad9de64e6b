"""`vdd-ros confidence`: fit, calibrate and validate out-of-distribution signals of an MoE."""
from __future__ import annotations

import argparse
from pathlib import Path

from vdd_ros.core.io import check_writable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vdd_ros.confidence_study import DEFAULT_CONDITIONS, StudyConfig
    d = StudyConfig()
    parser.add_argument('--policy', required=True, help='MoE checkpoint folder (VDD-MoE or a '
                        'baseline); the chosen calibration is stored in it')
    parser.add_argument('--dataset', required=True,
                        help='the dataset it was trained on (train split: fit; valid split: '
                             'calibration)')
    parser.add_argument('--teacher', default=None,
                        help='teacher checkpoint: adds the teacher_residual candidate')
    parser.add_argument('--other-dataset', default=None,
                        help="another task's demonstrations of the same observation layout "
                             '(default: initial states with the cube moved out of its region)')
    parser.add_argument('--episodes', type=int, default=d.episodes,
                        help='closed-loop test episodes per condition, on test seeds (0: '
                             f'offline only; default {d.episodes})')
    parser.add_argument('--validation-episodes', type=int, default=d.validation_episodes,
                        help='clean closed-loop episodes on validation seeds for calibration '
                             f'(default {d.validation_episodes})')
    parser.add_argument('--conditions', nargs='+', default=list(DEFAULT_CONDITIONS),
                        help=f'perturbations to test (default {" ".join(DEFAULT_CONDITIONS)})')
    parser.add_argument('--sustain', type=int, default=d.sustain,
                        help='consecutive actions above a threshold before a level '
                             f'(default {d.sustain})')
    parser.add_argument('--components', type=int, default=d.components,
                        help=f'Gaussian mixture components of the density (default '
                             f'{d.components})')
    parser.add_argument('--workers', type=int, default=d.workers,
                        help='worker processes for the episodes (default 1)')
    parser.add_argument('--out', default=None,
                        help='folder for confidence.md/.json/.png (default: results/confidence/'
                             '<checkpoint name>)')
    parser.add_argument('--no-save', action='store_true',
                        help='do not write confidence.safetensors into the checkpoint')


def run(args: argparse.Namespace) -> int:
    from vdd_ros.confidence_study import StudyConfig, format_report, run_study
    cfg = StudyConfig(episodes=args.episodes, validation_episodes=args.validation_episodes,
                      conditions=tuple(args.conditions), components=args.components,
                      sustain=args.sustain, workers=args.workers, save=not args.no_save)
    cfg.check()
    out = args.out or str(Path('results') / 'confidence' / Path(args.policy).name)
    check_writable(out, '--out', folder=True)
    report = run_study(args.policy, args.dataset, cfg, teacher=args.teacher,
                       other_dataset=args.other_dataset, out=out)
    print(format_report(report))
    print(f'report -> {out}/confidence.md ({report["wall_s"]:.0f} s)')
    return 0
