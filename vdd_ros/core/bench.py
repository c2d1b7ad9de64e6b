"""Per-action inference latency at batch 1: the MoE against the teacher at several step counts."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from vdd_ros.core.config import MoEConfig, TeacherConfig
from vdd_ros.core.moe import MixtureOfExperts
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


def latency_benchmark(obs_dim: int = 60, action_dim: int = 7, hidden_dim: int = 256,
                      num_layers: int = 3, num_experts: int = 8,
                      steps: tuple[int, ...] = (1, 3, 8, 16), calls: int = 2000,
                      warmup: int = 200, expert_mode: str = 'sample',
                      threads: int = 1) -> dict[str, Any]:
    """Latency of `Policy.act` for the MoE and the teacher, and of the MoE's bare network.

    Both models use the same backbone size; each `act` call queries the network (one action
    per query), so no chunk amortises the cost.
    """
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
    results: dict[str, Any] = {'settings': {
        'obs_dim': obs_dim, 'action_dim': action_dim, 'hidden_dim': hidden_dim,
        'num_layers': num_layers, 'num_experts': num_experts, 'calls': calls,
        'warmup': warmup, 'threads': threads, 'expert_mode': expert_mode,
        'torch': torch.__version__}}
    results['moe'] = summary(time_calls(lambda: moe_policy.act(obs), calls, warmup))
    x = torch.from_numpy(obs)[None]

    def bare() -> None:
        with torch.inference_mode():
            h = moe.backbone(x)
            moe.mean_head(h), moe.gate(h)
    results['moe_forward'] = summary(time_calls(bare, calls, warmup))
    results['teacher'] = {}
    teacher_policy = ModelPolicy(teacher, spec)
    for n in steps:
        teacher.sampling_steps = n
        results['teacher'][str(n)] = summary(
            time_calls(lambda: teacher_policy.act(obs), max(calls // max(n // 4, 1), 200),
                       warmup))
    m = results['moe']['p50']
    results['moe_ms_p50'] = m
    results['moe_ms_p99'] = results['moe']['p99']
    results['moe_forward_ms_p50'] = results['moe_forward']['p50']
    results['teacher_ms_p50'] = {k: v['p50'] for k, v in results['teacher'].items()}
    results['speedup_vs_teacher'] = {k: v / m for k, v in results['teacher_ms_p50'].items()}
    if '8' in results['teacher_ms_p50']:
        results['speedup_vs_teacher_8'] = results['teacher_ms_p50']['8'] / m
    results['act_over_forward'] = m / results['moe_forward_ms_p50']
    return results
