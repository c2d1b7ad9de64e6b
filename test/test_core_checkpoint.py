"""Checkpoint round trips, the one loader, file modes, training curves, config errors."""
import json
import os
import stat

import numpy as np
import pytest
import torch
import yaml

from vdd_ros.core.checkpoint import (CURVE_POINTS, load_model, load_policy, read_training,
                                     save_checkpoint, tail_mean)
from vdd_ros.core.config import (ConfigError, MoEConfig, TeacherConfig, TrainConfig, from_dict,
                                 load_config)
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.policy import PolicySpec
from vdd_ros.core.teacher import DiffusionTeacher
from vdd_ros.errors import UserError

SPEC = PolicySpec(obs_fields=[('eef_pos', 3), ('cube_pos', 3)], action_dim=2, obs_horizon=2,
                  action_horizon=3, action_exec=2, task='lift_carry')


def models():
    torch.manual_seed(0)
    moe = MixtureOfExperts(MoEConfig(num_experts=3, hidden_dim=32, num_layers=2), 6, 2, 2, 3)
    teacher = DiffusionTeacher(TeacherConfig(hidden_dim=32, num_layers=2, sampling_steps=3),
                               6, 2, 2, 3)
    for m in (moe, teacher):
        m.obs_normalizer.fit(torch.randn(100, 6) * 3 + 1, 'standard')
        m.action_normalizer.fit(torch.rand(100, 2) * 4, 'minmax')
    return {'vdd_moe': moe, 'teacher': teacher}


def rollout(policy, seed=0):
    policy.reset(seed=seed)
    rng = np.random.default_rng(1)
    return np.stack([policy.act(rng.standard_normal(6).astype(np.float32)) for _ in range(6)])


@pytest.mark.parametrize('method', ['vdd_moe', 'teacher'])
def test_round_trip_gives_identical_actions(tmp_path, method):
    model = models()[method]
    path = save_checkpoint(tmp_path / method, model, SPEC, method, {'seed': 0})
    assert sorted(p.name for p in path.iterdir()) == ['config.yaml', 'model.safetensors',
                                                      'normalizer.safetensors']
    meta = yaml.safe_load((path / 'config.yaml').read_text())
    assert meta['method'] == method and meta['spec']['task'] == 'lift_carry'
    from vdd_ros.core.policy import ModelPolicy
    before = rollout(ModelPolicy(model, SPEC))
    policy = load_policy(path)
    assert policy.spec == SPEC
    assert np.array_equal(rollout(policy), before)
    loaded, _, _ = load_model(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_checkpoint_from_before_independent_experts_loads_as_shared(tmp_path):
    """config.yaml written before `moe.experts` existed: the shared-backbone model, with the
    same weights and actions (not the new default, whose weights would not fit)."""
    torch.manual_seed(0)
    model = MixtureOfExperts(MoEConfig(num_experts=3, hidden_dim=32, num_layers=2,
                                       experts='shared'), 6, 2, 2, 3)
    model.obs_normalizer.fit(torch.randn(100, 6) * 3 + 1, 'standard')
    path = save_checkpoint(tmp_path / 'old', model, SPEC, 'vdd_moe')
    meta = yaml.safe_load((path / 'config.yaml').read_text())
    assert meta['model'].pop('experts') == 'shared'
    (path / 'config.yaml').write_text(yaml.safe_dump(meta, sort_keys=False))
    loaded, _, _ = load_model(path)
    assert loaded.cfg.experts == 'shared' and not loaded.independent
    assert loaded.state_dict().keys() == model.state_dict().keys()
    from vdd_ros.core.policy import ModelPolicy
    assert np.array_equal(rollout(load_policy(path)), rollout(ModelPolicy(model, SPEC)))
    # a new checkpoint says which architecture it has
    new = save_checkpoint(tmp_path / 'new', models()['vdd_moe'], SPEC, 'vdd_moe')
    assert yaml.safe_load((new / 'config.yaml').read_text())['model']['experts'] == \
        'independent'
    assert load_model(new)[0].independent


def test_saving_again_replaces_atomically(tmp_path):
    model = models()['vdd_moe']
    save_checkpoint(tmp_path / 'ckpt', model, SPEC, 'vdd_moe')
    with torch.no_grad():
        model.mean_head.bias.add_(1.0)
    save_checkpoint(tmp_path / 'ckpt', model, SPEC, 'vdd_moe')
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt']      # no temporary left behind
    loaded, _, _ = load_model(tmp_path / 'ckpt')
    assert torch.equal(loaded.mean_head.bias, model.mean_head.bias)


def test_loader_options_and_errors(tmp_path):
    path = save_checkpoint(tmp_path / 'moe', models()['vdd_moe'], SPEC, 'vdd_moe')
    assert load_policy(path, expert_mode='argmax').model.expert_mode == 'argmax'
    assert load_policy(path, expert_mode='2').model.expert_mode == 2
    with pytest.raises(ConfigError, match='pinned expert 5 out of range'):
        load_policy(path, expert_mode=5)
    with pytest.raises(UserError, match='steps applies to teacher'):
        load_policy(path, steps=2)
    tpath = save_checkpoint(tmp_path / 't', models()['teacher'], SPEC, 'teacher')
    assert load_policy(tpath, steps=1).model.sampling_steps == 1
    with pytest.raises(UserError, match='checkpoint folder not found'):
        load_policy(tmp_path / 'missing')
    (path / 'model.safetensors').write_bytes(b'not safetensors')
    with pytest.raises(UserError, match='model.safetensors: cannot read weights'):
        load_policy(path)
    meta = yaml.safe_load((tpath / 'config.yaml').read_text())
    meta['model']['hidden_dim'] = 64
    (tpath / 'config.yaml').write_text(yaml.safe_dump(meta))
    with pytest.raises(UserError, match='weights do not match the config'):
        load_policy(tpath)
    meta['model']['hidden_dim'] = -1
    (tpath / 'config.yaml').write_text(yaml.safe_dump(meta))
    with pytest.raises(ConfigError, match=r'config.yaml \(model\): hidden_dim: must be >= 1'):
        load_policy(tpath)


def test_config_errors_name_the_field_and_the_file(tmp_path):
    f = tmp_path / 'train.yaml'
    f.write_text('vdd:\n  batch_sise: 12\n')
    with pytest.raises(ConfigError, match=r'train.yaml: vdd.batch_sise: unknown key'):
        load_config(TrainConfig, f)
    f.write_text('vdd:\n  batch_size: 0\n')
    with pytest.raises(ConfigError, match=r'train.yaml: vdd.batch_size: must be >= 1, got 0'):
        load_config(TrainConfig, f)
    f.write_text('moe:\n  covariance: spherical\n')
    with pytest.raises(ConfigError, match=r"moe.covariance: must be one of \['diag', 'full'\]"):
        load_config(TrainConfig, f)
    f.write_text('moe:\n  experts: separate\n')
    with pytest.raises(ConfigError, match=r"train.yaml: moe.experts: must be one of "
                       r"\['independent', 'shared'\], got 'separate'"):
        load_config(TrainConfig, f)
    f.write_text('teacher:\n  lr: fast\n')
    with pytest.raises(ConfigError, match=r"teacher.lr: expected a number, got 'fast'"):
        load_config(TrainConfig, f)
    f.write_text('action_exec: 9\n')
    with pytest.raises(ConfigError, match='action_exec: must be <= action_horizon'):
        load_config(TrainConfig, f)
    f.write_text('[1, 2]\n')
    with pytest.raises(ConfigError, match='expected a mapping at the top level'):
        load_config(TrainConfig, f)
    with pytest.raises(ConfigError, match='nope.yaml: config file not found'):
        load_config(TrainConfig, tmp_path / 'nope.yaml')
    assert from_dict(TrainConfig, {'vdd': {'iterations': 7}}).vdd.iterations == 7


def test_shipped_default_config_matches_the_dataclass_defaults():
    from pathlib import Path
    shipped = Path(__file__).resolve().parents[1] / 'config' / 'train.yaml'
    assert load_config(TrainConfig, shipped) == TrainConfig()


@pytest.mark.parametrize('umask', [0o022, 0o027])
def test_every_file_is_written_with_the_normal_umask(tmp_path, umask):
    from vdd_ros.core.io import write_json
    previous = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / 'ckpt', models()['vdd_moe'], SPEC, 'vdd_moe',
                               metrics={'iterations': 2}, curves={'loss_history': [[0, 1.0],
                                                                                  [1, 0.5]]})
        write_json(tmp_path / 'm.json', {'a': 1})
    finally:
        os.umask(previous)
    files = sorted(path.iterdir()) + [tmp_path / 'm.json']
    assert [p.name for p in files] == ['config.yaml', 'curves.json', 'model.safetensors',
                                       'normalizer.safetensors', 'm.json']
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask


