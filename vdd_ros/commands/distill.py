"""`vdd-ros distill`: distil a teacher checkpoint into a VDD Mixture of Experts (the code the
distillation_node runs)."""
from __future__ import annotations

import argparse
from pathlib import Path

from vdd_ros.commands.train_teacher import add_common_arguments, run_job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--teacher', type=Path, required=True,
                        help='teacher checkpoint folder (from vdd-ros train-teacher)')
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from vdd_ros.core.jobs import distill_job
    return run_job(distill_job, args, args.teacher, args.dataset)
