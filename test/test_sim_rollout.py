"""Rollout runner, evaluation metrics, collection files and the collect/evaluate commands."""
from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from vdd_ros.core.data import load_dataset
from vdd_ros.errors import UserError

pytest.importorskip('robosuite')

from vdd_ros.cli import main  # noqa: E402
from vdd_ros.sim.collection import collect  # noqa: E402
from vdd_ros.sim.demonstrators import make_oracle  # noqa: E402
from vdd_ros.sim.rollout import (EVAL_SEED_BASE, evaluate, evaluation_seeds,  # noqa: E402
                                 mode_entropy, run_episode)
from vdd_ros.sim.tasks import TASKS  # noqa: E402


def averaged_pick_factory():
    """A picklable factory (module level) for worker processes."""
    return make_oracle('pick_either', 'averaged')


def lift_oracle_factory():
    return make_oracle('lift_carry')


def test_mode_entropy() -> None:
    assert mode_entropy({'a': 5, 'b': 5}, 2) == pytest.approx(1.0)
    assert mode_entropy({'a': 4, 'b': 0}, 2) == 0.0
    assert math.copysign(1.0, mode_entropy({'a': 4, 'b': 0}, 2)) == 1.0   # printed 0.00, not -0.00
    assert mode_entropy({'a': 0, 'b': 0}, 2) == 0.0
    p = np.array([0.75, 0.25])
    assert mode_entropy({'a': 3, 'b': 1}, 2) == pytest.approx(-(p * np.log(p)).sum()
                                                               / math.log(2))
    # normalised by log M of the task's M modes (carry_four: 4), not log 2
    assert mode_entropy({'a': 3, 'b': 3, 'c': 3, 'd': 3}, 4) == pytest.approx(1.0)
    assert mode_entropy({'a': 3, 'b': 3, 'c': 0, 'd': 0}, 4) == pytest.approx(0.5)


def test_evaluation_seeds_are_disjoint_from_collection() -> None:
    assert evaluation_seeds(3) == [EVAL_SEED_BASE, EVAL_SEED_BASE + 1, EVAL_SEED_BASE + 2]
    with pytest.raises(UserError, match='collection seeds'):
        collect('pick_either', 2, '/tmp/never.hdf5', seed=EVAL_SEED_BASE - 1)


def test_evaluate_scripted_metrics() -> None:
    m = evaluate('scripted', 'lift_carry', 2, show_progress=False)
    assert m['episodes'] == 2 and m['successes'] == 2 and m['success_rate'] == 1.0
    detail = m['episodes_detail']
    assert [d['seed'] for d in detail] == evaluation_seeds(2)
    assert all(d['success'] and d['mode'] in ('left', 'right') for d in detail)
    assert all(d['mode'] == d['policy_mode'] for d in detail)
    assert sum(m['mode_counts'].values()) == 2
    counts = {k: sum(d['mode'] == k for d in detail) for k in ('left', 'right')}
    assert m['mode_counts'] == counts
    assert m['mode_entropy'] == pytest.approx(mode_entropy(counts, 2))
    assert m['mean_length'] == pytest.approx(np.mean([d['length'] for d in detail]))
    assert 0 < m['latency_ms_p50'] <= m['latency_ms_p99'] < 50
    assert m['task'] == 'lift_carry' and m['policy'] == 'scripted'
    json.dumps(m)  # plain JSON types only
    # the same seeds give the same episodes
    again = evaluate(lift_oracle_factory, 'lift_carry', 2, show_progress=False)
    assert [(d['length'], d['mode']) for d in again['episodes_detail']] == \
        [(d['length'], d['mode']) for d in detail]


def test_evaluate_in_worker_processes_with_factory() -> None:
    m = evaluate(averaged_pick_factory, 'pick_either', 2, workers=2, show_progress=False)
    assert m['episodes'] == 2 and m['workers'] == 2
    assert m['success_rate'] == 0.0 and m['mode_entropy'] == 0.0
    assert [d['length'] for d in m['episodes_detail']] == [TASKS['pick_either'].horizon] * 2


def test_evaluate_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match='no such checkpoint'):
        evaluate(tmp_path / 'missing', 'lift_carry', 1, show_progress=False)
    with pytest.raises(UserError, match='lift_carry'):
        evaluate(lift_oracle_factory, 'pick_either', 1, show_progress=False)
    with pytest.raises(UserError, match='unknown task'):
        evaluate('scripted', 'nope', 1, show_progress=False)
    with pytest.raises(UserError, match='.gif'):
        evaluate('scripted', 'lift_carry', 1, video=str(tmp_path / 'v.mp4'),
                 show_progress=False)