def test_training_curves_stay_out_of_the_config(tmp_path):
    history = [(i, 1.0 / (1 + i)) for i in range(170_000)]
    metrics = {'iterations': len(history), 'final_loss': tail_mean(history)}
    path = save_checkpoint(tmp_path / 'big', models()['vdd_moe'], SPEC, 'vdd_moe',
                           metrics=metrics, curves={'loss_history': history})
    assert (path / 'config.yaml').stat().st_size < 4000
    meta = yaml.safe_load((path / 'config.yaml').read_text())
    assert meta['metrics'] == metrics
    curve = json.loads((path / 'curves.json').read_text())['loss_history']
    assert len(curve) == CURVE_POINTS and curve[-1][0] == 169_999
    assert curve[0][1] == pytest.approx(np.mean([v for _, v in history[:85]]))
    training = read_training(path)
    assert training['iterations'] == 170_000
    assert training['final_loss'] == pytest.approx(tail_mean(history))
    assert training['loss_history'] == curve
    # a checkpoint that kept the whole history in config.yaml still loads and reads
    old = save_checkpoint(tmp_path / 'old', models()['teacher'], SPEC, 'teacher',
                          metrics={'loss_history': [[i, 2.0 - i / 10] for i in range(10)]})
    assert not (old / 'curves.json').exists()
    assert load_policy(old).meta['metrics']['loss_history'][3] == [3, 1.7]
    training = read_training(old)
    assert training['iterations'] == 10 and training['loss_history'][-1] == [9, 1.1]
    assert training['final_loss'] == pytest.approx(1.1)
    # no curves at all: zero iterations, no history
    bare = save_checkpoint(tmp_path / 'bare', models()['teacher'], SPEC, 'teacher')
    assert read_training(bare)['iterations'] == 0 and read_training(bare)['loss_history'] == []
    (path / 'curves.json').write_text('{"loss_history": [[1, "x"')
    with pytest.raises(UserError, match='curves.json: not readable JSON'):
        read_training(path)
