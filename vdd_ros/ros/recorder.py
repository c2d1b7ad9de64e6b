"""`vdd-ros record`: live topics of a binding into a rosbag2 written with rosbags' Writer, and
the demonstrator mode that records scripted demonstrations through sim_node and policy_node.

What is recorded: every source and sink topic of the binding, its episode marker topic
(std_msgs/String) and /clock (rosgraph_msgs/Clock); nothing else. A topic is subscribed once
a publisher of it shows up in the graph (checked every 0.2 s), like `ros2 bag record`:
RELIABLE when every publisher then offers reliable, else BEST_EFFORT (which matches any
publisher), KEEP_LAST 1000, volatile. A topic advertised with another type than the
binding's is an error naming both (no bag is kept).

Messages are taken RAW (serialized CDR) and written byte for byte. The log time of a message
is, by default, its PUBLISH time (rmw's `source_timestamp`, the publisher's system clock;
`log_time='receive'`: its DDS reception time, `received_timestamp`, as `ros2 bag record`
logs it; the callback's time when the middleware gives neither). bag2dataset times a
command without a header (Float64MultiArray) by the /clock logged before it, so the log
order of /clock and the commands must be causal: publish times are (a command answering the
state at t is published after /clock(t), and the simulator publishes /clock(t + 1) after
the command reached it), while reception times are not under load: a reliable sample lost
once and repaired later is received after /clock values that followed it, and measured so
it put 18 gripper commands of one recorded episode past their step. Publish times need the
publishers' clocks to agree (one machine, or synchronised hosts); else use 'receive'.
Messages wait in a reorder window (2 s) and are written sorted by log time, so the bag's log
times never go back (a message later than the window is written with the last written time
and counted as late).

Message definitions and type hashes come from rosbags' ROS 2 Kilted type store (the ROS 2
distribution of the wheels here; these standard types are the same in Jazzy).

Storage: MCAP (default) or sqlite3; `compress` is zstd per message (rosbag2's
`--compression-mode message`), which a reader can stream.

Atomic output: the bag is written in a hidden folder `.<name>.rec-<pid>_*/<name>` next to
the final DIR (recording its owner, see core/process.py) and renamed to DIR when the
recording stops cleanly: SIGINT or SIGTERM, `episodes` end markers, or `duration_s`. A killed
recorder leaves only the hidden folder, which the next recording into that parent folder
removes; DIR itself must not exist.

Demonstrator mode (`record_demonstrations`): sim_node (lockstep, the binding, the given
seeds, `wait_for_subscribers: 2` so nothing is published before this recorder and the policy
listen) and policy_node (checkpoint `scripted`, the same binding, `act_on: complete`,
use_sim_time) run as subprocesses on a private ROS domain (evaluation.NodeProcess: they die
with this process), and the recorder records them from this process: the demonstrations are
recorded the way teleoperation of a real robot would be, and bag2dataset converts them.
"""
from __future__ import annotations

import heapq
import itertools
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vdd_ros.binding import CLOCK, STRING, Binding, parse_marker
from vdd_ros.errors import UserError

STORAGES = ('mcap', 'sqlite3')
CLOCK_TOPIC = '/clock'
DEPTH = 1000
REORDER_NS = 2_000_000_000
LOG_TIMES = ('publish', 'receive')
GRAPH_PERIOD_S = 0.2
TEMP_INFIX = '.rec-'


def recorded_topics(binding: Binding) -> dict[str, str]:
    """{topic: type} a recording of `binding` holds: sources, sinks, markers, /clock."""
    topics = dict(binding.observation_topics())
    topics.update(binding.action_topics())
    topics[binding.episode_topic] = STRING
    topics.setdefault(CLOCK_TOPIC, CLOCK)
    return topics


def temp_prefix(out: Path) -> str:
    return f'.{out.name}{TEMP_INFIX}'


