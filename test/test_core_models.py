"""MoE densities against closed forms, scores against finite differences and the exact score of
Gaussian data, shapes; independent experts share no parameter; the acting fast path."""
import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from vdd_ros.core.config import MoEConfig, TeacherConfig
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.policy import ModelPolicy, PolicySpec
from vdd_ros.core.scores import GaussianMixtureScore, TeacherScore
from vdd_ros.core.teacher import DiffusionTeacher
from vdd_ros.core.toy import RingProblem, ToyConfig


EXPERTS = ['independent', 'shared']


def make_moe(cov: str, z: int = 3, obs_dim: int = 4, act_dim: int = 2, t_o: int = 1,
             t_a: int = 1, experts: str = 'independent') -> MixtureOfExperts:
    torch.manual_seed(0)
    moe = MixtureOfExperts(MoEConfig(num_experts=z, hidden_dim=32, num_layers=2,
                                     covariance=cov, experts=experts),
                           obs_dim, act_dim, t_o, t_a)
    with torch.no_grad():  # non-trivial gating and scales
        for p in (*moe.gating_parameters(), *moe.scale_head.parameters()):
            p.add_(0.3 * torch.randn_like(p))
    return moe.eval()


def gate_logits(moe: MixtureOfExperts, obs: torch.Tensor) -> torch.Tensor:
    """log q(z|s) of raw observations `(B, F)` through the plain (unfolded) network."""
    return moe.log_gating(moe.features(moe.obs_normalizer.normalize(obs)))


@pytest.mark.parametrize('experts', EXPERTS)
@pytest.mark.parametrize('cov', ['diag', 'full'])
def test_log_prob_matches_closed_form(cov, experts):
    moe = make_moe(cov, experts=experts)
    obs, a = torch.randn(5, 4), torch.randn(5, 2)
    log_gate, means, scales = moe(obs)
    if cov == 'full':
        comps = MultivariateNormal(means, scale_tril=scales)
    else:
        comps = Normal(means, scales)
    per = comps.log_prob(a[:, None]) if cov == 'full' else comps.log_prob(a[:, None]).sum(-1)
    expected = torch.logsumexp(log_gate + per, -1)
    assert torch.allclose(moe.log_prob(a, obs), expected, atol=1e-5)
    ent = comps.entropy() if cov == 'full' else comps.entropy().sum(-1)
    assert torch.allclose(moe.entropy(scales), ent, atol=1e-5)
    assert torch.allclose(log_gate.exp().sum(-1), torch.ones(5), atol=1e-6)


def test_full_covariance_is_lower_triangular_with_positive_diagonal():
    moe = make_moe('full', act_dim=3)
    _, _, chol = moe(torch.randn(6, 4))
    assert chol.shape == (6, 3, 3, 3)
    assert torch.equal(chol, chol.tril())
    assert (chol.diagonal(dim1=-2, dim2=-1) >= moe.cfg.min_std).all()


def test_reparameterised_samples_have_expert_statistics():
    moe = make_moe('full', z=2)
    obs = torch.randn(1, 4)
    _, means, chol = moe(obs)
    draws = moe.rsample_experts(means, chol, 20000, torch.Generator().manual_seed(0))
    assert draws.shape == (1, 2, 20000, 2)
    cov = chol @ chol.transpose(-1, -2)
    for z in range(2):
        x = draws[0, z]
        assert torch.allclose(x.mean(0), means[0, z], atol=0.05)
        assert torch.allclose(torch.cov(x.T), cov[0, z], atol=0.05)


def test_analytic_score_matches_finite_differences():
    problem = RingProblem(ToyConfig())
    score_fn = problem.score()
    obs = torch.tensor([[0.3]], dtype=torch.float64)
    a = torch.tensor([[1.1, -0.4]], dtype=torch.float64)
    sigma = torch.tensor([0.35], dtype=torch.float64)
    eps = 1e-5
    fd = []
    for d in range(2):
        step = torch.zeros_like(a)
        step[0, d] = eps
        fd.append((score_fn.log_prob(a + step, obs, sigma)
                   - score_fn.log_prob(a - step, obs, sigma)) / (2 * eps))
    assert torch.allclose(score_fn(a, obs, sigma)[0], torch.cat(fd), atol=1e-6)


