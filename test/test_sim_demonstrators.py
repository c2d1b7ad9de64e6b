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


# camera tasks act through their base task's oracle (test_sim_env)
@pytest.fixture(scope='module', params=sorted(t for t in TASKS if not TASKS[t].cameras))
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
    """Two-cube tasks: the very first action heads toward the chosen cube. Carry tasks
    (lift_carry, carry_four): the modes act alike until the grasp, and the first step after it
    already heads to the chosen goal."""
    runs = []
    for i in range(len(env.modes)):
        probs = [0.0] * len(env.modes)
        probs[i] = 1.0
        oracle = make_oracle(env.task, mode_probs=probs, noise=0.0)
        obs = env.reset(5)
        oracle.reset(5)
        actions, phases, seen = [], [], []
        for _ in range(40):
            actions.append(oracle.act(obs))
            phases.append(oracle.info['phase'])
            seen.append(env.raw_observation())
            obs, _, done = env.step(actions[-1])
            if done:
                break
        runs.append((np.array(actions), phases, seen))
    if env.spec.goals:
        carry = runs[0][1].index(3.0)  # phases: via, descend, grasp, carry
        for mode, (a, p, seen) in zip(env.modes, runs):
            assert p.index(3.0) == carry
            np.testing.assert_array_equal(a[:carry], runs[0][0][:carry])
            # every axis along which the goal lies far from the cube is driven toward it
            offset = seen[carry][f'cube_to_goal_{mode}']
            far = np.abs(offset) > 0.05
            assert far[1] and np.all(a[carry, :3][far] * np.sign(offset[far]) > 0.5), mode
        firsts = [tuple(np.sign(a[carry, :2])) for a, _, _ in runs]
        assert len(set(firsts)) == len(env.modes)  # each mode heads its own way at once
    else:
        (a0, _, _), (a1, _, _) = runs
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


def test_carry_four_modes_are_balanced_over_consecutive_seeds() -> None:
    """The Weyl sequence gives each of the four modes a quarter, to within two episodes, of
    any 40 consecutive seeds and of the pipeline's 400 collection seeds."""
    oracle = make_oracle('carry_four')
    for start in [*range(0, 3000, 7), 1_000_000]:  # collection seeds and evaluation seeds
        modes = []
        for seed in range(start, start + 40):
            oracle.reset(seed)
            modes.append(oracle.mode_index)
        counts = np.bincount(modes, minlength=4)
        assert counts.sum() == 40 and counts.min() >= 8 and counts.max() <= 12, (start, counts)
    counts = np.bincount([oracle.choose_mode(s) for s in range(400)], minlength=4)
    assert np.all(np.abs(counts - 100) <= 2), counts


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
