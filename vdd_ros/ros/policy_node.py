"""policy_node: any vdd_ros policy (a checkpoint or a scripted oracle) at the control rate.

Subscribes `observation` (Float32MultiArray, sensor-data QoS, labelled as in conversions.py),
publishes `action` (Float32MultiArray, reliable) from a steady timer at `control_rate_hz`, and
publishes diagnostics on /diagnostics. Each new observation is acted on exactly once (so
action chunks and per-episode experts advance once per control step); ticks without a new
observation republish the last action. The action echoes the observation's `@seq` and
`@episode` and carries `@infer_us`; an observation from a new `@episode` resets the policy
with that seed first, so episodes are reproducible.

Safety: no valid observation for `obs_timeout_s` publishes the hold action (no metadata) and
a WARN diagnostic; an invalid observation (NaN, Inf, wrong length or fields) is rejected with a
throttled warning and answered with the hold action. The hold action is `hold_action`, or zero
motion with the last commanded gripper value (the action's last entry) kept.

Run: `python -m vdd_ros.ros.policy_node --ros-args -p checkpoint:=PATH -p task:=lift_carry`.
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from std_msgs.msg import Float32MultiArray
from std_srvs.srv import Trigger

from vdd_ros.core.policy import Policy
from vdd_ros.errors import UserError
from vdd_ros.ros.conversions import (InvalidMessage, action_to_msg, msg_meta, msg_to_array,
                                     percentiles)
from vdd_ros.ros.runtime import VddNode, run_node

ORACLES = ('scripted', 'averaged')
ACTION_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
WINDOW = 2000          # latency samples kept for the percentiles
THROTTLE_S = 2.0       # minimum seconds between two repeated warnings


def load_any_policy(checkpoint: str, task: str = '', device: str = 'cpu',
                    steps: int | None = None) -> Policy:
    """A checkpoint folder through the one loader, or a task's oracle ('scripted')."""
    if not checkpoint:
        raise UserError('parameter checkpoint: required (a checkpoint folder, or '
                        f'{" / ".join(ORACLES)} with a task)')
    if checkpoint in ORACLES:
        if not task:
            raise UserError(f'parameter task: required when checkpoint is {checkpoint!r}')
        from vdd_ros.sim.demonstrators import make_oracle
        return make_oracle(task, kind=checkpoint)
    from vdd_ros.core.checkpoint import load_policy
    policy = load_policy(checkpoint, device=device, steps=steps)
    if task:
        from vdd_ros.sim.tasks import get_task
        spec = get_task(task)
        if policy.spec.task not in (None, spec.name):
            raise UserError(f'{checkpoint}: trained for task {policy.spec.task!r}, not {task!r}')
        fields = [(str(k), int(n)) for k, n in policy.spec.obs_fields]
        if fields != list(spec.obs_fields):
            raise UserError(f'{checkpoint}: observation fields differ from task {task!r}')
    return policy


def set_realtime_priority(priority: int, logger: Any) -> bool:
    """Run this thread (the executor's) under SCHED_FIFO at `priority`; warn when not allowed."""
    if not 1 <= priority <= 99:
        raise UserError(f'parameter realtime_priority: must be 0 or 1-99, got {priority}')
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (AttributeError, PermissionError, OSError) as exc:
        logger.warning(f'cannot use SCHED_FIFO priority {priority} ({exc}); keeping the '
                       'normal scheduler (needs CAP_SYS_NICE or an rtprio limit)')
        return False
    logger.info(f'control loop runs under SCHED_FIFO priority {priority}')
    return True


class DeadlineMonitor:
    """Counts missed control deadlines of a periodic callback.

    A miss is a tick whose work took longer than the period, or a period without a tick (the
    timer fired more than 1.5 periods after the previous tick; each skipped period counts).
    """

    def __init__(self, period_s: float) -> None:
        self.period = period_s
        self.ticks = 0
        self.misses = 0
        self.skipped = 0
        self.overruns = 0
        self._last: float | None = None

    def record(self, start: float, end: float) -> None:
        self.ticks += 1
        if self._last is not None:
            gap = start - self._last
            if gap > 1.5 * self.period:
                skipped = int(round(gap / self.period)) - 1
                self.skipped += skipped
                self.misses += skipped
        self._last = start
        if end - start > self.period:
            self.overruns += 1
            self.misses += 1

    @property
    def rate(self) -> float:
        periods = self.ticks + self.skipped
        return self.misses / periods if periods else 0.0


