"""policy_node: any vdd_ros policy (a checkpoint or a scripted oracle) at the control rate.

Subscribes `observation` (Float32MultiArray, sensor-data QoS, labelled as in conversions.py),
publishes `action` (Float32MultiArray, reliable) from a steady timer at `control_rate_hz`, and
publishes diagnostics on /diagnostics. Each new observation is acted on exactly once (so
action chunks and per-episode experts advance once per control step); ticks without a new
observation republish the last action. The action echoes the observation's `@seq` and
`@episode` and carries `@infer_us`; an observation from a new `@episode` resets the policy
with that seed first, so episodes are reproducible. An observation with the `@seq` and
`@episode` of the last *accepted* one is a resend and is dropped.

Invariants (what is published when):
- Every tick publishes exactly one action of `action_dim` finite float32 values: the policy's
  answer to a new valid observation, the last answer again, or the hold action. A last gate
  before each publish replaces anything else (non-finite, wrong length) by the safe hold,
  zero motion with the last finite gripper command, counts it and reports ERROR.
- The hold action is `hold_action` (checked at start: finite, `action_dim` values), or zero
  motion keeping the last commanded gripper value (the action's last entry). It answers a
  rejected observation (NaN, Inf, wrong length or fields, too large, undecodable; a throttled
  warning), a failing policy (ERROR), and is published without metadata once no valid
  observation came for `obs_timeout_s` (the watchdog; WARN).
- Observations arrive serialized: one larger than `max_observation_bytes`, or with more than
  MAX_LAYOUT_DIMS layout dimensions, is rejected before it is decoded, so no message can
  stall the control timer for more than a fraction of a period.
- Parameters are checked before anything starts (one FATAL line, exit status 2) and runtime
  sets are validated before any is applied (rejected with the reason): `control_rate_hz` in
  (0, 2000], `obs_timeout_s` in [2 control periods, 3600], `diagnostics_period_s` in
  [0.01, 3600]. `expert_mode` '' restores the checkpoint's own mode.

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
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from std_msgs.msg import Float32MultiArray
from std_srvs.srv import Trigger

from vdd_ros.core.config import check_expert_mode
from vdd_ros.core.policy import Policy
from vdd_ros.errors import UserError
from vdd_ros.ros.conversions import (UINT32_MAX, InvalidMessage, action_to_msg,
                                     decode_labelled_array, msg_meta, msg_to_array, percentiles)
from vdd_ros.ros.runtime import VddNode, run_node

ORACLES = ('scripted', 'averaged')
ACTION_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
WINDOW = 2000          # latency samples kept for the percentiles
THROTTLE_S = 2.0       # minimum seconds between two repeated warnings
MAX_RATE_HZ = 2000.0   # control_rate_hz in (0, MAX_RATE_HZ]
MIN_TIMEOUT_PERIODS = 2.0         # obs_timeout_s in [2 control periods, MAX_TIMEOUT_S]
MAX_TIMEOUT_S = 3600.0
DIAG_PERIOD_S = (0.01, 3600.0)    # diagnostics_period_s range
OBS_BYTES = (1024, 64 * 2 ** 20)  # max_observation_bytes range (default 64 KiB)


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
    """Counts missed control deadlines of a periodic callback, and its worst gap.

    A miss is a tick whose work took longer than the period, or a period without a tick (the
    timer fired more than 1.5 periods after the previous tick; each skipped period counts).
    """

    def __init__(self, period_s: float) -> None:
        self.period = period_s
        self.ticks = 0
        self.misses = 0
        self.skipped = 0
        self.overruns = 0
        self.worst_gap = 0.0      # seconds between two consecutive tick starts, at most
        self._last: float | None = None

    def record(self, start: float, end: float) -> None:
        self.ticks += 1
        if self._last is not None:
            gap = start - self._last
            self.worst_gap = max(self.worst_gap, gap)
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
    resends: int = 0
    computed: int = 0
    holds: int = 0
    watchdog_trips: int = 0
    errors: int = 0
    unsafe: int = 0        # actions the last gate replaced by the safe hold


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
        rate = self.param('control_rate_hz', 20.0, 'rate of the action timer in Hz, in '
                          f'(0, {MAX_RATE_HZ:g}]', read_only=True, dynamic=True)
        timeout = self.param('obs_timeout_s', 0.5, 'watchdog: seconds without a valid '
                             'observation before the hold action is published, in '
                             f'[{MIN_TIMEOUT_PERIODS:g} control periods, {MAX_TIMEOUT_S:g}]; '
                             'changeable at runtime', dynamic=True)
        self.param('expert_mode', '', 'MoE expert choice: sample, argmax, per_episode, or an '
                   "expert index to pin; empty: the checkpoint's own; changeable at runtime",
                   dynamic=True)
        self.model_diagnostics = bool(self.param(
            'model_diagnostics', True, 'compute the chosen expert, gating entropy and '
            'log-likelihood of each MoE action (a few tens of microseconds)'))
        hold = self.param('hold_action', 'float[]', 'hold action: action_dim finite values; '
                          'empty: zero motion keeping the last gripper command (last entry)',
                          read_only=True)
        diag_period = self.param('diagnostics_period_s', 1.0, 'seconds between two diagnostics '
                                 f'messages, in [{DIAG_PERIOD_S[0]:g}, {DIAG_PERIOD_S[1]:g}]',
                                 read_only=True, dynamic=True)
        max_bytes = self.param('max_observation_bytes', 64 * 1024, 'serialized observations '
                               'larger than this are rejected before decoding, in '
                               f'[{OBS_BYTES[0]}, {OBS_BYTES[1]}]', read_only=True)
        seed = self.param('seed', -1, 'seed of the first episode (-1: random); an '
                          'observation with @episode reseeds', read_only=True)
        self.stats_file = str(self.param('stats_file', '', 'JSON file that receives the final '
                                         'diagnostics values at exit (empty: none)',
                                         read_only=True))
        priority = int(self.param('realtime_priority', 0, 'SCHED_FIFO priority (1-99) for the '
                                  'control loop thread; 0 keeps the normal scheduler',
                                  read_only=True))
        threads = int(self.param('torch_threads', 1, 'torch CPU threads (0: torch default)',
                                 read_only=True))

        # every parameter is checked before anything starts
        self.rate = self.number('control_rate_hz', rate, high=MAX_RATE_HZ)
        self.obs_timeout = self._timeout(timeout)
        diag_period = self.number('diagnostics_period_s', diag_period, DIAG_PERIOD_S[0],
                                  inclusive=True, high=DIAG_PERIOD_S[1])
        self.max_bytes = int(self.number('max_observation_bytes', max_bytes, OBS_BYTES[0],
                                         inclusive=True, high=OBS_BYTES[1]))
        if not -1 <= seed <= UINT32_MAX:
            raise UserError(f'parameter seed: must be -1 or in [0, {UINT32_MAX}], got {seed}')
        if steps < 0:
            raise UserError(f'parameter teacher_steps: must be >= 0, got {steps}')
        if priority:
            set_realtime_priority(priority, self.get_logger())
        if threads > 0:
            import torch
            torch.set_num_threads(threads)

        self.checkpoint = checkpoint
        self.policy = load_any_policy(checkpoint, task, device, int(steps) or None)
        self.fields = [(str(k), int(n)) for k, n in self.policy.spec.obs_fields]
        self.action_dim = int(self.policy.spec.action_dim)
        self.model = getattr(self.policy, 'model', None)
        self.hold_action = self._check_hold(hold)
        if hasattr(self.policy, 'diagnostics'):
            self.policy.diagnostics = self.model_diagnostics and self._is_moe()
        self._own_mode = self.model.expert_mode if self._is_moe() else None
        mode = self.get_parameter('expert_mode').value
        if mode not in ('', None):
            self._set_expert_mode(self._expert_mode_value(mode))
        self.policy.reset(seed if seed >= 0 else None)

        self._latest: _Observation | None = None
        self._fresh = False
        self._accepted: tuple[int, int | None] | None = None  # (@seq, @episode) last accepted
        self._episode: int | None = None
        self._last: tuple[np.ndarray, dict[str, int]] | None = None
        self._gripper = 0.0
        self._last_valid = time.perf_counter()
        self._tripped = False
        self._error = ''
        self._unsafe = ''
        self._logged: dict[str, float] = {}  # level -> time of the last throttled message
        self.stats = _Stats()
        self.deadlines = DeadlineMonitor(1.0 / self.rate)
        self._period_counts = (0, 0, 0)  # rejected, misses, unsafe at the last diagnostics

        self.action_pub = self.create_publisher(Float32MultiArray, 'action', ACTION_QOS)
        self.create_subscription(Float32MultiArray, 'observation', self._on_observation,
                                 qos_profile_sensor_data, raw=True)
        self.create_service(Trigger, '~/reset', self._on_reset)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        self.timer = self.create_steady_timer(1.0 / self.rate, self._on_tick)
        self.create_steady_timer(diag_period, self._publish_status)
        self.get_logger().info(
            f'policy {checkpoint!r} ({self._kind()}, {self.policy.spec.obs_dim} obs -> '
            f'{self.action_dim} actions) at {self.rate:g} Hz, expert_mode '
            f'{self._expert_mode()!r}')

    # -- parameters ---------------------------------------------------------------------------
    def _timeout(self, value: Any) -> float:
        low = MIN_TIMEOUT_PERIODS / self.rate
        return self.number('obs_timeout_s', value, low, inclusive=True, high=MAX_TIMEOUT_S,
                           note=f'{MIN_TIMEOUT_PERIODS:g} control periods at {self.rate:g} Hz')

    def _check_hold(self, hold: list[Any]) -> np.ndarray | None:
        """`hold_action` as float32, or None when empty; UserError unless finite and of
        `action_dim` values."""
        if not hold:
            return None
        if len(hold) != self.action_dim:
            raise UserError(f'parameter hold_action: needs {self.action_dim} values, got '
                            f'{len(hold)}')
        with np.errstate(over='ignore'):
            action = np.asarray(hold, dtype=np.float64).astype(np.float32)
        if not np.all(np.isfinite(action)):
            raise UserError('parameter hold_action: every value must be finite as float32, '
                            f'got {list(hold)}')
        return action

    def _expert_mode_value(self, mode: Any) -> str | int:
        """The expert mode `mode` names ('' : the checkpoint's own); UserError when invalid."""
        if not self._is_moe():
            raise UserError(f'parameter expert_mode: applies to MoE checkpoints, this policy '
                            f'is {self._kind()}')
        if isinstance(mode, bool) or not isinstance(mode, (int, str)):
            raise UserError('parameter expert_mode: expected a name or an expert index, got '
                            f'{mode!r}')
        if mode == '':
            return self._own_mode
        if isinstance(mode, str) and mode.strip().lstrip('-').isdigit():
            mode = int(mode)
        check_expert_mode(mode, self.model.num_experts, name='parameter expert_mode')
        return mode

    def _set_expert_mode(self, mode: str | int) -> None:
        """Switch the MoE's expert choice now (the queued action chunk is dropped)."""
        self.model.set_expert_mode(mode)
        queue = getattr(self.policy, '_queue', None)
        if queue is not None:
            queue.clear()

    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Check a runtime set before any of it applies (rclpy then calls _apply_parameters)."""
        for p in params:
            try:
                if p.name == 'expert_mode' and (p.value != '' or self._is_moe()):
                    self._expert_mode_value(p.value)
                elif p.name == 'obs_timeout_s':
                    self._timeout(p.value)
            except UserError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        for p in params:
            if p.name == 'expert_mode' and (p.value != '' or self._is_moe()):
                self._set_expert_mode(self._expert_mode_value(p.value))
                self.get_logger().info(f'expert_mode is now {self._expert_mode()!r}')
            elif p.name == 'obs_timeout_s':
                self.obs_timeout = self._timeout(p.value)
            elif p.name == 'model_diagnostics':
                self.model_diagnostics = bool(p.value)
                if hasattr(self.policy, 'diagnostics'):
                    self.policy.diagnostics = self.model_diagnostics and self._is_moe()

    # -- policy facts -------------------------------------------------------------------------
    def _is_moe(self) -> bool:
        return self.model is not None and hasattr(self.model, 'set_expert_mode')

    def _kind(self) -> str:
        if self.model is None:
            return f'{getattr(self.policy, "kind", "oracle")} oracle'
        return getattr(self.policy, 'meta', {}).get('method', self.model.kind)

    def _expert_mode(self) -> str:
        return str(self.model.expert_mode) if self._is_moe() else 'n/a'

    # -- callbacks ----------------------------------------------------------------------------
    def _on_observation(self, data: bytes) -> None:
        """A serialized observation: size-checked, decoded, validated, kept as the latest."""
        now = time.perf_counter()
        self.stats.received += 1
        meta: dict[str, int] = {}
        try:
            msg = decode_labelled_array(data, self.max_bytes)
            meta = msg_meta(msg)
            if 'seq' in meta and self._accepted == (meta['seq'], meta.get('episode')):
                self.stats.resends += 1
                return  # a resend of the observation already accepted
            obs = msg_to_array(msg, self.fields if msg.layout.dim else None,
                               self.policy.spec.obs_dim)
        except InvalidMessage as exc:
            self.stats.rejected += 1
            self._latest = _Observation(None, meta, now, str(exc))
            self._fresh = True
            self._throttled('warning', f'observation rejected: {exc}; holding')
            return
        self._accepted = (meta['seq'], meta.get('episode')) if 'seq' in meta else None
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
        self._publish(action, meta)
        self.deadlines.record(start, time.perf_counter())

    def _publish(self, action: np.ndarray, meta: dict[str, int]) -> None:
        """The last gate: only `action_dim` finite values are ever published on `action`."""
        try:
            with np.errstate(over='ignore', invalid='ignore'):
                out = np.asarray(action, dtype=np.float32).reshape(-1)
            safe = out.shape == (self.action_dim,) and bool(np.all(np.isfinite(out)))
        except (TypeError, ValueError):
            safe = False
        if not safe:
            self.stats.unsafe += 1
            self._unsafe = f'unsafe action {action!r} replaced by the safe hold'
            self._throttled('error', f'{self._unsafe}: zero motion, last gripper command')
            out = np.zeros(self.action_dim, dtype=np.float32)
            out[-1] = self._gripper
            meta = {k: v for k, v in meta.items() if k in ('seq', 'episode')}
        self.action_pub.publish(action_to_msg(out, meta))

    def _answer(self, latest: _Observation, start: float) -> tuple[np.ndarray, dict[str, int]]:
        """Act on a new observation (or hold when it was rejected)."""
        meta = {k: latest.meta[k] for k in ('seq', 'episode') if k in latest.meta}
        if latest.obs is None:
            self.stats.holds += 1
            return self._hold(), meta
        t0 = time.perf_counter()
        try:
            episode = latest.meta.get('episode')
            if episode is not None and episode != self._episode:
                self.policy.reset(int(episode))
                self._episode = int(episode)
            t0 = time.perf_counter()
            action = np.asarray(self.policy.act(latest.obs), dtype=np.float32).reshape(-1)
            if action.shape[0] != self.action_dim or not np.all(np.isfinite(action)):
                raise ValueError(f'policy returned {action}')
        except Exception as exc:  # a failing model must not stop the control loop
            self.stats.errors += 1
            self._error = f'{type(exc).__name__}: {exc}'
            self._throttled('error', f'policy failed, holding: {self._error}')
            return self._hold(), meta
        infer = time.perf_counter() - t0
        self._error = ''
        self.stats.computed += 1
        self.stats.inference_ms.append(infer * 1e3)
        self.stats.obs_age_ms.append((start - latest.received) * 1e3)
        self._gripper = float(action[-1])
        meta['infer_us'] = min(int(infer * 1e6), UINT32_MAX)
        return action, meta

    def _throttled(self, level: str, text: str) -> None:
        """Log `text` unless this level logged within THROTTLE_S (rclpy's own throttle inspects
        the caller's frame on every call: ~1 ms, too slow for a flood of bad messages)."""
        now = time.monotonic()
        if now - self._logged.get(level, -THROTTLE_S) >= THROTTLE_S:
            self._logged[level] = now
            getattr(self.get_logger(), level)(text)

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
        self._accepted = None
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
        rejected, misses, unsafe = self._period_counts
        values: dict[str, Any] = {
            'checkpoint': self.checkpoint, 'policy': self._kind(),
            'expert_mode': self._expert_mode(), 'control_rate_hz': self.rate,
            'obs_timeout_s': self.obs_timeout,
            'inference_ms_p50': inf50, 'inference_ms_p99': inf99,
            'obs_age_ms_p50': age50, 'obs_age_ms_p99': age99,
            'ticks': self.deadlines.ticks, 'deadline_misses': self.deadlines.misses,
            'deadline_miss_rate': self.deadlines.rate,
            'skipped_periods': self.deadlines.skipped, 'overruns': self.deadlines.overruns,
            'worst_tick_gap_ms': self.deadlines.worst_gap * 1e3,
            'observations': s.received, 'rejected_observations': s.rejected,
            'resends_dropped': s.resends,
            'actions_computed': s.computed, 'hold_answers': s.holds,
            'watchdog': 'tripped' if self._tripped else 'ok',
            'watchdog_trips': s.watchdog_trips, 'policy_errors': s.errors,
            'unsafe_actions_replaced': s.unsafe,
            'last_observation_age_s': time.perf_counter() - self._last_valid,
        }
        for key, value in getattr(self.policy, 'info', {}).items():
            values[key] = int(value) if key in ('expert', 'mode', 'phase') else value
        if s.unsafe > unsafe:
            return 'ERROR', (f'{s.unsafe - unsafe} unsafe action(s) replaced by the safe '
                             f'hold ({self._unsafe})'), values
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
        self._period_counts = (self.stats.rejected, self.deadlines.misses, self.stats.unsafe)

    def shutdown(self) -> None:
        if self.stats_file:
            from vdd_ros.core.io import write_json
            level, message, values = self.status()
            write_json(self.stats_file, {'level': level, 'message': message, **values})


def main(args: list[str] | None = None) -> int:
    return run_node(PolicyNode, args, 'policy_node')


if __name__ == '__main__':
    sys.exit(main())
