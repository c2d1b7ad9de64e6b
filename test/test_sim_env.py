"""SimEnv and task registry: observation layout, seeding, done handling, classifiers."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from vdd_ros.errors import UserError
from vdd_ros.sim.tasks import TABLE_Z, TASKS, get_task

pytest.importorskip('robosuite')

from vdd_ros.sim.demonstrators import make_oracle  # noqa: E402
from vdd_ros.sim.env import SimEnv  # noqa: E402
from vdd_ros.sim.rollout import run_episode  # noqa: E402


def test_registry() -> None:
    assert set(TASKS) == {'lift_carry', 'pick_either', 'stack_either', 'carry_four',
                          'pick_either_image'}
    for name, spec in TASKS.items():
        assert spec.name == name and len(spec.modes) >= 2 and spec.control_freq == 20
        assert 50 <= spec.horizon <= 200
        assert spec.obs_dim == sum(n for _, n in spec.obs_fields)
        if spec.goals:  # carry tasks: one mode per goal, in order
            assert spec.modes == [g.name for g in spec.goals]
    assert len(TASKS['carry_four'].modes) == 4
    camera = TASKS['pick_either_image']
    assert camera.family == 'pick_either' and camera.modes == TASKS['pick_either'].modes
    assert [k for k, _ in camera.obs_fields] == [
        'robot0_eef_pos', 'robot0_gripper_qpos', 'agentview_image', 'robot0_eye_in_hand_image']
    assert dict(camera.obs_fields)['agentview_image'] == 32 * 32 * 3 and camera.image_side == 32
    with pytest.raises(UserError, match='lift_carry, pick_either, stack_either, carry_four'):
        get_task('push_t')


def test_unknown_task_env() -> None:
    with pytest.raises(UserError, match='unknown task'):
        SimEnv('nope')


@pytest.fixture(scope='module')
def lift_env():
    env = SimEnv('lift_carry')
    yield env
    env.close()


def test_observation_layout(lift_env: SimEnv) -> None:
    env = lift_env
    obs = env.reset(7)
    assert obs.shape == (env.obs_dim,) and obs.dtype == np.float32
    assert env.action_dim == 7 and env.modes == ['left', 'right'] and env.horizon == 90
    named = env.raw_observation()
    assert list(named) == [k for k, _ in env.obs_fields]
    np.testing.assert_allclose(named['eef_to_cube'],
                               named['cube_pos'] - named['robot0_eef_pos'], atol=1e-6)
    np.testing.assert_allclose(named['cube_to_goal_left'],
                               named['goal_left_pos'] - named['cube_pos'], atol=1e-6)
    assert named['goal_left_pos'][1] > 0.15 and named['goal_right_pos'][1] < -0.15
    assert abs(named['cube_pos'][1]) < 0.04 and not env.success() and env.mode() is None


def test_lift_carry_goals_keep_their_draws(lift_env: SimEnv) -> None:
    """lift_carry's goals come from the generator exactly as before goals were a list (left
    x, y, height, then right mirrored in y), so recorded datasets replay unchanged."""
    for seed in range(3):
        goals = lift_env._sample_goals(np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        expect = {}
        for name, sign in (('left', 1.0), ('right', -1.0)):
            expect[name] = np.array([rng.uniform(-0.04, 0.04), sign * rng.uniform(0.18, 0.22),
                                     TABLE_Z + rng.uniform(0.14, 0.18)])
        assert list(goals) == ['left', 'right']
        for name in expect:
            np.testing.assert_array_equal(goals[name], expect[name])


def test_same_seed_same_episode_after_any_history(lift_env: SimEnv) -> None:
    oracle = make_oracle('lift_carry')
    first = run_episode(lift_env, oracle, 11, record=True)
    run_episode(lift_env, make_oracle('lift_carry', 'averaged'), 12)
    again = run_episode(lift_env, oracle, 11, record=True)
    assert first['length'] == again['length']
    np.testing.assert_array_equal(first['obs'], again['obs'])
    np.testing.assert_array_equal(first['actions'], again['actions'])
    np.testing.assert_array_equal(first['states'], again['states'])
    assert not np.array_equal(lift_env.reset(12), lift_env.reset(11))


def test_unseeded_envs_differ_and_constructor_seed_counts(lift_env: SimEnv) -> None:
    with SimEnv('lift_carry') as a, SimEnv('lift_carry') as b:
        assert not np.array_equal(a.reset(), b.reset())
    with SimEnv('lift_carry', seed=11) as c:
        np.testing.assert_array_equal(c.reset(), lift_env.reset(11))


def test_done_at_horizon_and_no_step_after_done(lift_env: SimEnv) -> None:
    env = lift_env
    env.reset(3)
    done, steps = False, 0
    while not done:
        _, reward, done = env.step(np.zeros(7))
        steps += 1
        assert reward == 0.0
    assert steps == env.horizon and not env.success()
    with pytest.raises(RuntimeError, match='reset'):
        env.step(np.zeros(7))
    env.reset(3)
    with pytest.raises(ValueError):
        env.step(np.full(7, np.nan))
    with pytest.raises(ValueError):
        env.step(np.zeros(6))


def test_render_frame_upright() -> None:
    with SimEnv('pick_either', render=True, width=96, height=80) as env:
        env.reset(0)
        frame = env.render_frame()
        red, green = env.project(env.cube_pos('cubeA')), env.project(env.cube_pos('cubeB'))
    assert frame.shape == (80, 96, 3) and frame.dtype == np.uint8
    # cube A is red and cube B green where the camera geometry puts them in an upright image
    r = frame[red].astype(int)
    g = frame[green].astype(int)
    assert r[0] > r[1] + 40 and r[0] > r[2] + 40, r
    assert g[1] > g[0] + 20 and g[1] > g[2] + 20, g


def test_camera_task_sees_the_cubes_upright_and_acts_like_its_base() -> None:
    side = get_task('pick_either_image').image_side
    with SimEnv('pick_either_image', width=side, height=side) as env:
        obs = env.reset(5)
        assert obs.shape == (env.obs_dim,) and obs.dtype == np.float32
        fields = env.raw_observation()
        agent = fields['agentview_image'].reshape(side, side, 3).astype(int)
        red, green = env.project(env.cube_pos('cubeA')), env.project(env.cube_pos('cubeB'))
        r, g = agent[red], agent[green]
        assert r[0] > r[1] + 40 and r[0] > r[2] + 40, r
        assert g[1] > g[0] + 20 and g[1] > g[2] + 20, g
        assert np.array_equal(fields['robot0_eef_pos'], env.state_observation()[:3])
        assert env.state_observation().shape == (get_task('pick_either').obs_dim,)
        image = run_episode(env, make_oracle('pick_either_image'), 5, record=True)
    with SimEnv('pick_either') as env:
        state = run_episode(env, make_oracle('pick_either'), 5)
    # the scripted oracle reads the simulator's state: the same episode as the base task's
    assert image['success'] and (image['mode'], image['length']) == (state['mode'],
                                                                     state['length'])
    wrist = image['obs'][:, -side * side * 3:]
    assert wrist.min() >= 0 and wrist.max() <= 255 and np.ptp(wrist[0] - wrist[-1]) > 50


@pytest.fixture(scope='module')
def four_env():
    env = SimEnv('carry_four')
    yield env
    env.close()


def test_carry_four_goals_lie_in_their_quadrants_and_defeat_averaging(four_env: SimEnv) -> None:
    env, radius = four_env, four_env.spec.success_radius
    assert env.modes == ['front_left', 'front_right', 'back_left', 'back_right']
    for seed in range(5):
        env.reset(seed)
        named = env.raw_observation()
        assert list(named) == [k for k, _ in env.obs_fields] and list(env.goals) == env.modes
        cube = named['cube_pos']
        for mode, goal in env.goals.items():
            sx = 1.0 if mode.startswith('front') else -1.0
            sy = 1.0 if mode.endswith('left') else -1.0
            assert 0.12 <= sx * goal[0] <= 0.16 and 0.12 <= sy * goal[1] <= 0.16, (mode, goal)
            assert 0.14 <= goal[2] - TABLE_Z <= 0.18
            np.testing.assert_allclose(named[f'goal_{mode}_pos'], goal, atol=1e-6)
            np.testing.assert_allclose(named[f'cube_to_goal_{mode}'], goal - cube, atol=1e-6)
        goals = np.array(list(env.goals.values()))
        # distinct goals, and neither the mean of all four nor that of any two reaches a goal
        assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(goals, 2)) > 0.2
        averages = [goals.mean(0)] + [(a + b) / 2 for a, b in itertools.combinations(goals, 2)]
        for avg in averages:
            assert np.linalg.norm(goals - avg, axis=1).min() > 2.5 * radius
        assert np.linalg.norm(goals - goals.mean(0), axis=1).min() > 4 * radius
        assert not env.success() and env.mode() is None


def test_carry_four_success_and_mode_classification(four_env: SimEnv) -> None:
    """The lifted cube at a goal succeeds in that goal's mode; near one (outside the success
    radius) it shows that mode only; above the goals' mean it shows none."""
    env = four_env
    for mode in env.modes:
        env.reset(2)
        goal = env.goals[mode]
        toward_centre = np.array([-goal[0], -goal[1], 0.0])
        near = goal + 0.05 * toward_centre / np.linalg.norm(toward_centre)
        env.displace_object('cube', near - env.cube_pos('cube'))
        assert env.mode() == mode
        _, reward, done = env.step(np.zeros(7))
        assert reward == 0.0 and not done and not env.success()
        env.displace_object('cube', goal - env.cube_pos('cube'))
        _, reward, done = env.step(np.zeros(7))
        assert reward == 1.0 and done and env.success() and env.mode() == mode
    env.reset(2)
    centre = np.array(list(env.goals.values())).mean(0)
    env.displace_object('cube', centre - env.cube_pos('cube'))
    assert env.mode() is None
    _, reward, _ = env.step(np.zeros(7))
    assert reward == 0.0 and env.mode() is None


def test_render_cost_times_each_camera_frame_of_a_camera_task() -> None:
    from vdd_ros.sim.throughput import render_cost
    r = render_cost('pick_either_image', frames=3)
    assert r['cameras'] == ['agentview', 'robot0_eye_in_hand']
    assert (r['side'], r['drawn_side']) == (32, 64) and r['ms_per_frame'] > 0
    with pytest.raises(ValueError, match='pick_either has no cameras'):
        render_cost('pick_either', frames=1)
