"""sim_node's standard topics: the robosuite robot published the way a ROS 2 robot publishes
itself, and a binding's commands turned back into the simulator's action vector.

Published at every step, all with header.stamp = the step's simulation time and frame_id
`world` (the robot base's axes are the world's in these tasks):

- `/joint_states` (sensor_msgs/JointState): the arm joints, then the gripper fingers, by
  robosuite's names (robot0_joint1..7, gripper0_right_finger_joint1/2), position and velocity;
- `/eef_pose` (geometry_msgs/PoseStamped): the end effector (robosuite's robot0_eef_pos and
  robot0_eef_quat, x y z w);
- `/objects/<cube>/pose` (PoseStamped): each cube (`cube`, or `cubeA` and `cubeB`);
- `/goals/<name>/pose` (PoseStamped): each virtual goal (lift_carry: `left`, `right`;
  carry_four: `front_left`, `front_right`, `back_left`, `back_right`), with the identity
  orientation;
- `/cameras/<camera>/image_raw` (sensor_msgs/Image, rgb8, frame_id the camera's name): each
  camera of a camera task (pick_either_image: `agentview`, `robot0_eye_in_hand`), the frame
  rendered for that step.

The numbers are robosuite's float64 values, unchanged, so a binding reading them (the shipped
config/bindings/<task>.yaml) assembles exactly SimEnv's observation. Publishers are RELIABLE,
depth 10 (a best-effort subscriber matches them too); `/clock` (rosgraph_msgs/Clock) is
RELIABLE, depth 10; episode markers (std_msgs/String on the binding's episode topic) RELIABLE,
depth 100, like policy_node's subscription.

`check_binding` runs at start: every source topic of the binding must be one of these with
the same type, its joints among the published ones (by name), its frame_id `world` where it
names one, and the sinks must fill the task's action exactly; the error names the parameter,
the topic and the joint. Commands arrive on the sink topics (reliable, depth 10) and are read
with `Sink.decode` (frame_id, size, finiteness).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from rclpy.qos import QoSProfile, ReliabilityPolicy

from vdd_ros.binding import (IMAGE, IMAGE_ENCODING, JOINT_STATE, POSE_STAMPED, Binding,
                             BindingMismatch)
from vdd_ros.errors import UserError
from vdd_ros.ros.binding_io import message_class, to_time

SIM_FRAME = 'world'
CLOCK_TOPIC = '/clock'
STATE_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
CLOCK_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
MARKER_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
COMMAND_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


def sim_topics(state: dict[str, Any]) -> dict[str, str]:
    """{topic: type} of what the simulator publishes, for one `SimEnv.robot_state()`."""
    topics = {'/joint_states': JOINT_STATE, '/eef_pose': POSE_STAMPED}
    topics.update({f'/objects/{k}/pose': POSE_STAMPED for k in state['objects']})
    topics.update({f'/goals/{k}/pose': POSE_STAMPED for k in state['goals']})
    topics.update({camera_topic(k): IMAGE for k in state.get('cameras', {})})
    return topics


def camera_topic(camera: str) -> str:
    return f'/cameras/{camera}/image_raw'


def _frame_of(topic: str, state: dict[str, Any]) -> str:
    """The frame_id sim_node stamps on a topic: the camera's name for images, else world."""
    cameras = {camera_topic(k): k for k in state.get('cameras', {})}
    return cameras.get(topic, SIM_FRAME)


def check_binding(binding: Binding, state: dict[str, Any], action_dim: int) -> None:
    """UserError (naming the parameter, topic and joint) unless the simulator can feed every
    source of `binding` and its sinks fill an action of `action_dim` values."""
    where = f'parameter binding ({binding.name or "binding"})'
    published = sim_topics(state)
    for src in binding.sources:
        kind = published.get(src.topic)
        if kind is None:
            raise UserError(f'{where}: the simulator publishes no {src.topic} (it publishes '
                            f'{", ".join(published)})')
        if kind != src.type:
            raise UserError(f'{where}: {src.topic} is {kind} here, the binding says '
                            f'{src.type}')
        missing = [j for j in src.joints if j not in state['joints']]
        if missing:
            raise UserError(f'{where}: {src.topic} has no joint {missing[0]!r} (joints: '
                            f'{", ".join(state["joints"])})')
        frame = _frame_of(src.topic, state)
        if src.frame_id is not None and src.frame_id != frame:
            raise UserError(f'{where}: {src.topic} is published in frame {frame!r}, the '
                            f'binding expects {src.frame_id!r}')
        if src.type == IMAGE:
            side = state['cameras'][src.topic.split('/')[2]].shape[:2]
            if (src.height, src.width) != tuple(side):
                raise UserError(f'{where}: {src.topic} carries {side[1]}x{side[0]} images, '
                                f'the binding expects {src.width}x{src.height}')
    if binding.action_dim != action_dim:
        raise UserError(f'{where}: the sinks take {binding.action_dim} action values, the '
                        f'task needs {action_dim}')


def _pose(cls: Any, position: Any, quat: Any, stamp: Any) -> Any:
    msg = cls()
    msg.header.stamp = stamp
    msg.header.frame_id = SIM_FRAME
    p, q = msg.pose.position, msg.pose.orientation
    p.x, p.y, p.z = (float(v) for v in position)
    q.x, q.y, q.z, q.w = (float(v) for v in quat)
    return msg


