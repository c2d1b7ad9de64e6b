"""Camera datasets: images stored as robomimic stores them (uint8, a chunk per frame,
compressed), next_obs a view of the same frames, read lazily; one clear error for a missing
camera or a wrong image layout."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from vdd_ros.core.data import Demo, FrameRef, load_dataset, write_dataset
from vdd_ros.core.fields import join_cameras, split_cameras
from vdd_ros.errors import UserError

SIDE = 12
FIELDS = [('eef', 3), ('agentview_image', SIDE * SIDE * 3), ('grip', 2)]


def _demos(n: int = 3, steps: int = 5) -> list[Demo]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        flat = np.concatenate([rng.normal(size=(steps + i, 3)),
                               rng.integers(0, 256, (steps + i, SIDE * SIDE * 3)),
                               rng.normal(size=(steps + i, 2))], axis=1).astype(np.float32)
        low, frames = split_cameras(flat, FIELDS)
        out.append(Demo(obs=low, actions=rng.normal(size=(steps + i, 4)).astype(np.float32),
                        frames=frames))
    return out


def test_split_and_join_are_inverse() -> None:
    rng = np.random.default_rng(1)
    flat = np.concatenate([rng.normal(size=(4, 3)), rng.integers(0, 256, (4, SIDE * SIDE * 3)),
                           rng.normal(size=(4, 2))], axis=1).astype(np.float32)
    low, frames = split_cameras(flat, FIELDS)
    assert low.shape == (4, 5) and frames['agentview_image'].shape == (4, SIDE, SIDE, 3)
    assert frames['agentview_image'].dtype == np.uint8
    assert np.array_equal(join_cameras(low, frames, FIELDS), flat)


def test_camera_round_trip_is_lazy_and_next_obs_is_a_view(tmp_path: Path) -> None:
    demos = _demos()
    path = tmp_path / 'cams.hdf5'
    write_dataset(path, demos, FIELDS, {'env_name': 'Stack'}, valid_fraction=0.0)
    with h5py.File(path) as f:
        node = f['data/demo_1/obs/agentview_image']
        assert node.dtype == np.uint8 and node.chunks == (1, SIDE, SIDE, 3)
        assert node.compression == 'gzip'
        nxt = f['data/demo_1/next_obs/agentview_image']
        assert nxt.is_virtual
        assert np.array_equal(nxt[:-1], node[1:]) and np.array_equal(nxt[-1], node[-1])
    data = load_dataset(path)
    assert data.obs_fields == FIELDS and data.cameras == ['agentview_image']
    for written, read in zip(demos, data.demos):
        ref = read.frames['agentview_image']
        assert isinstance(ref, FrameRef) and ref.shape == written.frames['agentview_image'].shape
        assert np.array_equal(read.obs, written.obs)
        picked = ref[[3, 0, 3]]           # any order, repeats allowed
        assert np.array_equal(picked, written.frames['agentview_image'][[3, 0, 3]])
    FrameRef.close_all()


def test_a_missing_camera_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / 'cams.hdf5'
    write_dataset(path, _demos(), FIELDS, {}, valid_fraction=0.0)
    with pytest.raises(UserError, match=r"demo_0 has no obs key 'wrist_image' \(available: "
                                        r'agentview_image, eef, grip\)'):
        load_dataset(path, ['eef', 'wrist_image'])


@pytest.mark.parametrize('data, match', [
    (np.zeros((5, 12, 12, 3), np.float32), 'expected uint8 RGB images'),
    (np.zeros((5, 12, 12), np.uint8), 'expected uint8 RGB images'),
    (np.zeros((5, 12, 10, 3), np.uint8), '12x10 images; square images'),
    (np.zeros((4, 12, 12, 3), np.uint8), 'has 4 frames, actions have 5 steps'),
])
def test_wrong_image_layouts_are_one_error(tmp_path: Path, data, match) -> None:
    path = tmp_path / 'cams.hdf5'
    write_dataset(path, _demos(1), FIELDS, {}, valid_fraction=0.0)
    with h5py.File(path, 'a') as f:
        del f['data/demo_0/obs/agentview_image']
        f['data/demo_0/obs/agentview_image'] = data
    with pytest.raises(UserError, match=f'demo_0/obs/agentview_image:? .*{match}'):
        load_dataset(path)


def test_write_checks_frames_against_the_fields(tmp_path: Path) -> None:
    demos = _demos(1)
    demos[0].frames['agentview_image'] = demos[0].frames['agentview_image'][:, :8]
    with pytest.raises(ValueError, match="frames 'agentview_image' of shape"):
        write_dataset(tmp_path / 'x.hdf5', demos, FIELDS, {})
