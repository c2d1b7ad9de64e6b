"""Obs-to-action latency and deadline misses of policy_node at a given control rate.

The policy node runs as its own process on a private ROS domain; this process publishes
observations at the same rate from a steady timer (as a simulator would, without the cost of
stepping one) and times each observation until the first action that answers it (same @seq).
Deadline misses and inference times come from the policy node's own diagnostics.

    python -m vdd_ros.ros.bench --policy default --rates 20 500 --duration 10 --json bench.json

`--policy tiny` or `default` use an untrained MoE of that size that queries its network on
every step (the worst case); pass a checkpoint folder to time a real one.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from vdd_ros.errors import UserError

# untrained MoEs that query their network on every step: 'tiny' (tests) and 'default' (the
# size of config/train.yaml's moe section: 8 experts, 3 x 256)
SIZES = {'tiny': dict(num_experts=3, hidden_dim=32, num_layers=1),
         'default': dict(num_experts=8, hidden_dim=256, num_layers=3)}


def benchmark_latency(policy: str, rate_hz: float, duration_s: float = 10.0,
                      task: str = 'lift_carry', expert_mode: str | None = None,
                      domain_id: int | None = None, startup_timeout_s: float = 90.0,
                      seed: int = 0, sweep_phase: bool = True,
                      realtime_priority: int = 0) -> dict[str, Any]:
    """Measure policy_node at `rate_hz` for `duration_s` seconds (after the first answer).

    The obs-to-action latency of a timer-driven policy includes the wait for its next tick,
    which depends on the phase between the observation stream and the policy's timer; with
    `sweep_phase` the source's rate is lowered by one period per window so that every phase
    offset is measured once (without it the result is one arbitrary phase). Returns
    observations sent and answered, obs-to-action latency percentiles (ms), and from the policy
    node's diagnostics its inference time and tick-wait (`obs_age`) percentiles, ticks,
    deadline misses and miss rate over the measured window.
    """
    from vdd_ros.ros.evaluation import NodeProcess, free_domain_id
    from vdd_ros.ros.runtime import make_executor
    from vdd_ros.ros.testing import Probe, ros_context, spin_until, tiny_moe_checkpoint
    from vdd_ros.sim.tasks import get_task

    if rate_hz <= 0 or duration_s <= 0:
        raise UserError('rate and duration must be > 0')
    spec = get_task(task)
    domain = free_domain_id() if domain_id is None else int(domain_id)
    namespace = f'/vdd_bench_{uuid.uuid4().hex[:8]}'
    rng = np.random.default_rng(seed)
    observations = rng.normal(size=(256, spec.obs_dim)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix='vdd_ros_bench_') as tmp:
        folder = Path(tmp)
        if policy in SIZES:
            checkpoint = str(tiny_moe_checkpoint(folder / policy, task, **SIZES[policy]))
        else:
            checkpoint = policy
        params: dict[str, Any] = {'checkpoint': checkpoint, 'task': spec.name,
                                  'control_rate_hz': float(rate_hz),
                                  'diagnostics_period_s': 0.5}
        if expert_mode:
            params['expert_mode'] = str(expert_mode)
        if realtime_priority:
            params['realtime_priority'] = int(realtime_priority)
        node = NodeProcess('policy_node', 'policy_node', params, folder, domain, namespace)
        try:
            with ros_context(domain) as ctx:
                probe = Probe(ctx, namespace, name='bench_source')
                executor = make_executor(ctx)
                executor.add_node(probe.node)
                state = {'i': 0}

                def tick() -> None:
                    i = state['i']
                    probe.send(observations[i % len(observations)], list(spec.obs_fields),
                               episode=1, step=i)
                    state['i'] = i + 1

                from rclpy.clock import Clock, ClockType
                # with sweep_phase the source runs one period per window slower than the
                # policy, so their phase offset sweeps every value once while measuring
                source_hz = rate_hz - 1.0 / duration_s if sweep_phase else rate_hz
                probe.node.create_timer(1.0 / source_hz, tick,
                                        clock=Clock(clock_type=ClockType.STEADY_TIME))
                ok = spin_until(executor, lambda: any('seq' in m for _, _, m in probe.actions)
                                and probe.last_status(f'{namespace}/policy_node') is not None,
                                startup_timeout_s)
                if not ok:
                    raise UserError(f'policy_node gave no answer within {startup_timeout_s:g} '
                                    f's:\n{node.log_tail()}')
                spin_until(executor, lambda: False, 1.0)   # settle
                first_seq = probe.seq + 1
                before = _diag_numbers(probe, f'{namespace}/policy_node')
                n_diag = len(probe.diagnostics)
                spin_until(executor, lambda: False, duration_s)
                last_seq = probe.seq
                spin_until(executor, lambda: len(probe.diagnostics) > n_diag + 1, 2.0)
                after = _diag_numbers(probe, f'{namespace}/policy_node')
                answered: dict[int, float] = {}
                for t, _, meta in probe.actions:
                    s = meta.get('seq')
                    if s is not None and first_seq <= s <= last_seq and s not in answered:
                        answered[s] = (t - probe.sent[s]) * 1e3
                probe.destroy()
                executor.shutdown()
        finally:
            code = node.stop()
    lat = np.asarray(list(answered.values()), dtype=np.float64)
    sent = last_seq - first_seq + 1
    ticks = after.get('ticks', 0.0) - before.get('ticks', 0.0)
    misses = after.get('deadline_misses', 0.0) - before.get('deadline_misses', 0.0)
    return {
        'policy': policy, 'task': spec.name, 'rate_hz': float(rate_hz),
        'duration_s': float(duration_s), 'observations_sent': int(sent),
        'observations_answered': int(lat.size),
        'answered_fraction': float(lat.size / sent) if sent else 0.0,
        'obs_to_action_ms_p50': _pct(lat, 50), 'obs_to_action_ms_p99': _pct(lat, 99),
        'obs_to_action_ms_mean': float(lat.mean()) if lat.size else 0.0,
        'obs_to_action_ms_max': float(lat.max()) if lat.size else 0.0,
        'inference_ms_p50': after.get('inference_ms_p50', 0.0),
        'inference_ms_p99': after.get('inference_ms_p99', 0.0),
        'obs_age_ms_p50': after.get('obs_age_ms_p50', 0.0),
        'obs_age_ms_p99': after.get('obs_age_ms_p99', 0.0),
        'sweep_phase': bool(sweep_phase), 'realtime_priority': int(realtime_priority),
        'policy_ticks': int(ticks), 'deadline_misses': int(misses),
        'skipped_periods': int(after.get('skipped_periods', 0.0)
                               - before.get('skipped_periods', 0.0)),
        'overruns': int(after.get('overruns', 0.0) - before.get('overruns', 0.0)),
        'deadline_miss_rate': float(misses / ticks) if ticks else 0.0,
        'policy_exit_status': code,
    }


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else 0.0


def _diag_numbers(probe: Any, name: str) -> dict[str, float]:
    status = probe.last_status(name)
    out: dict[str, float] = {}
    if status is not None:
        for key, value in status[2].items():
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m vdd_ros.ros.bench', description=__doc__
                                     .split('\n\n')[0])
    parser.add_argument('--policy', default='default', help="checkpoint folder, 'scripted', "
                        "or an untrained MoE: 'default' (8 x 3x256) or 'tiny' (default: "
                        "%(default)s)")
    parser.add_argument('--task', default='lift_carry')
    parser.add_argument('--rates', type=float, nargs='+', default=[20.0, 500.0])
    parser.add_argument('--duration', type=float, default=10.0, help='seconds per rate')
    parser.add_argument('--expert-mode', default=None)
    parser.add_argument('--fixed-phase', action='store_true',
                        help='publish at exactly the policy rate (one arbitrary phase)')
    parser.add_argument('--realtime-priority', type=int, default=0,
                        help='SCHED_FIFO priority of the policy node (0: normal scheduler)')
    parser.add_argument('--json', type=Path, help='write the results here')
    args = parser.parse_args(argv)
    try:
        results = [benchmark_latency(args.policy, rate, args.duration, args.task,
                                     args.expert_mode, sweep_phase=not args.fixed_phase,
                                     realtime_priority=args.realtime_priority)
                   for rate in args.rates]
    except UserError as exc:
        print(f'bench: error: {exc}', file=sys.stderr)
        return 2
    for r in results:
        print(f'{r["rate_hz"]:7.1f} Hz: obs-to-action p50 {r["obs_to_action_ms_p50"]:.2f} ms '
              f'p99 {r["obs_to_action_ms_p99"]:.2f} ms, answered {r["answered_fraction"]:.1%}, '
              f'inference p50 {r["inference_ms_p50"]:.3f} ms, tick wait p50 '
              f'{r["obs_age_ms_p50"]:.2f} ms, deadline misses '
              f'{r["deadline_misses"]}/{r["policy_ticks"]} ({r["deadline_miss_rate"]:.2%})')
    if args.json:
        from vdd_ros.core.io import write_json
        write_json(args.json, {'generated': time.strftime('%Y-%m-%d %H:%M:%S'),
                               'results': results})
    return 0


if __name__ == '__main__':
    sys.exit(main())