def check_output(out: str | os.PathLike) -> Path:
    """The bag folder to create: UserError when it exists or its parent cannot be written."""
    from vdd_ros.core.io import check_writable
    out = Path(out)
    if out.exists():
        raise UserError(f'--out {out}: exists already (a bag is never overwritten)')
    check_writable(out, 'bag folder', folder=True)
    return out


@dataclass
class RecordSummary:
    """What a recording holds."""

    out: str = ''
    storage: str = 'mcap'
    messages: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    episodes: int = 0            # end markers
    successes: int = 0
    late: int = 0                # written with the last written time (beyond the window)
    wall_s: float = 0.0
    stopped_by: str = ''

    def lines(self) -> list[str]:
        size = self.bytes / 2 ** 20
        out = [f'recorded {sum(self.messages.values())} messages ({size:.2f} MB of CDR) in '
               f'{self.wall_s:.1f} s, {self.episodes} episode(s) ended, {self.successes} '
               f'successful; stopped by {self.stopped_by}']
        out += [f'  {t}: {n}' for t, n in self.messages.items()]
        if self.late:
            out.append(f'  {self.late} message(s) arrived later than the reorder window')
        return out


class BagRecorder:
    """Records a binding's topics from one rclpy context into a rosbag2 (see the module
    docstring). `spin(until)` records until `until()` is true or a stop is requested; then
    `close(commit)` finalises the bag and renames it into place (commit) or discards it."""

    def __init__(self, binding: Binding, out: str | os.PathLike, storage: str = 'mcap',
                 compress: bool = False, context: Any = None,
                 on_marker: Callable[[Any], None] | None = None,
                 log_time: str = 'publish') -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        from vdd_ros.core.process import owned_tempdir, remove_dead_owners
        if storage not in STORAGES:
            raise UserError(f'--storage must be one of {list(STORAGES)}, got {storage!r}')
        if log_time not in LOG_TIMES:
            raise UserError(f'--log-time must be one of {list(LOG_TIMES)}, got {log_time!r}')
        self.stamp_key = 'source_timestamp' if log_time == 'publish' else 'received_timestamp'
        self.binding = binding
        self.out = check_output(out)
        self.topics = recorded_topics(binding)
        self.store = get_typestore(Stores.ROS2_KILTED)
        for topic, kind in self.topics.items():
            if kind not in self.store.types:
                raise UserError(f'{topic}: type {kind} is not in the ROS 2 type store')
        self.summary = RecordSummary(out=str(self.out), storage=storage,
                                     messages={t: 0 for t in self.topics})
        self.on_marker = on_marker
        remove_dead_owners(temp_prefix(self.out), self.out.parent)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = owned_tempdir(temp_prefix(self.out), self.out.parent)
        self.bag = self.tmp / self.out.name
        plugin = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}[storage]
        self.writer = Writer(self.bag, version=9, storage_plugin=plugin)
        if compress:
            self.writer.set_compression(CompressionMode.MESSAGE, CompressionFormat.ZSTD)
        self.writer.open()
        self.conns: dict[str, Any] = {}
        self.heap: list[tuple[int, int, str, bytes]] = []
        self.seq = itertools.count()
        self.last_written = 0
        self.stop_requested = threading.Event()
        self.stop_reason = ''
        self._closed = False
        self.node = rclpy.create_node('vdd_recorder', context=context,
                                      start_parameter_services=False)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.subscribed: dict[str, str] = {}      # topic -> 'reliable' | 'best_effort'
        self.started = time.perf_counter()
        self._next_graph = 0.0

    # -- subscriptions -------------------------------------------------------------------------
    def _check_graph(self) -> None:
        """Subscribe each topic whose first publisher appeared; a wrong type is an error."""
        from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile,
                               ReliabilityPolicy)

        from vdd_ros.ros.binding_io import message_class
        for topic, kind in self.topics.items():
            if topic in self.subscribed:
                continue
            infos = self.node.get_publishers_info_by_topic(topic)
            if not infos:
                continue
            wrong = sorted({i.topic_type for i in infos} - {kind})
            if wrong:
                raise UserError(f'{topic} is published as {wrong[0]}, the binding records '
                                f'{kind}')
            reliable = all(i.qos_profile.reliability == ReliabilityPolicy.RELIABLE
                           for i in infos)
            qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=DEPTH,
                             reliability=ReliabilityPolicy.RELIABLE if reliable
                             else ReliabilityPolicy.BEST_EFFORT,
                             durability=DurabilityPolicy.VOLATILE)
            self.node.create_subscription(
                message_class(kind), topic,
                lambda raw, info, topic=topic: self._on_message(topic, raw, info), qos,
                raw=True)
            self.subscribed[topic] = 'reliable' if reliable else 'best_effort'

    def _on_message(self, topic: str, raw: bytes, info: Any) -> None:
        stamp = int((info or {}).get(self.stamp_key) or 0) or time.time_ns()
        heapq.heappush(self.heap, (stamp, next(self.seq), topic, bytes(raw)))
        if topic == self.binding.episode_topic:
            self._marker(raw)

    def _marker(self, raw: bytes) -> None:
        from rclpy.serialization import deserialize_message
        from std_msgs.msg import String
        try:
            marker = parse_marker(deserialize_message(raw, String).data)
        except Exception:   # malformed: recorded as it is, bag2dataset names the problem
            return
        if marker.event == 'end':
            self.summary.episodes += 1
            self.summary.successes += bool(marker.success)
        if self.on_marker is not None:
            self.on_marker(marker)

    # -- writing -------------------------------------------------------------------------------
    def _write(self, older_than: int | None) -> None:
        """Write the messages logged before `older_than` (all when None), in log-time order."""
        while self.heap and (older_than is None or self.heap[0][0] < older_than):
            stamp, _, topic, raw = heapq.heappop(self.heap)
            if stamp < self.last_written:
                self.summary.late += 1
                stamp = self.last_written
            conn = self.conns.get(topic)
            if conn is None:
                conn = self.conns[topic] = self.writer.add_connection(
                    topic, self.topics[topic], typestore=self.store)
            self.writer.write(conn, stamp, raw)
            self.last_written = stamp
            self.summary.messages[topic] += 1
            self.summary.bytes += len(raw)

    def step(self, timeout_s: float = 0.05) -> None:
        """Handle the callbacks ready within `timeout_s`, subscribe new topics, write what
        left the reorder window."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.executor.spin_once(timeout_sec=max(deadline - time.monotonic(), 0.0))
            if time.monotonic() >= deadline:
                break
        now = time.monotonic()
        if now >= self._next_graph:
            self._next_graph = now + GRAPH_PERIOD_S
            self._check_graph()
        self._write(time.time_ns() - REORDER_NS)

    def request_stop(self, reason: str) -> None:
        if not self.stop_requested.is_set():
            self.stop_reason = reason
            self.stop_requested.set()

    def spin(self, until: Callable[[], str | None] | None = None) -> str:
        """Record until a stop is requested or `until()` gives a reason; returns the reason."""
        while not self.stop_requested.is_set():
            self.step()
            reason = until() if until is not None else None
            if reason:
                self.request_stop(reason)
        return self.stop_reason

    def drain(self, seconds: float) -> None:
        """Keep receiving for `seconds` (messages still in flight when a stop came)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.step(min(0.05, max(end - time.monotonic(), 0.0)))

    def close(self, commit: bool) -> RecordSummary:
        """Finish the bag: written and renamed to the final folder (commit), else deleted."""
        if self._closed:
            return self.summary
        self._closed = True
        self.summary.wall_s = time.perf_counter() - self.started
        self.summary.stopped_by = self.stop_reason or ('error' if not commit else 'done')
        try:
            self.executor.remove_node(self.node)
            self.node.destroy_node()
            self.executor.shutdown(timeout_sec=1.0)
        except Exception:   # a context already shut down: nothing left to release
            pass
        try:
            if commit:
                self._write(None)
            self.writer.close()
            if commit:
                if self.out.exists():
                    raise UserError(f'--out {self.out}: appeared while recording; the bag is '
                                    f'left in {self.tmp}')
                os.replace(self.bag, self.out)
        finally:
            if not commit or not self.bag.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
        return self.summary


