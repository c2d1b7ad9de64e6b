"""Perturbed episodes (vdd_ros/sim/perturbations.py) on a real robosuite environment."""
import numpy as np
import pytest

from vdd_ros.errors import UserError
from vdd_ros.sim.env import SimEnv
from vdd_ros.sim.perturbations import Perturbation, PerturbedEnv

ZERO = np.zeros(7)


@pytest.fixture(scope='module')
def env():
    with SimEnv('lift_carry') as e:
        yield e


def test_displace_moves_the_cube_at_the_start_step_only(env):
    pe = PerturbedEnv(env, Perturbation('displace', 0.08, start_range=(3, 3)))
    pe.reset(11)
    before = env.cube_pos('cube')
    for _ in range(2):
        pe.step(ZERO)
    assert np.linalg.norm((env.cube_pos('cube') - before)[:2]) < 0.005   # (it settles)
    obs, _, _ = pe.step(ZERO)                                    # step 3: the jump
    moved = env.cube_pos('cube') - before
    assert np.linalg.norm(moved[:2]) == pytest.approx(0.08, abs=0.005)
    np.testing.assert_allclose(obs[5:8], env.cube_pos('cube'), atol=1e-5)
    pe.step(ZERO)
    assert np.linalg.norm((env.cube_pos('cube') - before - moved)[:2]) < 0.005   # once


@pytest.mark.parametrize('kind, factor', [('friction', 0.05), ('mass', 20.0)])
def test_physics_changes_last_one_episode(env, kind, factor):
    friction, mass = env.object_physics('cube')
    pe = PerturbedEnv(env, Perturbation(kind, factor))
    pe.reset(4)
    during = env.object_physics('cube')
    if kind == 'friction':      # the cube's and the fingers' contact geoms
        np.testing.assert_allclose(during[0][:, 0], friction[:, 0] * factor)
        assert len(friction) > 1 and np.all(during[0][:, 1:] == friction[:, 1:])
    else:
        assert during[1] == pytest.approx(mass * factor)
    pe.reset(5)                                  # a new episode scales the original once
    assert env.object_physics('cube')[1] == pytest.approx(during[1])
    pe.close()
    np.testing.assert_array_equal(env.object_physics('cube')[0], friction)
    assert env.object_physics('cube')[1] == mass


def test_observation_noise_starts_at_the_start_step(env):
    std = np.linspace(0.1, 1.0, env.obs_dim)
    pe = PerturbedEnv(env, Perturbation('obs_noise', 2.0, start_range=(2, 2)), std)
    obs = pe.reset(8)
    np.testing.assert_array_equal(obs, env.observation())
    obs, _, _ = pe.step(ZERO)
    np.testing.assert_array_equal(obs, env.observation())
    seen = np.stack([pe.step(ZERO)[0] - env.observation() for _ in range(30)])
    np.testing.assert_allclose(seen.std(0) / (2.0 * std), 1.0, atol=0.45)


@pytest.mark.parametrize('kwargs, match', [
    ({'kind': 'earthquake'}, 'unknown kind'),
    ({'kind': 'mass', 'magnitude': -1.0}, 'magnitude must be finite and >= 0'),
    ({'kind': 'displace', 'start_range': (5, 2)}, 'start range'),
])
def test_bad_perturbations_are_one_error(kwargs, match):
    with pytest.raises(UserError, match=match):
        Perturbation(**kwargs)


def test_observation_noise_needs_the_feature_scales(env):
    with pytest.raises(UserError, match='standard deviations'):
        PerturbedEnv(env, Perturbation('obs_noise'))