def test_unpicklable_factory_needs_one_worker() -> None:
    with pytest.raises(UserError, match='picklable'):
        evaluate(lambda: make_oracle('pick_either'), 'pick_either', 2, workers=2,
                 show_progress=False)


def test_video_gif(tmp_path: Path) -> None:
    from PIL import Image
    path = tmp_path / 'episode.gif'
    m = evaluate('scripted', 'pick_either', 1, video=str(path), show_progress=False)
    assert m['video'] == str(path)
    with Image.open(path) as gif:
        assert gif.n_frames == m['episodes_detail'][0]['length'] + 1
        assert gif.size == (256, 256)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['episode.gif']


def test_collect_file_layout(tmp_path: Path) -> None:
    out = tmp_path / 'pick.hdf5'
    s = collect('pick_either', 3, str(out), seed=40, show_progress=False)
    assert s['kept'] == 3 and s['discarded'] == 0 and s['complete']
    assert sum(s['mode_counts'].values()) == 3
    spec = TASKS['pick_either']
    with h5py.File(out, 'r') as f:
        data = f['data']
        env_args = json.loads(data.attrs['env_args'])
        assert env_args['env_name'] == 'Stack' and env_args['type'] == 1
        assert env_args['task'] == 'pick_either'
        assert env_args['env_kwargs']['robots'] == 'Panda'
        assert env_args['env_kwargs']['has_offscreen_renderer'] is False
        total = 0
        for i in range(3):
            g = data[f'demo_{i}']
            T = int(g.attrs['num_samples'])
            total += T
            assert g.attrs['mode'] in spec.modes and g.attrs['seed'] == 40 + i
            assert set(g['obs']) == {k for k, _ in spec.obs_fields}
            assert g['actions'].shape == (T, 7) and g['rewards'][-1] == 1.0
            assert g['dones'][-1] == 1 and g['dones'][:-1].sum() == 0
            assert g['states'].ndim == 2 and g['states'].shape[0] == T
        assert data.attrs['total'] == total
        masks = {n.decode() for n in f['mask/train'][()]} | \
            {n.decode() for n in f['mask/valid'][()]}
        assert masks == {'demo_0', 'demo_1', 'demo_2'}
    ds = load_dataset(out)
    assert ds.obs_fields == spec.obs_fields and ds.action_dim == 7
    assert [d.seed for d in ds.demos] == [40, 41, 42]


