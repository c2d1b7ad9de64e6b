"""Obs-to-action latency and deadline misses of policy_node at a given control rate.

The policy node runs as its own process on a private ROS domain; this process publishes
observations at the same rate from a steady timer (as a simulator would, without the cost of
stepping one) and times each observation until the first action that answers it (same @seq).
Deadline misses and inference times come from the policy node's own diagnostics.

    python -m vdd_ros.ros.bench --policy default --rates 20 500 --duration 10 --json bench.json

`--policy tiny` or `default` use an untrained MoE of that size that queries its network on
every step (the worst case); pass a checkpoint folder to time a real one.

Standard messages: with `--binding FILE` (or `task:lift_carry`, the shipped JointState +
PoseStamped binding) every rate runs the labelled path and the binding path alternately,
`--rounds` times each, in one invocation (same machine, same load), and reports both and the
ratio of their median p50s. The binding source publishes every source topic of one step with
one header stamp (the system time of the step); an answer is matched by the stamp on its
stamped sink and is complete when every sink has arrived.

    python -m vdd_ros.ros.bench --policy default --rates 500 --binding task:lift_carry \
        --rounds 3 --duration 10
"""
from __future__ import annotations

import argparse
import struct
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
                      realtime_priority: int = 0, binding: str = '',
                      act_on: str = 'tick', raw_source: bool = False) -> dict[str, Any]:
    """Measure policy_node at `rate_hz` for `duration_s` seconds (after the first answer).

    The obs-to-action latency of a timer-driven policy includes the wait for its next tick,
    which depends on the phase between the observation stream and the policy's timer; with
    `sweep_phase` the source's rate is lowered by one period per window so that every phase
    offset is measured once (without it the result is one arbitrary phase). Returns
    observations sent and answered, obs-to-action latency percentiles (ms), and from the policy
    node's diagnostics its inference time and tick-wait (`obs_age`) percentiles, ticks,
    deadline misses and miss rate over the measured window. With `binding` (a file or
    `task:<name>`) the observations travel on the binding's topics and the node acts per
    `act_on`. With `raw_source` the source publishes pre-serialized messages with only
    their sequence number or stamp patched (a C++ driver's cost rather than rclpy's message
    conversion, for both paths alike).
    """
    from vdd_ros.ros.evaluation import NodeProcess, free_domain_id
    from vdd_ros.ros.runtime import make_executor
    from vdd_ros.ros.testing import (BindingProbe, Probe, ros_context, spin_until,
                                     tiny_moe_checkpoint)
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
        if binding:
            from vdd_ros.ros.binding_io import resolve_binding
            bound = resolve_binding(binding)
            params.update(binding=binding, act_on=act_on)
        node = NodeProcess('policy_node', 'policy_node', params, folder, domain, namespace)
        try:
            with ros_context(domain) as ctx:
                if binding:
                    probe: Any = BindingProbe(ctx, bound, namespace, name='bench_source')
                    source: Any = _BindingSource(probe, observations, raw_source)
                else:
                    probe = Probe(ctx, namespace, name='bench_source')
                    source = _LabelledSource(probe, observations, list(spec.obs_fields),
                                             raw_source)
                executor = make_executor(ctx)
                executor.add_node(probe.node)

                from rclpy.clock import Clock, ClockType
                # with sweep_phase the source runs one period per window slower than the
                # policy, so their phase offset sweeps every value once while measuring
                source_hz = rate_hz - 1.0 / duration_s if sweep_phase else rate_hz
                probe.node.create_timer(1.0 / source_hz, source.tick,
                                        clock=Clock(clock_type=ClockType.STEADY_TIME))
                ok = spin_until(executor, lambda: source.answered_any()
                                and probe.last_status(f'{namespace}/policy_node') is not None,
                                startup_timeout_s)
                if not ok:
                    raise UserError(f'policy_node gave no answer within {startup_timeout_s:g} '
                                    f's:\n{node.log_tail()}')
                spin_until(executor, lambda: False, 1.0)   # settle
                first = source.count
                before = _diag_numbers(probe, f'{namespace}/policy_node')
                n_diag = len(probe.diagnostics)
                spin_until(executor, lambda: False, duration_s)
                last = source.count
                spin_until(executor, lambda: len(probe.diagnostics) > n_diag + 1, 2.0)
                after = _diag_numbers(probe, f'{namespace}/policy_node')
                answered = source.latencies_ms(first, last)
                probe.destroy()
                executor.shutdown()
        finally:
            code = node.stop()
    lat = np.asarray(answered, dtype=np.float64)
    sent = last - first
    ticks = after.get('ticks', 0.0) - before.get('ticks', 0.0)
    misses = after.get('deadline_misses', 0.0) - before.get('deadline_misses', 0.0)
    return {
        'policy': policy, 'task': spec.name, 'rate_hz': float(rate_hz),
        'path': f'binding {binding} (act_on {act_on})' if binding else 'labelled',
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
        'raw_source': bool(raw_source),
        'policy_ticks': int(ticks), 'deadline_misses': int(misses),
        'skipped_periods': int(after.get('skipped_periods', 0.0)
                               - before.get('skipped_periods', 0.0)),
        'overruns': int(after.get('overruns', 0.0) - before.get('overruns', 0.0)),
        'deadline_miss_rate': float(misses / ticks) if ticks else 0.0,
        'policy_exit_status': code,
    }


