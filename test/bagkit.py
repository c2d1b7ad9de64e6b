"""Test helpers: standard messages built as rclpy objects or as rosbags dataclasses (the two
forms a binding reads), and rosbag2 files written with rosbags' own writer."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.typesys import Stores, get_typestore

STORE = get_typestore(Stores.ROS2_KILTED)
T = STORE.types


class Rosbags:
    """Messages as rosbags' deserialised dataclasses."""

    name = 'rosbags'

    @staticmethod
    def header(stamp_ns: int = 0, frame_id: str = '') -> Any:
        return T['std_msgs/msg/Header'](
            stamp=T['builtin_interfaces/msg/Time'](sec=int(stamp_ns // 10**9),
                                                    nanosec=int(stamp_ns % 10**9)),
            frame_id=frame_id)

    @classmethod
    def joint_state(cls, names: Sequence[str], position: Sequence[float] = (),
                    velocity: Sequence[float] = (), effort: Sequence[float] = (),
                    stamp_ns: int = 0, frame_id: str = '') -> Any:
        def arr(values: Sequence[float]) -> np.ndarray:
            return np.asarray(values, dtype=np.float64)
        return T['sensor_msgs/msg/JointState'](
            header=cls.header(stamp_ns, frame_id), name=list(names), position=arr(position),
            velocity=arr(velocity), effort=arr(effort))

    @classmethod
    def pose(cls, position: Sequence[float], quat: Sequence[float] = (0, 0, 0, 1),
             stamp_ns: int = 0, frame_id: str = 'world') -> Any:
        p = T['geometry_msgs/msg/Point'](*(float(v) for v in position))
        q = T['geometry_msgs/msg/Quaternion'](*(float(v) for v in quat))
        return T['geometry_msgs/msg/PoseStamped'](
            header=cls.header(stamp_ns, frame_id), pose=T['geometry_msgs/msg/Pose'](p, q))

    @classmethod
    def twist(cls, values: Sequence[float], stamp_ns: int = 0, frame_id: str = '') -> Any:
        v3 = T['geometry_msgs/msg/Vector3']
        return T['geometry_msgs/msg/TwistStamped'](
            header=cls.header(stamp_ns, frame_id),
            twist=T['geometry_msgs/msg/Twist'](v3(*map(float, values[:3])),
                                               v3(*map(float, values[3:6]))))

    @staticmethod
    def array(values: Sequence[float], f32: bool = False,
              dims: Iterable[tuple[str, int, int]] = ()) -> Any:
        kind = 'std_msgs/msg/Float32MultiArray' if f32 else 'std_msgs/msg/Float64MultiArray'
        layout = T['std_msgs/msg/MultiArrayLayout'](
            dim=[T['std_msgs/msg/MultiArrayDimension'](label=a, size=b, stride=c)
                 for a, b, c in dims], data_offset=0)
        return T[kind](layout=layout,
                       data=np.asarray(values, dtype=np.float32 if f32 else np.float64))

    @classmethod
    def trajectory(cls, joints: Sequence[str], points: Sequence[Sequence[float]],
                   stamp_ns: int = 0) -> Any:
        pts = [T['trajectory_msgs/msg/JointTrajectoryPoint'](
            positions=np.asarray(p, dtype=np.float64), velocities=np.zeros(0),
            accelerations=np.zeros(0), effort=np.zeros(0),
            time_from_start=T['builtin_interfaces/msg/Duration'](sec=0, nanosec=0))
            for p in points]
        return T['trajectory_msgs/msg/JointTrajectory'](
            header=cls.header(stamp_ns), joint_names=list(joints), points=pts)

    @staticmethod
    def string(text: str) -> Any:
        return T['std_msgs/msg/String'](data=text)

    @classmethod
    def image(cls, pixels: np.ndarray, stamp_ns: int = 0, frame_id: str = '',
              encoding: str = 'rgb8') -> Any:
        """sensor_msgs/Image of `(H, W, 3)` uint8 pixels, rows unpadded."""
        h, w = pixels.shape[:2]
        return T['sensor_msgs/msg/Image'](
            header=cls.header(stamp_ns, frame_id), height=h, width=w, encoding=encoding,
            is_bigendian=0, step=w * 3, data=np.ascontiguousarray(pixels, np.uint8).reshape(-1))

    @staticmethod
    def clock(stamp_ns: int) -> Any:
        return T['rosgraph_msgs/msg/Clock'](clock=T['builtin_interfaces/msg/Time'](
            sec=int(stamp_ns // 10**9), nanosec=int(stamp_ns % 10**9)))


class Rclpy:
    """The same messages as rclpy objects (imported lazily: only when used)."""

    name = 'rclpy'

    @staticmethod
    def header(stamp_ns: int = 0, frame_id: str = '') -> Any:
        from builtin_interfaces.msg import Time
        from std_msgs.msg import Header
        return Header(stamp=Time(sec=int(stamp_ns // 10**9), nanosec=int(stamp_ns % 10**9)),
                      frame_id=frame_id)

    @classmethod
    def joint_state(cls, names: Sequence[str], position: Sequence[float] = (),
                    velocity: Sequence[float] = (), effort: Sequence[float] = (),
                    stamp_ns: int = 0, frame_id: str = '') -> Any:
        from sensor_msgs.msg import JointState
        return JointState(header=cls.header(stamp_ns, frame_id), name=list(names),
                          position=[float(v) for v in position],
                          velocity=[float(v) for v in velocity],
                          effort=[float(v) for v in effort])

    @classmethod
    def pose(cls, position: Sequence[float], quat: Sequence[float] = (0, 0, 0, 1),
             stamp_ns: int = 0, frame_id: str = 'world') -> Any:
        from geometry_msgs.msg import Point, Pose, PoseStamped, Quaternion
        p = Point(x=float(position[0]), y=float(position[1]), z=float(position[2]))
        q = Quaternion(x=float(quat[0]), y=float(quat[1]), z=float(quat[2]), w=float(quat[3]))
        return PoseStamped(header=cls.header(stamp_ns, frame_id),
                           pose=Pose(position=p, orientation=q))

    @classmethod
    def twist(cls, values: Sequence[float], stamp_ns: int = 0, frame_id: str = '') -> Any:
        from geometry_msgs.msg import Twist, TwistStamped, Vector3
        v = [float(x) for x in values]
        return TwistStamped(header=cls.header(stamp_ns, frame_id), twist=Twist(
            linear=Vector3(x=v[0], y=v[1], z=v[2]), angular=Vector3(x=v[3], y=v[4], z=v[5])))

    @staticmethod
    def array(values: Sequence[float], f32: bool = False,
              dims: Iterable[tuple[str, int, int]] = ()) -> Any:
        from std_msgs.msg import (Float32MultiArray, Float64MultiArray, MultiArrayDimension,
                                  MultiArrayLayout)
        cls = Float32MultiArray if f32 else Float64MultiArray
        layout = MultiArrayLayout(dim=[MultiArrayDimension(label=a, size=b, stride=c)
                                       for a, b, c in dims])
        return cls(layout=layout, data=[float(v) for v in values])

    @classmethod
    def trajectory(cls, joints: Sequence[str], points: Sequence[Sequence[float]],
                   stamp_ns: int = 0) -> Any:
        from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint
        return JointTrajectory(header=cls.header(stamp_ns), joint_names=list(joints),
                               points=[JointTrajectoryPoint(positions=[float(v) for v in p])
                                       for p in points])

    @staticmethod
    def string(text: str) -> Any:
        from std_msgs.msg import String
        return String(data=text)


KINDS = (Rclpy, Rosbags)


def write_bag(path: str | Path, messages: Iterable[tuple[str, str, int, Any]],
              storage: str = 'mcap', compress: bool | str = False) -> Path:
    """A rosbag2 written by rosbags' writer from (topic, type, log time ns, message) tuples;
    `compress` is zstd compression as `ros2 bag record --compression-mode file|message`
    writes it (True: file)."""
    from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer
    plugin = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}[storage]
    path = Path(path)
    conns: dict[str, Any] = {}
    writer = Writer(path, version=9, storage_plugin=plugin)
    if compress:
        mode = CompressionMode.MESSAGE if compress == 'message' else CompressionMode.FILE
        writer.set_compression(mode, CompressionFormat.ZSTD)
    with writer:
        for topic, msgtype, t_ns, msg in messages:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=STORE)
            writer.write(conns[topic], int(t_ns), STORE.serialize_cdr(msg, msgtype))
    return path
