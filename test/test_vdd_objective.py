"""The VDD objectives: the smoothed student's terms against closed forms, the optima of both
objectives on a single Gaussian (exact score), rank shares of one step, config validation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import MultivariateNormal

from vdd_ros.core.config import MoEConfig, TrainConfig, VDDConfig, from_dict
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.vdd import distill, expert_draws, expert_loss, smoothed_terms
from vdd_ros.errors import ConfigError

MEAN = torch.tensor([0.5, -1.0])
COV = torch.tensor([[0.09, 0.06], [0.06, 0.16]])   # correlated, stds 0.3 and 0.4


def gaussian_score(a: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact score of N(MEAN, COV) smoothed by N(0, sigma^2 I)."""
    prec = torch.linalg.inv(COV + sigma[..., None, None] ** 2 * torch.eye(2))
    return -(prec @ (a - MEAN)[..., None])[..., 0]


def random_moe(cov: str, z: int = 3, dim: int = 3) -> MixtureOfExperts:
    torch.manual_seed(0)
    moe = MixtureOfExperts(MoEConfig(num_experts=z, hidden_dim=16, num_layers=1,
                                     covariance=cov), 2, dim).double()
    with torch.no_grad():   # distinct gating and scales
        for p in (*moe.scale_head.parameters(), *moe.gate.parameters()):
            p.add_(0.3 * torch.randn_like(p))
    return moe


@pytest.mark.parametrize('cov', ['diag', 'full'])
def test_smoothed_terms_are_those_of_the_mixture_with_sigma_squared_added(cov):
    moe = random_moe(cov)
    h = moe.features(torch.randn(4, 2, dtype=torch.float64))
    log_gate, means, scales = moe.log_gating(h).detach(), moe.means(h).detach(), moe.scales(h)
    a = torch.randn(4, 3, 5, 3, dtype=torch.float64, requires_grad=True)
    sigma = torch.rand(4, 3, 5, dtype=torch.float64) * 0.4 + 0.1
    own, entropy = smoothed_terms(moe, a, sigma, log_gate, means, scales)
    covs = scales @ scales.transpose(-1, -2) if cov == 'full' else torch.diag_embed(scales ** 2)
    s2 = sigma[..., None, None] ** 2 * torch.eye(3, dtype=torch.float64)        # (B, Z, V, 3, 3)
    smoothed = MultivariateNormal(means[:, None, None],   # q~ with detached parameters
                                  covs.detach()[:, None, None] + s2[..., None, :, :])
    joint = log_gate[:, None, None] + smoothed.log_prob(a[:, :, :, None])        # (B, Z, V, Z')
    expected = (joint - joint.logsumexp(-1, keepdim=True)).diagonal(dim1=1, dim2=3)
    assert torch.allclose(own, expected.transpose(1, 2), atol=1e-10)
    own_entropy = MultivariateNormal(means[:, :, None], covs[:, :, None] + s2).entropy()
    assert torch.allclose(entropy, own_entropy, atol=1e-10)
    # gradients: the responsibility through the samples only, the entropy through the scales
    params = list(moe.scale_head.parameters())
    got = torch.autograd.grad(own.sum() + entropy.sum(), [a, *params], retain_graph=True)
    want = torch.autograd.grad(expected.sum() + own_entropy.sum(), [a, *params])
    assert all(torch.allclose(g, w, atol=1e-9) for g, w in zip(got, want))
    assert torch.autograd.grad(own.sum(), params, allow_unused=True) == (None, None)


