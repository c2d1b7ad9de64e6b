"""policy_node: any vdd_ros policy (a checkpoint or a scripted oracle) at the control rate.

Subscribes `observation` (Float32MultiArray, sensor-data QoS, labelled as in conversions.py),
publishes `action` (Float32MultiArray, reliable) at `control_rate_hz`, and publishes
diagnostics on /diagnostics. Each new observation is acted on exactly once (so action chunks
and per-episode experts advance once per control step). The action echoes the observation's
`@seq` and `@episode` and carries `@infer_us`; an observation from a new `@episode` resets
the policy with that seed first, so episodes are reproducible. An observation with the `@seq`
and `@episode` of the last *accepted* one is a resend and is dropped.

When it acts (`act_on`, both paths):
- `tick` (default): at each control tick on the latest observation when it is new; ticks
  without one republish the last action (labelled path). The tick comes from an executor
  timer on the steady clock (`control_loop:=timer`, default) or from a dedicated thread
  sleeping to absolute deadlines (`control_loop:=thread`, control_loop.py).
- `complete`: as soon as an observation is complete, in its subscription callback (a robot
  that publishes state at the control rate, lockstep simulation): no tick wait. Nothing is
  republished; the tick is only the watchdog, on a thread that sleeps until it could expire.
  A deadline miss is then an answer later than one period after the observation arrived.
Labelled observations with the layout bytes of one already read are read straight from their
bytes (binding_io.LabelledReader). Diagnostics add the p50/p99 of each stage of a control
period (decode, the thread's wake-up lateness, tick wait, inference, publish, arrival to
sent), and the MoE's gating entropy and log-likelihood for one action per diagnostics period.

Invariants (what is published when):
- Labelled path: every action is `action_dim` finite float32 values: the policy's answer to a
  new valid observation, the last answer again (act_on tick: every tick publishes one), or
  the hold action. A last gate before each publish replaces anything else (non-finite, wrong
  length) by the safe hold, zero motion with the last finite gripper command, counts it and
  reports ERROR.
- The hold action is `hold_action` (checked at start: finite, `action_dim` values), or zero
  motion keeping the last commanded gripper value (the action's last entry). It answers a
  rejected observation (NaN, Inf, wrong length or fields, too large, undecodable; a throttled
  warning), a failing policy (ERROR), and is published without metadata once no valid
  observation came for `obs_timeout_s` (the watchdog; WARN).
- Observations arrive serialized: one larger than `max_observation_bytes`, or with more than
  MAX_LAYOUT_DIMS layout dimensions, is rejected before it is decoded, so no message can
  stall the control timer for more than a fraction of a period.
- Out of distribution: a checkpoint calibrated by `vdd-ros confidence` (its
  confidence.safetensors, or `confidence_file`) has every observation scored by an
  observation density (core/confidence.py, some tens of microseconds) before the policy acts;
  the level (OK, WARN, ERROR against the calibrated thresholds, sustained for a few actions)
  is on /diagnostics. `on_out_of_distribution:=hold` publishes the hold action instead of the
  policy's while the level is ERROR: labelled actions then carry `@hold` = 1, and the
  diagnostics count the holds and say so.
- Parameters are checked before anything starts (one FATAL line, exit status 2) and runtime
  sets are validated before any is applied (rejected with the reason): `control_rate_hz` in
  (0, 2000], `obs_timeout_s` in [2 control periods, 3600], `diagnostics_period_s` in
  [0.01, 3600]. `expert_mode` '' restores the checkpoint's own mode.

Standard messages (`binding:=FILE`, or `binding:=task:<name>` for the shipped
config/bindings/<name>.yaml; see vdd_ros/binding.py for the format). Without a binding the
node speaks the labelled arrays above, unchanged. With one:
- At start the binding must match the checkpoint: the same observation features (names,
  sizes, order) and action size, else one FATAL line naming the first difference (exit 2).
  Joint names and topics cannot be checked before messages arrive: a missing joint rejects
  each message that lacks it (a throttled warning naming joint and topic); a source topic
  without messages is named in the diagnostics (no publisher, or published with another type:
  ERROR).
- Subscriptions: the episode marker topic first (std_msgs/String, reliable, depth 100: a
  `start` marker resets the policy with its seed, so episodes are reproducible per seed), then
  one raw sensor-data subscription per source topic. Each message is size-checked
  (`max_observation_bytes`) before it is decoded, then read through the binding (joints by
  name, frame_id, sizes, NaN/Inf, a stamp more than max_age_s ahead of the node clock: a bad
  message is rejected and its topic is invalid until its next valid message). A header stamp
  not newer than the feature's latest is dropped (a duplicate or out of order); when the node
  clock goes back, every source is forgotten.
- Time: a source's age is measured on the node clock (`use_sim_time` follows /clock): now
  minus its header stamp, or minus its arrival for headerless arrays; older than its
  max_age_s (or stamped that far in the future) it is stale. The watchdog (`obs_timeout_s`)
  runs on the node clock too, so a paused simulation trips nothing.
- Acting (`act_on`): `tick` acts at each control tick on the latest message of each source
  when any of them is new; `complete` acts in the subscription callback as soon as every
  source has a message of the same header stamp, newer than the last answered one (lockstep
  simulation, robots that publish all state at one stamp; each source topic then keeps only
  its newest messages, so a policy slower than the sources answers late by at most about a
  period, see _source_qos). An observation with a stale or invalid source is answered by the
  hold, with a WARN naming the topic; a rejected message in `complete` is answered at once,
  stamped like it.
- Sinks: one reliable publisher per action topic. Each is published only when the node acts
  or holds (never a republished command: a repeated delta would move twice); while the
  watchdog is tripped the hold goes out at every tick. Stamped sinks carry header.stamp = the
  observation's time (the OLDEST of its sources' times: a command never claims fresher data
  than it used) and the sink's frame_id (a watchdog hold: now in `tick`, the last answered
  stamp in `complete`, so a lockstep simulator never takes it for its next step's answer).
  A JointTrajectory carries the whole predicted chunk
  (the action, then `Policy.pending()`), point k at (k + 1) control periods. The last gate
  covers every sink: unless all values are finite and of the right shape, the safe hold goes
  out on every topic. A PoseStamped target sink has no zero-motion hold: while holding it
  publishes nothing (unless `hold_action` gives it a pose).
- Diagnostics add the binding, act_on, and per source topic its state (ok, waiting, invalid,
  stale) and age on the node clock.

Run: `python -m vdd_ros.ros.policy_node --ros-args -p checkpoint:=PATH -p task:=lift_carry`
(add `-p binding:=task:lift_carry -p use_sim_time:=true` for sim_node's standard topics).
"""
from __future__ import annotations

