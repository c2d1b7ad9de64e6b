"""Camera observations through training: the windows assembled per batch equal the in-memory
windows, and a teacher, its VDD-MoE (on the teacher's frozen encoder, or on its own) and
Gaussian BC (its own encoder) learn an action that only the image shows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vdd_ros.core.checkpoint import load_model, load_policy, read_meta
from vdd_ros.core.data import Demo, FrameRef, load_dataset, make_windows, write_dataset
from vdd_ros.core.fields import join_cameras
from vdd_ros.core.jobs import baseline_job, distill_job, prepare_data, train_teacher_job
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.config import MoEConfig, VisionConfig
from vdd_ros.core.windows import CameraWindows

SIDE = 16
FIELDS = [('eef', 2), ('front_image', SIDE * SIDE * 3)]


def _image(left: bool, rng: np.random.Generator) -> np.ndarray:
    """A grey image with a bright square on the left or the right half."""
    img = rng.integers(60, 90, (SIDE, SIDE, 3)).astype(np.uint8)
    col = rng.integers(1, 5) if left else rng.integers(SIDE // 2 + 1, SIDE - 5)
    row = rng.integers(2, SIDE - 6)
    img[row:row + 4, col:col + 4] = 250
    return img


def _dataset(path: Path, demos: int = 24, steps: int = 6) -> Path:
    """The action's first entry is -1 when the square is on the left and +1 on the right;
    the low-dimensional field is noise."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(demos):
        left = bool(i % 2)
        frames = np.stack([_image(left, rng) for _ in range(steps)])
        actions = np.zeros((steps, 2), np.float32)
        actions[:, 0] = -1.0 if left else 1.0
        actions[:, 1] = rng.normal(0, 0.05, steps)
        out.append(Demo(obs=rng.normal(size=(steps, 2)).astype(np.float32), actions=actions,
                        frames={'front_image': frames}))
    write_dataset(path, out, FIELDS, {'env_name': 'none'}, valid_fraction=0.1)
    return path


def test_camera_windows_equal_the_in_memory_windows(tmp_path: Path) -> None:
    path = _dataset(tmp_path / 'cams.hdf5', demos=4, steps=5)
    data = load_dataset(path)
    low, _ = make_windows(data.demos, 3, 1)
    windows = CameraWindows(data.demos, FIELDS, 3, torch.as_tensor(low))
    full = [Demo(obs=join_cameras(d.obs, {'front_image': np.asarray(d.frames['front_image'])
                                          .astype(np.float32) / 255.0}, FIELDS),
                 actions=d.actions) for d in data.demos]
    expected, _ = make_windows(full, 3, 1)
    idx = torch.tensor([0, 7, 7, 19, 3])
    assert windows.shape == (len(expected), 3 * (2 + SIDE * SIDE * 3))
    assert torch.allclose(windows[idx], torch.as_tensor(expected[idx.numpy()]).reshape(5, -1))
    # a cache smaller than one demo's frames keeps only the latest, and reads again
    small = CameraWindows(data.demos, FIELDS, 3, torch.as_tensor(low), cache_bytes=1)
    for rows in (idx, torch.arange(len(expected)).flip(0)):
        assert torch.allclose(small[rows], torch.as_tensor(expected[rows.numpy()])
                              .reshape(len(rows), -1))
        assert len(small.cache) == 1
    assert len(windows.cache) == len({int(d) for d in windows.demo[idx.numpy()].ravel()})
    FrameRef.close_all()


def test_normalizer_scales_pixels_and_standardises_the_rest(tmp_path: Path) -> None:
    path = _dataset(tmp_path / 'cams.hdf5', demos=4)
    moe = MixtureOfExperts(MoEConfig(num_experts=2, hidden_dim=16, num_layers=1), 2 + 768, 2,
                           2, 1, fields=FIELDS, vision=VisionConfig(feature_dim=8))
    from vdd_ros.core.config import TrainConfig
    data = prepare_data(path, TrainConfig(obs_horizon=2, action_horizon=1, action_exec=1), moe)
    norm = moe.obs_normalizer
    assert torch.all(norm.offset[2:] == 0) and torch.all(norm.scale[2:] == 255)
    assert torch.all(norm.scale[:2] != 1) and isinstance(data.obs, CameraWindows)
    batch = data.obs[torch.arange(len(data.obs))]
    pixels = batch.reshape(len(batch), 2, -1)[:, :, 2:]
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.max() > 0.9
    low = batch.reshape(len(batch), 2, -1)[:, -1, :2]
    assert torch.allclose(low.mean(0), torch.zeros(2), atol=0.05)
    FrameRef.close_all()