def test_teacher_shapes_and_sampler_steps():
    torch.manual_seed(0)
    teacher = DiffusionTeacher(TeacherConfig(hidden_dim=32, num_layers=2), 3, 2, 2, 4)
    obs = torch.randn(5, 6)
    assert teacher.sample(obs, steps=1).shape == (5, 8)
    assert teacher.sample(obs, steps=5).shape == (5, 8)
    sig = teacher.sigmas(5)
    assert sig[0] == pytest.approx(teacher.cfg.sigma_max)
    assert sig[-1] == pytest.approx(teacher.cfg.sigma_min)
    assert (sig[1:] < sig[:-1]).all()
    a = torch.randn(5, 8)
    s = teacher.score(a, obs, torch.tensor(0.3))
    # broadcast as the VDD objective calls it: (B, Z, V, D) actions with (B, 1, 1, F) obs
    s4 = teacher.score(a.view(5, 1, 1, 8).expand(5, 3, 2, 8), obs[:, None, None],
                       torch.full((5, 3, 2), 0.3))
    assert torch.allclose(s4[:, 1, 1], s, atol=1e-5)


def test_teacher_with_the_ideal_denoiser_has_the_exact_score_of_gaussian_data():
    """With its network's output zeroed, the EDM denoiser is c_skip * a = E[a0 | a] for data
    a0 ~ N(0, sigma_data^2 I): its score must be that of N(0, (sigma_data^2 + sigma^2) I)."""
    torch.manual_seed(0)
    teacher = DiffusionTeacher(TeacherConfig(hidden_dim=16, num_layers=2, sigma_data=0.7), 3,
                               2).double()
    with torch.no_grad():
        teacher.net.out[-1].weight.zero_()
        teacher.net.out[-1].bias.zero_()
    obs = torch.randn(4, 1, 1, 3, dtype=torch.float64)
    a = 2 * torch.randn(4, 3, 5, 2, dtype=torch.float64)
    sigma = torch.rand(4, 3, 5, dtype=torch.float64) * 0.9 + 0.05
    exact = -a / (0.7 ** 2 + sigma[..., None] ** 2)
    assert torch.allclose(teacher.score(a, obs, sigma), exact, atol=1e-10)
    assert torch.allclose(TeacherScore(teacher)(a, obs, sigma), exact, atol=1e-10)
    # the analytic mixture score helper, one component at 0, agrees
    one = GaussianMixtureScore(lambda o: (o.new_zeros(*o.shape[:-1], 1, 2),
                                          o.new_zeros(*o.shape[:-1], 1)), 0.7)
    assert torch.allclose(one(a, obs, sigma), exact, atol=1e-10)


def test_teacher_learns_a_point_mass():
    """A few hundred steps on a fixed target make every sample land near it."""
    from vdd_ros.core.teacher import train_teacher
    torch.manual_seed(0)
    teacher = DiffusionTeacher(TeacherConfig(hidden_dim=64, num_layers=2, iterations=400,
                                             batch_size=64, lr=3e-3, ema_decay=0.9), 1, 2)
    obs = torch.rand(512, 1)
    target = torch.tensor([0.6, -0.4])
    history = train_teacher(teacher, obs, target.expand(512, 2), show_bar=False)
    assert np.mean([v for _, v in history[-50:]]) < np.mean([v for _, v in history[:50]])
    x = teacher.sample(torch.rand(200, 1), steps=4, generator=torch.Generator().manual_seed(1))
    assert (x - target).norm(dim=-1).mean() < 0.1