import functools
import gc
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.clock import JumpThreshold, TimeJump
from rclpy.duration import Duration
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from std_msgs.msg import Float32MultiArray, String
from std_srvs.srv import Trigger

from vdd_ros.binding import IMAGE, JOINT_TRAJECTORY, BindingMismatch, parse_marker
from vdd_ros.core.config import check_expert_mode, is_integer
from vdd_ros.core.confidence import LEVELS, ConfidenceMonitor, load_confidence
from vdd_ros.core.policy import Policy
from vdd_ros.errors import UserError
from vdd_ros.ros.binding_io import (LabelledReader, LabelledWriter, SinkWriter, SourceBook,
                                    TopicReader, check_against_policy, header_stamp_ns,
                                    resolve_binding)
from vdd_ros.ros.control_loop import LOOPS, ControlThread, TimerLoop, set_realtime_priority
from vdd_ros.ros.conversions import (UINT32_MAX, InvalidMessage, percentiles)
from vdd_ros.ros.runtime import VddNode, run_node

ORACLES = ('scripted', 'averaged')
ACTION_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
MARKER_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
ACT_ON = ('tick', 'complete')
OOD_ACTIONS = ('warn', 'hold')     # on_out_of_distribution
LEVEL_INDEX = {name: i for i, name in enumerate(LEVELS)}
NS = 1_000_000_000
WINDOW = 2000          # latency samples kept for the percentiles
THROTTLE_S = 2.0       # minimum seconds between two repeated warnings
MAX_RATE_HZ = 2000.0   # control_rate_hz in (0, MAX_RATE_HZ]
MIN_TIMEOUT_PERIODS = 2.0         # obs_timeout_s in [2 control periods, MAX_TIMEOUT_S]
MAX_TIMEOUT_S = 3600.0
DIAG_PERIOD_S = (0.01, 3600.0)    # diagnostics_period_s range
OBS_BYTES = (1024, 64 * 2 ** 20)  # max_observation_bytes range (default 64 KiB)


def load_any_policy(checkpoint: str, task: str = '', device: str = 'cpu',
                    steps: int | None = None, threads: int | None = None) -> Policy:
    """A checkpoint folder or exported .onnx file (onnxruntime on `threads` threads, no
    torch) through the one loader, or a task's oracle ('scripted')."""
    if not checkpoint:
        raise UserError('parameter checkpoint: required (a checkpoint folder, or '
                        f'{" / ".join(ORACLES)} with a task)')
    if checkpoint in ORACLES:
        if not task:
            raise UserError(f'parameter task: required when checkpoint is {checkpoint!r}')
        from vdd_ros.sim.demonstrators import make_oracle
        return make_oracle(task, kind=checkpoint)
    from vdd_ros.core.checkpoint import load_policy
    policy = load_policy(checkpoint, device=device, steps=steps, threads=threads)
    if task:
        from vdd_ros.sim.tasks import get_task
        spec = get_task(task)
        if policy.spec.task not in (None, spec.name):
            raise UserError(f'{checkpoint}: trained for task {policy.spec.task!r}, not {task!r}')
        fields = [(str(k), int(n)) for k, n in policy.spec.obs_fields]
        if fields != list(spec.obs_fields):
            raise UserError(f'{checkpoint}: observation fields differ from task {task!r}')
    return policy


def _source_qos(depth: int) -> QoSProfile:
    """Sensor-data QoS keeping only the newest `depth` messages of a topic (one per source
    it feeds, as a driver may publish them apart). In act_on complete the node acts inside
    the subscription callbacks; should acting take longer than the source period, the older
    messages are overwritten in the queue rather than answered late, so an observation waits
    at most about one period (with sensor-data's depth 5 it would wait five)."""
    return QoSProfile(history=qos_profile_sensor_data.history, depth=max(1, depth),
                      reliability=qos_profile_sensor_data.reliability,
                      durability=qos_profile_sensor_data.durability)


class DeadlineMonitor:
    """Counts missed control deadlines of a periodic callback, and its worst gap.

    A miss is a tick whose work took longer than the period, or a period without a tick (the
    loop woke more than 1.5 periods after the previous tick; each skipped period counts).
    Not `periodic` (acting on arrival), each answer is a tick from the observation's arrival
    to its action's publication, and a miss is an answer later than one period.
    """

    def __init__(self, period_s: float, periodic: bool = True) -> None:
        self.period = period_s
        self.periodic = periodic
        self.ticks = 0
        self.misses = 0
        self.skipped = 0
        self.overruns = 0
        self.worst_gap = 0.0      # seconds between two consecutive tick starts, at most
        self._last: float | None = None

    def record(self, start: float, end: float) -> None:
        self.ticks += 1
        if self._last is not None and self.periodic:
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
    serial: int = 0       # counts the observations received (accepted or rejected)


@dataclass
class _Stats:
    inference_ms: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    obs_age_ms: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    decode_ms: deque = field(default_factory=lambda: deque(maxlen=WINDOW))   # callback: read
    publish_ms: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # publish calls
    answer_ms: deque = field(default_factory=lambda: deque(maxlen=WINDOW))   # arrival -> sent
    confidence_ms: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # scoring
    received: int = 0
    rejected: int = 0
    resends: int = 0
    computed: int = 0
    holds: int = 0
    out_of_order: int = 0  # binding sources: a header stamp older than the latest one
    watchdog_trips: int = 0
    errors: int = 0
    unsafe: int = 0        # actions the last gate replaced by the safe hold
    ood_holds: int = 0     # actions held because the observation was out of distribution


