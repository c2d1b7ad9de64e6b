"""Helpers shared by the ROS tests and the latency benchmark: private contexts, probe nodes
that play the simulator's side of the topics, the benchmark's observation sources, and a tiny
MoE checkpoint."""
from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.context import Context
from rclpy.qos import qos_profile_sensor_data
from std_msgs.msg import Float32MultiArray

from vdd_ros.ros.conversions import (array_to_msg, decode_labelled_array, level_name,
                                     msg_meta, msg_to_array, observation_to_msg, status_values)
from vdd_ros.ros.policy_node import ACTION_QOS

SEQ_MARK = 0x7A6B5C4D   # a @seq value whose bytes occur nowhere else in an observation


def domain_id() -> int:
    """This run's ROS domain: ROS_DOMAIN_ID when set, else one derived from the process id."""
    env = os.environ.get('ROS_DOMAIN_ID', '')
    return int(env) if env.isdigit() else 10 + os.getpid() % 90


@contextlib.contextmanager
def ros_context(domain: int | None = None) -> Iterator[Context]:
    """A private, initialised rclpy context (no signal handlers), shut down on exit."""
    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain_id() if domain is None else domain,
               signal_handler_options=rclpy.signals.SignalHandlerOptions.NO)
    try:
        yield ctx
    finally:
        ctx.try_shutdown()


def spin_until(executor: Any, predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Spin until `predicate()` holds (True) or `timeout_s` passes (False)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        executor.spin_once(timeout_sec=0.02)
    return predicate()


def spin_for(executor: Any, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        executor.spin_once(timeout_sec=min(0.02, max(end - time.monotonic(), 0.0)))


class DiagnosticsLog:
    """Keeps every status received on /diagnostics (subscribe `_on_diag`)."""

    diagnostics: list[tuple[str, str, str, dict[str, str]]]

    def _on_diag(self, msg: DiagnosticArray) -> None:
        for s in msg.status:
            self.diagnostics.append((s.name, level_name(s.level), s.message, status_values(s)))

    def last_status(self, node_name: str) -> tuple[str, str, dict[str, str]] | None:
        """The latest status named `node_name` (a full name without the leading slash)."""
        for name, level, message, values in reversed(self.diagnostics):
            if name == node_name.lstrip('/'):
                return level, message, values
        return None


class Probe(DiagnosticsLog):
    """Publishes observations and records actions and diagnostics, like a simulator would."""

    def __init__(self, context: Context, namespace: str = '', name: str = 'probe') -> None:
        self.node = rclpy.create_node(name, namespace=namespace, context=context)
        self.obs_pub = self.node.create_publisher(Float32MultiArray, 'observation',
                                                  qos_profile_sensor_data)
        self.actions: list[tuple[float, np.ndarray, dict[str, int]]] = []
        self.diagnostics: list[tuple[str, str, str, dict[str, str]]] = []
        self.sent: dict[int, float] = {}
        self.seq = 0
        self.node.create_subscription(Float32MultiArray, 'action', self._on_action, ACTION_QOS)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 50)

    def _on_action(self, msg: Float32MultiArray) -> None:
        self.actions.append((time.perf_counter(), msg_to_array(msg), msg_meta(msg)))

    def send(self, obs: np.ndarray, fields: list[tuple[str, int]] | None, episode: int = 1,
             step: int = 0, raw: bool = False) -> int:
        """Publish one observation (fields labelled unless `raw`); returns its `@seq`."""
        self.seq += 1
        if raw:  # no field labels, only the metadata
            msg = array_to_msg(obs, None, {'seq': self.seq, 'episode': episode, 'step': step})
        else:
            msg = observation_to_msg(obs, fields, self.seq, episode, step)
        self.sent[self.seq] = time.perf_counter()
        self.obs_pub.publish(msg)
        return self.seq

    def answers(self, seq: int) -> list[np.ndarray]:
        return [a for _, a, m in self.actions if m.get('seq') == seq]

    def destroy(self) -> None:
        self.node.destroy_node()


class BindingProbe(DiagnosticsLog):
    """Plays a robot (or sim_node) through a binding: publishes its source topics, episode
    markers and optionally /clock, and records every sink message (arrival time, header stamp
    in ns or None, the action slice `Sink.decode` reads, the message) and diagnostics."""

    def __init__(self, context: Context, binding: Any, namespace: str = '',
                 name: str = 'binding_probe', extra_joints: dict[str, float] | None = None
                 ) -> None:
        from rosgraph_msgs.msg import Clock as ClockMsg
        from std_msgs.msg import String

        from vdd_ros.ros.binding_io import message_class
        from vdd_ros.ros.policy_node import MARKER_QOS
        self.binding = binding
        self.extra_joints = extra_joints
        self.node = rclpy.create_node(name, namespace=namespace, context=context)
        self.pubs = {t: self.node.create_publisher(message_class(k), t, qos_profile_sensor_data)
                     for t, k in binding.observation_topics().items()}
        self.marker_pub = self.node.create_publisher(String, binding.episode_topic, MARKER_QOS)
        self.clock_pub = self.node.create_publisher(ClockMsg, '/clock', 10)
        self.received: dict[str, list[tuple[float, int | None, np.ndarray | None, Any]]] = {
            s.topic: [] for s in binding.action}
        self.diagnostics: list[tuple[str, str, str, dict[str, str]]] = []
        self.sent: dict[int, float] = {}
        for sink in binding.action:
            self.node.create_subscription(message_class(sink.type), sink.topic,
                                          lambda msg, sink=sink: self._on_sink(sink, msg),
                                          ACTION_QOS)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 50)

    def _on_sink(self, sink: Any, msg: Any) -> None:
        stamp = None
        if hasattr(msg, 'header'):
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        try:
            values = sink.decode(msg)
        except ValueError:
            values = None
        self.received[sink.topic].append((time.perf_counter(), stamp, values, msg))

    def marker(self, event: str, episode: int | None = None, **kw: Any) -> None:
        from std_msgs.msg import String

        from vdd_ros.binding import marker_json
        self.marker_pub.publish(String(data=marker_json(event, episode, **kw)))

    def clock(self, stamp_ns: int) -> None:
        from rosgraph_msgs.msg import Clock as ClockMsg

        from vdd_ros.ros.binding_io import to_time
        self.clock_pub.publish(ClockMsg(clock=to_time(stamp_ns)))

    def messages(self, obs: np.ndarray, stamp_ns: int) -> dict[str, Any]:
        """{topic: message} of a flat observation (its source features) at `stamp_ns`."""
        from vdd_ros.ros.binding_io import source_messages, split_observation
        return source_messages(self.binding, split_observation(self.binding, obs), stamp_ns,
                               self.extra_joints)

    def send(self, obs: np.ndarray, stamp_ns: int,
             messages: dict[str, Any] | None = None) -> None:
        """Publish one observation on every source topic, all stamped `stamp_ns`."""
        messages = self.messages(obs, stamp_ns) if messages is None else messages
        self.sent[stamp_ns] = time.perf_counter()
        for topic, msg in messages.items():
            self.pubs[topic].publish(msg)

    def actions(self) -> list[tuple[int | None, float, np.ndarray | None]]:
        """(stamp, arrival, action vector) of each answer: the k-th message of every sink
        makes the k-th action (each sink publishes once per answer, in order); the stamp is
        the first stamped sink's; the action is None when a message did not decode."""
        streams = [self.received[s.topic] for s in self.binding.action]
        out = []
        for k in range(min(len(x) for x in streams)):
            items = [x[k] for x in streams]
            stamp = next((s for _, s, _, _ in items if s is not None), None)
            parts = [v for _, _, v, _ in items]
            action = None
            if all(v is not None for v in parts):
                action = np.zeros(self.binding.action_dim)
                for sink, v in zip(self.binding.action, parts):
                    action[sink.slice[0]:sink.slice[1]] = v
            out.append((stamp, max(t for t, _, _, _ in items), action))
        return out

    def answers(self, stamp_ns: int) -> list[np.ndarray | None]:
        """The action vectors of the answers stamped `stamp_ns`."""
        return [a for s, _, a in self.actions() if s == stamp_ns]

    def answered(self, stamp_ns: int) -> bool:
        return bool(self.answers(stamp_ns))

    def destroy(self) -> None:
        self.node.destroy_node()


