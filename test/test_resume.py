"""Resumable training: a killed or stopped run, resumed (also on another number of ranks), ends
where an uninterrupted run ends; the state is safetensors plus JSON and belongs to its run."""
import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpkit import TOLERANCE, close_to, torchrun, torchrun_env
from vdd_ros.cli import main as cli_main
from vdd_ros.core.config import parse_overrides
from vdd_ros.core.data import Demo, write_dataset
from vdd_ros.core.jobs import baseline_job, distill_job, train_teacher_job
from vdd_ros.core.train_state import TrainingState, flatten, state_folder, unflatten
from vdd_ros.errors import UserError

TINY = ['obs_horizon=1', 'action_horizon=2', 'action_exec=2', 'teacher.hidden_dim=32',
        'teacher.num_layers=1', 'teacher.batch_size=32', 'moe.num_experts=2',
        'moe.hidden_dim=32', 'moe.num_layers=1', 'moe.gating_hidden_dim=16',
        'vdd.batch_size=16', 'vdd.init_em_iterations=15', 'vdd.iterations=15',
        'gaussian_bc.iterations=15', 'gaussian_bc.batch_size=32', 'em_moe.iterations=15',
        'em_moe.batch_size=32', 'teacher.iterations=30']


def _dataset(path, seed=0):
    rng = np.random.default_rng(seed)
    demos = [Demo(obs=rng.normal(size=(30, 5)).astype(np.float32),
                  actions=rng.uniform(-1, 1, size=(30, 3)).astype(np.float32))
             for _ in range(6)]
    write_dataset(path, demos, [('pos', 3), ('vel', 2)], {})
    return path


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp('resume')
    dataset = _dataset(folder / 'd.hdf5')
    teacher = folder / 'teacher'
    train_teacher_job(dataset, teacher, overrides=_overrides(), show_bar=False)
    return dataset, teacher


def _overrides(*extra):
    return parse_overrides([*TINY, *extra])


def _weights(folder):
    return load_file(str(folder / 'model.safetensors'))


def _same_checkpoint(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((a / 'curves.json').read_text()) == \
        json.loads((b / 'curves.json').read_text())


def _stop_at_first(stage):
    """A progress callback and the event it sets at the first report of `stage`."""
    stop = threading.Event()

    def on_progress(p):
        if p.stage == stage:
            stop.set()
    return on_progress, stop


JOBS = {
    'teacher': lambda d, t, out, **kw: train_teacher_job(d, out, overrides=_overrides(), **kw),
    'gaussian_bc': lambda d, t, out, **kw: baseline_job('gaussian_bc', d, out,
                                                        overrides=_overrides(), **kw),
    'em_moe': lambda d, t, out, **kw: baseline_job('em_moe', d, out, overrides=_overrides(),
                                                   **kw),
    'vdd_moe': lambda d, t, out, **kw: distill_job(t, d, out, overrides=_overrides(), **kw),
}


@pytest.mark.parametrize('job, stage', [('teacher', 'teacher'), ('gaussian_bc', 'gaussian_bc'),
                                        ('em_moe', 'em_moe'),
                                        ('vdd_moe', 'vdd warm start (EM)'),
                                        ('vdd_moe', 'vdd')])
def test_a_stopped_run_resumed_ends_bitwise_equal_to_an_uninterrupted_one(data, tmp_path, job,
                                                                          stage):
    dataset, teacher = data
    run = JOBS[job]
    whole, parted = tmp_path / 'whole', tmp_path / 'parted'
    run(dataset, teacher, whole, show_bar=False, checkpoint_every=4)
    assert not state_folder(whole).exists()          # a completed run removes its state
    on_progress, stop = _stop_at_first(stage)
    run(dataset, teacher, parted, show_bar=False, checkpoint_every=4, progress=on_progress,
        stop=stop)
    gens = list(state_folder(parted).iterdir())
    assert len(gens) == 1
    meta = json.loads((gens[0] / 'state.json').read_text())
    assert meta['stage'] == stage and meta['iteration'] == 1
    assert not _weights(parted).keys() ^ _weights(whole).keys()
    run(dataset, teacher, parted, show_bar=False, checkpoint_every=4, resume=True)
    _same_checkpoint(whole, parted)
    assert not state_folder(parted).exists()


def test_a_killed_run_resumed_ends_bitwise_equal_to_an_uninterrupted_one(data, tmp_path):
    dataset = data[0]
    args = ['train-teacher', '--dataset', str(dataset), '--quiet', '--checkpoint-every', '40',
            '--set', *TINY[:-1], 'teacher.iterations=800']
    killed = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, '-m', 'vdd_ros.cli', *args, '--out', str(killed)],
                            env=torchrun_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(state_folder(killed).glob('gen-*')):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
        proc.stderr.close()
    [gen] = state_folder(killed).glob('gen-*')
    iteration = json.loads((gen / 'state.json').read_text())['iteration']
    assert 0 < iteration < 800 and iteration % 40 == 0
    whole = tmp_path / 'whole'
    assert cli_main([*args, '--out', str(whole)]) == 0
    assert cli_main([*args, '--out', str(killed), '--resume']) == 0
    _same_checkpoint(whole, killed)
    assert not state_folder(killed).exists()