class _LabelledSource:
    """Labelled observations, one per tick; answers matched by `@seq`. With `raw`, each
    observation is serialized once and only its `@seq` bytes change per tick."""

    def __init__(self, probe: Any, observations: np.ndarray, fields: list,
                 raw: bool = False) -> None:
        self.probe, self.observations, self.fields = probe, observations, fields
        self.count = 0
        self.raw: list[bytes] = []
        if raw:
            from rclpy.serialization import serialize_message

            from vdd_ros.ros.conversions import observation_to_msg
            mark = 0x7A6B5C4D      # a @seq value whose bytes occur nowhere else
            self.raw = [serialize_message(observation_to_msg(obs, fields, mark, 1, 0))
                        for obs in observations]
            self.at = [blob.index(mark.to_bytes(4, 'little')) for blob in self.raw]

    def tick(self) -> None:
        i = self.count
        if not self.raw:
            self.probe.send(self.observations[i % len(self.observations)], self.fields,
                            episode=1, step=i)
        else:
            k = i % len(self.raw)
            blob = bytearray(self.raw[k])
            seq = self.probe.seq = i + 1
            struct.pack_into('<I', blob, self.at[k], seq)
            self.probe.sent[seq] = time.perf_counter()
            self.probe.obs_pub.publish(bytes(blob))
        self.count = i + 1

    def answered_any(self) -> bool:
        return any('seq' in m for _, _, m in self.probe.actions)

    def latencies_ms(self, first: int, last: int) -> list[float]:
        """Observation to first answer of the observations sent [first, last) (seq = i + 1)."""
        answered: dict[int, float] = {}
        for t, _, meta in self.probe.actions:
            s = meta.get('seq')
            if s is not None and first < s <= last and s not in answered:
                answered[s] = (t - self.probe.sent[s]) * 1e3
        return list(answered.values())


class _BindingSource:
    """Every source topic of a binding, one stamp per tick (the system time); answers
    matched by the stamp of their stamped sink, complete when every sink has arrived."""

    def __init__(self, probe: Any, observations: np.ndarray, raw: bool = False) -> None:
        from rclpy.serialization import serialize_message
        self.probe, self.count, self.raw = probe, 0, raw
        self.stamps: list[int] = []
        clock = probe.node.get_clock()
        self.now = lambda: clock.now().nanoseconds
        self.messages = [probe.messages(obs, 0) for obs in observations]
        # raw: every message serialized once; only its header stamp bytes change per tick
        self.blobs = [{t: (serialize_message(m), hasattr(m, 'header')) for t, m in msgs.items()}
                      for msgs in self.messages] if raw else []

    def tick(self) -> None:
        from vdd_ros.ros.binding_io import to_time
        k = self.count % len(self.messages)
        stamp = self.now()
        if self.raw:
            self.probe.sent[stamp] = time.perf_counter()
            sec, nsec = divmod(stamp, 1_000_000_000)
            for topic, (blob, stamped) in self.blobs[k].items():
                if stamped:
                    blob = bytearray(blob)
                    struct.pack_into('<iI', blob, 4, sec, nsec)
                self.probe.pubs[topic].publish(bytes(blob))
        else:
            msgs = self.messages[k]
            for msg in msgs.values():
                if hasattr(msg, 'header'):
                    msg.header.stamp = to_time(stamp)
            self.probe.send(None, stamp, msgs)
        self.stamps.append(stamp)
        self.count += 1

    def answered_any(self) -> bool:
        sent = self.probe.sent
        return any(s in sent for s, _, _ in self.probe.actions())

    def latencies_ms(self, first: int, last: int) -> list[float]:
        wanted = set(self.stamps[first:last])
        answered: dict[int, float] = {}
        for stamp, t, _ in self.probe.actions():
            if stamp in wanted and stamp not in answered:
                answered[stamp] = (t - self.probe.sent[stamp]) * 1e3
        return list(answered.values())