_FLOOD = """
import sys, time
import rclpy
from rclpy.qos import qos_profile_sensor_data
from std_msgs.msg import Float32MultiArray
namespace, period, *paths = sys.argv[1:]
blobs = [open(path, 'rb').read() for path in paths]
rclpy.init()
node = rclpy.create_node('flood', namespace=namespace)
pub = node.create_publisher(Float32MultiArray, 'observation', qos_profile_sensor_data)
i = 0
while rclpy.ok():
    pub.publish(blobs[i % len(blobs)])
    i += 1
    time.sleep(float(period))
"""


def flood_observations(namespace: str, blobs: list[bytes], period_s: float,
                       folder: str | os.PathLike) -> subprocess.Popen:
    """A separate process that publishes the serialized `blobs` in turn on `observation`
    every `period_s` (so the sender's own cost never lands on the receiver); kill it when
    done."""
    paths = []
    for i, blob in enumerate(blobs):
        path = Path(folder) / f'blob_{i}.cdr'
        path.write_bytes(blob)
        paths.append(str(path))
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id()))
    return subprocess.Popen([sys.executable, '-c', _FLOOD, namespace, str(period_s), *paths],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tiny_moe_checkpoint(path: str | os.PathLike, task: str = 'lift_carry',
                        num_experts: int = 3, hidden_dim: int = 32, num_layers: int = 1,
                        seed: int = 0, chunk: int = 1, execute: int | None = None) -> Path:
    """An untrained VDD-MoE checkpoint for `task`'s observation (for tests and benches).

    It predicts `chunk` actions per query and executes the first `execute` (default: all) of
    them (chunk 1: it queries its network on every step). The experts' means are spread apart
    so that each expert gives a different action.
    """
    import torch

    from vdd_ros.core.checkpoint import save_checkpoint
    from vdd_ros.core.config import MoEConfig
    from vdd_ros.core.moe import MixtureOfExperts
    from vdd_ros.core.policy import PolicySpec
    from vdd_ros.sim.tasks import get_task

    spec = get_task(task)
    torch.manual_seed(seed)
    model = MixtureOfExperts(MoEConfig(num_experts=num_experts, hidden_dim=hidden_dim,
                                       num_layers=num_layers), spec.obs_dim, spec.action_dim,
                             action_horizon=chunk)
    with torch.no_grad():
        model.mean_head.bias.view(-1).copy_(torch.linspace(-0.9, 0.9, num_experts)
                                           .repeat_interleave(spec.action_dim * chunk))
    return save_checkpoint(path, model, PolicySpec(obs_fields=list(spec.obs_fields),
                                                   action_dim=spec.action_dim, task=spec.name,
                                                   action_horizon=chunk,
                                                   action_exec=execute or chunk),
                           'vdd_moe')


def tiny_dataset(path: str | os.PathLike, task: str = 'lift_carry', demos: int = 6,
                 length: int = 24, seed: int = 0) -> Path:
    """A small random demonstration file in the task's observation layout (for smoke tests)."""
    from vdd_ros.core.data import Demo, write_dataset
    from vdd_ros.sim.tasks import get_task

    spec = get_task(task)
    rng = np.random.default_rng(seed)
    items = [Demo(obs=rng.normal(size=(length, spec.obs_dim)).astype(np.float32),
                  actions=rng.uniform(-1, 1, size=(length, spec.action_dim)).astype(np.float32),
                  mode=spec.modes[i % len(spec.modes)]) for i in range(demos)]
    write_dataset(path, items, list(spec.obs_fields), {'task': spec.name})
    return Path(path)


# Overrides that make every training stage take a fraction of a second.
TINY_TRAINING = ['obs_horizon=1', 'action_horizon=2', 'action_exec=2', 'teacher.hidden_dim=32',
                 'teacher.num_layers=1', 'teacher.batch_size=32', 'moe.num_experts=2',
                 'moe.hidden_dim=32', 'moe.num_layers=1', 'moe.gating_hidden_dim=16',
                 'vdd.batch_size=16']


class LabelledSource(DiagnosticsLog):
    """Labelled observations, one per tick, and the actions that answer them (recorded raw,
    with their arrival time, and decoded after the run); answers matched by `@seq`."""

    def __init__(self, context: Any, namespace: str, observations: np.ndarray, fields: list,
                 raw: bool = True) -> None:
        from rclpy.serialization import serialize_message
        self.node = rclpy.create_node('bench_source', namespace=namespace, context=context)
        self.pub = self.node.create_publisher(Float32MultiArray, 'observation',
                                              qos_profile_sensor_data)
        self.observations, self.fields, self.raw = observations, fields, raw
        self.count = 0
        self.sent = np.zeros(1 << 22)          # perf_counter of each @seq sent (seq = i + 1)
        self.received: list[tuple[float, bytes]] = []
        self.diagnostics: list[tuple[str, str, str, dict[str, str]]] = []
        self.blobs = [serialize_message(observation_to_msg(obs, fields, SEQ_MARK, 1, 0))
                      for obs in observations]
        self.at = [blob.index(SEQ_MARK.to_bytes(4, 'little')) for blob in self.blobs]
        self.node.create_subscription(Float32MultiArray, 'action', self._on_action, ACTION_QOS,
                                      raw=True)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 50)

    def _on_action(self, raw: bytes) -> None:
        self.received.append((time.perf_counter(), raw))

    def tick(self) -> None:
        i = self.count
        seq = i + 1
        k = i % len(self.blobs)
        if self.raw:
            blob = bytearray(self.blobs[k])
            struct.pack_into('<I', blob, self.at[k], seq)
            self.sent[seq % self.sent.size] = time.perf_counter()
            self.pub.publish(bytes(blob))
        else:
            msg = observation_to_msg(self.observations[k], self.fields, seq, 1, i)
            self.sent[seq % self.sent.size] = time.perf_counter()
            self.pub.publish(msg)
        self.count = i + 1

    def answered_any(self) -> bool:
        return bool(self.received)

    def latencies_ms(self, first: int, last: int) -> list[float]:
        """Observation to first answer of the observations sent [first, last) (seq = i + 1)."""
        answered: dict[int, float] = {}
        for t, raw in self.received:
            s = msg_meta(decode_labelled_array(raw, 1 << 20)).get('seq')
            if s is not None and first < s <= last and s not in answered:
                answered[s] = (t - self.sent[s % self.sent.size]) * 1e3
        return list(answered.values())

    def destroy(self) -> None:
        self.node.destroy_node()


class BindingSource:
    """Every source topic of a binding, one stamp per tick (the system time); answers
    matched by the stamp of their stamped sink, complete when every sink has arrived."""

    def __init__(self, probe: Any, observations: np.ndarray, raw: bool = True) -> None:
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
