"""bag2dataset: bags written by rosbags' own writer (sqlite3 and MCAP, compressed or not) ->
robomimic datasets; the fast CDR reader against rosbags' deserializer; the resampler's
invariants (Hypothesis); bad input as one line and no file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from bagkit import STORE, Rosbags as R, write_bag
from hypothesis import HealthCheck, given, settings, strategies as st

from vdd_ros.bags import (Resampler, _mcap_batches, _Topic, convert, dataset_binding,
                          decode_batch, message_batches, parse_layout)
from vdd_ros.binding import (Binding, BindingMismatch, binding_for_task, labelled_binding,
                             marker_json)
from vdd_ros.cli import main
from vdd_ros.core.data import load_dataset
from vdd_ros.errors import ConfigError

JOINTS = [f'robot0_joint{i}' for i in range(1, 8)] + [
    'gripper0_right_finger_joint1', 'gripper0_right_finger_joint2']
P = 50_000_000                     # 20 Hz
JS, PS, TW = ('sensor_msgs/msg/JointState', 'geometry_msgs/msg/PoseStamped',
              'geometry_msgs/msg/TwistStamped')
F64, STR, CLK = 'std_msgs/msg/Float64MultiArray', 'std_msgs/msg/String', 'rosgraph_msgs/msg/Clock'


def _state(ep: int, k: int) -> dict[str, np.ndarray]:
    """The simulated state at step k of episode ep (every value distinct)."""
    return {'q': np.arange(9) * 0.01 + k + 100 * ep, 'eef': np.array([k, ep, 0.5]),
            'cube': np.array([1.0, k * 0.1, ep]), 'left': np.array([0.0, 1.0, ep]),
            'right': np.array([0.0, -1.0, ep]),
            'act': np.concatenate([np.full(6, k / 100), [ep - k / 10]])}


def _lift_carry_messages(episodes=3, steps=12, fail=(1,), skip=None, js_order=None,
                         nan_at=None, t0=10 * 10**9):
    """A lockstep-simulator recording of lift_carry: /clock, markers, states stamped with sim
    time, commands after each state (timed by /clock at arrival, like a demonstrator's)."""
    out = []
    t = t0
    for ep in range(episodes):
        out.append(('/clock', CLK, t, R.clock(t)))
        out.append(('/vdd/episode', STR, t + 1, R.string(marker_json('start', 100 + ep))))
        for k in range(steps):
            tt, w = t + k * P, t + k * P + 1000
            s = _state(ep, k)
            if k:
                out.append(('/clock', CLK, w, R.clock(tt)))
            names = JOINTS if js_order is None else [JOINTS[i] for i in js_order]
            q = s['q'] if js_order is None else s['q'][js_order]
            if nan_at == (ep, k):
                q = q.copy()
                q[-1] = np.nan
            out.append(('/joint_states', JS, w + 1, R.joint_state(names, q, stamp_ns=tt)))
            if skip is None or not skip(ep, k):
                out.append(('/objects/cube/pose', PS, w + 3, R.pose(s['cube'], stamp_ns=tt)))
            out.append(('/eef_pose', PS, w + 2, R.pose(s['eef'], [0, 0, 0.6, 0.8], stamp_ns=tt)))
            out.append(('/goals/left/pose', PS, w + 4, R.pose(s['left'], stamp_ns=tt)))
            out.append(('/goals/right/pose', PS, w + 5, R.pose(s['right'], stamp_ns=tt)))
            out.append(('/arm/twist_cmd', TW, w + 10,
                        R.twist(s['act'][:6], stamp_ns=tt, frame_id='robot0_base')))
            out.append(('/gripper/command', F64, w + 11, R.array(s['act'][6:])))
        t += steps * P
        out.append(('/clock', CLK, t, R.clock(t)))
        out.append(('/vdd/episode', STR, t + 2, R.string(marker_json(
            'end', 100 + ep, success=ep not in fail, mode=['left', 'right'][ep % 2]))))
        t += P
    return out


def _expected_obs(b: Binding, ep: int, k: int) -> np.ndarray:
    s = _state(ep, k)
    return b.assemble({'robot0_eef_pos': s['eef'], 'robot0_gripper_qpos': s['q'][7:],
                       'cube_pos': s['cube'], 'goal_left_pos': s['left'],
                       'goal_right_pos': s['right']})


@pytest.fixture(scope='module')
def lift():
    return binding_for_task('lift_carry')


# -- conversion -------------------------------------------------------------------------------
@pytest.mark.parametrize('storage, compress', [('mcap', False), ('mcap', 'file'),
                                               ('sqlite3', False), ('sqlite3', 'file'),
                                               ('mcap', 'message')])
def test_bags_of_every_storage_convert_to_the_exact_dataset(tmp_path, lift, storage, compress):
    bag = write_bag(tmp_path / 'bag', _lift_carry_messages(), storage, compress)
    out = tmp_path / 'demos.hdf5'
    s = convert([bag], lift, out, show_progress=False, env_args={'task': 'lift_carry'})
    assert (s.episodes, s.demos, s.dropped_failed, s.split) == (3, 2, 1, 0)
    assert s.slow == 0                      # every message went through the fast reader
    data = load_dataset(out)
    assert data.obs_fields == lift.obs_fields and data.action_dim == 7
    assert data.env_args['task'] == 'lift_carry'
    assert [(d.seed, d.mode) for d in data.demos] == [(100, 'left'), (102, 'left')]
    for demo, ep in zip(data.demos, (0, 2)):
        assert len(demo) == 12              # ticks before the end marker; the final state is
        for k in range(12):                 # not paired with a command
            assert np.array_equal(demo.obs[k], _expected_obs(lift, ep, k))
            assert np.allclose(demo.actions[k], _state(ep, k)['act'])
    assert dataset_binding(out) == lift
    assert sorted(data.train_idx + data.valid_idx) == [0, 1]


def test_cli_converts_and_prints_the_summary(tmp_path, capsys):
    bag = write_bag(tmp_path / 'bag', _lift_carry_messages(episodes=2, fail=()), 'mcap')
    binding = Path(__file__).parents[1] / 'config' / 'bindings' / 'lift_carry.yaml'
    out = tmp_path / 'demos.hdf5'
    assert main(['bag2dataset', str(bag), '--binding', str(binding), '--out', str(out),
                 '--quiet']) == 0
    text = capsys.readouterr().out
    assert 'MB/s' in text and '2 episode(s) -> 2 demo(s), 24 samples' in text
    assert load_dataset(out).env_args['task'] == 'lift_carry'


def test_joints_are_read_by_name_whatever_order_the_bag_has(tmp_path, lift):
    order = [8, 3, 0, 7, 1, 2, 6, 4, 5]
    bag = write_bag(tmp_path / 'bag', _lift_carry_messages(1, fail=(), js_order=order), 'mcap')
    convert([bag], lift, tmp_path / 'd.hdf5', show_progress=False)
    demo = load_dataset(tmp_path / 'd.hdf5').demos[0]
    assert np.array_equal(demo.obs[5], _expected_obs(lift, 0, 5))


def test_a_gap_splits_the_episode_or_drops_it(tmp_path, lift):
    # the cube pose is missing for steps 5..9 of episode 0 (0.25 s > max_age 0.2 s)
    msgs = _lift_carry_messages(2, steps=16, fail=(), skip=lambda ep, k: ep == 0 and 5 <= k < 10)
    bag = write_bag(tmp_path / 'bag', msgs, 'sqlite3')
    s = convert([bag], lift, tmp_path / 'split.hdf5', show_progress=False)
    assert (s.episodes, s.split, s.demos) == (2, 1, 3)
    lengths = [len(d) for d in load_dataset(tmp_path / 'split.hdf5').demos]
    # stale from step 9 (age 0.25 s); 4 fresh ticks while the old message is within 0.2 s
    assert lengths == [9, 6, 16]
    assert s.gaps == {'cube_pos': 1}
    s = convert([bag], lift, tmp_path / 'drop.hdf5', show_progress=False, on_gap='drop')
    assert (s.dropped_gap, s.demos) == (1, 1)
    assert 'dropped 1 at a gap' in s.lines()[1]


def test_nan_messages_are_skipped_and_counted(tmp_path, lift):
    bag = write_bag(tmp_path / 'bag', _lift_carry_messages(1, fail=(), nan_at=(0, 4)), 'mcap')
    s = convert([bag], lift, tmp_path / 'd.hdf5', show_progress=False)
    assert s.invalid == {'/joint_states': 1}
    demo = load_dataset(tmp_path / 'd.hdf5').demos[0]
    # step 4 falls back on step 3's joint state (0.05 s old, within max_age)
    assert np.array_equal(demo.obs[4, 3:5], _expected_obs(lift, 0, 3)[3:5])
    assert np.array_equal(demo.obs[4, :3], _expected_obs(lift, 0, 4)[:3])


def test_bag_without_markers_is_one_episode_on_log_time(tmp_path):
    b = Binding.from_dict({
        'observation': [{'feature': 'q', 'topic': '/joint_states', 'type': JS,
                         'joints': ['a', 'b'], 'stamp': 'arrival', 'max_age_s': 0.01}],
        'action': [{'topic': '/cmd', 'type': F64, 'slice': [0, 1], 'max_age_s': 0.05}]})
    msgs = []
    for i in range(500):                      # 500 Hz joints, 50 Hz commands
        t = 10**9 + i * 2_000_000
        msgs.append(('/joint_states', JS, t, R.joint_state(['b', 'a'], [i, -i], stamp_ns=7)))
        if i % 10 == 3:
            msgs.append(('/cmd', F64, t, R.array([float(i)])))
    bag = write_bag(tmp_path / 'bag', msgs, 'sqlite3')
    s = convert([bag], b, tmp_path / 'd.hdf5', rate_hz=100, show_progress=False)
    demo = load_dataset(tmp_path / 'd.hdf5').demos[0]
    assert s.episodes == 1 and demo.seed is None
    # t0 = the first command (i = 3); tick j at i = 3 + 5j: joints of i, command of i - i%10 + 3
    i = 3 + 5 * np.arange(len(demo))
    assert np.array_equal(demo.obs[:, 0], -i) and np.array_equal(demo.obs[:, 1], i)
    assert np.array_equal(demo.actions[:, 0], i - (i - 3) % 10)
    assert len(demo) == 100                   # up to the last message (i = 498)


def test_labelled_arrays_and_a_trajectory_sink_convert(tmp_path):
    """Today's wire format (metadata changing in every message) in, and a JointTrajectory
    command (decoded by rosbags' deserializer: no fast path) out."""
    b = Binding.from_dict({
        'observation': [{'feature': 'x', 'topic': '/obs', 'type': 'std_msgs/Float32MultiArray',
                         'label': 'x', 'size': 2}],
        'action': [{'topic': '/traj', 'type': 'trajectory_msgs/JointTrajectory',
                    'slice': [0, 2], 'joints': ['a', 'b'], 'stamp': 'arrival'}]})
    msgs = []
    for i in range(40):
        t = 10**9 + i * P
        msgs.append(('/obs', 'std_msgs/msg/Float32MultiArray', t, R.array(
            [i, i + 0.5, 9], f32=True, dims=[('x', 2, 2), ('@seq', 0, i), ('y', 1, 1)])))
        msgs.append(('/traj', 'trajectory_msgs/msg/JointTrajectory', t + 1,
                     R.trajectory(['b', 'a'], [[i, -i], [0, 0]], stamp_ns=t)))
    bag = write_bag(tmp_path / 'bag', msgs, 'mcap')
    s = convert([bag], b, tmp_path / 'd.hdf5', rate_hz=20, show_progress=False)
    demo = load_dataset(tmp_path / 'd.hdf5').demos[0]
    assert s.slow == 40                       # the trajectories only
    i = np.arange(40)                         # tick k at command k (obs k + 1 ns)
    assert np.array_equal(demo.obs[:, 0], i) and np.array_equal(demo.obs[:, 1], i + 0.5)
    assert np.array_equal(demo.actions, np.stack([-i, i], axis=1))
    lab = labelled_binding([('x', 2)], 2)
    assert lab.sources[0].label == 'x'


def test_camera_frames_convert_to_robomimic_uint8_images(tmp_path):
    b = Binding.from_dict({
        'observation': [{'feature': 'q', 'topic': '/joint_states', 'type': JS, 'joints': ['a']},
                        {'feature': 'front_image', 'topic': '/cam', 'type': 'sensor_msgs/Image',
                         'width': 8, 'height': 8, 'frame_id': 'front'}],
        'action': [{'topic': '/cmd', 'type': F64, 'slice': [0, 1]}]})
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    msgs = []
    for i in range(30):
        t = 10**9 + i * P
        msgs.append(('/joint_states', JS, t, R.joint_state(['a'], [i], stamp_ns=t)))
        msgs.append(('/cam', 'sensor_msgs/msg/Image', t, R.image(frames[i], t, 'front')))
        msgs.append(('/cmd', F64, t + 1, R.array([float(i)])))
    bag = write_bag(tmp_path / 'bag', msgs, 'mcap')
    convert([bag], b, tmp_path / 'd.hdf5', rate_hz=20, show_progress=False)
    with h5py.File(tmp_path / 'd.hdf5') as f:
        stored = f['data/demo_0/obs/front_image']
        assert stored.dtype == np.uint8 and stored.shape == (30, 8, 8, 3)
        assert stored.chunks == (1, 8, 8, 3) and stored.compression == 'gzip'
        assert np.array_equal(f['data/demo_0/next_obs/front_image'][0], frames[1])
    demo = load_dataset(tmp_path / 'd.hdf5').demos[0]
    # tick k at command k: the frame and the joint of message k
    assert np.array_equal(np.asarray(demo.frames['front_image'][np.arange(30)]), frames)
    assert np.array_equal(demo.obs[:, 0], np.arange(30))
    with pytest.raises(ConfigError, match=r'observation\[1\]\.width: camera images are '
                                          r'square, at least 8x8.*got 8x6'):
        bad = b.to_dict()
        bad['observation'][1]['height'] = 6
        Binding.from_dict(bad)


# -- the fast CDR reader ----------------------------------------------------------------------
names = st.lists(st.text(alphabet='abcxyz_019', min_size=1, max_size=13), min_size=1,
                 max_size=6, unique=True)
floats = st.floats(allow_nan=False, width=64)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(joint_names=names, frame=st.text(alphabet='ab/_', max_size=9), data=st.data())
def test_fast_joint_state_reader_equals_rosbags_deserializer(joint_names, frame, data):
    n = len(joint_names)
    pos = data.draw(st.lists(floats, min_size=n, max_size=n))
    vel = data.draw(st.sampled_from([[], pos[::-1]]))
    eff = data.draw(st.sampled_from([[], [float(i) for i in range(n)]]))
    stamp = data.draw(st.integers(0, 2**31 * 10**9 - 1))
    msg = R.joint_state(joint_names, pos, vel, eff, stamp_ns=stamp, frame_id=frame)
    raw = bytes(STORE.serialize_cdr(msg, JS))
    layout = parse_layout(raw, JS)
    assert layout is not None and layout.names == joint_names and layout.frame_id == frame
    rows, stamps, blocks = decode_batch([raw, raw], layout, header=True)
    assert rows.tolist() == [0, 1] and stamps.tolist() == [stamp, stamp]
    back = STORE.deserialize_cdr(raw, JS)
    for name in ('position', 'velocity', 'effort'):
        assert np.array_equal(blocks[name][0], getattr(back, name))


@settings(max_examples=30, deadline=None)
@given(frame=st.text(alphabet='abc_', max_size=11),
       values=st.lists(st.floats(allow_nan=False, width=32), min_size=7, max_size=7),
       labels=st.lists(st.tuples(st.sampled_from(['x', 'yy', '@seq', '@episode']),
                                 st.integers(0, 3)), max_size=4, unique_by=lambda d: d[0]))
def test_fast_pose_twist_and_array_readers_equal_rosbags_deserializer(frame, values, labels):
    pose = bytes(STORE.serialize_cdr(R.pose(values[:3], values[3:], 5, frame), PS))
    layout = parse_layout(pose, PS)
    _, _, blocks = decode_batch([pose], layout, header=True)
    assert layout.frame_id == frame and np.array_equal(blocks['values'][0], values)
    twist = bytes(STORE.serialize_cdr(R.twist(values[:6], 5, frame), TW))
    _, _, blocks = decode_batch([twist], parse_layout(twist, TW), header=True)
    assert np.array_equal(blocks['values'][0], values[:6])
    dims = [(a, 0 if a.startswith('@') else n, n) for a, n in labels]
    size = sum(d[1] for d in dims)
    for f32, kind in ((False, F64), (True, 'std_msgs/msg/Float32MultiArray')):
        raw = bytes(STORE.serialize_cdr(R.array(values[:size], f32, dims), kind))
        layout = parse_layout(raw, kind)
        _, _, blocks = decode_batch([raw], layout, header=False)
        want = np.asarray(values[:size], dtype=np.float32 if f32 else np.float64)
        assert np.array_equal(blocks['data'][0], want)
        assert list(layout.labels) == [a for a, n, _ in dims if not a.startswith('@')]


def test_joint_states_of_several_layouts_are_read_fast_by_name(lift):
    topic = _Topic('/joint_states', JS, lift.sources_of('/joint_states'), None, '')
    msgs = [R.joint_state(JOINTS, np.arange(9.0) + i, stamp_ns=i) for i in range(3)]
    msgs[1] = R.joint_state(JOINTS[::-1], np.arange(9.0)[::-1] + 1, stamp_ns=1)
    raws = [bytes(STORE.serialize_cdr(m, JS)) for m in msgs]
    stamps, out = topic.decode(raws, STORE.deserialize_cdr)
    rows, values = out['robot0_gripper_qpos']
    assert stamps.tolist() == [0, 1, 2] and rows.tolist() == [0, 1, 2]
    assert values.tolist() == [[7, 8], [8, 9], [9, 10]]
    assert len(topic.layouts) == 2 and topic.slow == 0


def test_arm_and_gripper_joint_states_published_apart_feed_their_own_features(tmp_path):
    b = Binding.from_dict({
        'observation': [
            {'feature': 'arm', 'topic': '/joint_states', 'type': JS, 'joints': ['j1', 'j2']},
            {'feature': 'grip', 'topic': '/joint_states', 'type': JS, 'joints': ['f']}],
        'action': [{'topic': '/cmd', 'type': F64, 'slice': [0, 1], 'stamp': 'arrival'}]})
    arm = R.joint_state(['j2', 'j1'], [2.0, 1.0], stamp_ns=5)
    grip = R.joint_state(['f'], [0.5], stamp_ns=5)
    assert set(b.read('/joint_states', arm)) == {'arm'}
    assert b.read('/joint_states', grip)['grip'].tolist() == [0.5]
    with pytest.raises(BindingMismatch, match="no joint 'j2'"):
        b.read('/joint_states', R.joint_state(['j1'], [0.0]))
    msgs = []
    for i in range(30):
        t = 10**9 + i * 10_000_000
        msgs.append(('/joint_states', JS, t, R.joint_state(['j2', 'j1'], [i, -i], stamp_ns=t)))
        msgs.append(('/joint_states', JS, t + 1, R.joint_state(['f'], [i / 10], stamp_ns=t)))
        msgs.append(('/cmd', F64, t + 2, R.array([float(i)])))
    bag = write_bag(tmp_path / 'bag', msgs, 'mcap')
    s = convert([bag], b, tmp_path / 'd.hdf5', rate_hz=100, show_progress=False)
    demo = load_dataset(tmp_path / 'd.hdf5').demos[0]
    i = np.arange(30)
    assert s.slow == 0 and len(demo) == 30
    assert np.allclose(demo.obs, np.stack([-i, i, i / 10], axis=1))


def test_fast_mcap_readers_return_what_rosbags_reads(tmp_path):
    """Chunks located through their message indexes, or walked record by record, give the
    messages rosbags' own reader gives, in the same order (several 1 MiB chunks here)."""
    from rosbags.highlevel import AnyReader
    names = [f'joint_{i}' for i in range(200)]
    msgs = []
    for i in range(500):
        msgs.append(('/joint_states', JS, 10**9 + 7 * i, R.joint_state(names, np.full(200, i))))
        if i % 3 == 0:
            msgs.append(('/cmd', F64, 10**9 + 7 * i + 3, R.array([float(i)])))
        if i % 50 == 0:
            msgs.append(('/other', STR, 10**9 + 7 * i + 1, R.string('x')))
    bag = write_bag(tmp_path / 'bag', msgs, 'mcap')

    def flat(batches):
        return [(int(k), int(t), bytes(r)) for ks, ts, rs in batches
                for k, t, r in zip(ks, ts, rs)]

    with AnyReader([bag]) as reader:
        kind_of = {'/cmd': 0, '/joint_states': 1}
        wanted = [c for c in reader.connections if c.topic in kind_of]
        ref = [(kind_of[c.topic], t, bytes(raw)) for c, t, raw in reader.messages(wanted)]
        storage = reader.readers[0].storage.storages[0]
        assert len(storage.chunks) >= 2 and all(c.message_index_offsets
                                                for c in storage.chunks)
        assert flat(message_batches(reader, kind_of)) == ref
        storage.chunks[:] = [c._replace(message_index_offsets={}) for c in storage.chunks]
        assert flat(_mcap_batches(storage, kind_of)) == ref


# -- the resampler ----------------------------------------------------------------------------
stream_times = st.lists(st.integers(0, 400), min_size=1, max_size=30).map(sorted)


@settings(max_examples=120, deadline=None)
@given(times=st.lists(stream_times, min_size=1, max_size=3),
       ages=st.lists(st.integers(1, 60), min_size=3, max_size=3), period=st.integers(1, 40),
       cuts=st.lists(st.integers(0, 30), max_size=6), end=st.integers(0, 450),
       lateness=st.sampled_from([10, 10**6]))
def test_resampler_never_uses_a_future_message_and_honours_max_age(times, ages, period, cuts,
                                                                   end, lateness):
    keys = [f's{i}' for i in range(len(times))]
    r = Resampler({k: (1, ages[i]) for i, k in enumerate(keys)}, period, 0, lateness)
    out = []
    bounds = sorted(set(cuts))
    for a, b in zip([0] + bounds, bounds + [None]):     # push in chunks, advancing between
        for k, t in zip(keys, times):
            part = np.asarray(t[a:b], dtype=np.int64)
            r.push(k, part, part[:, None].astype(float))
        out.append(r.advance())
    out.append(r.finish(end))
    ticks = [x for x in out if x is not None]
    if not ticks:
        return
    all_ticks = np.concatenate([x.ticks for x in ticks])
    t0 = max(t[0] for t in times)
    assert np.array_equal(all_ticks, t0 + period * np.arange(all_ticks.size))
    assert all_ticks[-1] < max(end, max(max(t) for t in times) + 1)
    for i, k in enumerate(keys):
        msg_t = np.asarray(times[i])
        used = np.concatenate([x.times[k] for x in ticks])
        fresh = np.concatenate([x.fresh[k] for x in ticks])
        vals = np.concatenate([x.values[k][:, 0] for x in ticks])
        assert (used <= all_ticks).all()                       # never a future message
        assert np.array_equal(vals, used)                      # values travel with their time
        assert np.array_equal(fresh, all_ticks - used <= ages[i])   # max age honoured
        if r.late == 0:                                        # and it is the latest one
            latest = msg_t[np.searchsorted(msg_t, all_ticks, side='right') - 1]
            assert np.array_equal(used, latest)


def test_a_silent_stream_does_not_hold_the_others_in_memory():
    r = Resampler({'fast': (1, 5), 'silent': (1, 5)}, 10, 0, 100)
    r.push('silent', np.array([0]), np.zeros((1, 1)))
    emitted = 0
    for c in range(100):
        t = np.arange(c * 100, (c + 1) * 100, dtype=np.int64)
        r.push('fast', t, t[:, None].astype(float))
        ticks = r.advance()
        emitted += 0 if ticks is None else ticks.ticks.size
        assert r.t['fast'].size <= 250
    assert emitted >= 980 and r.late == 0


def test_resampler_rejects_times_that_go_back():
    r = Resampler({'a': (1, 5)}, 10, 0, 100)
    r.push('a', np.array([5, 6]), np.zeros((2, 1)))
    with pytest.raises(ValueError, match='times go back'):
        r.push('a', np.array([4]), np.zeros((1, 1)))


# -- bad input --------------------------------------------------------------------------------
def _cli(tmp_path, bag, binding_yaml=None, *extra):
    binding = binding_yaml or Path(__file__).parents[1] / 'config' / 'bindings' / 'lift_carry.yaml'
    out = tmp_path / 'bad.hdf5'
    rc = main(['bag2dataset', str(bag), '--binding', str(binding), '--out', str(out),
               '--quiet', *extra])
    return rc, out


def _one_line_error(capsys, rc, out, *fragments):
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists(), err
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
    for f in fragments:
        assert f in err, err
    assert not list(out.parent.glob(f'.{out.name}.tmp*'))


def _ns(msg) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


def _edited(msgs, topic, fn):
    return [(t, k, ns, fn(m) if t == topic else m) for t, k, ns, m in msgs]


def test_a_topic_missing_from_the_bag_is_named(tmp_path, capsys):
    msgs = [m for m in _lift_carry_messages(1) if m[0] != '/goals/left/pose']
    rc, out = _cli(tmp_path, write_bag(tmp_path / 'bag', msgs, 'mcap'))
    _one_line_error(capsys, rc, out, 'topic /goals/left/pose (goal_left_pos) is not in the bag')


def test_a_joint_missing_from_the_bag_is_named(tmp_path, capsys):
    msgs = _edited(_lift_carry_messages(1), '/joint_states', lambda m: R.joint_state(
        JOINTS[:-1], m.position[:-1], stamp_ns=_ns(m)))
    rc, out = _cli(tmp_path, write_bag(tmp_path / 'bag', msgs, 'mcap'))
    _one_line_error(capsys, rc, out, "/joint_states: no joint 'gripper0_right_finger_joint2'")


def test_a_message_type_other_than_the_bindings_is_named(tmp_path, capsys):
    msgs = [(t, F64, ns, R.array([0.0, 1.0, 2.0])) if t == '/eef_pose' else (t, k, ns, m)
            for t, k, ns, m in _lift_carry_messages(1)]
    rc, out = _cli(tmp_path, write_bag(tmp_path / 'bag', msgs, 'sqlite3'))
    _one_line_error(capsys, rc, out, '/eef_pose is std_msgs/msg/Float64MultiArray in the bag, '
                                     'the binding says geometry_msgs/msg/PoseStamped')


def test_a_frame_other_than_the_bindings_is_named(tmp_path, capsys):
    msgs = _edited(_lift_carry_messages(1), '/objects/cube/pose', lambda m: R.pose(
        [0, 0, 0], stamp_ns=_ns(m), frame_id='camera'))
    rc, out = _cli(tmp_path, write_bag(tmp_path / 'bag', msgs, 'mcap'))
    _one_line_error(capsys, rc, out, "/objects/cube/pose: frame_id 'camera', the binding "
                                     "expects 'world'")


@pytest.mark.parametrize('what, shift', [('duplicate', 0), ('out-of-order', -P // 2)])
def test_duplicate_and_out_of_order_stamps_are_named(tmp_path, capsys, what, shift):
    msgs = _lift_carry_messages(1)
    idx = [i for i, m in enumerate(msgs) if m[0] == '/eef_pose']
    t, k, ns, _ = msgs[idx[6]]
    # step 6 stamped like step 5, or between steps 4 and 5
    msgs[idx[6]] = (t, k, ns, R.pose([0, 0, 0], stamp_ns=_ns(msgs[idx[5]][3]) + shift))
    rc, out = _cli(tmp_path, write_bag(tmp_path / 'bag', msgs, 'mcap'))
    _one_line_error(capsys, rc, out, f'/eef_pose: {what} header stamp')


@pytest.mark.parametrize('storage, compress, damage', [
    ('mcap', False, 'truncate'), ('mcap', False, 'garbage'), ('sqlite3', False, 'truncate'),
    ('sqlite3', False, 'garbage'), ('mcap', True, 'truncate'), ('sqlite3', True, 'garbage')])
def test_a_corrupt_or_truncated_bag_is_one_line_and_no_file(tmp_path, capsys, storage,
                                                            compress, damage):
    bag = write_bag(tmp_path / 'bag', _lift_carry_messages(3), storage, compress)
    (data,) = [p for p in bag.iterdir() if p.name != 'metadata.yaml']
    raw = data.read_bytes()
    if damage == 'truncate':
        data.write_bytes(raw[:len(raw) * 2 // 3])
    else:
        mid = len(raw) // 2
        data.write_bytes(raw[:mid] + bytes(range(256)) * 8 + raw[mid + 2048:])
    rc, out = _cli(tmp_path, bag)
    _one_line_error(capsys, rc, out, str(bag))


def test_missing_bag_and_rate_are_one_line(tmp_path, capsys):
    rc, out = _cli(tmp_path, tmp_path / 'nope')
    _one_line_error(capsys, rc, out, 'no such bag')
    b = tmp_path / 'b.yaml'
    b.write_text(json.dumps({'observation': [{'feature': 'a', 'topic': '/a', 'type': F64,
                                              'slice': [0, 1]}],
                             'action': [{'topic': '/c', 'type': F64, 'slice': [0, 1]}]}))
    bag = write_bag(tmp_path / 'bag2', [('/a', F64, 1, R.array([1.0])),
                                        ('/c', F64, 2, R.array([1.0]))], 'mcap')
    rc, out = _cli(tmp_path, bag, b)
    _one_line_error(capsys, rc, out, '--rate')


def test_the_stored_binding_is_kept_in_the_file(tmp_path, lift):
    bag = write_bag(tmp_path / 'bag', _lift_carry_messages(1, fail=()), 'mcap')
    convert([bag], lift, tmp_path / 'd.hdf5', show_progress=False)
    with h5py.File(tmp_path / 'd.hdf5') as f:
        stored = json.loads(f['data'].attrs['binding'])
    assert Binding.from_dict(stored) == lift
    shutil.rmtree(bag)


def test_streams_on_different_clocks_fail_with_the_stale_feature_named(tmp_path, capsys):
    """Header stamps from a clock that started at 0, commands timed by the recorder's wall
    clock: every tick is stale, and the error says which feature."""
    msgs = []
    for i in range(50):
        t = 1_700_000_000 * 10**9 + i * 10**7
        msgs.append(('/a', JS, t, R.joint_state(['j'], [1.0], stamp_ns=i * 10**7)))
        msgs.append(('/c', F64, t + 1, R.array([1.0])))
    binding = tmp_path / 'b.yaml'
    binding.write_text('observation: [{feature: q, topic: /a, type: sensor_msgs/JointState, '
                       'joints: [j], max_age_s: 0.1}]\n'
                       'action: [{topic: /c, type: std_msgs/Float64MultiArray, '
                       'slice: [0, 1]}]\n')
    rc, out = _cli(tmp_path, write_bag(tmp_path / 'bag', msgs, 'mcap'), binding, '--rate', '10')
    _one_line_error(capsys, rc, out, 'no demonstration survived', 'most stale: q')
