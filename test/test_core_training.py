"""Training loops: VDD recovers the modes of an exact mixture score, baselines fit the data,
divergence raises, early stop and progress callbacks work."""
import dataclasses
import math
import threading

import pytest
import torch

from vdd_ros.core.baselines import em_loss, floor_scales, std_floor_schedule, train_em
from vdd_ros.core.config import BaselineConfig, MoEConfig, TeacherConfig, VDDConfig
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.progress import DivergenceError
from vdd_ros.core.teacher import DiffusionTeacher, train_teacher
from vdd_ros.core.toy import RingProblem, ToyConfig, mean_errors
from vdd_ros.core.vdd import distill, gating_loss

FAST_VDD = VDDConfig(iterations=400, batch_size=64, lr=1e-2, gating_lr=1e-2,
                     final_lr_fraction=0.05, uniform_gating_fraction=0.5,
                     backbone_lr_scale=1.0)


EXPERTS = ['independent', 'shared']


def ring_moe(cfg: ToyConfig, actions: torch.Tensor, gen: torch.Generator,
             experts: str = 'independent') -> MixtureOfExperts:
    moe = MixtureOfExperts(dataclasses.replace(cfg.moe, experts=experts), 1, 2)
    moe.init_means(actions, gen)
    return moe


@pytest.mark.parametrize('experts', EXPERTS)
def test_vdd_on_the_exact_score_puts_one_expert_on_each_mode_and_gates_it_by_its_weight(
        experts):
    cfg = ToyConfig(weights=[0.17, 0.08] * 4)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    problem = RingProblem(cfg)
    obs, actions = problem.sample(4000, gen)
    moe = ring_moe(cfg, actions, gen, experts)
    # independent experts each learn the modes' common dependence on s alone: at 400
    # iterations one edge-state mode was 0.26-0.29 from its expert (seeds 0-3); at 800 all
    # within 0.2 (seed 0: 0.09, gating error 0.022)
    vcfg = dataclasses.replace(FAST_VDD, iterations=800) if experts == 'independent' \
        else FAST_VDD
    distill(moe, problem.score(), obs, actions, vcfg, seed=0, show_bar=False)
    states = torch.linspace(-1, 1, 5)[:, None]
    covered, worst, distinct = mean_errors(problem, moe, states)
    assert covered == 8
    assert distinct
    assert worst < 0.25
    # after the uniform warm-up the M-step gives each expert its mode's weight, 0.17 or 0.08
    # (an untrained gating is uniform: 1/8, off by 0.045 for every expert; measured: 0.021)
    with torch.no_grad():
        h = moe.features(states)
        gate, means = moe.log_gating(h).exp(), moe.means(h)
    modes = torch.stack([problem.classify(m, s.expand(8, 1)) for m, s in zip(means, states)])
    assert (gate - problem.probs[modes]).abs().max() < 0.03


def test_vdd_raises_on_divergence_naming_the_iteration():
    cfg = ToyConfig()
    gen = torch.Generator().manual_seed(0)
    obs, actions = RingProblem(cfg).sample(256, gen)
    moe = ring_moe(cfg, actions, gen)
    calls = {'n': 0}

    def bad_score(a, obs, sigma):
        calls['n'] += 1
        return torch.full_like(a, float('nan')) if calls['n'] > 6 else torch.zeros_like(a)

    with pytest.raises(DivergenceError, match='iteration 3'):
        distill(moe, bad_score, obs, actions, FAST_VDD, show_bar=False)


def test_teacher_training_raises_on_nan_data():
    teacher = DiffusionTeacher(TeacherConfig(hidden_dim=16, num_layers=1, iterations=5), 1, 2)
    actions = torch.zeros(32, 2)
    actions[:, 0] = float('nan')
    with pytest.raises(DivergenceError, match='teacher: loss became nan at iteration 0'):
        train_teacher(teacher, torch.zeros(32, 1), actions, show_bar=False)


def test_early_stop_and_progress_callback():
    cfg = ToyConfig()
    gen = torch.Generator().manual_seed(0)
    problem = RingProblem(cfg)
    obs, actions = problem.sample(256, gen)
    moe = ring_moe(cfg, actions, gen)
    stop = threading.Event()
    reports = []

    def on_progress(p):
        reports.append(p)
        if p.iteration >= 5:
            stop.set()

    vcfg = VDDConfig(iterations=1000, batch_size=32, backbone_lr_scale=1.0)
    history = distill(moe, problem.score(), obs, actions, vcfg, progress=on_progress,
                      stop=stop, show_bar=False)
    assert 5 <= len(history) < 1000
    assert reports and reports[-1].stage == 'vdd' and reports[-1].total == 1000
    assert reports[-1].eta_s > 0