def compare_paths(policy: str, rate_hz: float, binding: str, rounds: int = 3,
                  duration_s: float = 10.0, act_on: str = 'tick',
                  **kwargs: Any) -> dict[str, Any]:
    """The labelled and the binding path at `rate_hz`, alternately, `rounds` times each:
    every run's result, the median p50 of each path and their ratio (binding / labelled)."""
    labelled, bound = [], []
    for _ in range(rounds):
        labelled.append(benchmark_latency(policy, rate_hz, duration_s, **kwargs))
        bound.append(benchmark_latency(policy, rate_hz, duration_s, binding=binding,
                                       act_on=act_on, **kwargs))
    p50 = {name: float(np.median([r['obs_to_action_ms_p50'] for r in runs]))
           for name, runs in (('labelled', labelled), ('binding', bound))}
    return {'rate_hz': float(rate_hz), 'binding': binding, 'act_on': act_on,
            'rounds': rounds, 'labelled_p50_ms': p50['labelled'],
            'binding_p50_ms': p50['binding'],
            'ratio': p50['binding'] / p50['labelled'] if p50['labelled'] else 0.0,
            'runs': labelled + bound}


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
    parser.add_argument('--binding', default='', help='also run the binding path (a binding '
                        'file, or task:<name>), alternating with the labelled path')
    parser.add_argument('--act-on', default='tick', choices=('tick', 'complete'),
                        help='the binding path\'s act_on (default: %(default)s)')
    parser.add_argument('--rounds', type=int, default=3,
                        help='runs of each path per rate with --binding (default: %(default)s)')
    parser.add_argument('--raw-source', action='store_true',
                        help='publish pre-serialized observations (only the sequence number or '
                        'stamp patched), so the source costs what a C++ driver would')
    parser.add_argument('--json', type=Path, help='write the results here')
    args = parser.parse_args(argv)
    common = dict(task=args.task, expert_mode=args.expert_mode,
                  sweep_phase=not args.fixed_phase, realtime_priority=args.realtime_priority,
                  raw_source=args.raw_source)
    try:
        if args.binding:
            if args.rounds < 1:
                raise UserError('--rounds must be >= 1')
            comparisons = [compare_paths(args.policy, rate, args.binding, args.rounds,
                                         args.duration, args.act_on, **common)
                           for rate in args.rates]
            results = [r for c in comparisons for r in c['runs']]
        else:
            comparisons = []
            results = [benchmark_latency(args.policy, rate, args.duration, **common)
                       for rate in args.rates]
    except UserError as exc:
        print(f'bench: error: {exc}', file=sys.stderr)
        return 2
    for r in results:
        print(f'{r["rate_hz"]:7.1f} Hz {r["path"]}: obs-to-action p50 '
              f'{r["obs_to_action_ms_p50"]:.2f} ms p99 {r["obs_to_action_ms_p99"]:.2f} ms, '
              f'answered {r["answered_fraction"]:.1%}, inference p50 '
              f'{r["inference_ms_p50"]:.3f} ms, tick wait p50 {r["obs_age_ms_p50"]:.2f} ms, '
              f'deadline misses {r["deadline_misses"]}/{r["policy_ticks"]} '
              f'({r["deadline_miss_rate"]:.2%})')
    for c in comparisons:
        print(f'{c["rate_hz"]:7.1f} Hz: median p50 labelled {c["labelled_p50_ms"]:.3f} ms, '
              f'binding {c["binding_p50_ms"]:.3f} ms ({c["binding"]}, act_on {c["act_on"]}): '
              f'{c["ratio"]:.2f}x over {c["rounds"]} alternating rounds')
    if args.json:
        from vdd_ros.core.io import write_json
        write_json(args.json, {'generated': time.strftime('%Y-%m-%d %H:%M:%S'),
                               'results': results,
                               'comparisons': [{k: v for k, v in c.items() if k != 'runs'}
                                               for c in comparisons]})
    return 0


if __name__ == '__main__':
    sys.exit(main())