def test_a_one_rank_run_resumed_on_two_ranks_by_torchrun(data, tmp_path):
    dataset = data[0]
    whole, parted = tmp_path / 'whole', tmp_path / 'parted'
    extra = ['teacher.iterations=60']
    train_teacher_job(dataset, whole, overrides=_overrides(*extra), show_bar=False)
    on_progress, stop = _stop_at_first('teacher')
    train_teacher_job(dataset, parted, overrides=_overrides(*extra), show_bar=False,
                      progress=on_progress, stop=stop)
    done = torchrun(2, '-m', 'vdd_ros.cli', 'train-teacher', '--dataset', str(dataset),
                    '--out', str(parted), '--resume', '--set', *TINY, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    # rank 0 alone speaks
    assert done.stdout.count('wrote ') == 1 and f'wrote {parted}' in done.stdout
    assert done.stderr.count('resuming teacher at iteration 1') == 1
    a, b = _weights(parted), _weights(whole)
    assert max(close_to(a[k], b[k]) for k in b) < TOLERANCE
    curve = json.loads((parted / 'curves.json').read_text())['loss_history']
    reference = json.loads((whole / 'curves.json').read_text())['loss_history']
    assert [i for i, _ in curve] == list(range(60))
    assert curve[0] == reference[0]                  # the iteration run before the stop
    assert max(abs(x - y) / abs(y) for (_, x), (_, y) in zip(curve, reference)) < TOLERANCE
    assert not state_folder(parted).exists()


def test_resuming_another_runs_state_is_one_line_naming_the_difference(data, tmp_path):
    dataset, _ = data
    out = tmp_path / 'run'
    on_progress, stop = _stop_at_first('teacher')
    train_teacher_job(dataset, out, overrides=_overrides(), show_bar=False,
                      progress=on_progress, stop=stop)
    with pytest.raises(UserError, match=r'another run \(config\.teacher\.lr: saved 0\.001, '
                                        r'now 0\.002\); rerun without --resume'):
        train_teacher_job(dataset, out, overrides=_overrides('teacher.lr=0.002'),
                          show_bar=False, resume=True)
    other = _dataset(tmp_path / 'other.hdf5', seed=1)
    with pytest.raises(UserError, match=r'another run \(data: saved'):
        train_teacher_job(other, out, overrides=_overrides(), show_bar=False, resume=True)


def test_resume_without_a_state_starts_afresh_and_says_so(data, tmp_path, capsys):
    dataset, _ = data
    fresh, resumed = tmp_path / 'fresh', tmp_path / 'resumed'
    train_teacher_job(dataset, fresh, overrides=_overrides(), show_bar=False)
    train_teacher_job(dataset, resumed, overrides=_overrides(), show_bar=False, resume=True)
    assert 'no training state' in capsys.readouterr().err
    _same_checkpoint(fresh, resumed)


def test_the_state_is_named_tensors_and_json_that_rebuild_an_optimizer(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 ** it)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        net(torch.randn(5, 3, generator=gen)).sum().backward()
        opt.step()
        sched.step()
    parts = {'model': net, 'opt': opt, 'sched': sched, 'gen': gen}
    state = TrainingState(tmp_path / 's', every=1, run={'job': 'x'}, stages=('a', 'b'))
    path = state.save('a', 3, parts, [(0, 1.0), (1, 0.5), (2, 0.25)])
    assert sorted(p.name for p in path.iterdir()) == ['state.json', 'state.safetensors']
    tensors = load_file(str(path / 'state.safetensors'))
    assert tensors['gen'].dtype == torch.uint8 and tensors['rng.torch'].dtype == torch.uint8
    assert {'opt.state.0.exp_avg', 'opt.state.3.exp_avg_sq', 'model.1.bias'} <= set(tensors)
    meta = json.loads((path / 'state.json').read_text())
    assert meta['parts']['opt']['param_groups'][0]['betas'] == {'__tuple__': [0.9, 0.999]}

    net2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.01)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda it: 0.5 ** it)
    gen2 = torch.Generator()
    again = TrainingState(tmp_path / 's', every=1, run={'job': 'x'}, stages=('a', 'b'),
                          resume=True)
    start, history = again.restore('a', {'model': net2, 'opt': opt2, 'sched': sched2,
                                         'gen': gen2})
    assert (start, history) == (3, [(0, 1.0), (1, 0.5), (2, 0.25)])
    assert again.restore('b', {}) == (0, [])         # the next stage starts afresh
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(gen.get_state(), gen2.get_state())
    assert sched2.last_epoch == 3 and opt2.param_groups[0]['betas'] == (0.9, 0.999)
    x = torch.randn(5, 3)
    for o, n in ((opt, net), (opt2, net2)):
        o.zero_grad()
        n(x).sum().backward()
        o.step()
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    tree = {'s': {0: {'t': torch.ones(2)}, 1: (1, None)}}
    tensors = {}
    assert unflatten(json.loads(json.dumps(flatten(tree, 'p', tensors))), tensors)['s'][1] \
        == (1, None)


