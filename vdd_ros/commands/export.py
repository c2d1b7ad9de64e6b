"""`vdd-ros export`: a checkpoint (VDD-MoE, baseline or teacher) as one ONNX file for
onnxruntime, the torch-free acting path (`load_policy F.onnx`, `policy_node
checkpoint:=F.onnx`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from vdd_ros.core.io import check_writable

PARITY_TOL = 1e-5   # --check: largest |torch - onnx| per unit of the largest action (>= 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--policy', required=True, help='checkpoint folder to export')
    parser.add_argument('--out', required=True, type=Path, help='the .onnx file to write')
    parser.add_argument('--opset', type=int, default=None,
                        help='ONNX opset, 17-20 (default 17: onnxruntime >= 1.13 runs it)')
    parser.add_argument('--expert-mode', default=None,
                        help="MoE: the file's default expert mode (sample, argmax, "
                             "per_episode or an expert index; default: the checkpoint's)")
    parser.add_argument('--steps', type=int, default=None,
                        help="teacher: the file's default sampling steps (default: the "
                             "checkpoint's)")
    parser.add_argument('--binding', default=None,
                        help='binding YAML (or task:<name>) to check against the checkpoint '
                             'and record in the file')
    parser.add_argument('--check', type=int, default=1000, metavar='N',
                        help='compare torch and onnxruntime actions on N random observation '
                             'windows with the same random numbers (0: skip; default 1000)')


def run(args: argparse.Namespace) -> int:
    from vdd_ros.core.config import is_integer
    from vdd_ros.core.onnx_export import OPSET, export_checkpoint, max_difference
    from vdd_ros.errors import UserError
    if args.check < 0:
        raise UserError(f'--check: must be >= 0, got {args.check}')
    check_writable(args.out, '--out')
    binding = None
    if args.binding:
        from vdd_ros.binding import binding_for_task, load_binding
        try:
            binding = (binding_for_task(args.binding[len('task:'):])
                       if args.binding.startswith('task:') else load_binding(args.binding))
        except UserError as exc:
            raise UserError(f'--binding: {exc}') from None
    mode = args.expert_mode
    if isinstance(mode, str) and is_integer(mode):
        mode = int(mode)
    meta = export_checkpoint(args.policy, args.out, OPSET if args.opset is None else args.opset,
                             mode, args.steps, binding)
    spec = meta['spec']
    what = (f'{meta["moe"]["num_experts"]} expert(s), expert_mode {meta["moe"]["expert_mode"]}'
            if meta['kind'] == 'moe' else
            f'denoiser, {meta["teacher"]["sampling_steps"]} {meta["teacher"]["sampler"]} steps '
            'outside the graph')
    print(f'{args.out}: {meta["method"]} ({what}), obs {spec["obs_horizon"]}x'
          f'{sum(n for _, n in spec["obs_fields"])} -> actions {spec["action_horizon"]}x'
          f'{spec["action_dim"]} (exec {spec["action_exec"]}), opset {meta["opset"]}, '
          f'{args.out.stat().st_size / 1024:.1f} KiB')
    if args.check:
        from vdd_ros.core.checkpoint import load_model
        from vdd_ros.core.onnx_policy import load_onnx_policy
        model = load_model(args.policy)[0]
        policy = load_onnx_policy(args.out)
        model_mode = meta['moe']['expert_mode'] if meta['kind'] == 'moe' else None
        if model_mode is not None:
            model.set_expert_mode(model_mode)
        if args.steps is not None:
            model.sampling_steps = int(args.steps)
        worst, biggest = max_difference(model, policy.model, policy.spec, args.check)
        tol = PARITY_TOL * max(1.0, biggest)
        print(f'parity on {args.check} observation windows: max |torch - onnx| = {worst:.2e} '
              f'(actions up to {biggest:.3g}, tolerance {tol:.1e})')
        if not worst <= tol:
            raise UserError(f'{args.out}: onnxruntime actions differ from torch by {worst:.2e} '
                            f'(tolerance {tol:.1e})')
    return 0