@dataclass
class _Observation:
    """The latest observation: values (None when rejected), metadata, arrival time."""

    obs: np.ndarray | None
    meta: dict[str, int]
    received: float
    error: str = ''


@dataclass
class _Stats:
    inference_ms: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    obs_age_ms: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    received: int = 0
    rejected: int = 0
    computed: int = 0
    holds: int = 0
    watchdog_trips: int = 0
    errors: int = 0


class PolicyNode(VddNode):
    """Acts on the latest observation at the control rate; see the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('policy_node', **kwargs)
        checkpoint = self.param('checkpoint', '', 'checkpoint folder (teacher, VDD-MoE or '
                                'baseline), or "scripted" / "averaged" for the task oracle',
                                read_only=True)
        task = self.param('task', '', 'task name; required for an oracle, checked against a '
                          'checkpoint when set', read_only=True)
        device = self.param('device', 'cpu', 'torch device for the model', read_only=True)
        steps = self.param('teacher_steps', 0, 'sampling steps of a teacher checkpoint (0: the '
                           "checkpoint's own)", read_only=True)
        rate = self.param('control_rate_hz', 20.0, 'rate of the action timer in Hz',
                          read_only=True, dynamic=True)
        self.rate = self.number('control_rate_hz', rate)
        self.obs_timeout = self.number('obs_timeout_s', self.param(
            'obs_timeout_s', 0.5, 'watchdog: seconds without a valid observation before the '
            'hold action is published', dynamic=True))
        self.param('expert_mode', '', 'MoE expert choice: sample, argmax, per_episode, or an '
                   "expert index to pin; empty keeps the checkpoint's own; changeable at "
                   'runtime', dynamic=True)
        self.model_diagnostics = bool(self.param(
            'model_diagnostics', True, 'compute the chosen expert, gating entropy and '
            'log-likelihood of each MoE action (a few tens of microseconds)'))
        hold = self.param('hold_action', 'float[]', 'hold action; empty: zero motion keeping '
                          'the last gripper command (last entry)', read_only=True)
        diag_period = self.number('diagnostics_period_s', self.param(
            'diagnostics_period_s', 1.0, 'seconds between two diagnostics messages',
            read_only=True, dynamic=True))
        seed = int(self.param('seed', -1, 'seed of the first episode (-1: random); an '
                              'observation with @episode reseeds', read_only=True))
        self.stats_file = str(self.param('stats_file', '', 'JSON file that receives the final '
                                         'diagnostics values at exit (empty: none)',
                                         read_only=True))
        priority = int(self.param('realtime_priority', 0, 'SCHED_FIFO priority (1-99) for the '
                                  'control loop thread; 0 keeps the normal scheduler',
                                  read_only=True))
        if priority:
            set_realtime_priority(priority, self.get_logger())
        threads = int(self.param('torch_threads', 1, 'torch CPU threads (0: torch default)',
                                 read_only=True))
        if threads > 0:
            import torch
            torch.set_num_threads(threads)

        self.checkpoint = checkpoint
        self.policy = load_any_policy(checkpoint, task, device, int(steps) or None)
        self.fields = [(str(k), int(n)) for k, n in self.policy.spec.obs_fields]
        self.action_dim = int(self.policy.spec.action_dim)
        self.model = getattr(self.policy, 'model', None)
        if hasattr(self.policy, 'diagnostics'):
            self.policy.diagnostics = self.model_diagnostics and self._is_moe()
        if hold and len(hold) != self.action_dim:
            raise UserError(f'parameter hold_action: needs {self.action_dim} values, got '
                            f'{len(hold)}')
        self.hold_action = np.asarray(hold, dtype=np.float32) if hold else None
        mode = self.get_parameter('expert_mode').value
        if mode not in ('', None):
            self._apply_expert_mode(mode)
        self.policy.reset(seed if seed >= 0 else None)

        self._latest: _Observation | None = None
        self._fresh = False
        self._episode: int | None = None
        self._last: tuple[np.ndarray, dict[str, int]] | None = None
        self._gripper = 0.0
        self._last_valid = time.perf_counter()
        self._tripped = False
        self._error = ''
        self.stats = _Stats()
        self.deadlines = DeadlineMonitor(1.0 / self.rate)
        self._period_counts = (0, 0)  # rejected, misses at the last diagnostics message

        self.action_pub = self.create_publisher(Float32MultiArray, 'action', ACTION_QOS)
        self.create_subscription(Float32MultiArray, 'observation', self._on_observation,
                                 qos_profile_sensor_data)
        self.create_service(Trigger, '~/reset', self._on_reset)
        self.add_on_set_parameters_callback(self._check_parameters)
        self.timer = self.create_steady_timer(1.0 / self.rate, self._on_tick)
        self.create_steady_timer(diag_period, self._publish_status)
        self.get_logger().info(
            f'policy {checkpoint!r} ({self._kind()}, {self.policy.spec.obs_dim} obs -> '
            f'{self.action_dim} actions) at {self.rate:g} Hz, expert_mode '
            f'{self._expert_mode()!r}')

    # -- policy facts -------------------------------------------------------------------------
    def _is_moe(self) -> bool:
        return self.model is not None and hasattr(self.model, 'set_expert_mode')

    def _kind(self) -> str:
        if self.model is None:
            return f'{getattr(self.policy, "kind", "oracle")} oracle'
        return getattr(self.policy, 'meta', {}).get('method', self.model.kind)

    def _expert_mode(self) -> str:
        return str(self.model.expert_mode) if self._is_moe() else 'n/a'

    def _apply_expert_mode(self, mode: Any) -> None:
        """Switch the MoE's expert choice now (the queued action chunk is dropped)."""
        if not self._is_moe():
            raise UserError(f'expert_mode applies to MoE checkpoints, this policy is '
                            f'{self._kind()}')
        if isinstance(mode, bool) or not isinstance(mode, (int, str)):
            raise UserError(f'expert_mode: expected a name or an expert index, got {mode!r}')
        if isinstance(mode, str) and mode.strip().lstrip('-').isdigit():
            mode = int(mode)
        self.model.set_expert_mode(mode)
        queue = getattr(self.policy, '_queue', None)
        if queue is not None:
            queue.clear()

    def _check_parameters(self, params: list[Any]) -> SetParametersResult:
        for p in params:
            try:
                if p.name == 'expert_mode' and p.value not in ('', None):
                    self._apply_expert_mode(p.value)
                    self.get_logger().info(f'expert_mode is now {self._expert_mode()!r}')
                elif p.name == 'obs_timeout_s':
                    self.obs_timeout = self.number('obs_timeout_s', p.value)
                elif p.name == 'model_diagnostics':
                    self.model_diagnostics = bool(p.value)
                    if hasattr(self.policy, 'diagnostics'):
                        self.policy.diagnostics = self.model_diagnostics and self._is_moe()
            except UserError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    # -- callbacks ----------------------------------------------------------------------------
    def _on_observation(self, msg: Float32MultiArray) -> None:
        now = time.perf_counter()
        self.stats.received += 1
        meta = msg_meta(msg)
        latest = self._latest
        if latest is not None and 'seq' in meta and latest.meta.get('seq') == meta['seq'] \
                and latest.meta.get('episode') == meta.get('episode'):
            return  # a resend of the observation already answered
        try:
            obs = msg_to_array(msg, self.fields if msg.layout.dim else None,
                               self.policy.spec.obs_dim)
        except InvalidMessage as exc:
            self.stats.rejected += 1
            self._latest = _Observation(None, meta, now, str(exc))
            self._fresh = True
            self.get_logger().warning(f'observation rejected: {exc}; holding',
                                   throttle_duration_sec=THROTTLE_S)
            return
        self._latest = _Observation(obs, meta, now)
        self._fresh = True
        self._last_valid = now

    def _on_tick(self) -> None:
        if not self.context.ok():
            return  # shutting down
        start = time.perf_counter()
        expired = start - self._last_valid > self.obs_timeout
        if expired:
            action, meta = self._hold(), {}
            self._fresh = False
            if not self._tripped:
                self._tripped = True
                self.stats.watchdog_trips += 1
                self.get_logger().warning(f'no valid observation for {self.obs_timeout:g} s: '
                                       'publishing the hold action')
                self._publish_status()
        elif self._fresh:
            self._fresh = False
            action, meta = self._answer(self._latest, start)
            self._last = (action, meta)
        elif self._last is not None:
            action, meta = self._last
        else:
            action, meta = self._hold(), {}
        if self._tripped and not expired:
            self._tripped = False
            self.get_logger().info('observations resumed')
        self.action_pub.publish(action_to_msg(action, meta))
        self.deadlines.record(start, time.perf_counter())

    def _answer(self, latest: _Observation, start: float) -> tuple[np.ndarray, dict[str, int]]:
        """Act on a new observation (or hold when it was rejected)."""
        meta = {k: latest.meta[k] for k in ('seq', 'episode') if k in latest.meta}
        if latest.obs is None:
            self.stats.holds += 1
            return self._hold(), meta
        episode = latest.meta.get('episode')
        if episode is not None and episode != self._episode:
            self.policy.reset(int(episode))
            self._episode = int(episode)
        t0 = time.perf_counter()
        try:
            action = np.asarray(self.policy.act(latest.obs), dtype=np.float32).reshape(-1)
            if action.shape[0] != self.action_dim or not np.all(np.isfinite(action)):
                raise ValueError(f'policy returned {action}')
        except Exception as exc:  # a failing model must not stop the control loop
            self.stats.errors += 1
            self._error = f'{type(exc).__name__}: {exc}'
            self.get_logger().error(f'policy failed, holding: {self._error}',
                                    throttle_duration_sec=THROTTLE_S)
            return self._hold(), meta
        infer = time.perf_counter() - t0
        self._error = ''
        self.stats.computed += 1
        self.stats.inference_ms.append(infer * 1e3)
        self.stats.obs_age_ms.append((start - latest.received) * 1e3)
        self._gripper = float(action[-1])
        meta['infer_us'] = min(int(infer * 1e6), 2 ** 32 - 1)
        return action, meta

    def _hold(self) -> np.ndarray:
        if self.hold_action is not None:
            return self.hold_action.copy()
        action = np.zeros(self.action_dim, dtype=np.float32)
        action[-1] = self._gripper
        return action

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response
                  ) -> Trigger.Response:
        self.policy.reset(None)
        self._episode = None
        self._last = None
        self._fresh = False
        response.success = True
        response.message = 'new episode: policy state cleared, holding until the next ' \
                           'observation'
        self.get_logger().info('reset: new episode')
        return response

    # -- diagnostics --------------------------------------------------------------------------
    def status(self) -> tuple[str, str, dict[str, Any]]:
        """(level, message, values) of the current state."""
        s = self.stats
        inf50, inf99 = percentiles(s.inference_ms)
        age50, age99 = percentiles(s.obs_age_ms)
        rejected, misses = self._period_counts
        values: dict[str, Any] = {
            'checkpoint': self.checkpoint, 'policy': self._kind(),
            'expert_mode': self._expert_mode(), 'control_rate_hz': self.rate,
            'inference_ms_p50': inf50, 'inference_ms_p99': inf99,
            'obs_age_ms_p50': age50, 'obs_age_ms_p99': age99,
            'ticks': self.deadlines.ticks, 'deadline_misses': self.deadlines.misses,
            'deadline_miss_rate': self.deadlines.rate,
            'skipped_periods': self.deadlines.skipped, 'overruns': self.deadlines.overruns,
            'observations': s.received, 'rejected_observations': s.rejected,
            'actions_computed': s.computed, 'hold_answers': s.holds,
            'watchdog': 'tripped' if self._tripped else 'ok',
            'watchdog_trips': s.watchdog_trips, 'policy_errors': s.errors,
            'last_observation_age_s': time.perf_counter() - self._last_valid,
        }
        for key, value in getattr(self.policy, 'info', {}).items():
            values[key] = int(value) if key in ('expert', 'mode', 'phase') else value
        if self._error:
            return 'ERROR', f'policy failing: {self._error}', values
        if self._tripped:
            return 'WARN', f'no valid observation for {self.obs_timeout:g} s: holding', values
        if s.rejected > rejected:
            return 'WARN', f'{s.rejected - rejected} invalid observation(s) rejected', values
        if self.deadlines.misses > misses:
            return 'WARN', f'{self.deadlines.misses - misses} deadline miss(es)', values
        return 'OK', 'acting', values

    def _publish_status(self) -> None:
        level, message, values = self.status()
        self.publish_diagnostics(level, message, values)
        self._period_counts = (self.stats.rejected, self.deadlines.misses)

    def shutdown(self) -> None:
        if self.stats_file:
            from vdd_ros.core.io import write_json
            level, message, values = self.status()
            write_json(self.stats_file, {'level': level, 'message': message, **values})


def main(args: list[str] | None = None) -> int:
    return run_node(PolicyNode, args, 'policy_node')


if __name__ == '__main__':
    sys.exit(main())
