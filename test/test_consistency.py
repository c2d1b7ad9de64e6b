"""Consistency distillation: the student is exactly the identity at sigma_min, one call of it
draws both modes of a bimodal teacher where one teacher step averages them, and its job writes
a checkpoint that loads and acts, resumes bitwise, and trains alike on two torchrun ranks."""
import copy
import json
import re
import threading

import numpy as np
import pytest
import torch
from ddpkit import TOLERANCE, close_to
from safetensors.torch import load_file

from vdd_ros.core.checkpoint import load_policy, read_meta
from vdd_ros.core.config import (ConsistencyConfig, TeacherConfig, TrainConfig, from_dict,
                                 parse_overrides)
from vdd_ros.core.consistency import (ConsistencyStudent, Walkers, bin_sigmas, heun_step,
                                      train_consistency)
from vdd_ros.core.data import Demo, write_dataset
from vdd_ros.core.jobs import baseline_job, consistency_job, train_teacher_job
from vdd_ros.core.launch import run_training, torchrun_job
from vdd_ros.core.progress import DivergenceError
from vdd_ros.core.scores import GaussianMixtureScore
from vdd_ros.core.teacher import DiffusionTeacher
from vdd_ros.core.train_state import state_folder
from vdd_ros.errors import ConfigError, UserError

TINY = ['obs_horizon=1', 'action_horizon=2', 'action_exec=2', 'teacher.hidden_dim=32',
        'teacher.num_layers=1', 'teacher.batch_size=32', 'teacher.iterations=30',
        'consistency.iterations=15', 'consistency.batch_size=33', 'consistency.bins=6',
        'gaussian_bc.iterations=2']


def test_the_student_is_exactly_the_identity_at_sigma_min_and_only_there():
    torch.manual_seed(0)
    cfg = TeacherConfig(hidden_dim=32, num_layers=2)
    student = ConsistencyStudent(cfg, 3, 2, obs_horizon=2, action_horizon=4)
    with torch.no_grad():                  # an output layer far from zero: F(...) is large
        student.net.out[-1].bias.normal_(0, 10)
    x, obs = torch.randn(64, 8) * 3, torch.randn(64, 6)
    sigma_min = torch.tensor(cfg.sigma_min)
    assert torch.equal(student.consistency(x, obs, sigma_min), x)
    levels = bin_sigmas(cfg, 5)                              # per-row levels, t_1 = sigma_min
    rows = levels[torch.arange(64) % 5]
    out = student.consistency(x, obs, rows)
    at_min = rows == levels[0]
    assert levels[0] == sigma_min and at_min.any()
    assert torch.equal(out[at_min], x[at_min])
    assert (out[~at_min] - x[~at_min]).abs().min() > 0       # elsewhere the network acts
    # a float32 sigma_min for float64 actions: the offset is 0 before the cast
    wide = copy.deepcopy(student).double()
    assert torch.equal(wide.consistency(x.double(), obs.double(), sigma_min), x.double())


# -- a conditional bimodal problem with the closed-form denoiser as the teacher --------------
STD, HALF_GAP = 0.1, 0.7       # actions 0.2 s +- 0.7 (equal odds), each with std 0.1


def _components(obs):
    centre = 0.2 * obs[..., :1]
    means = torch.stack([centre - HALF_GAP, centre + HALF_GAP], dim=-2)       # (..., 2, 1)
    return means, torch.full(means.shape[:-1], -float(np.log(2.0)))


class ExactTeacher:
    """The exact denoiser D(a; sigma, s) = a + sigma^2 score of the smoothed data."""

    def __init__(self):
        self.score = GaussianMixtureScore(_components, STD)

    def denoise(self, a, obs, sigma):
        sigma = sigma.to(a.dtype).expand(a.shape[:-1])
        return a + sigma[..., None] ** 2 * self.score(a, obs.expand(*a.shape[:-1], 1), sigma)


def _bimodal_data(n, gen):
    obs = torch.rand(n, 1, generator=gen) * 2 - 1
    sign = torch.where(torch.rand(n, 1, generator=gen) < 0.5, -1.0, 1.0)
    return obs, 0.2 * obs + HALF_GAP * sign + STD * torch.randn(n, 1, generator=gen)


def _shares(sample):
    """(share of the lower mode, of the upper mode, near the midpoint) over 5 states x 400."""
    gen = torch.Generator().manual_seed(1)
    obs = torch.linspace(-1, 1, 5).repeat_interleave(400)[:, None]
    offset = sample(obs, gen) - 0.2 * obs
    return (float(((offset + HALF_GAP).abs() < 0.3).float().mean()),
            float(((offset - HALF_GAP).abs() < 0.3).float().mean()),
            float((offset.abs() < 0.35).float().mean()))


def _bimodal(shares):
    low, high, middle = shares
    return low > 0.35 and high > 0.35 and middle < 0.1