def state_messages(state: dict[str, Any], stamp_ns: int) -> dict[str, Any]:
    """{topic: rclpy message} of one robot state, every header stamped `stamp_ns`."""
    from geometry_msgs.msg import PoseStamped
    from sensor_msgs.msg import JointState
    stamp = to_time(stamp_ns)
    joints = JointState()
    joints.header.stamp = stamp
    joints.header.frame_id = SIM_FRAME
    joints.name = list(state['joints'])
    joints.position = [float(v) for v in state['position']]
    joints.velocity = [float(v) for v in state['velocity']]
    out = {'/joint_states': joints,
           '/eef_pose': _pose(PoseStamped, state['eef_pos'], state['eef_quat'], stamp)}
    for name, (pos, quat) in state['objects'].items():
        out[f'/objects/{name}/pose'] = _pose(PoseStamped, pos, quat, stamp)
    for name, pos in state['goals'].items():
        out[f'/goals/{name}/pose'] = _pose(PoseStamped, pos, (0.0, 0.0, 0.0, 1.0), stamp)
    for name, frame in state.get('cameras', {}).items():
        out[camera_topic(name)] = image_message(frame, name, stamp)
    return out


def image_message(frame: np.ndarray, frame_id: str, stamp: Any) -> Any:
    """sensor_msgs/Image (rgb8, unpadded rows) of an (H, W, 3) uint8 frame."""
    from sensor_msgs.msg import Image
    msg = Image()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = (int(v) for v in frame.shape[:2])
    msg.encoding = IMAGE_ENCODING
    msg.is_bigendian = 0
    msg.step = msg.width * 3
    msg.data = np.ascontiguousarray(frame, dtype=np.uint8).tobytes()
    return msg


class SimTopics:
    """The publishers and command subscriptions of sim_node's binding mode on `node`.

    `on_command(index, values, stamp_ns)` receives each valid command of sink `index` (its
    decoded action slice and header stamp, None for headerless sinks); `on_invalid(text)` a
    command the binding rejects.
    """

    def __init__(self, node: Any, binding: Binding, state: dict[str, Any], action_dim: int,
                 on_command: Callable[[int, np.ndarray, int | None], None],
                 on_invalid: Callable[[str], None]) -> None:
        from rosgraph_msgs.msg import Clock
        from std_msgs.msg import String
        check_binding(binding, state, action_dim)
        self.binding = binding
        self.pubs = {t: node.create_publisher(message_class(k), t, STATE_QOS)
                     for t, k in sim_topics(state).items()}
        self.clock_pub = node.create_publisher(Clock, CLOCK_TOPIC, CLOCK_QOS)
        self.marker_pub = node.create_publisher(String, binding.episode_topic, MARKER_QOS)
        self._clock_cls, self._string_cls = Clock, String
        self.on_command, self.on_invalid = on_command, on_invalid
        self.subs = [node.create_subscription(
            message_class(sink.type), sink.topic,
            lambda msg, i=i: self._on_sink(i, msg), COMMAND_QOS)
            for i, sink in enumerate(binding.action)]
        self.last: dict[str, Any] = {}

    def _on_sink(self, index: int, msg: Any) -> None:
        sink = self.binding.action[index]
        try:
            values = sink.decode(msg)
        except (BindingMismatch, ValueError) as exc:
            self.on_invalid(f'command ignored: {exc}')
            return
        self.on_command(index, values, sink.stamp_ns(msg))

    def clock(self, stamp_ns: int) -> None:
        self.clock_pub.publish(self._clock_cls(clock=to_time(stamp_ns)))

    def state(self, state: dict[str, Any], stamp_ns: int) -> None:
        """Publish one robot state on every standard topic."""
        self.last = state_messages(state, stamp_ns)
        for topic, msg in self.last.items():
            self.pubs[topic].publish(msg)

    def resend(self) -> None:
        """Publish the last state's messages again (lockstep: an unanswered observation)."""
        for topic, msg in self.last.items():
            self.pubs[topic].publish(msg)

    def marker(self, text: str, wait_s: float) -> bool:
        """Publish an episode marker; wait (at most `wait_s`) until every subscriber has it."""
        from rclpy.duration import Duration
        self.marker_pub.publish(self._string_cls(data=text))
        if wait_s <= 0:
            return True
        return bool(self.marker_pub.wait_for_all_acked(Duration(nanoseconds=int(wait_s * 1e9))))

    def waiting_for(self, node: Any, count: int) -> list[str]:
        """The topics that have fewer than `count` subscriptions (the command topics: sim_node's
        own included) or, for commands, no publisher yet."""
        out = []
        for pub in [*self.pubs.values(), self.clock_pub, self.marker_pub]:
            if pub.get_subscription_count() < count:
                out.append(f'{pub.topic_name} ({pub.get_subscription_count()} subscriber(s))')
        for sub in self.subs:
            if node.count_publishers(sub.topic_name) < 1:
                out.append(f'{sub.topic_name} (no publisher)')
            elif node.count_subscribers(sub.topic_name) < count:
                out.append(f'{sub.topic_name} ({node.count_subscribers(sub.topic_name)} '
                           f'subscriber(s))')
        return out


def assemble_action(binding: Binding, parts: dict[int, np.ndarray]) -> np.ndarray:
    """The action vector from one decoded slice per sink (float64)."""
    action = np.zeros(binding.action_dim, dtype=np.float64)
    for i, sink in enumerate(binding.action):
        action[sink.slice[0]:sink.slice[1]] = parts[i]
    return action
