"""Closed-loop evaluation over ROS: sim_node and policy_node as processes on a private domain.

`evaluate_via_ros` starts both nodes as subprocesses (`python -m vdd_ros.ros.<node>`), each
with the same fresh ROS_DOMAIN_ID, localhost-only discovery and a unique namespace, so the run
never talks to another ROS graph on the machine. Separate processes (rather than executors in
this process) keep robosuite stepping and policy inference from sharing one GIL, so the
measured latencies are those of a deployment, and a crash in either node cannot take the caller
down. The simulator runs in lockstep on the in-process runner's evaluation seeds: each
episode resets the environment and the policy with the same seed and steps with the action
that answers each observation, so the episodes are the ones `vdd_ros.sim.rollout.evaluate`
runs. Both nodes die with the calling process however it ends (PR_SET_PDEATHSIG), and the
run's temporary folder (`vdd_ros_eval_<pid>_*`) records its owner, so the next run removes
what a killed one left.

With `binding` (a binding file or `task:<name>`), both nodes speak standard messages instead
of the labelled arrays: sim_node publishes the robot (JointState, PoseStamped, /clock, episode
markers) and steps on the binding's commands; policy_node reads the same binding with
`act_on: complete` on sim time (use_sim_time). sim_node waits until the policy listens on
every topic (`wait_for_subscribers: 1`). The episodes are the same as with the labelled
arrays; `latency_ms_*` is then the policy node's inference time from its stats.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from vdd_ros.core.process import child_preexec, owned_tempdir, remove_dead_owners
from vdd_ros.errors import UserError

ORACLES = ('scripted', 'averaged')
TEMP_PREFIX = 'vdd_ros_eval_'
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def free_domain_id(avoid: int | None = None) -> int:
    """A random ROS domain in [30, 99] other than `avoid` (default: this process's domain)."""
    if avoid is None:
        env = os.environ.get('ROS_DOMAIN_ID', '')
        avoid = int(env) if env.isdigit() else 0
    choices = [d for d in range(30, 100) if d != avoid]
    return random.SystemRandom().choice(choices)


class NodeProcess:
    """One vdd_ros node run as `python -m vdd_ros.ros.<module>` with a parameter file.

    Output goes to `<folder>/<name>.log`. The node gets SIGTERM when this process exits (it
    never outlives its parent). `stop()` sends SIGINT (what launch sends), then
    SIGTERM, then SIGKILL, each after a grace period; it returns the exit status.
    """

    def __init__(self, module: str, name: str, params: Mapping[str, Any], folder: Path,
                 domain_id: int, namespace: str = '') -> None:
        self.name = name
        self.folder = Path(folder)
        self.params_file = self.folder / f'{name}.yaml'
        self.params_file.write_text(yaml.safe_dump({'/**': {'ros__parameters': dict(params)}}))
        self.log_file = self.folder / f'{name}.log'
        env = dict(os.environ)
        env.update(ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
                   PYTHONUNBUFFERED='1', OMP_NUM_THREADS=env.get('OMP_NUM_THREADS', '1'))
        env['PYTHONPATH'] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get('PYTHONPATH', '')) if p)
        cmd = [sys.executable, '-m', f'vdd_ros.ros.{module}', '--ros-args',
               '-r', f'__node:={name}', '--params-file', str(self.params_file)]
        if namespace:
            cmd[-2:-2] = ['-r', f'__ns:={namespace}']
        self._log = open(self.log_file, 'wb')
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(self.folder), preexec_fn=child_preexec())

    def poll(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, lines: int = 25) -> str:
        self._log.flush()
        try:
            text = self.log_file.read_text(errors='replace').strip().splitlines()
        except OSError:
            return ''
        return '\n'.join(text[-lines:])

    def stop(self, grace_s: float = 10.0) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                continue
        code = self.proc.wait()
        self._log.close()
        return code


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def evaluate_via_ros(policy: str | os.PathLike, task: str, episodes: int,
                     seeds: list[int] | None = None, *, control_rate_hz: float = 500.0,
                     expert_mode: str | int | None = None, device: str = 'cpu',
                     show_progress: bool = True, domain_id: int | None = None,
                     timeout_s: float | None = None, binding: str | None = None
                     ) -> dict[str, Any]:
    """Roll `policy` out through sim_node (lockstep) and policy_node over DDS (`timeout_s`:
    the longest wait for the next episode to end, default 120 s + one second per step).

    `policy` is a checkpoint folder or 'scripted' / 'averaged'. Returns the metrics of
    `vdd_ros.sim.rollout.evaluate` (latency_ms_* is the policy node's inference time) plus
    `obs_to_action_ms_p50/p99/mean` (measured by the sim node), the policy node's deadline
    statistics at `control_rate_hz`, and `via_ros`, `clock_mode`, `control_rate_hz`,
    `expert_mode`, `domain_id`, `binding` (None: the labelled arrays; see the module
    docstring).
    """
    from tqdm import tqdm

    from vdd_ros.sim.rollout import (build_policy, check_unsealed, describe_policy,
                                     evaluation_seeds, summarize)
    from vdd_ros.sim.tasks import get_task

    spec = get_task(task)
    if callable(policy) and not isinstance(policy, (str, os.PathLike)):
        raise UserError('--via-ros needs a checkpoint folder or an oracle name, not a factory')
    ref = os.fspath(policy)
    episodes = int(episodes)
    if episodes < 1:
        raise UserError(f'episodes must be at least 1, got {episodes}')
    seeds = evaluation_seeds(episodes) if seeds is None else [int(s) for s in seeds]
    if len(seeds) < episodes:
        raise UserError(f'{episodes} episodes need {episodes} seeds, got {len(seeds)}')
    seeds = seeds[:episodes]
    check_unsealed(seeds)
    if not control_rate_hz > 0:
        raise UserError(f'control_rate_hz must be > 0, got {control_rate_hz}')
    built = build_policy(ref if ref in ORACLES else Path(ref).resolve(), task, device)
    if expert_mode not in (None, '') and not hasattr(getattr(built, 'model', None),
                                                      'set_expert_mode'):
        raise UserError(f'expert_mode applies to MoE checkpoints, not {describe_policy(ref)}')
    del built
    bound = None
    if binding:
        from vdd_ros.ros.binding_io import check_against_policy, resolve_binding
        if not str(binding).startswith('task:'):
            binding = str(Path(binding).resolve())
        bound = resolve_binding(str(binding))
        check_against_policy(bound, spec.obs_fields, spec.action_dim)
    domain = free_domain_id() if domain_id is None else int(domain_id)
    namespace = f'/vdd_eval_{os.getpid()}_{uuid.uuid4().hex[:6]}'
    if timeout_s is None:       # the longest wait for the next episode to end
        timeout_s = 120.0 + spec.horizon * 1.0
    start = time.perf_counter()
    remove_dead_owners(TEMP_PREFIX)
    folder = owned_tempdir(TEMP_PREFIX)
    try:
        results, stats = folder / 'results.json', folder / 'policy_stats.json'
        policy_params: dict[str, Any] = {
            'checkpoint': ref if ref in ORACLES else str(Path(ref).resolve()),
            'task': spec.name, 'device': device, 'control_rate_hz': float(control_rate_hz),
            'stats_file': str(stats)}
        if expert_mode not in (None, ''):
            policy_params['expert_mode'] = str(expert_mode)
        sim_params = {'task': spec.name, 'clock_mode': 'lockstep', 'seeds': seeds,
                      'episodes': episodes, 'exit_when_done': True,
                      'results_file': str(results)}
        if bound is not None:
            policy_params.update(binding=str(binding), act_on='complete', use_sim_time=True)
            sim_params.update(binding=str(binding), wait_for_subscribers=1)
        nodes: list[NodeProcess] = []
        bar = tqdm(total=episodes, desc=f'evaluate {task} via ROS', disable=not show_progress,
                   dynamic_ncols=True, leave=False)
        try:
            policy_proc = NodeProcess('policy_node', 'policy_node', policy_params, folder,
                                      domain, namespace)
            nodes.append(policy_proc)
            sim_proc = NodeProcess('sim_node', 'sim_node', sim_params, folder, domain,
                                   namespace)
            nodes.append(sim_proc)
            deadline = time.monotonic() + timeout_s
            while sim_proc.poll() is None:
                if policy_proc.poll() is not None:
                    raise UserError(f'policy_node exited with status {policy_proc.poll()}:\n'
                                    f'{policy_proc.log_tail()}')
                if time.monotonic() > deadline:
                    raise UserError(f'ROS evaluation stalled: no episode ended for '
                                    f'{timeout_s:.0f} s; sim_node log:\n'
                                    f'{sim_proc.log_tail()}\npolicy_node log:'
                                    f'\n{policy_proc.log_tail()}')
                time.sleep(0.25)
                done = len((_read_json(results) or {}).get('episodes', []))
                if done > bar.n:
                    bar.update(done - bar.n)
                    deadline = time.monotonic() + timeout_s
            if sim_proc.poll() != 0:
                raise UserError(f'sim_node exited with status {sim_proc.poll()}:\n'
                                f'{sim_proc.log_tail()}')
            policy_code = policy_proc.stop()
            if policy_code != 0:
                raise UserError(f'policy_node exited with status {policy_code}:\n'
                                f'{policy_proc.log_tail()}')
            data = _read_json(results)
            policy_stats = _read_json(stats) or {}
        finally:
            bar.close()
            for node in reversed(nodes):
                node.stop(grace_s=5.0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if not data or len(data.get('episodes', [])) != episodes:
        raise UserError('sim_node ended without the results of every episode')
    records = [dict(r, policy_mode=None) for r in data['episodes']]
    metrics = summarize(records, spec.modes)
    lat = np.concatenate([np.asarray(r['obs_to_action_ms'], dtype=np.float64)
                          for r in records]) if records else np.zeros(0)
    metrics.update({
        'obs_to_action_ms_p50': float(np.percentile(lat, 50)) if lat.size else 0.0,
        'obs_to_action_ms_p99': float(np.percentile(lat, 99)) if lat.size else 0.0,
        'obs_to_action_ms_mean': float(lat.mean()) if lat.size else 0.0,
        'deadline_misses': _number(policy_stats.get('deadline_misses')),
        'deadline_miss_rate': _number(policy_stats.get('deadline_miss_rate')),
        'policy_ticks': _number(policy_stats.get('ticks')),
        'task': spec.name, 'policy': describe_policy(ref), 'workers': 1,
        'via_ros': True, 'clock_mode': 'lockstep', 'control_rate_hz': float(control_rate_hz),
        'expert_mode': None if expert_mode in (None, '') else str(expert_mode),
        'domain_id': domain, 'wall_s': time.perf_counter() - start,
        'binding': None if bound is None else (bound.name or str(binding)),
    })
    if bound is not None and policy_stats.get('inference_ms_p50') is not None:
        metrics.update(latency_ms_p50=float(policy_stats['inference_ms_p50']),
                       latency_ms_p99=float(policy_stats['inference_ms_p99']))
    return metrics


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


# -- `vdd-ros evaluate --via-ros` ---------------------------------------------------------------
def add_via_ros_arguments(parser: Any) -> None:
    """The `--via-ros` options of `vdd-ros evaluate` (options the command already has are kept)."""
    existing = {s for action in parser._actions for s in action.option_strings}
    group = parser.add_argument_group('over ROS 2')
    options = [
        ('--via-ros', dict(action='store_true', help='roll out through sim_node (lockstep) and '
                           'policy_node over DDS, as separate processes on a private domain')),
        ('--control-rate-hz', dict(type=float, default=500.0, help='policy_node timer rate '
                                   'with --via-ros (default: %(default)s)')),
        ('--expert-mode', dict(default=None, help='with --via-ros, the MoE expert choice: '
                               "sample, argmax, per_episode or an expert index (default: "
                               "the checkpoint's)")),
        ('--domain-id', dict(type=int, default=None, help='ROS domain of the run with '
                             '--via-ros (default: a random free one)')),
        ('--binding', dict(default=None, help='with --via-ros, standard messages through '
                           'this binding (a YAML file, or task:<name> for the shipped one) '
                           'instead of the labelled arrays')),
    ]
    for flag, kwargs in options:
        if flag not in existing:
            group.add_argument(flag, **kwargs)


def evaluate_from_args(args: Any) -> dict[str, Any]:
    """`vdd-ros evaluate --via-ros`: the metrics of evaluate_via_ros for parsed arguments."""
    if getattr(args, 'workers', 1) != 1:
        raise UserError('--via-ros runs one simulator node: drop --workers')
    if getattr(args, 'video', None):
        raise UserError('--video is not available with --via-ros')
    return evaluate_via_ros(args.policy, args.task, args.episodes,
                            control_rate_hz=args.control_rate_hz,
                            expert_mode=getattr(args, 'expert_mode', None),
                            device=getattr(args, 'device', 'cpu'),
                            show_progress=not getattr(args, 'quiet', False),
                            domain_id=getattr(args, 'domain_id', None),
                            binding=getattr(args, 'binding', None))
