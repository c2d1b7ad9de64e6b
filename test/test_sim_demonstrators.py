"""Scripted oracles succeed in every mode; the mode-averaging oracle fails."""
from __future__ import annotations

import numpy as np
import pytest

from vdd_ros.core.policy import Policy
from vdd_ros.errors import UserError

pytest.importorskip('robosuite')

from vdd_ros.sim.demonstrators import make_oracle  # noqa: E402
from vdd_ros.sim.env import SimEnv  # noqa: E402
from vdd_ros.sim.rollout import run_episode  # noqa: E402
from vdd_ros.sim.tasks import TASKS  # noqa: E402

SEEDS = [900_001, 900_002]


@pytest.fixture(scope='module', params=sorted(TASKS))
def env(request):
    e = SimEnv(request.param)
    yield e
    e.close()


def test_each_mode_succeeds_and_averaging_fails(env: SimEnv) -> None:
    for i, mode in enumerate(env.modes):
        probs = [0.0] * len(env.modes)
        probs[i] = 1.0
        oracle = make_oracle(env.task, mode_probs=probs)
        for seed in SEEDS:
            rec = run_episode(env, oracle, seed)
            assert oracle.mode == mode and oracle.info['mode'] == i
            assert rec['success'], (env.task, mode, seed)
            assert rec['mode'] == mode and rec['length'] < env.horizon
    averaged = make_oracle(env.task, 'averaged')
    for seed in SEEDS:
        rec = run_episode(env, averaged, seed)
        assert averaged.mode is None and averaged.info['mode'] == -1
        assert not rec['success'] and rec['length'] == env.horizon


def test_mode_revealed_early(env: SimEnv) -> None:
    """Two-cube tasks: the very first action heads toward the chosen cube. lift_carry: the modes
    act alike until the grasp, and the first step after it already heads to the chosen goal."""
    runs = []
    for i in range(2):
        oracle = make_oracle(env.task, mode_probs=[1.0 - i, float(i)], noise=0.0)
        obs = env.reset(5)
        oracle.reset(5)
        actions, phases = [], []
        for _ in range(40):
            actions.append(oracle.act(obs))
            phases.append(oracle.info['phase'])
            obs, _, done = env.step(actions[-1])
            if done:
                break
        runs.append((np.array(actions), phases))
    (a0, p0), (a1, p1) = runs
    if env.task == 'lift_carry':
        carry = p0.index(3.0)  # phases: via, descend, grasp, carry
        assert p1.index(3.0) == carry
        np.testing.assert_array_equal(a0[:carry], a1[:carry])
        assert a0[carry, 1] > 0.5 and a1[carry, 1] < -0.5  # left goal: +y, right goal: -y
    else:
        assert a0[0, 1] < -0.5 and a1[0, 1] > 0.5  # cube A lies at -y, cube B at +y


def test_oracle_interface_and_mode_split() -> None:
    oracle = make_oracle('pick_either', seed=0)
    assert isinstance(oracle, Policy)
    assert oracle.spec.obs_dim == TASKS['pick_either'].obs_dim and oracle.spec.action_dim == 7
    modes = []
    for seed in range(200):
        oracle.reset(seed)
        modes.append(oracle.mode)
    assert 0.4 <= modes.count('cubeA') / 200 <= 0.6
    oracle.reset(3)
    m3 = oracle.mode
    oracle.reset(3)
    assert oracle.mode == m3
    skew = make_oracle('pick_either', mode_probs=[0.9, 0.1])
    share = np.mean([(skew.reset(s), skew.mode)[1] == 'cubeA' for s in range(200)])
    assert 0.8 <= share <= 0.97
    action = oracle.act(np.zeros(oracle.spec.obs_dim, np.float32))
    assert action.shape == (7,) and np.all(np.abs(action) <= 1)
    with pytest.raises(ValueError):
        oracle.act(np.zeros(5))


def test_oracle_argument_errors() -> None:
    with pytest.raises(UserError, match='kind'):
        make_oracle('lift_carry', kind='clever')
    with pytest.raises(UserError, match='mode_probs'):
        make_oracle('lift_carry', mode_probs=[1.0])
    with pytest.raises(UserError, match='mode_probs'):
        make_oracle('lift_carry', mode_probs=[-1.0, 2.0])
    with pytest.raises(UserError, match='noise'):
        make_oracle('lift_carry', noise=-0.1)
    with pytest.raises(UserError, match='unknown task'):
        make_oracle('nope')
