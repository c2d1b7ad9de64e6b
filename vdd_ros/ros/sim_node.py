"""sim_node: one robosuite task (vdd_ros.sim.env.SimEnv) behind ROS topics.

Publishes `observation` (Float32MultiArray, sensor-data QoS) whose layout names each field and
carries `@seq`, `@episode` (the episode's seed) and `@step`; subscribes `action`
(Float32MultiArray); publishes each finished episode on `episode_result` (std_msgs/String,
JSON: seed, success, mode, length, obs-to-action latencies) and its state on /diagnostics.

Clock modes:
- `realtime`: a steady timer steps the simulation at `control_rate_hz` with the latest action
  (the episode's clock starts when the first action answering it arrives; until then the first
  observation is republished every tick);
- `lockstep`: the simulation steps as soon as the action answering the last observation (same
  `@seq`) arrives; the observation is resent every `lockstep_resend_s` until then. Episodes
  then depend only on the seeds, never on timing.

The obs-to-action latency is the time from publishing an observation to receiving the first
action that answers it, measured here on one clock.

Standard messages (`binding:=FILE`, or `binding:=task:<name>` for the shipped
config/bindings/<name>.yaml). Without a binding the node speaks the labelled arrays above,
unchanged. With one, it publishes the robot the way a ROS 2 robot does (see
ros/sim_binding.py: /joint_states, /eef_pose, /objects/<cube>/pose, /goals/<name>/pose, frame
`world`), checked against the binding at start, and takes the binding's command topics:
- Time: `/clock` carries the simulation time t = (steps and resets since the node started) x
  the task's control period, in whole nanoseconds, so it never goes back across episodes.
  Every step publishes /clock, then every state topic stamped t.
- Episodes: the `start` marker (`marker_json('start', seed)` on the binding's episode topic)
  follows the reset's /clock and precedes the first observation (its subscribers are given up
  to `marker_wait_s`, default 0.05 s, to acknowledge it: Fast DDS acknowledges at its next
  heartbeat, measured 0.4-3 s later, so a longer bound costs that per episode while the
  marker is delivered, in order, long before); after the last step /clock advances once more
  and the `end` marker (success and mode) follows, waited for (up to 1 s) only before the
  node exits. episode_result JSON is unchanged.
- lockstep: the simulation steps once every sink topic has delivered a command since the
  observation at t was published, stamped sinks (TwistStamped, PoseStamped,
  JointTrajectory) with header.stamp == t (others answer an earlier observation and are
  ignored); the action is assembled from each sink's `Sink.decode`. An unanswered
  observation is resent (same messages, same stamp) every `lockstep_resend_s`.
- realtime: a timer steps at `control_rate_hz` with the latest command of each sink once
  every sink has delivered one in this episode; until then the reset state is republished
  each tick with the advancing time, as a robot keeps publishing while it stands still.
- `wait_for_subscribers: N` (both paths): the first episode starts only once every published
  topic has N subscriptions (the action topics count sim_node's own) and every action topic
  a publisher, so a recorder and a policy started next to the simulator miss nothing.

Run: `python -m vdd_ros.ros.sim_node --ros-args -p task:=lift_carry -p clock_mode:=lockstep`
(add `-p binding:=task:lift_carry` for the standard topics).
"""
from __future__ import annotations

import time
from typing import Any, NoReturn

import numpy as np
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from std_msgs.msg import Float32MultiArray, String
from std_srvs.srv import Trigger

from vdd_ros.binding import marker_json
from vdd_ros.errors import UserError
from vdd_ros.ros.conversions import (InvalidMessage, json_to_msg, msg_meta, msg_to_array,
                                     observation_to_msg, percentiles)
from vdd_ros.ros.entry import exit_now
from vdd_ros.ros.policy_node import ACTION_QOS, THROTTLE_S
from vdd_ros.ros.runtime import VddNode, run_node

CLOCK_MODES = ('realtime', 'lockstep')
RESULT_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