class _Signals:
    """SIGINT and SIGTERM request a clean stop (installed only in the main thread)."""

    def __init__(self, on_signal: Callable[[str], None]) -> None:
        self.on_signal = on_signal
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> '_Signals':
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(
                    sig, lambda s, f: self.on_signal(signal.Signals(s).name))
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C: the nodes are stopped and the bag is discarded."""
    raise KeyboardInterrupt


def _init_context(domain_id: int | None) -> Any:
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions
    context = Context()
    kwargs = {} if domain_id is None else {'domain_id': int(domain_id)}
    rclpy.init(args=None, context=context, signal_handler_options=SignalHandlerOptions.NO,
               **kwargs)
    return context


def _shutdown(context: Any) -> None:
    import rclpy
    try:
        rclpy.shutdown(context=context)
    except Exception:   # already shut down
        pass


def record(binding: Binding, out: str | os.PathLike, storage: str = 'mcap',
           compress: bool = False, episodes: int | None = None,
           duration_s: float | None = None, show_progress: bool = True,
           domain_id: int | None = None, log_time: str = 'publish') -> RecordSummary:
    """Record live topics of `binding` (this process's ROS domain unless `domain_id`) until
    SIGINT/SIGTERM, `episodes` end markers or `duration_s` seconds; the bag is committed in
    every one of these cases."""
    from tqdm import tqdm
    if episodes is not None and episodes < 1:
        raise UserError(f'--episodes must be at least 1, got {episodes}')
    if duration_s is not None and not duration_s > 0:
        raise UserError(f'--duration must be positive, got {duration_s}')
    check_output(out)
    context = _init_context(domain_id)
    recorder = None
    bar = tqdm(total=episodes, desc=f'record {Path(out).name}', unit='episode',
               disable=not show_progress, dynamic_ncols=True, leave=False)
    commit = False
    try:
        recorder = BagRecorder(binding, out, storage, compress, context, log_time=log_time)
        end = None if duration_s is None else time.monotonic() + duration_s

        def until() -> str | None:
            s = recorder.summary
            bar.set_postfix(messages=sum(s.messages.values()), refresh=False)
            if bar.n != s.episodes:
                bar.update(s.episodes - bar.n)
            if episodes is not None and s.episodes >= episodes:
                return f'{episodes} episode end marker(s)'
            if end is not None and time.monotonic() >= end:
                return f'--duration {duration_s:g} s'
            return None
        with _Signals(recorder.request_stop):
            recorder.spin(until)
            recorder.drain(REORDER_NS / 1e9)
        commit = True
    finally:
        bar.close()
        summary = recorder.close(commit) if recorder is not None else None
        _shutdown(context)
    assert summary is not None
    return summary


# -- demonstrator mode ------------------------------------------------------------------------
def record_demonstrations(task: str, out: str | os.PathLike, seeds: list[int],
                          binding: str | None = None, storage: str = 'mcap',
                          compress: bool = False, show_progress: bool = True,
                          domain_id: int | None = None, timeout_s: float | None = None,
                          oracle: str = 'scripted') -> tuple[RecordSummary, list[dict]]:
    """Record one scripted demonstration per seed through sim_node and policy_node (see the
    module docstring). `binding` is a binding file or `task:<name>` (default: the task's
    shipped binding); `timeout_s` is the longest wait for the next episode to end. Returns
    the recording's summary and sim_node's episode results."""
    from tqdm import tqdm

    from vdd_ros.core.process import owned_tempdir, remove_dead_owners
    from vdd_ros.ros.binding_io import resolve_binding
    from vdd_ros.ros.evaluation import TEMP_PREFIX, NodeProcess, _read_json, free_domain_id
    from vdd_ros.sim.tasks import get_task

    spec = get_task(task)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UserError('--episodes must be at least 1')
    ref = binding or f'task:{spec.name}'
    if not ref.startswith('task:'):
        ref = str(Path(ref).resolve())
    bound = resolve_binding(ref)
    check_output(out)
    domain = free_domain_id() if domain_id is None else int(domain_id)
    if timeout_s is None:       # the longest wait for the next episode to end
        timeout_s = 120.0 + spec.horizon * 1.0
    # the nodes discover only on localhost; so must the recorder (same private domain)
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    remove_dead_owners(TEMP_PREFIX)
    folder = owned_tempdir(TEMP_PREFIX)
    context = _init_context(domain)
    recorder: BagRecorder | None = None
    nodes: list[NodeProcess] = []
    commit = False
    bar = tqdm(total=len(seeds), desc=f'record {spec.name} demonstrations', unit='episode',
               disable=not show_progress, dynamic_ncols=True, leave=False)
    try:
        recorder = BagRecorder(bound, out, storage, compress, context)
        results = folder / 'results.json'
        policy = NodeProcess('policy_node', 'policy_node', {
            'checkpoint': oracle, 'task': spec.name, 'binding': ref, 'act_on': 'complete',
            'use_sim_time': True}, folder, domain)
        nodes.append(policy)
        sim = NodeProcess('sim_node', 'sim_node', {
            'task': spec.name, 'clock_mode': 'lockstep', 'binding': ref, 'seeds': seeds,
            'episodes': len(seeds), 'exit_when_done': True, 'results_file': str(results),
            'wait_for_subscribers': 2}, folder, domain)
        nodes.append(sim)
        deadline = [time.monotonic() + timeout_s]
        sim_exited: list[float] = []

        def until() -> str | None:
            s = recorder.summary
            if bar.n != s.episodes:
                deadline[0] = time.monotonic() + timeout_s
                bar.set_postfix(success=f'{s.successes}/{s.episodes}', refresh=False)
                bar.update(s.episodes - bar.n)
            if s.episodes >= len(seeds):
                return 'the last end marker'
            for node in (policy, sim):
                code = node.poll()
                if code is not None and (node is policy or code != 0):
                    raise UserError(f'{node.name} exited with status {code}:\n'
                                    f'{node.log_tail()}')
            now = time.monotonic()
            if sim.poll() == 0 and not sim_exited:
                sim_exited.append(now)
            if sim_exited and now > sim_exited[0] + 2.0:    # its last messages had 2 s
                raise UserError(f'sim_node finished, but the recorder saw only {s.episodes} '
                                f'of {len(seeds)} end markers')
            if now > deadline[0]:
                raise UserError(f'recording stalled: no episode ended for {timeout_s:.0f} s; '
                                f'sim_node log:\n{sim.log_tail()}\npolicy_node log:\n'
                                f'{policy.log_tail()}')
            return None
        previous = signal.signal(signal.SIGTERM, _interrupt) \
            if threading.current_thread() is threading.main_thread() else None
        try:
            recorder.spin(until)
            recorder.drain(REORDER_NS / 1e9 + 0.1)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        for node in nodes:
            node.stop(grace_s=5.0)
        episodes = (_read_json(results) or {}).get('episodes', [])
        commit = True
    finally:
        bar.close()
        for node in reversed(nodes):
            node.stop(grace_s=5.0)
        summary = recorder.close(commit) if recorder is not None else None
        _shutdown(context)
        shutil.rmtree(folder, ignore_errors=True)
    assert summary is not None
    return summary, episodes
