"""Per-action inference latency at batch 1: the MoE against the teacher at several step counts,
in torch and through onnxruntime (the exported graphs), and the MoE's arithmetic floor."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vdd_ros.core.config import MoEConfig, TeacherConfig
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.onnx_policy import ARGMAX
from vdd_ros.core.policy import ModelPolicy, PolicySpec
from vdd_ros.core.teacher import DiffusionTeacher


def time_calls(fn: Callable[[], Any], calls: int, warmup: int) -> np.ndarray:
    """Wall time of each of `calls` calls after `warmup` untimed ones, in milliseconds."""
    for _ in range(warmup):
        fn()
    out = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        out[i] = (time.perf_counter_ns() - t0) / 1e6
    return out


def summary(ms: np.ndarray) -> dict[str, float]:
    return {'p50': float(np.percentile(ms, 50)), 'p99': float(np.percentile(ms, 99)),
            'mean': float(ms.mean())}


def time_interleaved(fns: dict[str, Callable[[], Any]], calls: int, warmup: int,
                     rounds: int = 10) -> dict[str, np.ndarray]:
    """`time_calls` of each function in turn, `rounds` times `calls / rounds` calls, so that
    a change of machine load falls on every function alike."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in fns}
    per_round = -(-calls // rounds)
    for r in range(rounds):
        for name, fn in fns.items():
            out[name].append(time_calls(fn, per_round, warmup if r == 0 else 0))
    return {name: np.concatenate(parts)[:calls] for name, parts in out.items()}


def latency_benchmark(obs_dim: int = 60, action_dim: int = 7, hidden_dim: int = 256,
                      num_layers: int = 3, num_experts: int = 8,
                      steps: tuple[int, ...] = (1, 3, 8, 16), calls: int = 2000,
                      warmup: int = 200, expert_mode: str = 'sample',
                      threads: int = 1) -> dict[str, Any]:
    """Latency of `Policy.act` for the MoE and the teacher, in torch and through onnxruntime
    (the exported graphs on `threads` intra-op threads), of the MoE's bare torch network and
    bare onnxruntime graph run, and the MoE's arithmetic floor (`matmul_floor`).

    Both models use the same backbone size; each `act` call queries the network (one action
    per query), so no chunk amortises the cost. The four MoE rows are timed interleaved.
    """
    import onnxruntime
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = PolicySpec(obs_fields=[('obs', obs_dim)], action_dim=action_dim)
    moe = MixtureOfExperts(MoEConfig(num_experts=num_experts, hidden_dim=hidden_dim,
                                     num_layers=num_layers, expert_mode=expert_mode),
                           obs_dim, action_dim)
    teacher = DiffusionTeacher(TeacherConfig(hidden_dim=hidden_dim, num_layers=num_layers),
                               obs_dim, action_dim)
    obs = np.random.default_rng(0).standard_normal(obs_dim).astype(np.float32)
    moe_policy = ModelPolicy(moe, spec)
    onnx_moe, onnx_teacher = onnx_policies(moe, teacher, spec, threads)
    results: dict[str, Any] = {'settings': {
        'obs_dim': obs_dim, 'action_dim': action_dim, 'hidden_dim': hidden_dim,
        'num_layers': num_layers, 'num_experts': num_experts, 'calls': calls,
        'warmup': warmup, 'threads': threads, 'expert_mode': expert_mode,
        'torch': torch.__version__, 'onnxruntime': onnxruntime.__version__}}
    x = torch.from_numpy(obs)[None]
    window = obs[None]

    def bare() -> None:   # (independent experts: every expert's mean)
        with torch.inference_mode():
            h = moe.features(x)
            moe.means(h), moe.log_gating(h)
    moe_policy.reset(0)
    onnx_moe.reset(0)
    timed = time_interleaved({
        'moe': lambda: moe_policy.act(obs), 'moe_forward': bare,
        'onnx_moe': lambda: onnx_moe.act(obs),
        'onnx_moe_run': lambda: onnx_moe.model.run(window, ARGMAX)}, calls, warmup)
    results.update({name: summary(ms) for name, ms in timed.items()})
    for name, policy, model in (('teacher', ModelPolicy(teacher, spec), teacher),
                                ('onnx_teacher', onnx_teacher, onnx_teacher.model)):
        results[name] = {}
        for n in steps:
            model.sampling_steps = n
            results[name][str(n)] = summary(
                time_calls(lambda: policy.act(obs), max(calls // max(n // 4, 1), 200),
                           warmup))
    m = results['moe']['p50']
    results['moe_ms_p50'] = m
    results['moe_ms_p99'] = results['moe']['p99']
    results['moe_forward_ms_p50'] = results['moe_forward']['p50']
    results['onnx_moe_ms_p50'] = results['onnx_moe']['p50']
    results['teacher_ms_p50'] = {k: v['p50'] for k, v in results['teacher'].items()}
    results['onnx_teacher_ms_p50'] = {k: v['p50'] for k, v in results['onnx_teacher'].items()}
    results['speedup_vs_teacher'] = {k: v / m for k, v in results['teacher_ms_p50'].items()}
    if '8' in results['teacher_ms_p50']:
        results['speedup_vs_teacher_8'] = results['teacher_ms_p50']['8'] / m
    results['act_over_forward'] = m / results['moe_forward_ms_p50']
    results['onnx_moe_over_torch'] = results['onnx_moe']['p50'] / m
    results['floor'] = matmul_floor(moe_matmul_shapes(moe))
    results['floor']['onnx_moe_over_floor'] = (results['onnx_moe']['p50']
                                               / results['floor']['floor_ms'])
    return results


def onnx_policies(moe: MixtureOfExperts, teacher: DiffusionTeacher, spec: PolicySpec,
                  threads: int) -> tuple[Any, Any]:
    """The MoE and the teacher exported and loaded back as onnxruntime policies."""
    from vdd_ros.core.checkpoint import save_checkpoint
    from vdd_ros.core.onnx_export import export_checkpoint
    from vdd_ros.core.onnx_policy import load_onnx_policy
    policies = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (('moe', moe), ('teacher', teacher)):
            folder = save_checkpoint(Path(tmp) / name, model, spec, name)
            export_checkpoint(folder, Path(tmp) / f'{name}.onnx')
            policies.append(load_onnx_policy(Path(tmp) / f'{name}.onnx', threads=threads))
    return policies[0], policies[1]


def moe_matmul_shapes(moe: MixtureOfExperts) -> list[tuple[int, int]]:
    """(in, out) of every matrix product the MoE's acting graph computes at batch 1: the
    gating and the chosen expert's mean (MixtureOfExperts.acting_shapes)."""
    return moe.acting_shapes()


_FLOOR_SCRIPT = r"""
import json, sys, time
import numpy as np
shapes = json.loads(sys.argv[1])
rng = np.random.default_rng(0)

def per_call(fn, calls):
    best = float('inf')
    for _ in range(7):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / calls)
    return best / 1e6

out = {'batch1_ms': [], 'batched_gflops': []}
for n_in, n_out in shapes:
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    x1 = rng.standard_normal((1, n_in)).astype(np.float32)
    xb = rng.standard_normal((256, n_in)).astype(np.float32)
    out['batch1_ms'].append(per_call(lambda: x1 @ w, 2000))
    out['batched_gflops'].append(2 * 256 * n_in * n_out / per_call(lambda: xb @ w, 50) / 1e6)
print(json.dumps(out))
"""


def matmul_floor(shapes: list[tuple[int, int]]) -> dict[str, Any]:
    """The arithmetic floor of a chain of matrix-vector products of `shapes` (in, out) on one
    core: FLOPs / numpy's float32 matmul throughput at these layer sizes (256 rows at once, so
    that the call overhead is amortised), and the sum of numpy's batch-1 products (the same
    FLOPs, call overhead included). Measured in a subprocess held to one BLAS thread."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS='1', OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    run = subprocess.run([sys.executable, '-c', _FLOOR_SCRIPT, json.dumps(shapes)], env=env,
                         capture_output=True, text=True, check=True)
    measured = json.loads(run.stdout)
    flops = [2 * a * b for a, b in shapes]
    floor_ms = sum(f / (g * 1e6) for f, g in zip(flops, measured['batched_gflops']))
    return {'shapes': [list(s) for s in shapes], 'flops': int(sum(flops)),
            'matmul_gflops': measured['batched_gflops'], 'floor_ms': floor_ms,
            'numpy_batch1_ms': float(sum(measured['batch1_ms']))}


def loader_benchmark(dataset: str, batch: int = 64, batches: int = 50, threads: int = 1,
                     obs_horizon: int = 2, seed: int = 0) -> dict[str, Any]:
    """Samples per second of a camera dataset's windows assembled per batch from the file
    (core/windows.py: random batches, HDF5 chunk cache warm after the first pass), against
    the samples per second of one teacher training step (encoder, denoiser, backward, Adam)
    at the same batch, `threads` torch threads."""
    from vdd_ros.core.config import TrainConfig
    from vdd_ros.core.data import load_dataset, make_windows
    from vdd_ros.core.windows import CameraWindows
    from vdd_ros.errors import UserError
    data = load_dataset(dataset)
    if not data.cameras:
        raise UserError(f'{dataset}: no camera fields (the loader benchmark reads images)')
    torch.set_num_threads(threads)
    demos = data.train_demos() or data.demos
    low, actions = make_windows(demos, obs_horizon, 8)
    windows = CameraWindows(demos, data.obs_fields, obs_horizon, torch.as_tensor(low))
    gen = torch.Generator().manual_seed(seed)
    picks = [torch.randint(len(windows), (batch,), generator=gen) for _ in range(batches)]
    start = time.perf_counter()
    for idx in picks:
        windows[idx]
    cold = time.perf_counter() - start
    start = time.perf_counter()
    obs = [windows[idx] for idx in picks]
    warm = time.perf_counter() - start
    cfg = TrainConfig()
    teacher = DiffusionTeacher(cfg.teacher, data.obs_dim, data.action_dim, obs_horizon, 8,
                               fields=data.obs_fields, vision=cfg.vision)
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-4)
    acts = torch.as_tensor(actions).reshape(len(actions), -1)
    teacher.train()

    def step(k: int) -> None:
        loss = teacher.loss(acts[picks[k]], obs[k], generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step(0)
    start = time.perf_counter()
    for k in range(1, batches):
        step(k)
    train = (time.perf_counter() - start) / (batches - 1)
    return {'dataset': str(dataset), 'batch': batch, 'batches': batches, 'threads': threads,
            'windows': len(windows), 'cameras': data.cameras,
            'loader_samples_per_s_cold': batch * batches / cold,
            'loader_samples_per_s': batch * batches / warm,
            'train_samples_per_s': batch / train,
            'loader_share': (warm / batches) / (warm / batches + train)}