class SimNode(VddNode):
    """A seeded robosuite episode loop driven by ROS actions; see the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('sim_node', **kwargs)
        task = self.param('task', 'lift_carry', 'task name (see vdd_ros.sim.tasks)',
                          read_only=True)
        self.clock_mode = self.param('clock_mode', 'realtime', 'realtime: step at '
                                     'control_rate_hz with the latest action; lockstep: step '
                                     'when the action answering the last observation arrives',
                                     read_only=True)
        if self.clock_mode not in CLOCK_MODES:
            raise UserError(f'parameter clock_mode: must be one of {list(CLOCK_MODES)}, got '
                            f'{self.clock_mode!r}')
        rate = self.param('control_rate_hz', 0.0, 'realtime stepping rate in Hz (0: the '
                          "task's control frequency, i.e. real time)", read_only=True,
                          dynamic=True)
        self.seeds = [int(s) for s in self.param('seeds', 'int[]', 'episode seeds in order '
                                                 '(empty: see seed)', read_only=True)]
        self.base_seed = int(self.param('seed', -1, 'seed of the first episode when seeds is '
                                        'empty, then +1 per episode (-1: random)',
                                        read_only=True))
        if any(not 0 <= s < 2 ** 32 for s in self.seeds) or self.base_seed >= 2 ** 32:
            raise UserError('parameters seeds / seed: seeds must lie in [0, 2^32)')
        self.max_episodes = int(self.param('episodes', 0, 'stop after this many episodes '
                                           '(0: unlimited, or len(seeds))', read_only=True))
        self.auto_reset = bool(self.param('auto_reset', True, 'start the next episode when '
                                          'one ends (else wait for ~/reset)', read_only=True))
        self.exit_when_done = bool(self.param('exit_when_done', False, 'exit (status 0) once '
                                              'the last episode has ended', read_only=True))
        self.results_file = str(self.param('results_file', '', 'JSON file rewritten after '
                                           'every episode with all results so far (empty: '
                                           'none)', read_only=True))
        self.resend_s = self.number('lockstep_resend_s', self.param(
            'lockstep_resend_s', 0.5, 'lockstep: resend an unanswered observation after this '
            'many seconds', read_only=True, dynamic=True))
        diag_period = self.number('diagnostics_period_s', self.param(
            'diagnostics_period_s', 1.0, 'seconds between two diagnostics messages',
            read_only=True, dynamic=True))
        binding = str(self.param('binding', '', 'binding YAML file (task:<name>: the shipped '
                                 'config/bindings/<name>.yaml): publish the robot on standard '
                                 "topics and take the binding's commands ('': the labelled "
                                 'arrays)', read_only=True))
        self.wait_subscribers = int(self.param(
            'wait_for_subscribers', 0, 'start the first episode once every published topic '
            'has this many subscriptions (0: at once)', read_only=True))
        if self.wait_subscribers < 0:
            raise UserError(f'parameter wait_for_subscribers: must be >= 0, got '
                            f'{self.wait_subscribers}')
        self.marker_wait_s = self.number('marker_wait_s', self.param(
            'marker_wait_s', 0.05, 'binding: longest wait for the subscribers to acknowledge '
            'a start marker', read_only=True, dynamic=True), inclusive=True, high=60.0)

        from vdd_ros.sim.env import SimEnv
        self.env = SimEnv(task)
        self.task = self.env.task
        self.rate = self.number('control_rate_hz', rate, inclusive=True) \
            or float(self.env.spec.control_freq)
        self.fields = list(self.env.obs_fields)
        self._rng = np.random.default_rng()
        self.period_ns = round(1e9 / self.env.spec.control_freq)
        self.ticks = 0             # steps and resets so far: the sim time is ticks * period

        self.topics: Any = None
        self.binding_name = ''
        if binding:
            from vdd_ros.ros.binding_io import resolve_binding
            from vdd_ros.ros.sim_binding import SimTopics
            bound = resolve_binding(binding)
            self.env.reset(0)
            self.topics = SimTopics(self, bound, self.env.robot_state(), self.env.action_dim,
                                    self._on_command, self._on_invalid_command)
            self.binding_name = bound.name or binding
            self._commands: dict[int, np.ndarray] = {}   # sink -> its slice for this step
            self._command_stamps: dict[int, int | None] = {}
        else:
            self.obs_pub = self.create_publisher(Float32MultiArray, 'observation',
                                                 qos_profile_sensor_data)
            self._action_sub = self.create_subscription(Float32MultiArray, 'action',
                                                        self._on_action, ACTION_QOS)
        self.result_pub = self.create_publisher(String, 'episode_result', RESULT_QOS)
        self.create_service(Trigger, '~/reset', self._on_reset)

        self.records: list[dict[str, Any]] = []
        self.seq = 0
        self.started = 0           # episodes started
        self.active = False
        self.done = False
        self.seed = 0
        self._msg: Float32MultiArray | None = None
        self._published = 0.0
        self._sent: dict[int, float] = {}
        self._answered: set[int] = set()
        self._latest: np.ndarray | None = None
        self._fresh = False
        self._running = False      # realtime: the episode's clock has started
        self.invalid_actions = 0
        self.resends = 0
        self._episode_stats: dict[str, Any] = {}
        self._all_latency: list[float] = []
        self._waiting = None
        if self.wait_subscribers:
            self._waiting = self.create_steady_timer(0.1, self._check_subscribers)
            self._waiting_since = time.perf_counter()
        else:
            self._start_episode()
        if self.clock_mode == 'realtime':
            self.create_steady_timer(1.0 / self.rate, self._on_tick)
        else:
            self.create_steady_timer(min(self.resend_s, 0.1), self._check_resend)
        self.create_steady_timer(diag_period, self._publish_status)
        self.get_logger().info(f'task {self.task} ({self.clock_mode}, {self.rate:g} Hz), '
                               f'observation {self.env.obs_dim} values, action '
                               f'{self.env.action_dim}' + (f', binding {binding!r}'
                                                           if binding else ''))

    def _check_subscribers(self) -> None:
        """wait_for_subscribers: start the first episode once everyone listens."""
        if self.topics is not None:
            missing = self.topics.waiting_for(self, self.wait_subscribers)
        else:
            missing = []
            if self.obs_pub.get_subscription_count() < self.wait_subscribers:
                missing.append(self.obs_pub.topic_name)
            if self.count_publishers(self._action_sub.topic_name) < 1:
                missing.append(f'{self._action_sub.topic_name} (no publisher)')
        if missing:
            if time.perf_counter() - self._waiting_since > 10.0:
                self.get_logger().info(f'waiting for {self.wait_subscribers} subscriber(s) on: '
                                       f'{", ".join(missing)}', throttle_duration_sec=10.0)
            return
        self._waiting.cancel()
        self.destroy_timer(self._waiting)
        self._waiting = None
        self._start_episode()

    def _tick_clock(self) -> int:
        """Binding: advance the simulation time by one control period and publish /clock."""
        self.ticks += 1
        stamp = self.ticks * self.period_ns
        self.topics.clock(stamp)
        return stamp

    # -- episodes -----------------------------------------------------------------------------
    def _next_seed(self) -> int | None:
        index = self.started
        limit = self.max_episodes or (len(self.seeds) if self.seeds else 0)
        if limit and index >= limit:
            return None
        if self.seeds:
            return self.seeds[index] if index < len(self.seeds) else None
        if self.base_seed >= 0:
            return self.base_seed + index
        return int(self._rng.integers(2 ** 31))

    def _start_episode(self) -> bool:
        seed = self._next_seed()
        if seed is None:
            self.active = False
            self.done = True
            self.get_logger().info(f'all {self.started} episode(s) done')
            if self.exit_when_done:
                self.finish(0)
            return False
        self.seed = seed
        self.started += 1
        obs = self.env.reset(seed)
        self.active = True
        self._running = False
        self._latest, self._fresh = None, False
        self._sent.clear()
        self._answered.clear()
        self._episode_stats = {'obs_to_action_ms': [], 'latency_ms': [], 'stale_steps': 0,
                               'start': time.perf_counter()}
        if self.topics is not None:
            self._commands.clear()
            self._command_stamps.clear()
            self._tick_clock()
            self.topics.marker(marker_json('start', self.seed), self.marker_wait_s)
            self._publish_state()
            return True
        self._publish_obs(obs)
        return True

    def _publish_state(self) -> None:
        """Binding: publish the robot's state at the current time (after its /clock)."""
        stamp = self.ticks * self.period_ns
        self.seq = stamp
        self._published = time.perf_counter()
        self._sent[stamp] = self._published
        self.topics.state(self.env.robot_state(), stamp)

    def _publish_obs(self, obs: np.ndarray) -> None:
        if self.topics is not None:
            self._tick_clock()
            self._publish_state()
            return
        self.seq += 1
        self._msg = observation_to_msg(obs, self.fields, self.seq, self.seed, self.env.t)
        self._published = time.perf_counter()
        self._sent[self.seq] = self._published
        self.obs_pub.publish(self._msg)

    def _step(self, action: np.ndarray) -> None:
        obs, _, done = self.env.step(action)
        if done:
            if self.topics is not None:
                self._tick_clock()
            self._finish_episode()
        else:
            self._publish_obs(obs)

    def _finish_episode(self) -> None:
        stats = self._episode_stats
        lat = stats['obs_to_action_ms']
        p50, p99 = percentiles(lat)
        record = {
            'seed': int(self.seed), 'success': bool(self.env.success()),
            'mode': self.env.mode(), 'length': int(self.env.t),
            'obs_to_action_ms_p50': p50, 'obs_to_action_ms_p99': p99,
            'stale_steps': int(stats['stale_steps']),
            'episode_s': time.perf_counter() - stats['start'],
            'final_obs': [float(v) for v in self.env.observation()],
            'obs_to_action_ms': [round(v, 4) for v in lat],
            'latency_ms': [round(v, 4) for v in stats['latency_ms']],
        }
        self.records.append(record)
        self._all_latency.extend(lat)
        self.active = False
        if self.topics is not None:
            limit = self.max_episodes or len(self.seeds)
            last = self.exit_when_done and bool(limit) and self.started >= limit
            self.topics.marker(marker_json('end', self.seed, success=record['success'],
                                           mode=record['mode']), 1.0 if last else 0.0)
        self.result_pub.publish(json_to_msg(record))
        self._write_results()
        self.get_logger().info(
            f'episode {self.started} (seed {self.seed}): '
            f'{"success" if record["success"] else "failure"}, mode {record["mode"]}, '
            f'{record["length"]} steps, obs-to-action p50 {p50:.2f} ms p99 {p99:.2f} ms')
        if self.auto_reset:
            self._start_episode()
        elif self._next_seed() is None:
            self._start_episode()  # marks the run done (and exits when asked to)

    def _write_results(self) -> None:
        if not self.results_file:
            return
        from vdd_ros.core.io import write_json
        p50, p99 = percentiles(self._all_latency)
        write_json(self.results_file, {
            'task': self.task, 'clock_mode': self.clock_mode, 'control_rate_hz': self.rate,
            'binding': self.binding_name or None,
            'obs_to_action_ms_p50': p50, 'obs_to_action_ms_p99': p99,
            'episodes': self.records})

    # -- callbacks ----------------------------------------------------------------------------
    def _on_action(self, msg: Float32MultiArray) -> None:
        now = time.perf_counter()
        try:
            action = msg_to_array(msg, expected_dim=self.env.action_dim)
        except InvalidMessage as exc:
            self.invalid_actions += 1
            self.get_logger().warning(f'action ignored: {exc}', throttle_duration_sec=THROTTLE_S)
            return
        if not self.active:
            return
        meta = msg_meta(msg)
        if 'episode' in meta and meta['episode'] != self.seed:
            return  # answers an earlier episode
        seq = meta.get('seq')
        answers = seq is not None and seq in self._sent and seq not in self._answered
        if answers:
            self._answered.add(seq)
            self._episode_stats['obs_to_action_ms'].append((now - self._sent.pop(seq)) * 1e3)
            if 'infer_us' in meta:
                self._episode_stats['latency_ms'].append(meta['infer_us'] / 1e3)
        if self.clock_mode == 'lockstep':
            if answers and seq == self.seq:
                self._step(action)
            return
        self._latest, self._fresh = action, True
        if seq is None or answers:
            self._running = True

    def _on_invalid_command(self, text: str) -> None:
        self.invalid_actions += 1
        self.get_logger().warning(text, throttle_duration_sec=THROTTLE_S)

    def _on_command(self, index: int, values: np.ndarray, stamp: int | None) -> None:
        """Binding: one sink's command. lockstep steps once every sink has answered the
        observation at t = self.seq (stamped sinks: stamp == t); realtime keeps the latest."""
        now = time.perf_counter()
        if not self.active:
            return
        if self.clock_mode == 'lockstep' and stamp is not None and stamp != self.seq:
            return                               # answers an earlier observation
        self._commands[index] = values
        self._command_stamps[index] = stamp
        if len(self._commands) < len(self.topics.binding.action):
            return
        if self.clock_mode == 'realtime':
            self._fresh = True
            self._running = True
            sent = self._sent.pop(stamp, None) if stamp is not None else None
            if sent is not None:
                self._episode_stats['obs_to_action_ms'].append((now - sent) * 1e3)
            return
        from vdd_ros.ros.sim_binding import assemble_action
        sent = self._sent.pop(self.seq, None)
        if sent is not None:
            self._episode_stats['obs_to_action_ms'].append((now - sent) * 1e3)
            self._answered.add(self.seq)
        action = assemble_action(self.topics.binding, self._commands)
        self._commands.clear()
        self._command_stamps.clear()
        self._sent.clear()
        self._step(action)

    def _on_binding_tick(self) -> None:
        """Realtime with a binding: step with the latest commands, or keep publishing the
        reset state with the advancing time until every sink has delivered one."""
        from vdd_ros.ros.sim_binding import assemble_action
        if not self.active:
            return
        if not self._running:
            self._publish_obs(self.env.observation())
            return
        if not self._fresh:
            self._episode_stats['stale_steps'] += 1
        self._fresh = False
        self._step(assemble_action(self.topics.binding, self._commands))

    def _on_tick(self) -> None:
        """Realtime: one control step with the latest action."""
        if self.topics is not None:
            self._on_binding_tick()
            return
        if not self.active:
            return
        if not self._running or self._latest is None:
            if self._msg is not None:
                self.obs_pub.publish(self._msg)
            return
        if not self._fresh:
            self._episode_stats['stale_steps'] += 1
        self._fresh = False
        self._step(self._latest)

    def _check_resend(self) -> None:
        """Lockstep: resend the observation that no action has answered yet."""
        if not self.active or self.seq in self._answered:
            return
        if (self._msg is None) if self.topics is None else not self.topics.last:
            return
        if time.perf_counter() - self._published >= self.resend_s:
            self.resends += 1
            self._published = time.perf_counter()
            if self.topics is not None:
                self.topics.resend()
            else:
                self.obs_pub.publish(self._msg)
            self.get_logger().warning(f'no action answers observation {self.seq} (episode seed '
                                   f'{self.seed}, step {self.env.t}) yet: resending',
                                   throttle_duration_sec=5.0)

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response
                  ) -> Trigger.Response:
        abandoned = self.active
        self.active = False
        if abandoned and self.topics is not None:
            self._tick_clock()
            self.topics.marker(marker_json('end', self.seed, success=False), 0.0)
        if self._start_episode():
            response.success = True
            response.message = f'episode started with seed {self.seed}' + \
                (' (the running episode was abandoned)' if abandoned else '')
        else:
            response.success = False
            response.message = 'no episodes left (seeds or episodes exhausted)'
        return response

    # -- diagnostics --------------------------------------------------------------------------
    def _publish_status(self) -> None:
        p50, p99 = percentiles(self._all_latency + self._episode_stats.get(
            'obs_to_action_ms', []))
        waiting = self.active and self.seq not in self._answered and \
            time.perf_counter() - self._sent.get(self.seq, time.perf_counter()) > 1.0
        values = {
            'task': self.task, 'clock_mode': self.clock_mode, 'control_rate_hz': self.rate,
            'episode_seed': self.seed, 'step': self.env.t, 'episodes_done': len(self.records),
            'successes': sum(r['success'] for r in self.records),
            'obs_to_action_ms_p50': p50, 'obs_to_action_ms_p99': p99,
            'invalid_actions': self.invalid_actions, 'resends': self.resends,
            'stale_steps': self._episode_stats.get('stale_steps', 0),
        }
        if self.topics is not None:
            values.update(binding=self.binding_name, sim_time_s=self.ticks * self.period_ns / 1e9)
        if waiting:
            self.publish_diagnostics('WARN', 'waiting for an action', values)
        else:
            self.publish_diagnostics('OK', 'done' if self.done else 'running', values)

    def shutdown(self) -> None:
        self.env.close()


def main(args: list[str] | None = None) -> NoReturn:
    """The sim_node executable: run the node, then exit with its status."""
    exit_now(run_node(SimNode, args, 'sim_node'))


if __name__ == '__main__':
    main()