def test_policy_windows_and_chunks():
    """obs_horizon stacks observations, action_exec pops a chunk before the next query."""
    moe = make_moe('diag', z=2, obs_dim=3, act_dim=2, t_o=2, t_a=3)
    spec = PolicySpec(obs_fields=[('x', 3)], action_dim=2, obs_horizon=2, action_horizon=3,
                      action_exec=2)
    calls = []
    predict = moe.predict
    moe.predict = lambda w, **kw: (calls.append(w.clone()), predict(w, **kw))[1]
    policy = ModelPolicy(moe, spec)
    policy.reset(seed=0)
    for t in range(4):
        assert policy.act(np.full(3, t, np.float32)).shape == (2,)
    assert len(calls) == 2                            # steps 0 and 2 query the model
    assert calls[0].shape == (1, 2, 3)
    assert torch.equal(calls[0][0, 0], calls[0][0, 1])   # first window pads with obs 0
    assert calls[1][0, 0, 0] == 1 and calls[1][0, 1, 0] == 2
    with pytest.raises(ValueError, match='observation has 5 values'):
        policy.act(np.zeros(5, np.float32))


def test_folded_acting_path_matches_the_network():
    """predict() folds the normalizers into the layers; it must equal the plain computation."""
    moe = make_moe('diag', z=3, obs_dim=4, act_dim=2, t_o=2, t_a=2)
    moe.obs_normalizer.offset.uniform_(-1, 1)
    moe.obs_normalizer.scale.uniform_(0.5, 2)
    moe.action_normalizer.offset.uniform_(-1, 1)
    moe.action_normalizer.scale.uniform_(0.5, 2)
    moe._acting = None
    window = torch.randn(1, 2, 4)
    for z in range(3):
        moe.set_expert_mode(z)
        action, info = moe.predict(window, diagnostics=True)
        _, means, _ = moe(moe.obs_normalizer.normalize(window).reshape(1, -1))
        expected = moe.action_normalizer.unnormalize(means[0, z].view(2, 2))
        assert torch.allclose(action[0], expected, atol=1e-5)
        assert info['expert'] == z


@pytest.mark.parametrize('experts', EXPERTS)
@pytest.mark.parametrize('mode', ['sample', 'argmax', 'per_episode', 2])
def test_predict_gives_the_full_forwards_mean_of_the_chosen_expert(experts, mode):
    """At batch 1 and batch 5, every expert mode: the action is the chosen expert's mean of
    the unfolded forward pass (raw units), the expert the one the gating gives."""
    moe = make_moe('full', z=3, obs_dim=4, act_dim=2, t_o=2, t_a=3, experts=experts)
    with torch.no_grad():
        for p in (*moe.expert_parameters(), *moe.trunk_parameters()):
            p.add_(0.3 * torch.randn_like(p))   # the experts' means far apart
        for norm in (moe.obs_normalizer, moe.action_normalizer):
            norm.offset.uniform_(-1, 1)
            norm.scale.uniform_(0.5, 2)
    moe.set_expert_mode(mode)
    windows = torch.randn(5, 2, 4)
    flat = moe.obs_normalizer.normalize(windows).reshape(5, -1)
    log_gate, means, _ = moe(flat)
    want = moe.action_normalizer.unnormalize(means.view(5, 3, 3, 2))        # (B, Z, T_a, A)
    chosen = []
    for batch in (1, 5):
        for seed in range(6):
            moe.reset()
            action, info = moe.predict(windows[:batch], torch.Generator().manual_seed(seed))
            moe.reset()
            idx = moe.select(log_gate[:batch], torch.Generator().manual_seed(seed)) \
                if batch > 1 else torch.tensor([int(info['expert'])])
            assert action.shape == (batch, 3, 2)
            assert torch.allclose(action, want[torch.arange(batch), idx], atol=1e-5)
            assert info['expert'] == int(idx[0])
            chosen.append(int(idx[0]))
    if mode == 'argmax':
        assert set(chosen) == {int(log_gate[0].argmax())}
    elif mode == 2:
        assert set(chosen) == {2}
    else:
        assert len(set(chosen)) > 1       # the seeds choose different experts