def test_one_student_call_draws_both_modes_where_one_teacher_step_averages_them():
    gen = torch.Generator().manual_seed(0)
    obs, actions = _bimodal_data(4000, gen)
    cfg = TeacherConfig(hidden_dim=64, num_layers=2)
    torch.manual_seed(0)
    student = ConsistencyStudent(cfg, 1, 1)
    untrained = _shares(lambda o, g: student.sample(o, generator=g))
    exact = ExactTeacher()
    one_step = DiffusionTeacher(cfg, 1, 1)                   # the exact denoiser, sampled
    one_step.denoise = exact.denoise
    averaged = _shares(lambda o, g: one_step.sample(o, steps=1, generator=g))
    history = train_consistency(student, exact, obs, actions,
                                ConsistencyConfig(iterations=1000, lr=1e-3), show_bar=False)
    assert len(history) == 1000 and history[-1][1] < history[0][1]
    assert student.sampling_steps == 1 and not student.training
    trained = _shares(lambda o, g: student.sample(o, generator=g))
    # measured: trained (0.46, 0.49, 0.04), two steps (0.45, 0.47, 0.03); untrained (0.05,
    # 0.05, 0.86); one exact teacher step (0.18, 0.19, 0.55), its 8 steps (0.49, 0.51, 0.005)
    assert _bimodal(trained), trained
    assert not _bimodal(untrained), untrained
    assert not _bimodal(averaged), averaged
    two_step = _shares(lambda o, g: student.sample(o, steps=2, generator=g))
    assert _bimodal(two_step), two_step


class ZeroDenoiser:
    """D = 0: the ODE dx/dsigma = x / sigma, whose Heun steps are exact, x(t) = x(s) t / s."""

    def denoise(self, a, obs, sigma):
        return torch.zeros_like(a)


def test_walkers_lie_on_the_teachers_sampling_trajectories_at_every_level():
    gen = torch.Generator().manual_seed(0)
    cfg = TeacherConfig(sigma_max=2.0)
    levels, obs = bin_sigmas(cfg, 5), torch.zeros(10, 1)
    walkers = Walkers(8000, 4)
    walkers.start(ZeroDenoiser(), obs, levels, gen)

    def check():
        # started at sigma_max * eps, a walker on level k has walked to levels[k] * eps
        counts = torch.bincount(walkers.level, minlength=5)
        assert counts[0] == 0 and (counts[1:] > 1700).all()       # uniform over 1..4
        for k in range(1, 5):
            std = float(walkers.x[walkers.level == k].std())
            assert abs(std / float(levels[k]) - 1) < 0.05, (k, std, float(levels[k]))

    check()
    before = walkers.level.clone()
    for _ in range(6):
        stepped = heun_step(ZeroDenoiser(), walkers.x, obs[walkers.row], levels[walkers.level],
                            levels[walkers.level - 1])
        walkers.advance(stepped, levels, len(obs), gen)
        check()
    assert torch.equal(walkers.level, torch.where(before > 2, before - 2, before + 2))


def test_a_non_finite_loss_raises_naming_the_iteration():
    class Broken(ExactTeacher):
        calls = 0

        def denoise(self, a, obs, sigma):
            Broken.calls += 1
            out = super().denoise(a, obs, sigma)
            return out * float('nan') if Broken.calls > 4 else out

    gen = torch.Generator().manual_seed(0)
    obs, actions = _bimodal_data(64, gen)
    student = ConsistencyStudent(TeacherConfig(hidden_dim=16, num_layers=1), 1, 1)
    with pytest.raises(DivergenceError, match='consistency: loss became nan at iteration 2'):
        train_consistency(student, Broken(), obs, actions,   # two teacher calls an iteration
                          ConsistencyConfig(batch_size=16, trajectory_fraction=0.0),
                          show_bar=False)


@pytest.mark.parametrize('key, value, message', [
    ('bins', 1, 'consistency.bins: must be >= 2, got 1'),
    ('distance', 'l1', "consistency.distance: must be one of ['pseudo_huber', 'l2'], got 'l1'"),
    ('ema_decay', 1.0, 'consistency.ema_decay: must be in [0, 1), got 1.0'),
])
def test_the_config_section_is_validated_naming_the_field(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(f'train.yaml: {message}')):
        from_dict(TrainConfig, {'consistency': {key: value}}, 'train.yaml')


def test_an_e_step_floor_for_the_one_expert_of_gaussian_bc_is_refused():
    data = {'moe': {'min_std': 0.01}, 'gaussian_bc': {'responsibility_min_std': 0.2}}
    with pytest.raises(ConfigError, match=re.escape(
            'train.yaml: gaussian_bc.responsibility_min_std: has no effect: Gaussian BC has '
            'one expert')):
        from_dict(TrainConfig, data, 'train.yaml')
    data['em_moe'] = data.pop('gaussian_bc')          # the EM-trained MoE takes it
    assert from_dict(TrainConfig, data, 'train.yaml').em_moe.responsibility_min_std == 0.2


