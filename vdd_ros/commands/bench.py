"""`vdd-ros bench`: per-action latency at batch 1 on the CPU, MoE against the teacher, in torch
and through onnxruntime (the exported graphs), with the MoE's arithmetic floor.

`vdd-ros bench --ros`: policy_node over ROS instead (deadline misses, obs-to-action latency and
where the time goes, repeated runs per rate and control loop; see vdd_ros/ros/bench.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from vdd_ros.core.bench import latency_benchmark
from vdd_ros.core.io import check_writable, write_json
from vdd_ros.ros import bench as ros_bench

TARGET_SPEEDUP_8 = 8.0       # MoE at least 8x faster than the 8-step teacher
TARGET_ACT_OVER_FORWARD = 1.5  # MoE act within 1.5x of its bare network forward
TARGET_ONNX_OVER_TORCH = 0.5   # onnxruntime MoE act at most half the torch MoE act


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--ros', action='store_true', help='benchmark policy_node over ROS '
                        '(control loops, deadline misses) instead of the bare policies')
    parser.add_argument('--loader', metavar='F.hdf5', default=None,
                        help="a camera dataset's training windows read per batch from the "
                        'file, against a teacher training step (samples per second)')
    parser.add_argument('--batch', type=int, default=64,
                        help='with --loader: windows per batch (default: %(default)s)')
    parser.add_argument('--json', type=Path, default=None, help='where to write the results '
                        '(default: results/bench/latency.json, with --ros results/bench/ros.json)')
    parser.add_argument('--calls', type=int, default=2000,
                        help='timed calls per policy after warm-up (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=200)
    parser.add_argument('--obs-dim', type=int, default=60)
    parser.add_argument('--action-dim', type=int, default=7)
    parser.add_argument('--hidden-dim', type=int, default=256)
    parser.add_argument('--layers', type=int, default=3)
    parser.add_argument('--experts', type=int, default=8)
    parser.add_argument('--expert-mode', default=None,
                        choices=['sample', 'argmax', 'per_episode'],
                        help="the MoE's expert choice (default: sample; with --ros: the "
                        "checkpoint's own)")
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads and onnxruntime intra-op threads')
    ros_bench.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from vdd_ros.errors import UserError
    if args.ros:
        return ros_bench.run(args, args.json or Path('results/bench/ros.json'))
    if args.loader is not None:
        return _loader(args)
    args.json = args.json or Path('results/bench/latency.json')
    if args.calls < 1000:
        raise UserError(f'--calls: at least 1000 calls are needed for a p99, got {args.calls}')
    check_writable(args.json, '--json')
    r = latency_benchmark(args.obs_dim, args.action_dim, args.hidden_dim, args.layers,
                          args.experts, calls=args.calls, warmup=args.warmup,
                          expert_mode=args.expert_mode or 'sample', threads=args.threads)
    r['targets'] = {'speedup_vs_teacher_8': TARGET_SPEEDUP_8,
                    'act_over_forward': TARGET_ACT_OVER_FORWARD,
                    'onnx_moe_over_torch': TARGET_ONNX_OVER_TORCH}
    r['met'] = {'speedup_vs_teacher_8': r['speedup_vs_teacher_8'] >= TARGET_SPEEDUP_8,
                'act_over_forward': r['act_over_forward'] <= TARGET_ACT_OVER_FORWARD,
                'onnx_moe_over_torch': r['onnx_moe_over_torch'] <= TARGET_ONNX_OVER_TORCH}
    s = r['settings']
    print(f'batch 1, CPU, {s["threads"]} thread(s), {s["num_layers"]}x{s["hidden_dim"]} MLP, '
          f'obs {s["obs_dim"]}-d, action {s["action_dim"]}-d, {s["calls"]} calls')
    print(f'{"policy":<26}{"p50 ms":>10}{"p99 ms":>10}{"vs MoE":>9}')
    rows = [('MoE act (1 pass)', r['moe']), ('MoE bare network forward', r['moe_forward']),
            ('ONNX MoE act', r['onnx_moe']), ('ONNX MoE bare graph run', r['onnx_moe_run'])]
    rows += [(f'teacher, {k} step(s)', v) for k, v in r['teacher'].items()]
    rows += [(f'ONNX teacher, {k} step(s)', v) for k, v in r['onnx_teacher'].items()]
    for name, v in rows:
        print(f'{name:<26}{v["p50"]:>10.4f}{v["p99"]:>10.4f}{v["p50"] / r["moe_ms_p50"]:>8.1f}x')
    f = r['floor']
    print(f'MoE arithmetic floor: {f["flops"] / 1e3:.0f} kFLOP at '
          f'{f["flops"] / f["floor_ms"] / 1e6:.1f} GFLOP/s (numpy float32 matmul, one core) = '
          f'{f["floor_ms"]:.4f} ms; numpy batch-1 matmuls {f["numpy_batch1_ms"]:.4f} ms; '
          f'ONNX MoE act is {f["onnx_moe_over_floor"]:.1f}x the floor')
    flag = {True: 'met', False: 'MISSED'}
    print(f'speed-up vs 8-step teacher: {r["speedup_vs_teacher_8"]:.1f}x '
          f'(target >= {TARGET_SPEEDUP_8:.0f}x, {flag[r["met"]["speedup_vs_teacher_8"]]})')
    print(f'MoE act / bare forward: {r["act_over_forward"]:.2f}x '
          f'(target <= {TARGET_ACT_OVER_FORWARD}x, {flag[r["met"]["act_over_forward"]]})')
    print(f'ONNX MoE act / torch MoE act: {r["onnx_moe_over_torch"]:.2f}x '
          f'(target <= {TARGET_ONNX_OVER_TORCH}x, {flag[r["met"]["onnx_moe_over_torch"]]})')
    write_json(args.json, r)
    print(f'wrote {args.json}')
    return 0


def _loader(args: argparse.Namespace) -> int:
    from vdd_ros.core.bench import loader_benchmark
    from vdd_ros.errors import UserError
    args.json = args.json or Path('results/bench/loader.json')
    if args.batch < 1:
        raise UserError(f'--batch: must be >= 1, got {args.batch}')
    check_writable(args.json, '--json')
    r = loader_benchmark(args.loader, args.batch, threads=args.threads)
    print(f'{r["windows"]} windows of {", ".join(r["cameras"])}, batch {r["batch"]}, '
          f'{r["threads"]} thread(s)')
    print(f'loader: {r["loader_samples_per_s"]:.0f} samples/s '
          f'({r["loader_samples_per_s_cold"]:.0f} on the first pass)')
    print(f'teacher training step: {r["train_samples_per_s"]:.0f} samples/s; the loader takes '
          f'{100 * r["loader_share"]:.0f}% of a step')
    write_json(args.json, r)
    print(f'wrote {args.json}')
    return 0