def test_smoothed_entropy_has_a_gradient_where_eigenvalues_coincide():
    """An isotropic full covariance (the initial one) diagonalises with repeated eigenvalues."""
    moe = MixtureOfExperts(MoEConfig(num_experts=2, hidden_dim=8, num_layers=1,
                                     covariance='full'), 2, 3)
    h = moe.features(torch.randn(4, 2))
    scales = moe.scales(h)
    assert torch.allclose(scales, scales[0, 0, 0, 0] * torch.eye(3).expand_as(scales), atol=0.05)
    _, entropy = smoothed_terms(moe, torch.randn(4, 2, 2, 3), torch.full((4, 2, 2), 0.3),
                                moe.log_gating(h), moe.means(h).detach(), scales)
    entropy.sum().backward()
    grad = moe.scale_head.bias.grad
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def fit_single_gaussian(objective: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One full-covariance expert distilled from the exact score of N(MEAN, COV)."""
    torch.manual_seed(seed)
    moe = MixtureOfExperts(MoEConfig(num_experts=1, hidden_dim=8, num_layers=1,
                                     covariance='full'), 1, 2)
    cfg = VDDConfig(iterations=300, batch_size=64, samples_per_expert=4, lr=1e-2,
                    gating_lr=1e-2, final_lr_fraction=0.02, init_em_iterations=0,
                    objective=objective)
    obs = torch.zeros(64, 1)
    distill(moe, gaussian_score, obs, torch.zeros(64, 2), cfg, seed=seed, show_bar=False)
    with torch.no_grad():
        _, mean, chol = moe(obs[:1])
    return mean[0, 0], chol[0, 0] @ chol[0, 0].T


def test_one_expert_converges_to_a_single_gaussian_target_with_the_smoothed_objective():
    """The smoothed objective's optimum is the target itself; the plain one's is wider, with
    precision E_sigma[(COV + sigma^2 I)^-1] (its fixed point, sigma ~ U[0.2, 0.5]). The two
    optima's variances differ by 0.11. (A Gaussian target's score is linear, so the smoothing
    noise of the query points does not move either optimum: see the query-point test.)"""
    sigma = torch.linspace(0.2, 0.5, 2001)[:, None, None]
    plain_cov = torch.linalg.inv(torch.linalg.inv(COV + sigma ** 2 * torch.eye(2)).mean(0))
    assert (plain_cov - COV).diagonal().min() > 0.1
    for objective, target in (('smoothed', COV), ('plain', plain_cov)):
        mean, cov = fit_single_gaussian(objective)
        assert (mean - MEAN).abs().max() < 0.02, objective       # seeds 0-5: <= 0.01
        assert (cov - target).abs().max() < 0.01, (objective, cov)   # seeds 0-5: <= 0.0062


@pytest.mark.parametrize('objective', ['plain', 'smoothed'])
def test_rank_shares_of_one_step_add_up_to_the_global_step(objective):
    """Data-parallel ranks evaluate row slices of the same global draws (smoothing noise
    included); their share-weighted losses and gradients are those of the whole batch."""
    cfg = VDDConfig(objective=objective, samples_per_expert=3)
    moe = random_moe('full', z=2, dim=2).float()
    obs = torch.randn(7, 2)
    draws = expert_draws(moe, 7, cfg, generator=torch.Generator().manual_seed(0))
    assert (draws.noise is None) == (objective == 'plain')
    whole, _ = expert_loss(moe, obs, gaussian_score, cfg, draws=draws)
    full_grad = torch.autograd.grad(whole, list(moe.mean_head.parameters()))
    parts, grads = 0.0, [torch.zeros_like(g) for g in full_grad]
    for rows in (slice(0, 3), slice(3, 7)):
        share = (rows.stop - rows.start) / 7
        loss, _ = expert_loss(moe, obs[rows], gaussian_score, cfg, draws=draws.take(rows))
        parts = parts + share * loss
        for g, part in zip(grads, torch.autograd.grad(loss, list(moe.mean_head.parameters()))):
            g += share * part
    assert torch.allclose(parts, whole, atol=1e-5)
    assert all(torch.allclose(g, f, atol=1e-5) for g, f in zip(grads, full_grad))


@pytest.mark.parametrize('objective', ['plain', 'smoothed'])
def test_the_teacher_is_queried_at_the_samples_of_the_objectives_student(objective):
    """'plain' scores a = mu + L eps at sigma, 'smoothed' a + sigma * noise (for a Gaussian
    target both have the same optimum, so only the query points tell them apart)."""
    cfg = VDDConfig(objective=objective)
    moe = random_moe('full', z=2, dim=2).float()
    obs = torch.randn(4, 2)
    draws = expert_draws(moe, 4, cfg, generator=torch.Generator().manual_seed(0))
    seen = []
    expert_loss(moe, obs, lambda a, o, s: seen.append((a, s)) or torch.zeros_like(a), cfg,
                draws=draws)
    _, means, chol = moe(obs)
    expected = means[:, :, None] + (chol[:, :, None] @ draws.eps[..., None])[..., 0]
    if objective == 'smoothed':
        expected = expected + draws.sigma[..., None] * draws.noise
    assert torch.allclose(seen[0][0], expected, atol=1e-6)
    assert torch.equal(seen[0][1], draws.sigma)


def test_the_plain_objective_draws_what_it_drew_before_the_smoothed_one_existed():
    """The smoothing noise comes last: the plain objective's random stream is unchanged."""
    moe = random_moe('diag', z=2, dim=2)
    plain = expert_draws(moe, 5, VDDConfig(), generator=torch.Generator().manual_seed(3))
    smoothed = expert_draws(moe, 5, VDDConfig(objective='smoothed'),
                            generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain.eps, smoothed.eps) and torch.equal(plain.sigma, smoothed.sigma)
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(plain.eps, torch.randn(5, 2, 2, 2, generator=gen))


@settings(max_examples=200, deadline=None, database=None)
@given(value=st.one_of(st.text(max_size=12), st.integers(), st.none(), st.booleans()))
def test_a_bad_objective_is_one_config_error_naming_the_field(value):
    data = {'vdd': {'objective': value}}
    if value in ('plain', 'smoothed'):
        assert from_dict(TrainConfig, data).vdd.objective == value
        return
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, data, 'train.yaml')
    message = str(err.value)
    assert message.startswith('train.yaml: vdd.objective: ') and '\n' not in message
    if isinstance(value, str):
        assert "must be one of ['plain', 'smoothed']" in message