def test_collect_nothing_succeeds_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / 'none.hdf5'
    with pytest.raises(UserError, match='not written'):
        collect('pick_either', 1, str(out), noise=50.0, max_attempts=1, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = tmp_path / 'm.json'
    rc = main(['evaluate', '--policy', 'averaged', '--task', 'pick_either', '--episodes', '1',
               '--json', str(metrics), '--quiet'])
    assert rc == 0
    printed = capsys.readouterr().out
    assert 'success rate' in printed and '0.000 (0/1)' in printed
    data = json.loads(metrics.read_text())
    assert data['episodes'] == 1 and data['success_rate'] == 0.0
    assert main(['collect', '--task', 'pick_either', '--episodes', '1', '--quiet',
                 '--out', str(tmp_path / 'd.hdf5'), '--seed', '7']) == 0
    assert '1 pick_either demonstrations' in capsys.readouterr().out
    assert main(['collect', '--task', 'nope', '--episodes', '1',
                 '--out', str(tmp_path / 'x.hdf5')]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'unknown task' in err
    assert main(['evaluate', '--policy', str(tmp_path / 'no_ckpt'), '--task', 'lift_carry',
                 '--episodes', '1', '--quiet']) == 2
    assert 'no such checkpoint' in capsys.readouterr().err
    assert main(['collect', '--task', 'lift_carry', '--episodes', '1',
                 '--out', str(tmp_path / 'missing_dir' / 'x.hdf5')]) == 2
    assert 'does not exist' in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['d.hdf5', 'm.json']


def test_collect_records_each_task_env_args_in_one_process(tmp_path: Path) -> None:
    """The in-process worker serves several tasks in turn; each file names its own env."""
    names = {}
    for task in ('lift_carry', 'pick_either'):
        out = tmp_path / f'{task}.hdf5'
        collect(task, 1, str(out), seed=7, show_progress=False)
        with h5py.File(out, 'r') as f:
            env_args = json.loads(f['data'].attrs['env_args'])
        names[task] = (env_args['env_name'], env_args['task'])
    assert names == {'lift_carry': ('Lift', 'lift_carry'), 'pick_either': ('Stack', 'pick_either')}


class _CountingEnv:
    """A 7-step episode whose frames are the step they show."""

    t = 0

    def reset(self, seed: int) -> np.ndarray:
        self.t = 0
        return np.zeros(2, np.float32)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        self.t += 1
        return np.zeros(2, np.float32), 0.0, self.t == 7

    def render_frame(self) -> np.ndarray:
        return np.full((2, 2, 3), self.t, np.uint8)

    def success(self) -> bool:
        return False

    def mode(self) -> None:
        return None


class _ZeroPolicy:
    def reset(self, seed: int) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        return np.zeros(7, np.float32)


@pytest.mark.parametrize('step, shown', [(1, list(range(8))), (3, [0, 3, 6, 7]),
                                         (7, [0, 7]), (10, [0, 7])])
def test_frames_are_rendered_every_frame_step_and_at_the_end(step, shown):
    frames: list[np.ndarray] = []
    rec = run_episode(_CountingEnv(), _ZeroPolicy(), 0, frames=frames, frame_step=step)
    assert rec['length'] == 7
    assert [int(f[0, 0, 0]) for f in frames] == shown


def test_a_frame_step_below_one_is_refused():
    with pytest.raises(ValueError, match='frame_step must be >= 1, got 0'):
        run_episode(_CountingEnv(), _ZeroPolicy(), 0, frames=[], frame_step=0)


class _TimedPolicy:
    """A stand-in ModelPolicy whose `act` sleeps `ms` and logs its name and episode step."""

    def __init__(self, name: str, ms: float, log: list):
        from types import SimpleNamespace

        from vdd_ros.core.policy import PolicySpec
        self.name, self.ms, self.log, self.episode = name, ms, log, None
        self.spec = PolicySpec(obs_fields=[('obs', 2)], action_dim=1, action_exec=4)
        self.model = SimpleNamespace(encoder=SimpleNamespace(has_cameras=False))

    def reset(self, episode):
        self.episode = episode

    def act(self, obs):
        import time
        assert self.spec.action_exec == 1            # every call a network query
        self.log.append((self.name, self.episode, float(obs[0])))
        time.sleep(self.ms / 1e3)


def test_latencies_are_timed_in_turn_on_the_demonstrations(tmp_path):
    from vdd_ros.core.data import Demo, write_dataset
    from vdd_ros.pipeline.media import query_latencies
    demos = [Demo(obs=np.stack([np.arange(6) + 10 * i, np.zeros(6)], 1).astype(np.float32),
                  actions=np.zeros((6, 1), np.float32)) for i in range(3)]
    write_dataset(tmp_path / 'd.hdf5', demos, [('obs', 2)], {'task': 'x'})
    log: list = []
    policies = {'slow': _TimedPolicy('slow', 2.0, log), 'fast': _TimedPolicy('fast', 0.2, log)}
    out = query_latencies(policies, tmp_path / 'd.hdf5', queries=40, rounds=4, warmup=3)
    assert list(out) == ['slow', 'fast']
    assert out['slow']['query_count'] == out['fast']['query_count'] == 40
    assert 1.9 < out['slow']['query_ms_p50'] <= out['slow']['query_ms_p99']
    assert out['fast']['query_ms_p50'] < 1.0 < out['slow']['query_ms_p50']
    # four turns each (warm-up first): slow 3 + 10, fast 3 + 10, then 10 each in turn
    names = [n for n, _, _ in log]
    turns = [names[0]] + [b for a, b in zip(names, names[1:]) if a != b]
    assert turns == ['slow', 'fast'] * 4 and len(names) == 2 * (3 + 40)
    # each policy walks the demonstrations in order, reset at each episode's first step
    seen = [(e, v) for n, e, v in log if n == 'fast']
    assert seen[:8] == [(0, 0.0), (0, 1.0), (0, 2.0), (0, 3.0), (0, 4.0), (0, 5.0),
                        (1, 10.0), (1, 11.0)]
    assert seen[18] == (0, 0.0)                   # after the last demonstration, the first