# -- the job -------------------------------------------------------------------------------
def _dataset(path, seed=0, obs_dim=5):
    rng = np.random.default_rng(seed)
    demos = [Demo(obs=rng.normal(size=(30, obs_dim)).astype(np.float32),
                  actions=rng.uniform(-1, 1, size=(30, 3)).astype(np.float32))
             for _ in range(6)]
    write_dataset(path, demos, [('pos', 3), ('vel', obs_dim - 3)], {})
    return path


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp('consistency')
    dataset = _dataset(folder / 'd.hdf5')
    teacher = folder / 'teacher'
    train_teacher_job(dataset, teacher, overrides=parse_overrides(TINY), show_bar=False)
    return dataset, teacher


def _weights(folder):
    return load_file(str(folder / 'model.safetensors'))


def test_the_job_writes_a_one_step_student_that_load_policy_runs(data, tmp_path):
    dataset, teacher = data
    out = consistency_job(teacher, dataset, tmp_path / 'cm', overrides=parse_overrides(TINY),
                          show_bar=False)
    meta = read_meta(out)
    assert (meta['kind'], meta['method'], meta['metrics']['iterations']) == \
        ('consistency', 'consistency', 15)
    assert meta['model']['hidden_dim'] == 32 and meta['model']['sampling_steps'] == 1
    assert meta['spec'] == read_meta(teacher)['spec']
    # the student starts from the teacher's network and keeps its normalizers
    assert load_file(str(out / 'normalizer.safetensors')).keys() == \
        load_file(str(teacher / 'normalizer.safetensors')).keys()
    for k, v in load_file(str(teacher / 'normalizer.safetensors')).items():
        assert torch.equal(load_file(str(out / 'normalizer.safetensors'))[k], v)
    assert _weights(out).keys() == _weights(teacher).keys()
    for steps in (None, 3):
        policy = load_policy(out, steps=steps)
        assert policy.model.kind == 'consistency'
        assert policy.model.sampling_steps == (steps or 1)
        assert policy.model.describe() == {'sampling_steps': steps or 1}
        policy.reset(0)
        actions = [policy.act(np.zeros(5, np.float32)) for _ in range(3)]
        assert all(a.shape == (3,) and np.isfinite(a).all() for a in actions)
    # through the launcher, in this process
    again = run_training('consistency', dataset, tmp_path / 'cm2', teacher=teacher,
                         overrides=parse_overrides(TINY), show_bar=False)
    assert all(torch.equal(v, _weights(again)[k]) for k, v in _weights(out).items())
    with pytest.raises(UserError, match='consistency: needs a teacher checkpoint'):
        run_training('consistency', dataset, tmp_path / 'cm3', overrides={})


def test_a_wrong_checkpoint_kind_or_dataset_is_one_clear_error(data, tmp_path):
    dataset, teacher = data
    bc = baseline_job('gaussian_bc', dataset, tmp_path / 'bc', overrides=parse_overrides(TINY),
                      show_bar=False)
    with pytest.raises(UserError, match=r'bc: a moe checkpoint \(method gaussian_bc\); '
                                        r'consistency distillation needs a diffusion teacher'):
        consistency_job(bc, dataset, tmp_path / 'cm', overrides=parse_overrides(TINY))
    other = _dataset(tmp_path / 'other.hdf5', obs_dim=4)
    with pytest.raises(UserError, match="do not match the teacher's"):
        consistency_job(teacher, other, tmp_path / 'cm', overrides=parse_overrides(TINY))
    assert not (tmp_path / 'cm').exists()


def test_a_stopped_job_resumed_ends_bitwise_equal_to_an_uninterrupted_one(data, tmp_path):
    dataset, teacher = data
    whole, parted = tmp_path / 'whole', tmp_path / 'parted'
    run = dict(overrides=parse_overrides(TINY), show_bar=False, checkpoint_every=4)
    consistency_job(teacher, dataset, whole, **run)
    assert not state_folder(whole).exists()
    stop = threading.Event()
    consistency_job(teacher, dataset, parted, progress=lambda p: stop.set(), stop=stop, **run)
    [gen] = state_folder(parted).iterdir()
    meta = json.loads((gen / 'state.json').read_text())
    assert (meta['stage'], meta['iteration']) == ('consistency', 1)
    assert read_meta(parted)['metrics']['iterations'] == 1
    consistency_job(teacher, dataset, parted, resume=True, **run)
    assert all(torch.equal(v, _weights(parted)[k]) for k, v in _weights(whole).items())
    assert json.loads((whole / 'curves.json').read_text()) == \
        json.loads((parted / 'curves.json').read_text())
    assert not state_folder(parted).exists()


def test_two_torchrun_ranks_train_the_student_as_one_process(data, tmp_path, monkeypatch):
    monkeypatch.setenv('GLOO_SOCKET_IFNAME', 'lo')
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    dataset, teacher = data
    one = consistency_job(teacher, dataset, tmp_path / 'one', overrides=parse_overrides(TINY),
                          show_bar=False)
    two = torchrun_job('consistency', dataset, tmp_path / 'two', 2, teacher=teacher,
                       overrides=parse_overrides(TINY), show_bar=False)
    a, b = _weights(two), _weights(one)          # a global batch of 33 rows: shares 16 and 17
    assert a.keys() == b.keys()
    assert max(close_to(a[k], b[k]) for k in b) < TOLERANCE
