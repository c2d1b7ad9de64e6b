"""`vdd-ros bench --ros`: policy_node's deadline misses and obs-to-action latency, repeated.

The policy node runs as its own process on a private ROS domain. This process plays the robot:
a dedicated thread publishes one observation per period at absolute deadlines (pre-serialized,
only its sequence number or stamp patched: what a C++ driver costs; `--python-source` builds
each message in rclpy instead), and the executor records each action's arrival (decoded after
the run). An observation is timed until the first action that answers it (same @seq, or the
stamp on a binding's stamped sink). Deadline misses, the skipped periods and the node-side
breakdown (decode, wake-up lateness, tick wait, confidence, inference, publish) come from the
node's diagnostics.

Modes (`--modes`, all by default):
- `timer`: act on the latest observation at each tick of an executor timer (`act_on:=tick
  control_loop:=timer`, the node's defaults);
- `thread`: the same, ticked by a dedicated thread at absolute deadlines
  (`control_loop:=thread`);
- `event`: act as each observation arrives (`act_on:=complete`); a miss is an answer later
  than one period after the observation arrived.

Each rate runs every mode `--runs` times (at least 5), interleaved so that a change of load
falls on every mode alike; each run is a fresh node process. The summary gives the median and
the worst run. `--load N` keeps N busy processes running meanwhile (CPU contention).

    vdd-ros bench --ros --policy default --rates 20 500 1000 --runs 5 --duration 5

A tick-driven policy's latency includes the wait for its next tick, which depends on the phase
between the observation stream and the timer; the source runs one period per run slower than
the policy, so that every phase offset is measured once (`--fixed-phase`: one arbitrary phase).
"""
from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vdd_ros.errors import UserError

# untrained MoEs that query their network on every step: 'tiny' (tests) and 'default' (the
# size of config/train.yaml's moe section: 8 experts, 3 x 256)
SIZES = {'tiny': dict(num_experts=3, hidden_dim=32, num_layers=1),
         'default': dict(num_experts=8, hidden_dim=256, num_layers=3)}
MODES = {'timer': ('timer', 'tick'), 'thread': ('thread', 'tick'),
         'event': ('timer', 'complete')}
MIN_RUNS = 5
# node-side stages (from its diagnostics), in the order of one control period
# (confidence_ms: scoring the observation for out-of-distribution levels; 0 for a checkpoint
# without a calibration)
STAGES = ('decode_ms', 'wake_late_ms', 'obs_age_ms', 'confidence_ms', 'inference_ms',
          'publish_ms', 'answer_ms')


