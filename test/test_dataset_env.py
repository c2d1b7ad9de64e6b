"""Episodes in the robosuite environment a dataset was recorded in (sim/robosuite_env.py,
`vdd-ros evaluate --dataset-env`)."""
import numpy as np
import pytest

from vdd_ros.cli import main
from vdd_ros.core.data import Demo, write_dataset
from vdd_ros.errors import UserError
from vdd_ros.sim.robosuite_env import DatasetEnv, check_env_args, controller_config
from vdd_ros.sim.rollout import dataset_env, evaluate

LIFT_KEYS = ['robot0_eef_pos', 'robot0_eef_quat', 'robot0_gripper_qpos', 'object']
OLD_OSC = {'type': 'OSC_POSE', 'input_max': 1, 'input_min': -1,
           'output_max': [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
           'output_min': [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5], 'kp': 150,
           'damping_ratio': 1, 'impedance_mode': 'fixed', 'kp_limits': [0, 300],
           'damping_ratio_limits': [0, 10], 'position_limits': None,
           'orientation_limits': None, 'uncouple_pos_ori': True, 'control_delta': True,
           'interpolation': None, 'ramp_ratio': 0.2}
LIFT = {'env_name': 'Lift', 'type': 1,
        'env_kwargs': {'robots': 'Panda', 'controller_configs': OLD_OSC, 'control_freq': 20,
                       'reward_shaping': False, 'use_object_obs': True}}


@pytest.fixture(scope='module')
def lift_dataset(tmp_path_factory):
    """Four short random-action episodes of plain robosuite Lift in the robomimic layout."""
    path = tmp_path_factory.mktemp('lift') / 'lift.hdf5'
    rng = np.random.default_rng(0)
    demos = []
    with DatasetEnv(LIFT, LIFT_KEYS, horizon=12) as env:
        for seed in range(4):
            obs = [env.reset(seed)]
            actions = rng.uniform(-1, 1, size=(12, 7)).astype(np.float32)
            for a in actions[:-1]:
                obs.append(env.step(a)[0])
            demos.append(Demo(obs=np.stack(obs), actions=actions))
        fields = env.obs_fields
    write_dataset(path, demos, fields, LIFT, valid_fraction=0.25)
    return path, fields


def test_an_old_osc_config_maps_exactly_and_others_are_refused():
    cfg = controller_config(OLD_OSC, 'Panda', 'f.hdf5')
    arm = cfg['body_parts']['right']
    assert arm['type'] == 'OSC_POSE' and arm['input_type'] == 'delta'
    assert arm['input_ref_frame'] == 'world' and 'control_delta' not in arm
    assert arm['kp'] == 150 and arm['gripper'] == {'type': 'GRIP'}
    absolute = controller_config({**OLD_OSC, 'control_delta': False}, 'Panda', 'f.hdf5')
    assert absolute['body_parts']['right']['input_type'] == 'absolute'
    with pytest.raises(UserError, match="f.hdf5: controller_configs: type 'IK_POSE' from "
                                        'robosuite <= 1.4 has no exact'):
        controller_config({**OLD_OSC, 'type': 'IK_POSE'}, 'Panda', 'f.hdf5')
    composite = controller_config(cfg, 'Panda', 'f.hdf5')
    assert composite == cfg and composite is not cfg


@pytest.mark.parametrize('env_args, problem', [
    ({}, 'no env_args with an env_name'),
    ({'env_name': 'Lfit', 'type': 1}, "has no environment 'Lfit'"),
    ({'env_name': 'TwoArmLift', 'type': 1}, 'two-arm environment'),
    ({'env_name': 'Lift', 'type': 2}, 'only robosuite environments'),
    ({'env_name': 'Lift', 'type': 1, 'env_kwargs': {'warp_speed': 9}},
     "env_kwargs 'warp_speed' is not an argument of robosuite Lift"),
])
def test_environments_that_cannot_be_rebuilt_are_one_line(env_args, problem):
    with pytest.raises(UserError, match=problem):
        check_env_args(env_args, 'f.hdf5')


def test_a_state_of_another_size_and_a_missing_key_are_one_line():
    with DatasetEnv(LIFT, LIFT_KEYS, horizon=5) as env:
        env.reset(1)
        state = env.get_state()
        np.testing.assert_allclose(env.set_state(state), env.observation())
        with pytest.raises(UserError, match=f'has 31 values, Lift has {state.size}'):
            env.set_state(state[:31])
    with pytest.raises(UserError, match="Lift provides no observation 'cube_to_goal'"):
        DatasetEnv(LIFT, ['robot0_eef_pos', 'cube_to_goal'], horizon=5)


def test_seeded_episodes_repeat_and_end_at_the_horizon():
    with DatasetEnv(LIFT, LIFT_KEYS, horizon=3) as env:
        first = env.reset(7)
        other = env.reset(8)
        assert not np.allclose(first, other)          # the cube is placed by the seed
        np.testing.assert_array_equal(env.reset(7), first)
        assert env.obs_dim == 19 and env.modes == []
        for _ in range(3):
            _, _, done = env.step(np.zeros(7))
        assert done and not env.success()


def test_a_policy_is_evaluated_in_the_rebuilt_environment(lift_dataset, tmp_path, capsys):
    import torch

    from vdd_ros.core.checkpoint import save_checkpoint
    from vdd_ros.core.config import MoEConfig
    from vdd_ros.core.moe import MixtureOfExperts
    from vdd_ros.core.policy import PolicySpec
    path, fields = lift_dataset
    torch.manual_seed(0)
    moe = MixtureOfExperts(MoEConfig(num_experts=2, hidden_dim=16, num_layers=1), 19, 7)
    ckpt = save_checkpoint(tmp_path / 'moe', moe, PolicySpec(obs_fields=fields, action_dim=7),
                           'vdd_moe')
    env = dataset_env(path)
    assert env.horizon == 12 and env.action_dim == 7
    metrics = evaluate(str(ckpt), env, 2, show_progress=False)
    assert metrics['episodes'] == 2 and not metrics['modes_defined']
    assert metrics['mode_counts'] == {} and metrics['mean_length'] == 12
    assert metrics['task'].startswith('Lift')
    assert main(['evaluate', '--policy', str(ckpt), '--dataset-env', str(path),
                 '--episodes', '1', '--horizon', '4', '--quiet']) == 0
    out = capsys.readouterr().out
    assert 'no modes defined' in out and 'mean length' in out and '4.0 steps' in out
    # a checkpoint whose keys the environment lacks: one line, exit 2
    other = save_checkpoint(tmp_path / 'other', moe, PolicySpec(
        obs_fields=[('robot0_eef_pos', 3), ('cube_to_goal', 16)], action_dim=7), 'vdd_moe')
    assert main(['evaluate', '--policy', str(other), '--dataset-env', str(path),
                 '--episodes', '1', '--quiet']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and "provides no observation 'cube_to_goal'" in err


def test_a_dataset_without_env_args_cannot_be_evaluated_in(tmp_path, capsys):
    path = tmp_path / 'bare.hdf5'
    write_dataset(path, [Demo(obs=np.zeros((3, 2), np.float32),
                              actions=np.zeros((3, 7), np.float32))] * 2, [('x', 2)], {})
    assert main(['evaluate', '--policy', 'scripted', '--dataset-env', str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'no env_args with an env_name' in err