@pytest.mark.parametrize('experts', EXPERTS)
def test_gating_step_moves_toward_data_responsibilities(experts):
    """Data only on expert 0's mean: the M-step must raise q(z=0|s)."""
    moe = MixtureOfExperts(MoEConfig(num_experts=2, hidden_dim=16, num_layers=1,
                                     experts=experts), 1, 1)
    with torch.no_grad():
        moe.mean_head.weight.zero_()
        moe.mean_head.bias.view(-1).copy_(torch.tensor([-1.0, 1.0]))
    obs, actions = torch.zeros(64, 1), torch.full((64, 1), -1.0)
    opt = torch.optim.Adam(moe.gating_parameters(), lr=0.05)
    for _ in range(50):
        loss = gating_loss(moe, obs, actions)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert moe.log_gating(moe.features(obs[:1])).exp()[0, 0] > 0.9


def test_an_e_step_floor_sets_the_gatings_targets_but_the_experts_fit_unfloored():
    # a narrow expert (std 0.001) 2 stds from the action, a wide one (0.1) 0.48 stds from it
    moe = MixtureOfExperts(MoEConfig(num_experts=2, hidden_dim=8, num_layers=1), 1, 1)
    log_gate = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_()
    means = torch.tensor([[[0.0], [0.05]]])
    scales = torch.tensor([[[0.001], [0.1]]])
    moe.forward = lambda obs: (log_gate, means, scales)
    action = torch.tensor([[0.002]])

    def responsibilities_and_loss(floor):
        log_gate.grad = None
        loss = em_loss(moe, torch.zeros(1, 1), action, floor)
        loss.backward()
        return -log_gate.grad[0], loss.item()       # d loss / d log gate = -responsibility

    def log_normal(x, mu, std):
        return -0.5 * ((x - mu) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    comp = [log_normal(0.002, 0.0, 0.001), log_normal(0.002, 0.05, 0.1)]
    resp, loss = responsibilities_and_loss(None)
    assert float(resp[0]) == pytest.approx(1 / (1 + math.exp(comp[1] - comp[0])), rel=1e-5)
    assert float(resp[0]) > 0.9
    # floored at 0.1 both experts are judged at std 0.1: the narrow one barely wins
    floored, floored_loss = responsibilities_and_loss(0.1)
    judged = [log_normal(0.002, 0.0, 0.1), log_normal(0.002, 0.05, 0.1)]
    assert float(floored[0]) == pytest.approx(1 / (1 + math.exp(judged[1] - judged[0])),
                                              rel=1e-5)
    assert 0.5 < float(floored[0]) < 0.6
    # the experts' own likelihood (the M-step) keeps the narrow expert's std
    expected = -sum(float(r) * (c + math.log(0.5)) for r, c in zip(floored, comp))
    assert floored_loss == pytest.approx(expected, rel=1e-5)


def test_the_annealed_floor_falls_geometrically_from_the_moes_to_the_final_one():
    assert std_floor_schedule(0.05, None, 1000) is None
    floor = std_floor_schedule(0.05, 0.001, 1001)
    assert floor(0) == pytest.approx(0.05) and floor(1000) == pytest.approx(0.001)
    assert floor(500) == pytest.approx(math.sqrt(0.05 * 0.001))       # geometric midpoint
    assert floor(2000) == pytest.approx(0.001)                       # held past the end


def test_an_annealed_warm_start_ends_at_the_final_floor_with_experts_below_the_first():
    # two modes 0.005 wide: with a floor of 0.05 throughout no std can fit them; annealed
    # to 0.001 the experts end narrower than the floor they started from
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(512, 2, generator=gen)
    actions = 0.5 * torch.sign(obs[:, :1]) + 0.005 * torch.randn(512, 1, generator=gen)

    def warm_start(final):
        torch.manual_seed(0)
        moe = MixtureOfExperts(MoEConfig(num_experts=2, hidden_dim=32, num_layers=2), 2, 1)
        moe.init_means(actions, torch.Generator().manual_seed(0))
        train_em(moe, obs, actions, BaselineConfig(iterations=600, batch_size=128,
                                                   final_min_std=final), show_bar=False)
        with torch.no_grad():
            log_gate, _, scales = moe(obs)
        return moe, (log_gate.exp() * scales[..., 0]).sum(-1).median().item()
    fixed, fixed_std = warm_start(None)
    annealed, annealed_std = warm_start(0.001)
    assert fixed.cfg.min_std == 0.05 and fixed_std >= 0.05
    assert annealed.cfg.min_std == pytest.approx(0.001) and annealed_std < 0.02


def test_the_e_step_floor_lifts_a_cholesky_diagonal_and_keeps_the_rest():
    chol = torch.tensor([[[[0.01, 0.0], [0.5, 0.3]]]])
    assert torch.equal(floor_scales(chol, 0.1, full=True),
                       torch.tensor([[[[0.1, 0.0], [0.5, 0.3]]]]))
    assert torch.equal(floor_scales(torch.tensor([[[0.01, 0.3]]]), 0.1, full=False),
                       torch.tensor([[[0.1, 0.3]]]))


@pytest.mark.parametrize('experts', EXPERTS)
def test_em_moe_recovers_unequal_mode_weights_and_gaussian_bc_averages(experts):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n = 4000
    obs = torch.rand(n, 1, generator=gen)
    left = torch.rand(n, generator=gen) < 0.3
    actions = torch.where(left, -1.0, 1.0)[:, None] + 0.1 * torch.randn(n, 1, generator=gen)
    bcfg = BaselineConfig(iterations=600, batch_size=256, lr=1e-2)
    em = MixtureOfExperts(MoEConfig(num_experts=2, hidden_dim=32, num_layers=1,
                                    experts=experts), 1, 1)
    em.init_means(actions, gen)
    train_em(em, obs, actions, bcfg, show_bar=False)
    log_gate, means, scales = em(torch.full((1, 1), 0.5))
    order = means[0, :, 0].argsort()
    assert torch.allclose(means[0, order, 0], torch.tensor([-1.0, 1.0]), atol=0.1)
    assert torch.allclose(log_gate.exp()[0, order], torch.tensor([0.3, 0.7]), atol=0.05)
    assert torch.allclose(scales[0, :, 0], torch.tensor([0.1, 0.1]), atol=0.05)

    bc = MixtureOfExperts(MoEConfig(num_experts=1, hidden_dim=32, num_layers=1,
                                    experts=experts), 1, 1)
    train_em(bc, obs, actions, bcfg, show_bar=False)
    with torch.no_grad():
        _, mean, std = bc(torch.full((1, 1), 0.5))
    assert float(mean) == pytest.approx(0.4, abs=0.1)        # 0.7 * 1 + 0.3 * -1
    assert float(std) == pytest.approx(float(actions.std()), abs=0.1)


@pytest.mark.parametrize('experts', EXPERTS)
def test_backbone_lr_scale_zero_trains_only_heads_and_gating(experts):
    """A shared backbone stays frozen; independent experts have none, so every parameter of
    every expert is trained (at the full rate)."""
    cfg = ToyConfig()
    gen = torch.Generator().manual_seed(0)
    problem = RingProblem(cfg)
    obs, actions = problem.sample(256, gen)
    moe = ring_moe(cfg, actions, gen, experts)
    trunk = [p.detach().clone() for p in moe.trunk_parameters()]
    own = [p.detach().clone() for p in moe.expert_parameters()]
    gate = [p.detach().clone() for p in moe.gating_parameters()]
    vcfg = VDDConfig(iterations=20, batch_size=32, backbone_lr_scale=0.0)
    distill(moe, problem.score(), obs, actions, vcfg, show_bar=False)
    assert bool(trunk) == (experts == 'shared')
    assert all(torch.equal(a, b) for a, b in zip(trunk, moe.trunk_parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(own, moe.expert_parameters()))
    if experts == 'independent':   # each expert's own slice of each parameter moved
        assert all((a != b).flatten(1).any(1).all()
                   for a, b in zip(own, moe.expert_parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(gate, moe.gating_parameters()))


@pytest.mark.parametrize('experts', EXPERTS)
@pytest.mark.parametrize('scale', [0.0, 0.5])
def test_the_clipped_gradient_is_that_of_the_trained_parameters_of_this_step(monkeypatch,
                                                                             scale, experts):
    """At backbone_lr_scale 0 the frozen backbone's gradient is not clipped with the heads (left
    out of the optimizer, it was never zeroed, summed over the steps and inflated every head's
    clipped norm); otherwise it is clipped with them. Independent experts: every expert's
    parameters, and only those, at any scale."""
    cfg = ToyConfig()
    gen = torch.Generator().manual_seed(0)
    problem = RingProblem(cfg)
    obs, actions = problem.sample(256, gen)
    moe = ring_moe(cfg, actions, gen, experts)
    backbone = {id(p) for p in moe.trunk_parameters()}
    own = {id(p) for p in moe.expert_parameters()}
    clipped = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        clipped.append({id(p) for p in params})
        return clip(params, max_norm)
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', spy)
    vcfg = VDDConfig(iterations=30, batch_size=32, backbone_lr_scale=scale)
    distill(moe, problem.score(), obs, actions, vcfg, show_bar=False)
    assert len(clipped) == 30 * vcfg.expert_steps
    if experts == 'shared':
        assert all(bool(ids & backbone) == (scale > 0) for ids in clipped)
    else:
        assert not backbone and all(ids == own for ids in clipped)