@pytest.mark.timeout(600)
def test_policies_learn_what_only_the_camera_shows(tmp_path: Path) -> None:
    path = _dataset(tmp_path / 'cams.hdf5')
    ov = {'obs_horizon': 1, 'action_horizon': 1, 'action_exec': 1,
          'teacher.iterations': 400, 'teacher.batch_size': 32, 'teacher.hidden_dim': 64,
          'teacher.num_layers': 2, 'vision.keypoints': 8, 'vision.feature_dim': 16,
          'vision.shift': 2, 'moe.num_experts': 2, 'moe.hidden_dim': 32, 'moe.num_layers': 2,
          'vdd.iterations': 150, 'vdd.init_em_iterations': 100, 'vdd.batch_size': 32,
          'gaussian_bc.iterations': 400, 'gaussian_bc.batch_size': 32}
    teacher = train_teacher_job(path, tmp_path / 'teacher', overrides=ov, show_bar=False)
    moe = distill_job(teacher, path, tmp_path / 'moe', overrides=ov, show_bar=False)
    own = distill_job(teacher, path, tmp_path / 'own', show_bar=False,
                      overrides={**ov, 'vision.moe_encoder': 'own'})
    bc = baseline_job('gaussian_bc', path, tmp_path / 'bc', overrides=ov, show_bar=False)
    meta = read_meta(teacher)
    assert meta['vision']['feature_dim'] == 16 and meta['spec']['obs_fields'][1] == \
        ['front_image', SIDE * SIDE * 3]
    t_model, _, _ = load_model(teacher)
    m_model, _, _ = load_model(moe)
    for a, b in zip(t_model.encoder.parameters(), m_model.encoder.parameters()):
        assert torch.equal(a, b)          # the MoE acts on the teacher's encoder, unchanged
    # with moe_encoder own, the MoE trains encoders of its own (same architecture)
    o_model, _, _ = load_model(own)
    assert read_meta(own)['vision']['moe_encoder'] == 'own'
    assert not any(torch.equal(a, b) for a, b in zip(t_model.encoder.parameters(),
                                                     o_model.encoder.parameters()))
    rng = np.random.default_rng(7)
    for name, ckpt in (('teacher', teacher), ('vdd_moe', moe), ('vdd_moe_own', own),
                       ('gaussian_bc', bc)):
        policy = load_policy(ckpt)
        right = 0
        for k in range(20):
            left = bool(k % 2)
            obs = np.concatenate([rng.normal(size=2), _image(left, rng).reshape(-1)])
            policy.reset(k)
            action = policy.act(obs.astype(np.float32))
            right += (action[0] < 0) == left
        assert right >= 18, (name, right)
    FrameRef.close_all()


def test_onnx_export_refuses_camera_policies(tmp_path: Path) -> None:
    from vdd_ros.core.checkpoint import save_checkpoint
    from vdd_ros.core.onnx_export import export_checkpoint
    from vdd_ros.core.policy import PolicySpec
    from vdd_ros.errors import UserError
    moe = MixtureOfExperts(MoEConfig(num_experts=2, hidden_dim=16, num_layers=1), 2 + 768, 2,
                           1, 1, fields=FIELDS, vision=VisionConfig(feature_dim=8))
    ckpt = save_checkpoint(tmp_path / 'moe', moe, PolicySpec(FIELDS, 2), 'vdd')
    with pytest.raises(UserError, match=r'a camera policy \(front_image\); ONNX export '
                                        'covers state policies only'):
        export_checkpoint(ckpt, tmp_path / "moe.onnx")


def test_loader_bench_measures_the_camera_windows(tmp_path: Path, capsys) -> None:
    from vdd_ros.cli import main
    path = _dataset(tmp_path / 'cams.hdf5', demos=6)
    out = tmp_path / 'loader.json'
    assert main(['bench', '--loader', str(path), '--batch', '8', '--json', str(out)]) == 0
    import json
    r = json.loads(out.read_text())
    assert r['windows'] == 30 and r['cameras'] == ['front_image'] and r['batch'] == 8
    assert r['loader_samples_per_s'] > 0 and r['train_samples_per_s'] > 0
    assert 0 < r['loader_share'] < 1 and 'samples/s' in capsys.readouterr().out
    state = tmp_path / 'state.hdf5'
    write_dataset(state, [Demo(obs=np.zeros((4, 2), np.float32),
                               actions=np.zeros((4, 2), np.float32))], [('eef', 2)], {})
    assert main(['bench', '--loader', str(state), '--json', str(out)]) == 2
    assert 'no camera fields' in capsys.readouterr().err
    FrameRef.close_all()


def test_a_camera_policy_has_its_encoders_timed_alone(tmp_path: Path) -> None:
    from vdd_ros.core.policy import ModelPolicy, PolicySpec
    from vdd_ros.pipeline.media import query_latencies
    path = _dataset(tmp_path / 'cams.hdf5', demos=4)
    moe = MixtureOfExperts(MoEConfig(num_experts=2, hidden_dim=16, num_layers=1), 2 + 768, 2,
                           2, 1, fields=FIELDS, vision=VisionConfig(feature_dim=8))
    state = MixtureOfExperts(MoEConfig(num_experts=2, hidden_dim=16, num_layers=1), 2, 2, 2, 1)
    policies = {'camera': ModelPolicy(moe, PolicySpec(FIELDS, 2, obs_horizon=2)),
                'state': ModelPolicy(state, PolicySpec(FIELDS[:1], 2, obs_horizon=2))}
    out = query_latencies(policies, path, queries=20, rounds=2, warmup=2)
    # a query encodes the window, then runs the gating and one expert: more than the encoder
    assert 0 < out['camera']['encoder_ms_p50'] < out['camera']['query_ms_p50']
    assert 'encoder_ms_p50' not in out['state'] and out['state']['query_count'] == 20
    FrameRef.close_all()