class PolicyNode(VddNode):
    """Acts on the latest observation at the control rate; see the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('policy_node', **kwargs)
        checkpoint = self.param('checkpoint', '', 'checkpoint folder (teacher, VDD-MoE or '
                                'baseline), an exported .onnx file (onnxruntime, no torch), '
                                'or "scripted" / "averaged" for the task oracle',
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
            'model_diagnostics', True, 'report the chosen expert, gating entropy and '
            'log-likelihood of an MoE action on /diagnostics (computed for one action per '
            'diagnostics period)'))
        hold = self.param('hold_action', 'float[]', 'hold action: action_dim finite values; '
                          'empty: zero motion keeping the last gripper command (last entry)',
                          read_only=True)
        diag_period = self.param('diagnostics_period_s', 1.0, 'seconds between two diagnostics '
                                 f'messages, in [{DIAG_PERIOD_S[0]:g}, {DIAG_PERIOD_S[1]:g}]',
                                 read_only=True, dynamic=True)
        max_bytes = self.param('max_observation_bytes', 0, 'serialized observations larger '
                               'than this are rejected before decoding, in '
                               f'[{OBS_BYTES[0]}, {OBS_BYTES[1]}]; 0: 64 KiB, or the '
                               "policy's observation size and 4 KiB when that is larger "
                               '(camera policies)', read_only=True)
        seed = self.param('seed', -1, 'seed of the first episode (-1: random); an '
                          'observation with @episode reseeds', read_only=True)
        self.stats_file = str(self.param('stats_file', '', 'JSON file that receives the final '
                                         'diagnostics values at exit (empty: none)',
                                         read_only=True))
        priority = int(self.param('realtime_priority', 0, 'SCHED_FIFO priority (1-99) for the '
                                  'control loop thread; 0 keeps the normal scheduler',
                                  read_only=True))
        threads = int(self.param('torch_threads', 1, 'CPU threads of torch, or of onnxruntime '
                                 'for a .onnx checkpoint (0: the library default)',
                                 read_only=True))
        binding = str(self.param('binding', '', 'binding YAML file (task:<name>: the shipped '
                                 'config/bindings/<name>.yaml): standard topics in and out; '
                                 'empty: the labelled observation and action arrays',
                                 read_only=True))
        self.act_on = str(self.param('act_on', 'tick', 'tick: act at each control tick on '
                                     'the latest observation when it is new; complete: act as '
                                     'soon as an observation is complete (on arrival; with a '
                                     'binding, once every source has a message of one new '
                                     'stamp)', read_only=True))
        self.on_ood = str(self.param('on_out_of_distribution', 'warn', 'what an ERROR '
                                     'confidence level does: warn (reported on /diagnostics) '
                                     'or hold (the hold action is published while it lasts)',
                                     read_only=True))
        confidence = str(self.param('confidence_file', '', 'calibrated confidence file '
                                    '(vdd-ros confidence); empty: the checkpoint folder\'s '
                                    'own, when it has one', read_only=True))
        self.loop_kind = str(self.param('control_loop', 'timer', 'what drives the control '
                                        'tick in act_on tick: timer (an executor timer, between '
                                        'callbacks) or thread (a dedicated thread sleeping to '
                                        'absolute deadlines); act_on complete watches from a '
                                        'thread', read_only=True))

        # every parameter is checked before anything starts
        self.rate = self.number('control_rate_hz', rate, high=MAX_RATE_HZ)
        self.obs_timeout = self._timeout(timeout)
        diag_period = self.number('diagnostics_period_s', diag_period, DIAG_PERIOD_S[0],
                                  inclusive=True, high=DIAG_PERIOD_S[1])
        self.max_bytes = 0 if max_bytes == 0 else int(self.number(
            'max_observation_bytes', max_bytes, OBS_BYTES[0], inclusive=True, high=OBS_BYTES[1],
            note='or 0: sized for the policy'))
        if not -1 <= seed <= UINT32_MAX:
            raise UserError(f'parameter seed: must be -1 or in [0, {UINT32_MAX}], got {seed}')
        if steps < 0:
            raise UserError(f'parameter teacher_steps: must be >= 0, got {steps}')
        if self.act_on not in ACT_ON:
            raise UserError(f'parameter act_on: must be one of {list(ACT_ON)}, got '
                            f'{self.act_on!r}')
        if self.on_ood not in OOD_ACTIONS:
            raise UserError(f'parameter on_out_of_distribution: must be one of '
                            f'{list(OOD_ACTIONS)}, got {self.on_ood!r}')
        if self.loop_kind not in LOOPS:
            raise UserError(f'parameter control_loop: must be one of {list(LOOPS)}, got '
                            f'{self.loop_kind!r}')
        if not 0 <= priority <= 99:
            raise UserError(f'parameter realtime_priority: must be 0 or 1-99, got {priority}')
        if priority and self.loop_kind == 'timer':
            set_realtime_priority(priority, self.get_logger())
        onnx = checkpoint.endswith('.onnx')
        if threads > 0 and not onnx:
            import torch
            torch.set_num_threads(threads)

        self.checkpoint = checkpoint
        self.policy = load_any_policy(checkpoint, task, device, int(steps) or None,
                                      threads if onnx else None)
        self.fields = [(str(k), int(n)) for k, n in self.policy.spec.obs_fields]
        self.action_dim = int(self.policy.spec.action_dim)
        self.model = getattr(self.policy, 'model', None)
        self.hold_action = self._check_hold(hold)
        self.monitor = self._load_monitor(confidence)
        # (an MoE computes its diagnostics only when asked: see _compute)
        self._moe_diagnostics = hasattr(self.policy, 'diagnostics') and self._is_moe()
        self._own_mode = self.model.expert_mode if self._is_moe() else None
        mode = self.get_parameter('expert_mode').value
        if mode not in ('', None):
            self._set_expert_mode(self._expert_mode_value(mode))
        self.policy.reset(seed if seed >= 0 else None)
        self.binding = resolve_binding(binding) if binding else None
        if self.binding is not None:
            check_against_policy(self.binding, self.fields, self.action_dim)

        self._latest: _Observation | None = None
        self._received_serial = 0   # serial of the latest observation (labelled path)
        self._taken = 0             # serial of the latest one a tick has taken
        self._fresh = False         # binding path, act_on tick: a source is new
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
        self.deadlines = DeadlineMonitor(1.0 / self.rate, periodic=self.act_on == 'tick')
        self._info: dict[str, float] = {}  # the policy's info of recent actions
        self._want_info = True       # compute them for the next action (one per diagnostics)
        self._held = False           # the latest answer is an out-of-distribution hold
        self._worst_level = 0        # worst confidence level since the last diagnostics
        # the control loop thread and the executor's callbacks share the node's state
        self._lock = threading.RLock()
        self._period_counts = (0, 0, 0)  # rejected, misses, unsafe at the last diagnostics

        if self.binding is None:
            self.action_pub = self.create_publisher(Float32MultiArray, 'action', ACTION_QOS)
            obs_dim = self.policy.spec.obs_dim
            self.max_bytes = self.max_bytes or max(64 * 1024, 4 * obs_dim + 4096)
            self._reader = LabelledReader(self.fields, obs_dim, self.max_bytes)
            self._writer = LabelledWriter(self.action_dim)
            # acting on arrival takes the node's lock; in act_on tick the callback only
            # hands the observation over (see _on_observation), so the control thread never
            # waits for it
            on_obs = self._on_observation if self.act_on == 'tick' else \
                self._locked(self._on_observation)
            self.create_subscription(Float32MultiArray, 'observation', on_obs,
                                     qos_profile_sensor_data, raw=True)
        else:
            self._setup_binding(binding)
        self.create_service(Trigger, '~/reset', self._locked(self._on_reset))
        self.add_on_set_parameters_callback(self._locked(self._validate_parameters))
        self.add_post_set_parameters_callback(self._locked(self._apply_parameters))
        tick = self._locked(self._on_tick if self.binding is None else self._on_binding_tick)
        # acting on arrival, the tick is only the watchdog: a thread that sleeps until the
        # watchdog could expire (an executor timer would wake the executor every period)
        if self.loop_kind == 'thread' or self.act_on == 'complete':
            self.loop: Any = ControlThread(1.0 / self.rate, tick, name='vdd_control',
                                           priority=priority, logger=self.get_logger(),
                                           on_error=self._on_loop_error)
            # the thread starts when the node first spins (a node nobody spins never acts)
            self._starter = self.create_timer(0.0, self._start_loop)
        else:
            self.loop = TimerLoop(self, 1.0 / self.rate, tick)
        self.create_steady_timer(diag_period, self._locked(self._publish_status))
        # what was built so far lives as long as the node: out of the garbage collector's
        # scans, so that a full collection in the control loop stays short
        gc.collect()
        gc.freeze()
        self.get_logger().info(
            f'policy {checkpoint!r} ({self._kind()}, {self.policy.spec.obs_dim} obs -> '
            f'{self.action_dim} actions) at {self.rate:g} Hz ({self.loop_kind} loop, act_on '
            f'{self.act_on}), expert_mode {self._expert_mode()!r}'
            + ('' if self.binding is None else f', binding {binding!r}'))

    # -- the control loop ---------------------------------------------------------------------
    def _locked(self, fn: Any) -> Any:
        """`fn` called under the node's lock (shared by the control thread and callbacks)."""
        lock = self._lock

        @functools.wraps(fn)     # (rclpy reads a callback's signature: it keeps fn's)
        def call(*args: Any) -> Any:
            with lock:
                return fn(*args)
        return call

    def _start_loop(self) -> None:
        self._starter.cancel()
        if not self.loop.running:
            self.loop.start()

    def _on_loop_error(self, exc: BaseException) -> None:
        """A tick raised in the control thread: stop at shutdown, else log it (throttled)."""
        if not self.context.ok():
            self.loop.stop()
            return
        self.stats.errors += 1
        self._throttled('error', f'control tick failed: {type(exc).__name__}: {exc}',
                        key='tick')

    def stop_loop(self) -> None:
        """End the control loop (waits for the current tick)."""
        loop = getattr(self, 'loop', None)
        if loop is not None:
            loop.stop()

    def destroy_node(self) -> None:
        self.stop_loop()
        super().destroy_node()

    def _setup_binding(self, name: str) -> None:
        """Subscriptions (the episode markers first, then one raw sensor-data subscription
        per source topic), one publisher per sink, the per-source bookkeeping."""
        b = self.binding
        self._now_handle = self.get_clock().handle
        self.book = SourceBook(b)
        images = [s.size for s in b.sources if s.type == IMAGE]
        self.max_bytes = self.max_bytes or max(64 * 1024, max(images, default=0) + 4096)
        self.readers = {t: TopicReader(b, t, k, self.max_bytes)
                        for t, k in b.observation_topics().items()}
        self.writers = [SinkWriter(s) for s in b.action]
        self._chunked = any(s.type == JOINT_TRAJECTORY for s in b.action)
        self._acted_serial = 0       # book.serial when the node last acted
        self._acted_ns = -1          # the last observation stamp answered
        self._arrived = time.perf_counter()  # arrival of the newest source message
        self._last_valid_ns = self._now_ns()
        self._warned_types: set[str] = set()
        self.create_subscription(String, b.episode_topic, self._locked(self._on_marker),
                                 MARKER_QOS)
        for topic, reader in self.readers.items():
            qos = qos_profile_sensor_data
            if self.act_on == 'complete':   # see _source_qos
                qos = _source_qos(len(reader.sources))
            on_source = self._locked(lambda raw, reader=reader: self._on_source(reader, raw))
            self.create_subscription(reader.cls, topic, on_source, qos, raw=True)
        self.sink_pubs = [self.create_publisher(w.cls, w.sink.topic, ACTION_QOS)
                          for w in self.writers]
        self._jump = self.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(nanoseconds=-1)),
            post_callback=self._locked(self._on_time_jump))
        use_sim = bool(self.get_parameter('use_sim_time').value)
        if b.clock == 'sim' and not use_sim:
            self.get_logger().warning(f'binding {name!r} runs on /clock (clock: sim) but '
                                      'use_sim_time is false: source ages are measured on the '
                                      'system clock (set use_sim_time:=true)')
        if b.rate_hz is not None and b.rate_hz != self.rate:
            self.get_logger().warning(f'binding {name!r} has rate_hz {b.rate_hz:g}, the node '
                                      f'acts at control_rate_hz {self.rate:g}')

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

    def _load_monitor(self, confidence: str) -> ConfidenceMonitor | None:
        """The calibrated confidence monitor (`confidence_file`, else the checkpoint
        folder's), or None; UserError when it does not fit the policy or `hold` lacks one."""
        from pathlib import Path
        source = confidence or (self.checkpoint if Path(self.checkpoint).is_dir() else '')
        monitor = load_confidence(source) if source else None
        if confidence and monitor is None:
            raise UserError(f'parameter confidence_file: {confidence}: no such confidence '
                            'file')
        if monitor is not None and monitor.density.dim != self.policy.spec.obs_dim:
            raise UserError(f'{source}: confidence density of {monitor.density.dim} '
                            f'features, the policy reads {self.policy.spec.obs_dim}')
        if monitor is None and self.on_ood == 'hold':
            raise UserError('parameter on_out_of_distribution: hold needs a calibrated '
                            'checkpoint (run vdd-ros confidence) or confidence_file')
        return monitor

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
        if isinstance(mode, str) and is_integer(mode):
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
                if not self.model_diagnostics:
                    self._info = {k: v for k, v in self._info.items() if k == 'expert'}

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
        """A serialized observation: size-checked, decoded, validated, kept as the latest;
        in act_on complete, answered at once."""
        now = time.perf_counter()
        self.stats.received += 1
        try:
            obs, meta = self._reader.read(data)
        except InvalidMessage as exc:
            meta = exc.meta
            if self._resend(meta):
                return
            self.stats.rejected += 1
            self._received_serial += 1
            self._latest = _Observation(None, meta, now, str(exc), self._received_serial)
            self._throttled('warning', f'observation rejected: {exc}; holding')
        else:
            if self._resend(meta):
                return
            self._accepted = (meta['seq'], meta.get('episode')) if 'seq' in meta else None
            self._last_valid = now
            self._received_serial += 1
            # one assignment hands it to the control thread (act_on tick: no lock taken)
            self._latest = _Observation(obs, meta, now, serial=self._received_serial)
        self.stats.decode_ms.append((time.perf_counter() - now) * 1e3)
        if self.act_on == 'tick':
            return
        self._taken = self._latest.serial
        action, meta = self._answer(self._latest, now)
        self._last = (action, meta)
        self._publish(action, meta)
        self._answered(now)

    def _resend(self, meta: dict[str, int]) -> bool:
        """Whether `meta` is that of the observation last accepted (a resend: dropped)."""
        if 'seq' in meta and self._accepted == (meta['seq'], meta.get('episode')):
            self.stats.resends += 1
            return True
        return False

    def _on_tick(self) -> float | None:
        """act_on tick: answer a new observation, else republish the last answer (the hold
        before the first); act_on complete: only the watchdog (returns the seconds until it
        can expire, at most 10 periods: the control thread sleeps until then). Both: no valid
        observation for obs_timeout_s, the hold at every tick."""
        if not self.context.ok():
            return None  # shutting down
        start = time.perf_counter()
        latest = self._latest   # read once: the observation callback replaces it whole
        expired = start - self._last_valid > self.obs_timeout
        fresh = latest is not None and latest.serial != self._taken
        if latest is not None:
            self._taken = latest.serial
        if expired:
            if not self._tripped:
                self._tripped = True
                self.stats.watchdog_trips += 1
                self.get_logger().warning(f'no valid observation for {self.obs_timeout:g} s: '
                                          'publishing the hold action')
                self._publish_status()
        elif self._tripped:
            self._tripped = False
            self.get_logger().info('observations resumed')
        if expired:
            self._publish(self._hold(), {})
        elif self.act_on == 'complete':   # answers go out on arrival; nothing is republished
            return min(self._last_valid + self.obs_timeout - start, 10.0 / self.rate)
        elif fresh:
            action, meta = self._answer(latest, start)
            self._last = (action, meta)
            self._publish(action, meta)
            self._answered(latest.received)
        else:
            self._publish(*(self._last or (self._hold(), {})))
        if self.act_on == 'tick':
            self.deadlines.record(start, time.perf_counter())
        return None

    def _answered(self, arrived: float) -> None:
        """An observation that arrived at `arrived` was answered just now: its latency in
        the node, and in act_on complete its deadline (one period)."""
        done = time.perf_counter()
        self.stats.answer_ms.append((done - arrived) * 1e3)
        if self.act_on == 'complete':
            self.deadlines.record(arrived, done)

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
        msg = self._writer.serialize(out, meta)
        t0 = time.perf_counter()
        self.action_pub.publish(msg)
        self.stats.publish_ms.append((time.perf_counter() - t0) * 1e3)

    def _answer(self, latest: _Observation, start: float) -> tuple[np.ndarray, dict[str, int]]:
        """Act on a new observation (or hold when it was rejected)."""
        meta = {k: latest.meta[k] for k in ('seq', 'episode') if k in latest.meta}
        if latest.obs is None:
            self.stats.holds += 1
            return self._hold(), meta
        done = self._compute(latest.obs, start, latest.received, latest.meta.get('episode'))
        if done is None:
            return self._hold(), meta
        action, infer = done
        meta['infer_us'] = min(int(infer * 1e6), UINT32_MAX)
        if self._held:
            meta['hold'] = 1
        return action, meta

    def _compute(self, obs: np.ndarray, start: float, received: float,
                 episode: int | None = None) -> tuple[np.ndarray, float] | None:
        """(action, inference seconds) of the policy for `obs` (after a reset when `episode`
        is a new one), or None when the policy failed (logged, counted: hold)."""
        t0 = time.perf_counter()
        # the MoE's diagnostics (a few tens of microseconds) for one action per diagnostics
        # period: /diagnostics reports a recent action's, no action waits for them
        want = self._want_info and self.model_diagnostics
        self._held = False
        try:
            if episode is not None and episode != self._episode:
                self.policy.reset(int(episode))
                self._episode = int(episode)
                if self.monitor is not None:
                    self.monitor.reset()
            level = self._assess(obs) if self.monitor is not None else 0
            if self._moe_diagnostics:
                self.policy.diagnostics = want
            t0 = time.perf_counter()
            action = np.asarray(self.policy.act(obs), dtype=np.float32).reshape(-1)
            if action.shape[0] != self.action_dim or not np.all(np.isfinite(action)):
                raise ValueError(f'policy returned {action}')
        except Exception as exc:  # a failing model must not stop the control loop
            self.stats.errors += 1
            self._error = f'{type(exc).__name__}: {exc}'
            self._throttled('error', f'policy failed, holding: {self._error}')
            return None
        infer = time.perf_counter() - t0
        self._error = ''
        info = getattr(self.policy, 'info', None)
        if info:         # (the expert of every action; the rest when asked)
            self._info.update(info)
        if want:
            self._want_info = False
        self.stats.computed += 1
        self.stats.inference_ms.append(infer * 1e3)
        self.stats.obs_age_ms.append((start - received) * 1e3)
        if level == 2 and self.on_ood == 'hold':
            self._held = True
            self.stats.ood_holds += 1
            return self._hold(), infer
        self._gripper = float(action[-1])
        return action, infer

    def _assess(self, obs: np.ndarray) -> int:
        """The confidence level of `obs` (0 OK, 1 WARN, 2 ERROR), kept for diagnostics."""
        t0 = time.perf_counter()
        level = LEVEL_INDEX[self.monitor.update(obs)]
        self.stats.confidence_ms.append((time.perf_counter() - t0) * 1e3)
        self._worst_level = max(self._worst_level, level)
        return level

    def _throttled(self, level: str, text: str, key: str = '') -> None:
        """Log `text` unless this level (and `key`, e.g. a topic) logged within THROTTLE_S
        (rclpy's own throttle inspects the caller's frame on every call: ~1 ms, too slow for a
        flood of bad messages)."""
        now = time.monotonic()
        key = f'{level} {key}'
        if now - self._logged.get(key, -THROTTLE_S) < THROTTLE_S:
            return
        self._logged[key] = now
        # one call site per severity: rclpy raises ValueError when one line logs at two
        if level == 'error':
            self.get_logger().error(text)
        elif level == 'warning':
            self.get_logger().warning(text)
        else:
            self.get_logger().info(text)

    def _hold(self) -> np.ndarray:
        if self.hold_action is not None:
            return self.hold_action.copy()
        action = np.zeros(self.action_dim, dtype=np.float32)
        action[-1] = self._gripper
        return action

    # -- the binding path ---------------------------------------------------------------------
    def _now_ns(self) -> int:
        """Now on the node clock (follows /clock under use_sim_time); rclpy's Clock.now()
        without building its Time object (a fifth of the cost)."""
        return self._now_handle.get_now().nanoseconds

    def _on_source(self, reader: TopicReader, raw: bytes) -> None:
        """A serialized source message: size-checked, read through the binding, kept as the
        latest of its features; in act_on complete, acts once the observation is complete."""
        arrived = time.perf_counter()
        self.stats.received += 1
        try:
            stamp, values = reader.read(raw)
        except (InvalidMessage, BindingMismatch) as exc:
            self._reject_source(reader, raw, str(exc))
            return
        if not values:
            return        # a JointState naming none of this topic's joints
        header = stamp is not None
        now_ns = self._now_ns()
        if stamp is None:
            stamp = now_ns
        elif stamp - now_ns > reader.max_age_ns:   # kept, it would block every later one
            self._reject_source(reader, raw, f'stamped {(stamp - now_ns) / NS:.3g} s ahead of '
                                'the node clock (clocks out of sync? use_sim_time?)')
            return
        why = self.book.update(reader.topic, stamp, values, header)
        if why == 'duplicate':
            self.stats.resends += 1
            return
        if why:
            self.stats.out_of_order += 1
            self._throttled('warning', f'{reader.topic}: message stamped {stamp / NS:.9f} is '
                            'older than the latest one: dropped', key=reader.topic)
            return
        self._arrived = arrived
        self.stats.decode_ms.append((time.perf_counter() - arrived) * 1e3)
        if self.act_on == 'tick':
            self._fresh = True
            return
        ready = self.book.complete_stamp(self._acted_serial)
        if ready is not None and ready > self._acted_ns:
            self._act(ready, arrived, now_ns)

    def _reject_source(self, reader: TopicReader, raw: bytes, reason: str) -> None:
        """An invalid source message: the topic is invalid until its next valid message; the
        answer is the hold (at once in act_on complete, stamped like the rejected message)."""
        if not reason.startswith(reader.topic):
            reason = f'{reader.topic}: {reason}'
        self.stats.rejected += 1
        self.book.reject(reader.topic, reason)
        self._throttled('warning', f'source rejected: {reason}; holding', key=reader.topic)
        if self.act_on == 'tick':
            self._fresh = True
            return
        now_ns = self._now_ns()
        stamp = header_stamp_ns(raw) if reader.header else None
        if stamp is None or stamp - now_ns > reader.max_age_ns:   # none, or not believable
            stamp = now_ns
        if stamp > self._acted_ns:
            self._act(stamp, time.perf_counter(), now_ns)

    def _on_marker(self, msg: String) -> None:
        """An episode marker: a start resets the policy with the episode's seed."""
        try:
            marker = parse_marker(msg.data)
        except BindingMismatch as exc:
            self._throttled('warning', f'{self.binding.episode_topic}: {exc}', key='marker')
            return
        if marker.event == 'start':
            self.policy.reset(marker.episode)
            self._episode = marker.episode
            self.get_logger().debug(f'episode {marker.episode} starts')

    def _on_time_jump(self, jump: TimeJump) -> None:
        """The node clock went back (a restarted simulation or bag): forget every source's
        values and times, as tf2 clears its buffer."""
        if jump.delta.nanoseconds < 0:
            self.book = SourceBook(self.binding)
            self._acted_serial, self._acted_ns = 0, -1
            self._last_valid_ns = self._now_ns()
            self.get_logger().warning('the clock went back: source values cleared')

    def _on_binding_tick(self) -> float | None:
        """In act_on tick, act on the latest sources when any is new; then the watchdog (both
        modes): no valid observation for obs_timeout_s, the hold at every tick. In act_on
        complete, returns how long the control thread may sleep (until the watchdog can
        expire, at most 10 periods: the node clock may be a simulation's, faster than real
        time)."""
        if not self.context.ok():
            return None  # shutting down
        start = time.perf_counter()
        now_ns = self._now_ns()
        acted = self._fresh
        if self._fresh:          # only ever set in act_on tick
            self._fresh = False
            stamp = self.book.stamp_ns()
            self._act(now_ns if stamp is None else stamp, start, now_ns)
        expired = now_ns - self._last_valid_ns > self.obs_timeout * NS
        if expired:
            if not self._tripped:
                self._tripped = True
                self.stats.watchdog_trips += 1
                problems = '; '.join(self.book.problems(now_ns))
                self.get_logger().warning(f'no valid observation for {self.obs_timeout:g} s: '
                                          f'publishing the hold action ({problems or "-"})')
                self._publish_status()
            if not acted:        # (an act on invalid sources has just held)
                # stamped now (tick) or, in act_on complete, like the last answer: never with
                # a stamp not seen yet, which a lockstep simulator would take for its answer
                stamp = now_ns if self.act_on == 'tick' else max(self._acted_ns, 0)
                self._publish_sinks(self._hold(), None, stamp, hold=True)
        elif self._tripped:
            self._tripped = False
            self.get_logger().info('observations resumed')
        if self.act_on == 'tick':
            self.deadlines.record(start, time.perf_counter())
        elif not expired:
            left = (self._last_valid_ns + self.obs_timeout * NS - now_ns) / NS
            return min(left, 10.0 / self.rate)
        return None

    def _act(self, stamp_ns: int, start: float, now_ns: int) -> None:
        """Answer the observation of time `stamp_ns`: the policy's action when every source
        is valid and fresh at `now_ns`, else the hold (WARN naming the topics)."""
        problems = self.book.problems(now_ns)
        self._acted_serial = self.book.serial
        self._acted_ns = max(self._acted_ns, stamp_ns)
        done = None
        if problems:
            self.stats.holds += 1
            self._throttled('warning', f'holding: {"; ".join(problems)}', key='sources')
        else:
            self._last_valid_ns = now_ns
            done = self._compute(self.book.observation(), start, self._arrived)
        if done is None or self._held:
            self._publish_sinks(self._hold(), None, stamp_ns, hold=True)
        else:
            chunk = None
            if self._chunked:
                try:
                    chunk = np.concatenate([done[0][None], self.policy.pending()])
                except (TypeError, ValueError):   # a chunk of another shape: the gate holds
                    chunk = np.full((1, 1), np.nan)
            self._publish_sinks(done[0], chunk, stamp_ns)
        # (act_on complete calls with start = the arrival of the completing message)
        self._answered(self._arrived if self.act_on == 'tick' else start)

    def _sink_values(self, action: Any, chunk: Any) -> list[np.ndarray] | None:
        """Every sink's numbers for `action` (and its chunk), or None unless all are finite
        and of the right shape."""
        try:
            with np.errstate(over='ignore', invalid='ignore'):
                out = np.asarray(action, dtype=np.float32).reshape(-1)
                if chunk is not None:
                    chunk = np.asarray(chunk, dtype=np.float32)
            if out.shape != (self.action_dim,) or not np.all(np.isfinite(out)):
                return None
            if chunk is not None and (chunk.ndim != 2 or chunk.shape[1] != self.action_dim
                                      or not np.all(np.isfinite(chunk))):
                return None
            values = [w.values(out, chunk) for w in self.writers]
        except (TypeError, ValueError):
            return None
        return values if all(np.all(np.isfinite(v)) for v in values) else None

    def _publish_sinks(self, action: Any, chunk: Any, stamp_ns: int,
                       hold: bool = False) -> None:
        """Publish every sink for `action` (a trajectory: its `chunk`), stamped `stamp_ns`.

        The last gate of the binding path: unless every sink's values are finite and of the
        right shape, the safe hold goes out instead (zero motion, the last finite gripper
        command; counted, ERROR). A hold (`hold`) goes out as is; a sink with no safe value
        (a PoseStamped target has no zero pose) publishes nothing then."""
        values = None if hold else self._sink_values(action, chunk)
        if values is None:
            if not hold:
                self.stats.unsafe += 1
                self._unsafe = (f'unsafe action {action!r}{"" if chunk is None else " or chunk"}'
                                ' replaced by the safe hold')
                self._throttled('error', f'{self._unsafe}: zero motion, last gripper command')
                action = np.zeros(self.action_dim, dtype=np.float32)
                action[-1] = self._gripper
            values = [self._hold_values(w, action) for w in self.writers]
        period = 1.0 / self.rate
        messages = [writer.message(v, stamp_ns, period) if v is not None else None
                    for writer, v in zip(self.writers, values)]
        t0 = time.perf_counter()
        for pub, msg in zip(self.sink_pubs, messages):
            if msg is not None:
                pub.publish(msg)
        self.stats.publish_ms.append((time.perf_counter() - t0) * 1e3)

    @staticmethod
    def _hold_values(writer: SinkWriter, action: np.ndarray) -> np.ndarray | None:
        try:
            v = writer.values(action, None)
        except ValueError:
            return None
        return v if np.all(np.isfinite(v)) else None

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response
                  ) -> Trigger.Response:
        self.policy.reset(None)
        if self.monitor is not None:
            self.monitor.reset()
        self._episode = None
        self._last = None
        self._fresh = False
        self._taken = self._received_serial
        self._accepted = None
        if self.binding is not None:
            self._acted_serial = self.book.serial
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
            'control_loop': self.loop_kind, 'act_on': self.act_on,
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
        for name, window in (('decode_ms', s.decode_ms), ('publish_ms', s.publish_ms),
                             ('answer_ms', s.answer_ms), ('wake_late_ms', self.loop.late_ms)):
            values[f'{name}_p50'], values[f'{name}_p99'] = percentiles(window)
        for key, value in self._info.items():
            values[key] = int(value) if key in ('expert', 'mode', 'phase') else value
        ood = self._confidence_status(values)
        sources, wrong_type = self._source_status(values) if self.binding else ([], '')
        if s.unsafe > unsafe:
            return 'ERROR', (f'{s.unsafe - unsafe} unsafe action(s) replaced by the safe '
                             f'hold ({self._unsafe})'), values
        if self._error:
            return 'ERROR', f'policy failing: {self._error}', values
        if wrong_type:
            return 'ERROR', wrong_type, values
        if self._tripped:
            why = f' ({"; ".join(sources)})' if sources else ''
            return 'WARN', f'no valid observation for {self.obs_timeout:g} s: holding{why}', \
                values
        if sources:
            return 'WARN', f'source problem: {"; ".join(sources)}', values
        if ood:
            return LEVELS[self._worst_level], ood, values
        if s.rejected > rejected:
            return 'WARN', f'{s.rejected - rejected} invalid observation(s) rejected', values
        if self.deadlines.misses > misses:
            return 'WARN', f'{self.deadlines.misses - misses} deadline miss(es)', values
        return 'OK', 'acting', values

    def _confidence_status(self, values: dict[str, Any]) -> str:
        """Adds the confidence values; the message of a WARN or ERROR level since the last
        diagnostics ('' when OK or not calibrated)."""
        values['on_out_of_distribution'] = self.on_ood
        values['ood_holds'] = self.stats.ood_holds
        if self.monitor is None:
            values['confidence_level'] = 'not calibrated'
            return ''
        cal = self.monitor.calibration
        values.update(confidence_signal=cal.signal, confidence_score=self.monitor.score,
                      confidence_level=LEVELS[self._worst_level],
                      confidence_warn=cal.warn, confidence_error=cal.error)
        values['confidence_ms_p50'], values['confidence_ms_p99'] = \
            percentiles(self.stats.confidence_ms)
        if not self._worst_level:
            return ''
        limit = cal.error if self._worst_level == 2 else cal.warn
        held = ' (holding)' if self._worst_level == 2 and self.on_ood == 'hold' else ''
        return (f'out of distribution: {cal.signal} score above {limit:.3g} for '
                f'{cal.sustain}+ actions (latest {self.monitor.score:.3g}){held}')

    def _source_status(self, values: dict[str, Any]) -> tuple[list[str], str]:
        """Add each source topic's state and age to `values`; (the problems, one per topic,
        and an error when a topic that gave nothing yet is published with another type)."""
        now_ns = self._now_ns()
        values.update(binding=self.binding.name or 'binding', act_on=self.act_on,
                      last_observation_age_s=(now_ns - self._last_valid_ns) / NS,
                      out_of_order_dropped=self.stats.out_of_order)
        problems, wrong = [], ''
        for topic, reader in self.readers.items():
            state, detail = self.book.state(topic, now_ns)
            if state == 'waiting':
                detail = self._publisher_note(topic, reader.type)
                if 'published as' in detail:
                    wrong = wrong or f'{topic}: {detail}'
                    if topic not in self._warned_types:
                        self._warned_types.add(topic)
                        self.get_logger().error(f'{topic}: {detail}')
            age = self.book.age_s(topic, now_ns)
            values[f'source {topic}'] = f'{state}: {detail}' if detail else state
            values[f'source {topic} age_s'] = 'none' if age is None else age
            if state != 'ok':
                problems.append(f'{topic} {state}' + (f' ({detail})' if detail else ''))
        return problems, wrong

    def _publisher_note(self, topic: str, type_name: str) -> str:
        """Why a topic gave nothing yet: no publisher, or publishers of another type."""
        try:
            types = {i.topic_type for i in self.get_publishers_info_by_topic(topic)}
        except Exception:  # the graph query is best effort (e.g. during shutdown)
            return 'no message yet'
        if not types:
            return 'no message yet, no publisher'
        if types - {type_name}:
            return (f'published as {", ".join(sorted(types - {type_name}))}, the binding '
                    f'expects {type_name}')
        return 'no message yet'

    def _publish_status(self) -> None:
        self._want_info = True
        level, message, values = self.status()
        self.publish_diagnostics(level, message, values)
        self._period_counts = (self.stats.rejected, self.deadlines.misses, self.stats.unsafe)
        self._worst_level = 0

    def shutdown(self) -> None:
        self.stop_loop()
        if self.stats_file:
            from vdd_ros.core.io import write_json
            level, message, values = self.status()
            write_json(self.stats_file, {'level': level, 'message': message, **values})


def main(args: list[str] | None = None) -> int:
    return run_node(PolicyNode, args, 'policy_node')


if __name__ == '__main__':
    sys.exit(main())