def benchmark_latency(policy: str, rate_hz: float, duration_s: float = 10.0,
                      task: str = 'lift_carry', expert_mode: str | None = None,
                      domain_id: int | None = None, startup_timeout_s: float = 90.0,
                      seed: int = 0, sweep_phase: bool = True,
                      realtime_priority: int = 0, binding: str = '',
                      act_on: str = 'tick', raw_source: bool = True,
                      control_loop: str = 'timer', chunk: int = 1) -> dict[str, Any]:
    """One run: policy_node at `rate_hz` for `duration_s` seconds after its first answer.

    Returns observations sent and answered, obs-to-action latency percentiles (ms), and from
    the node's diagnostics its ticks, deadline misses (and their rate over the ticks and
    skipped periods), and the p50/p99 of each stage in STAGES. `policy` is a checkpoint
    folder or .onnx file, or an untrained MoE named in SIZES. With `binding` (a file or
    `task:<name>`) the observations travel on the binding's topics. With `chunk` > 1 an
    untrained policy predicts `chunk` actions per network pass (and acts out half), and the arm's
    command goes out as a JointTrajectory of the whole remaining chunk (the task's binding with
    its arm sink replaced, unless `binding` is given); the result adds what a trajectory
    controller receives (`trajectory_stats`).
    """
    from vdd_ros.ros.evaluation import NodeProcess, free_domain_id
    from vdd_ros.ros.runtime import make_executor
    from vdd_ros.ros.testing import (BindingProbe, BindingSource, LabelledSource, ros_context,
                                     spin_until, tiny_moe_checkpoint)
    from vdd_ros.sim.tasks import get_task

    if rate_hz <= 0 or duration_s <= 0:
        raise UserError('rate and duration must be > 0')
    spec = get_task(task)
    domain = free_domain_id() if domain_id is None else int(domain_id)
    namespace = f'/vdd_bench_{uuid.uuid4().hex[:8]}'
    observations = np.random.default_rng(seed).normal(size=(256, spec.obs_dim))
    observations = observations.astype(np.float32)
    with tempfile.TemporaryDirectory(prefix='vdd_ros_bench_') as tmp:
        folder = Path(tmp)
        # a receding horizon, as diffusion policies act: half the chunk executed per pass
        checkpoint = (str(tiny_moe_checkpoint(folder / policy, task, **SIZES[policy],
                                              chunk=chunk, execute=max(1, chunk // 2)))
                      if policy in SIZES else policy)
        if chunk > 1 and not binding:
            binding = str(trajectory_binding(folder / 'trajectory.yaml', task))
        params: dict[str, Any] = {'checkpoint': checkpoint, 'task': spec.name,
                                  'control_rate_hz': float(rate_hz),
                                  'diagnostics_period_s': 0.5, 'act_on': act_on,
                                  'control_loop': control_loop}
        if expert_mode:
            params['expert_mode'] = str(expert_mode)
        if realtime_priority:
            params['realtime_priority'] = int(realtime_priority)
        if binding:
            from vdd_ros.ros.binding_io import resolve_binding
            bound = resolve_binding(binding)
            params['binding'] = binding
        node = NodeProcess('policy_node', 'policy_node', params, folder, domain, namespace)
        try:
            with ros_context(domain) as ctx:
                if binding:
                    probe: Any = BindingProbe(ctx, bound, namespace, name='bench_source')
                    source: Any = BindingSource(probe, observations, raw_source)
                else:
                    source = LabelledSource(ctx, namespace, observations,
                                             list(spec.obs_fields), raw_source)
                    probe = source
                executor = make_executor(ctx)
                executor.add_node(probe.node)
                # tick-driven with sweep_phase: the source runs one period per run slower
                # than the policy, so their phase offset sweeps every value once
                sweep = sweep_phase and act_on == 'tick'
                source_hz = rate_hz - 1.0 / duration_s if sweep else rate_hz
                with _publishing(source, source_hz):
                    name = f'{namespace}/policy_node'
                    ok = spin_until(executor, lambda: source.answered_any()
                                    and probe.last_status(name) is not None,
                                    startup_timeout_s)
                    if not ok:
                        raise UserError(f'policy_node gave no answer within '
                                        f'{startup_timeout_s:g} s:\n{node.log_tail()}')
                    spin_until(executor, lambda: False, 1.0)   # settle
                    first = source.count
                    before = _diag_numbers(probe, name)
                    n_diag = len(probe.diagnostics)
                    spin_until(executor, lambda: False, duration_s)
                    last = source.count
                    spin_until(executor, lambda: len(probe.diagnostics) > n_diag + 1, 2.0)
                    after = _diag_numbers(probe, name)
                answered = source.latencies_ms(first, last)
                trajectory = (trajectory_stats(probe, source.stamps[first:last])
                              if binding else {})
                probe.destroy()
                executor.shutdown()
        finally:
            code = node.stop()
    lat = np.asarray(answered, dtype=np.float64)
    sent = last - first

    def delta(key: str) -> int:
        return int(after.get(key, 0.0) - before.get(key, 0.0))

    ticks, misses, skipped = delta('ticks'), delta('deadline_misses'), delta('skipped_periods')
    result: dict[str, Any] = {
        'policy': policy, 'task': spec.name, 'rate_hz': float(rate_hz),
        'path': f'binding {binding}' if binding else 'labelled',
        'control_loop': control_loop, 'act_on': act_on,
        'duration_s': float(duration_s), 'observations_sent': int(sent),
        'observations_answered': int(lat.size),
        'answered_fraction': float(lat.size / sent) if sent else 0.0,
        'obs_to_action_ms_p50': _pct(lat, 50), 'obs_to_action_ms_p99': _pct(lat, 99),
        'obs_to_action_ms_mean': float(lat.mean()) if lat.size else 0.0,
        'obs_to_action_ms_max': float(lat.max()) if lat.size else 0.0,
        'sweep_phase': bool(sweep), 'realtime_priority': int(realtime_priority),
        'raw_source': bool(raw_source),
        'policy_ticks': ticks, 'deadline_misses': misses, 'skipped_periods': skipped,
        'overruns': delta('overruns'),
        'deadline_miss_rate': float(misses / (ticks + skipped)) if ticks + skipped else 0.0,
        'policy_exit_status': code,
    }
    for stage in STAGES:
        for q in ('p50', 'p99'):
            result[f'{stage}_{q}'] = after.get(f'{stage}_{q}', 0.0)
    result['chunk'] = int(chunk)
    result.update(trajectory)
    return result


def trajectory_binding(path: Path, task: str) -> Path:
    """The task's shipped binding with its arm command (a[0:6]) sent as a JointTrajectory of
    the whole predicted chunk instead (the gripper keeps its own sink); written to `path`."""
    import yaml

    from vdd_ros.binding import binding_for_task
    data = binding_for_task(task).to_dict()
    first = data['action'][0]
    n = first['slice'][1] - first['slice'][0]
    data['action'][0] = {'topic': '/arm/joint_trajectory',
                         'type': 'trajectory_msgs/JointTrajectory', 'slice': first['slice'],
                         'joints': [f'axis{i}' for i in range(n)]}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def trajectory_stats(probe: Any, stamps: list[int]) -> dict[str, Any]:
    """What a trajectory controller receives on the binding's JointTrajectory sink, over the
    answers to the observations stamped `stamps`: messages per second, points per message,
    and how far each message's last point reaches beyond the arrival of the next message
    (the margin: negative means the controller ran out of points)."""
    sink = next((s for s in probe.binding.action if s.type.endswith('JointTrajectory')), None)
    if sink is None:
        return {}
    wanted = set(stamps)
    got = [(t, msg) for t, stamp, _, msg in probe.received[sink.topic] if stamp in wanted]
    if len(got) < 2:
        return {'trajectory_messages': len(got)}
    times = np.array([t for t, _ in got])
    points = np.array([len(m.points) for _, m in got])
    reach = np.array([m.points[-1].time_from_start.sec + m.points[-1].time_from_start.nanosec
                      * 1e-9 for _, m in got])
    margin_ms = (times[:-1] + reach[:-1] - times[1:]) * 1e3
    span = times[-1] - times[0]
    return {'trajectory_messages': len(got),
            'trajectory_messages_per_s': float((len(got) - 1) / span) if span else 0.0,
            'trajectory_points_per_s': float(points[:-1].sum() / span) if span else 0.0,
            'trajectory_points_mean': float(points.mean()),
            'trajectory_points_min': int(points.min()),
            'trajectory_margin_ms_min': float(margin_ms.min()),
            'trajectory_margin_ms_p50': float(np.median(margin_ms)),
            'trajectory_covered_fraction': float((margin_ms > 0).mean())}


@contextlib.contextmanager
def _publishing(source: Any, rate_hz: float) -> Iterator[None]:
    """The source publishes from its own thread at absolute deadlines while inside."""
    from vdd_ros.ros.control_loop import ControlThread
    loop = ControlThread(1.0 / rate_hz, source.tick, name='bench_source')
    loop.start()
    try:
        yield
    finally:
        loop.stop()


@contextlib.contextmanager
def cpu_load(processes: int) -> Iterator[None]:
    """`processes` busy-looping processes while inside (CPU contention for the node)."""
    procs = [subprocess.Popen([sys.executable, '-c', 'while True: pass'])
             for _ in range(max(0, processes))]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run_suite(policy: str, rates: list[float], modes: list[str], runs: int = MIN_RUNS,
              duration_s: float = 5.0, load: int = 0, progress: bool = True,
              **kwargs: Any) -> dict[str, Any]:
    """Every mode at every rate, `runs` times (a fresh node each), modes interleaved within
    each repeat; every run's result and a summary per (rate, mode): median and worst run."""
    if runs < MIN_RUNS:
        raise UserError(f'--runs: at least {MIN_RUNS} runs per rate and mode, got {runs}')
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UserError(f'--modes: unknown {unknown}; choose from {list(MODES)}')
    if any(r <= 0 for r in rates) or duration_s <= 0:
        raise UserError('--rates and --duration must be > 0')
    chunk = int(kwargs.get('chunk', 1))
    if chunk < 1 or (chunk > 1 and policy not in SIZES):
        raise UserError(f'--chunk: a whole number >= 1 for an untrained policy ({", ".join(SIZES)}'
                        f'), got {chunk} with --policy {policy}')
    from tqdm import tqdm
    results: list[dict[str, Any]] = []
    total = len(rates) * len(modes) * runs
    with cpu_load(load), tqdm(total=total, desc='bench --ros', unit='run',
                              disable=not progress) as bar:
        for rate in rates:
            for _ in range(runs):
                for mode in modes:
                    loop, act_on = MODES[mode]
                    r = benchmark_latency(policy, rate, duration_s, control_loop=loop,
                                          act_on=act_on, **kwargs)
                    r['mode'], r['load'] = mode, int(load)
                    results.append(r)
                    bar.update(1)
    summary = [summarise([r for r in results if r['rate_hz'] == rate and r['mode'] == mode])
               for rate in rates for mode in modes]
    return {'policy': policy, 'runs': runs, 'duration_s': duration_s, 'load': int(load),
            'summary': summary, 'results': results}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and worst run of the deadline-miss rate, latency, answered share, and the
    median of each node-side stage, over `runs` of one rate and mode."""
    def col(key: str) -> np.ndarray:
        return np.array([r[key] for r in runs], dtype=np.float64)

    out: dict[str, Any] = {'rate_hz': runs[0]['rate_hz'], 'mode': runs[0]['mode'],
                           'runs': len(runs)}
    for key in ('deadline_miss_rate', 'obs_to_action_ms_p50', 'obs_to_action_ms_p99',
                'obs_to_action_ms_max'):
        out[f'{key}_median'] = float(np.median(col(key)))
        out[f'{key}_worst'] = float(col(key).max())
    out['answered_fraction_median'] = float(np.median(col('answered_fraction')))
    out['answered_fraction_worst'] = float(col('answered_fraction').min())
    out['runs_under_1pct_misses'] = int((col('deadline_miss_rate') < 0.01).sum())
    for stage in STAGES:
        for q in ('p50', 'p99'):
            out[f'{stage}_{q}'] = float(np.median(col(f'{stage}_{q}')))
    if 'trajectory_points_per_s' in runs[0]:
        for key in ('trajectory_messages_per_s', 'trajectory_points_per_s',
                    'trajectory_points_mean'):
            out[f'{key}_median'] = float(np.median(col(key)))
        out['trajectory_margin_ms_min_worst'] = float(col('trajectory_margin_ms_min').min())
        out['trajectory_covered_fraction_worst'] = float(
            col('trajectory_covered_fraction').min())
    # acting on arrival, what the node does not see: the wire both ways and the dispatch in
    # each process (a tick-driven answer's tick wait varies too much for a difference of
    # medians to mean anything)
    out['outside_node_ms_p50'] = (out['obs_to_action_ms_p50_median'] - out['answer_ms_p50']
                                  if out['mode'] == 'event' else None)
    return out


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the ROS bench (`vdd-ros bench --ros`)."""
    g = parser.add_argument_group('with --ros (policy_node over ROS)')
    g.add_argument('--policy', default='default', help="checkpoint folder or .onnx file, or "
                   "an untrained MoE: 'default' (8 x 3x256) or 'tiny' (default: %(default)s)")
    g.add_argument('--task', default='lift_carry')
    g.add_argument('--rates', type=float, nargs='+', default=[20.0, 500.0, 1000.0])
    g.add_argument('--modes', nargs='+', default=list(MODES), choices=list(MODES),
                   help='control loops to measure (default: all)')
    g.add_argument('--runs', type=int, default=MIN_RUNS,
                   help='runs per rate and mode, each a fresh node (default: %(default)s)')
    g.add_argument('--duration', type=float, default=5.0, help='seconds per run')
    g.add_argument('--load', type=int, default=0, help='busy processes kept running '
                   'meanwhile, for figures under CPU contention (default: %(default)s)')
    g.add_argument('--fixed-phase', action='store_true',
                   help='publish at exactly the policy rate (one arbitrary phase)')
    g.add_argument('--realtime-priority', type=int, default=0,
                   help='SCHED_FIFO priority of the control loop (0: normal scheduler)')
    g.add_argument('--binding', default='', help='observations and actions on a binding\'s '
                   'standard topics (a file, or task:<name>) instead of the labelled arrays')
    g.add_argument('--chunk', type=int, default=1, help='an untrained policy predicting CHUNK '
                   'actions per network pass, its arm command sent as a JointTrajectory of the '
                   'remaining chunk (default: %(default)s: one action, the labelled path)')
    g.add_argument('--python-source', action='store_true',
                   help='build each observation message in rclpy (default: pre-serialized, '
                   'what a C++ driver costs)')


def run(args: argparse.Namespace, json_path: Path | None) -> int:
    """Run the suite from parsed arguments, print the table, write `json_path`."""
    from vdd_ros.core.io import check_writable, write_json
    from vdd_ros.errors import UserError
    if json_path is not None:
        check_writable(json_path, '--json')
    policy = args.policy
    if policy not in SIZES:      # (the node runs elsewhere: an absolute path, checked here)
        if not Path(policy).exists():
            raise UserError(f'--policy: no such checkpoint {policy} (a folder, an .onnx file, '
                            f'or one of {", ".join(SIZES)})')
        policy = str(Path(policy).resolve())
    suite = run_suite(policy, args.rates, args.modes, args.runs, args.duration,
                      args.load, task=args.task, expert_mode=getattr(args, 'expert_mode', None),
                      sweep_phase=not args.fixed_phase,
                      realtime_priority=args.realtime_priority, binding=args.binding,
                      raw_source=not args.python_source, chunk=args.chunk)
    print(format_table(suite))
    if json_path is not None:
        write_json(json_path, {'generated': time.strftime('%Y-%m-%d %H:%M:%S'), **suite})
        print(f'wrote {json_path}')
    return 0


def format_table(suite: dict[str, Any]) -> str:
    """The summary as text: per rate and mode, median [worst run]."""
    lines = [f'policy {suite["policy"]}, {suite["runs"]} runs of {suite["duration_s"]:g} s '
             f'per rate and mode, {suite["load"]} busy process(es); median [worst run]',
             f'{"rate":>7} {"mode":<7}{"misses":>18}{"p50 ms":>15}{"p99 ms":>15}'
             f'{"max ms":>9}{"answered":>17}']
    for s in suite['summary']:
        lines.append(
            f'{s["rate_hz"]:>7g} {s["mode"]:<7}'
            f'{s["deadline_miss_rate_median"]:>8.2%} [{s["deadline_miss_rate_worst"]:>6.2%}]'
            f'{s["obs_to_action_ms_p50_median"]:>7.2f} [{s["obs_to_action_ms_p50_worst"]:>5.2f}]'
            f'{s["obs_to_action_ms_p99_median"]:>7.2f} [{s["obs_to_action_ms_p99_worst"]:>5.2f}]'
            f'{s["obs_to_action_ms_max_worst"]:>9.1f}'
            f'{s["answered_fraction_median"]:>8.1%} [{s["answered_fraction_worst"]:>6.1%}]')
    lines.append('node-side p50 in ms (median run): decode, wake-up lateness (thread), tick '
                 'wait, confidence, inference, publish, arrival to sent | outside the node '
                 '(event: wire both ways, dispatch)')
    for s in suite['summary']:
        stages = ' '.join('     -' if k == 'wake_late_ms' and s['mode'] != 'thread'
                          else f'{s[f"{k}_p50"]:6.3f}' for k in STAGES)
        outside = s['outside_node_ms_p50']
        lines.append(f'{s["rate_hz"]:>7g} {s["mode"]:<7} {stages} | '
                     + ('-' if outside is None else f'{outside:.3f}'))
    chunked = [s for s in suite['summary'] if 'trajectory_points_per_s_median' in s]
    if chunked:
        lines.append('JointTrajectory of the chunk (median run; margin: how far the last point '
                     'reaches past the next message, worst run)')
        for s in chunked:
            lines.append(f'{s["rate_hz"]:>7g} {s["mode"]:<7} '
                         f'{s["trajectory_messages_per_s_median"]:7.1f} msg/s '
                         f'{s["trajectory_points_mean_median"]:5.2f} points/msg '
                         f'{s["trajectory_points_per_s_median"]:8.1f} points/s, margin min '
                         f'{s["trajectory_margin_ms_min_worst"]:7.2f} ms, covered '
                         f'{s["trajectory_covered_fraction_worst"]:.1%}')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m vdd_ros.ros.bench',
                                     description=__doc__.split('\n\n')[0])
    add_arguments(parser)
    parser.add_argument('--expert-mode', default=None)
    parser.add_argument('--json', type=Path, help='write the results here')
    args = parser.parse_args(argv)
    try:
        return run(args, args.json)
    except UserError as exc:
        print(f'bench: error: {exc}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