def test_the_warm_start_keeps_the_moe_floor_and_distillation_the_vdd_floor(data, tmp_path,
                                                                          monkeypatch):
    from vdd_ros.core import jobs
    from vdd_ros.core.checkpoint import load_model
    floors = {}

    def spy(name, fn):
        def wrapped(moe, *args, **kwargs):
            floors[name] = moe.cfg.min_std
            return fn(moe, *args, **kwargs)
        monkeypatch.setattr(jobs, name, wrapped)
    spy('train_em', jobs.train_em)
    spy('distill', jobs.distill)
    dataset, teacher = data
    out = distill_job(teacher, dataset, tmp_path / 'm', show_bar=False,
                      overrides=_overrides('moe.min_std=0.2', 'vdd.min_std=0.003'))
    assert floors == {'train_em': 0.2, 'distill': 0.003}
    moe, _, meta = load_model(out)
    assert meta['model']['min_std'] == moe.cfg.min_std == 0.003


def test_an_annealed_warm_start_hands_distillation_the_moe_floor_or_the_vdd_one(
        data, tmp_path, monkeypatch):
    from vdd_ros.core import jobs
    seen = []

    def spy(name, fn):
        def wrapped(moe, *args, **kwargs):
            seen.append((name, moe.cfg.min_std))
            out = fn(moe, *args, **kwargs)
            seen.append((f'after {name}', moe.cfg.min_std))
            return out
        monkeypatch.setattr(jobs, name, wrapped)
    spy('train_em', jobs.train_em)
    spy('distill', jobs.distill)
    dataset, teacher = data
    distill_job(teacher, dataset, tmp_path / 'm', show_bar=False,
                overrides=_overrides('moe.min_std=0.2', 'vdd.init_em_final_min_std=0.003',
                                     'vdd.min_std=null'))
    assert seen[:3] == [('train_em', 0.2), ('after train_em', pytest.approx(0.003)),
                        ('distill', 0.2)]
    seen.clear()
    distill_job(teacher, dataset, tmp_path / 'n', show_bar=False,
                overrides=_overrides('vdd.init_em_final_min_std=0.003', 'vdd.min_std=0.002'))
    assert seen[:3] == [('train_em', 0.05), ('after train_em', pytest.approx(0.003)),
                        ('distill', 0.002)]
    seen.clear()
    distill_job(teacher, dataset, tmp_path / 'd', show_bar=False, overrides=_overrides())
    assert seen[:3] == [('train_em', 0.05), ('after train_em', pytest.approx(0.001)),
                        ('distill', 0.001)]                             # the defaults
    with pytest.raises(UserError, match=r'vdd.init_em_final_min_std: must be below '
                                        r'moe.init_std \(0.5\), got 0.5'):
        distill_job(teacher, dataset, tmp_path / 'o', show_bar=False,
                    overrides=_overrides('vdd.init_em_final_min_std=0.5'))
    assert not (tmp_path / 'o').exists()


def test_the_warm_start_takes_the_e_step_floor_and_a_useless_one_is_refused(data, tmp_path,
                                                                           monkeypatch):
    from vdd_ros.core import jobs
    seen = []

    def spy(moe, obs, actions, cfg, **kwargs):
        seen.append(cfg.responsibility_min_std)
        return train_em(moe, obs, actions, cfg, **kwargs)
    train_em = jobs.train_em
    monkeypatch.setattr(jobs, 'train_em', spy)
    dataset, teacher = data
    distill_job(teacher, dataset, tmp_path / 'm', show_bar=False,
                overrides=_overrides('moe.min_std=0.01', 'vdd.init_em_responsibility_min_std=0.2'))
    assert seen == [0.2]
    with pytest.raises(UserError, match=r'vdd.init_em_responsibility_min_std: must exceed '
                                        r'moe.min_std \(0.05\) to have an effect, got 0.05'):
        distill_job(teacher, dataset, tmp_path / 'n', show_bar=False,
                    overrides=_overrides('vdd.init_em_responsibility_min_std=0.05'))
    assert not (tmp_path / 'n').exists() and seen == [0.2]


def test_a_vdd_floor_at_or_above_the_initial_std_is_refused_before_training(data, tmp_path):
    dataset, teacher = data
    with pytest.raises(UserError, match='vdd.min_std: must be below moe.init_std'):
        distill_job(teacher, dataset, tmp_path / 'm', show_bar=False,
                    overrides=_overrides('vdd.min_std=0.5'))
    assert not (tmp_path / 'm').exists()