def test_independent_experts_share_no_parameter():
    """Expert 0's mean and scale have no gradient in expert 1's parameters (nor the gating's),
    and changing every parameter of expert 1 leaves expert 0's outputs as they were; the
    shared backbone, by contrast, carries expert 0's gradient."""
    obs = torch.randn(6, 4)
    for experts in EXPERTS:
        moe = make_moe('full', z=3, experts=experts)
        _, means, chol = moe(obs)
        (means[:, 0].sum() + chol[:, 0].sum()).backward()
        assert all(p.grad is None for p in moe.gating_parameters())
        trunk = list(moe.trunk_parameters())
        assert bool(trunk) == (experts == 'shared')
        assert all(p.grad.abs().sum() > 0 for p in trunk)
        if experts == 'shared':
            continue
        own = list(moe.expert_parameters())
        assert own and all(p.shape[0] == 3 for p in own)       # stacked (Z, ...)
        assert len(own) == 2 * moe.cfg.num_layers + 4
        for p in own:
            assert p.grad[0].abs().sum() > 0 and torch.equal(p.grad[1:], torch.zeros_like(
                p.grad[1:]))
        with torch.no_grad():
            before = moe(obs)
            for p in own:
                p[1].add_(torch.randn_like(p[1]))
            after = moe(obs)
        assert torch.equal(after[0], before[0])                   # the gating
        for b, a in zip(before[1:], after[1:]):
            assert torch.equal(a[:, [0, 2]], b[:, [0, 2]]) and not torch.allclose(
                a[:, 1], b[:, 1])


@pytest.mark.parametrize('experts', EXPERTS)
def test_init_means_spreads_the_experts_over_the_data(experts):
    """Farthest-point picks: each expert starts at one of the data's clusters."""
    moe = make_moe('diag', z=3, act_dim=2, experts=experts)
    centres = torch.tensor([[-3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])
    actions = (centres[:, None] + 0.01 * torch.randn(3, 50, 2)).reshape(-1, 2)
    moe.init_means(actions, torch.Generator().manual_seed(0))
    with torch.no_grad():
        means = moe.means(moe.features(torch.zeros(10, 4)))      # (10, Z, D)
    nearest = torch.cdist(means.mean(0), centres).argmin(-1)
    assert sorted(nearest.tolist()) == [0, 1, 2]
    assert (means - means.mean(0)).abs().max() < 0.5    # the weights start small


@pytest.mark.parametrize('mode', ['argmax', 'per_episode', 1])
def test_expert_modes(mode):
    moe = make_moe('diag', z=3)
    spec = PolicySpec(obs_fields=[('x', 4)], action_dim=2)
    policy = ModelPolicy(moe, spec)
    policy.diagnostics = True
    moe.set_expert_mode(mode)
    rng = np.random.default_rng(0)
    experts = []
    policy.reset(seed=3)
    for _ in range(20):
        obs = rng.standard_normal(4).astype(np.float32)
        policy.act(obs)
        experts.append(policy.info['expert'])
        if mode == 'argmax':
            logits = gate_logits(moe, torch.from_numpy(obs)[None])
            assert experts[-1] == int(logits.argmax())
    if mode in ('per_episode', 1):
        assert len(set(experts)) == 1
    if mode == 1:
        assert experts[0] == 1


def test_sampled_experts_follow_the_gating():
    moe = make_moe('diag', z=3)
    obs = torch.randn(1, 1, 4)
    moe.set_expert_mode('sample')
    gen = torch.Generator().manual_seed(0)
    counts = np.bincount([int(moe.predict(obs, gen, diagnostics=True)[1]['expert'])
                          for _ in range(3000)], minlength=3) / 3000
    probs = gate_logits(moe, obs.reshape(1, -1)).exp()[0].detach().numpy()
    assert np.abs(counts - probs).max() < 0.04


@pytest.mark.parametrize('experts', EXPERTS)
def test_diagnostic_log_prob_is_the_mixture_density(experts):
    moe = make_moe('diag', z=3, experts=experts)
    obs = torch.randn(1, 1, 4)
    moe.set_expert_mode(2)
    action, info = moe.predict(obs, diagnostics=True)
    expected = moe.log_prob(action.view(1, 2), obs.view(1, 4))   # identity normalizers
    assert info['log_prob'] == pytest.approx(float(expected.detach()), abs=1e-4)
    assert 0 <= info['gating_entropy'] <= math.log(3) + 1e-6
