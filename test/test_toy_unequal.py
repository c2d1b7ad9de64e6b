"""The unequal-weight toy: its mixture, the metrics that sampling reveals (mode masses, off-mode
mass, expert spreads), its config checks, and a reduced run of both VDD objectives."""
import math
import re

import pytest
import torch

from vdd_ros.core.config import MoEConfig, from_dict
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.toy import (OFF_MODE_STDS, RingProblem, ToyConfig, UnequalConfig,
                              expert_stds, run_unequal, sample_metrics)
from vdd_ros.errors import ConfigError

STATES = torch.linspace(-1, 1, 5)[:, None]


def draw(problem: RingProblem, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([problem.sample(n, gen, s.expand(n, 1))[1] for s in STATES])


def test_the_mixture_has_the_given_weights_in_its_samples_and_its_score():
    problem = RingProblem(UnequalConfig())
    assert torch.allclose(problem.probs, torch.tensor([0.35, 0.25, 0.2, 0.12, 0.08]))
    samples = draw(problem, 4000)
    counts = torch.bincount(torch.cat([problem.classify(x, s.expand(len(x), 1))
                                       for s, x in zip(STATES, samples)]), minlength=5)
    assert torch.allclose(counts / counts.sum(), problem.probs, atol=0.012)
    _, log_w = problem.components(STATES)
    assert torch.allclose(log_w.exp(), problem.probs.expand(5, 5))


def test_sample_metrics_pass_the_mixture_and_fail_a_wider_or_reweighted_one():
    cfg = UnequalConfig()
    problem = RingProblem(cfg)
    exact = sample_metrics(problem, draw(problem, 4000), STATES)
    # a 2-D Gaussian puts exp(-9/2) = 0.011 of its mass beyond 3 standard deviations
    assert exact['off_mode_mass'] == pytest.approx(math.exp(-OFF_MODE_STDS ** 2 / 2), abs=0.004)
    assert exact['max_mass_error'] < 0.015
    wide = RingProblem(UnequalConfig(std=0.42))              # the plain objective's spread
    m = sample_metrics(problem, draw(wide, 4000), STATES)
    assert m['off_mode_mass'] == pytest.approx(math.exp(-(0.75 / 0.42) ** 2 / 2), abs=0.02)
    assert m['off_mode_mass'] > 0.15
    equal = RingProblem(UnequalConfig(weights=[]))
    assert sample_metrics(problem, draw(equal, 4000), STATES)['max_mass_error'] > 0.1


@pytest.mark.parametrize('cov', ['diag', 'full'])
def test_expert_stds_are_the_principal_standard_deviations_in_raw_units(cov):
    torch.manual_seed(0)
    moe = MixtureOfExperts(MoEConfig(num_experts=3, hidden_dim=8, num_layers=1,
                                     covariance=cov), 1, 2)
    with torch.no_grad():
        moe.scale_head.weight.normal_(0, 0.3)
        moe.scale_head.bias.normal_(0, 0.5)
    moe.action_normalizer.scale.copy_(torch.tensor([2.0, 0.5]))
    stds = expert_stds(moe, STATES)
    with torch.no_grad():
        scales = moe.scales(moe.features(STATES))
    unit = torch.diag(torch.tensor([2.0, 0.5]))
    chol = unit @ scales if cov == 'full' else unit @ torch.diag_embed(scales)
    samples = chol @ torch.randn(2, 200000, generator=torch.Generator().manual_seed(0))
    cov_raw = samples @ samples.transpose(-1, -2) / 200000
    assert torch.allclose(stds.pow(2).sum(-1), cov_raw.diagonal(dim1=-2, dim2=-1).sum(-1),
                          rtol=0.02)                                      # the trace
    assert torch.allclose(stds.pow(2).prod(-1), torch.linalg.det(cov_raw), rtol=0.04)


def test_bad_toy_settings_are_one_error_naming_the_field():
    for data, message in (
            ({'unequal': {'weights': [0.5, 0.5]}},
             'unequal.weights: expected num_modes (5) entries, got 2'),
            ({'unequal': {'weights': [0.3, 0.3, -0.1, 0.3, 0.2]}},
             'unequal.weights[2]: must be > 0'),
            ({'unequal': {'compare': ['smooth']}},
             "unequal.compare[0]: must be one of ['plain', 'smoothed'], got 'smooth'"),
            ({'unequal': {'vdd': {'objective': 'exact'}}}, 'unequal.vdd.objective: must be'),
            ({'weights': [1.0]}, 'weights: expected num_modes (8) entries')):
        with pytest.raises(ConfigError, match='^' + re.escape(f'--set: {message}')):
            from_dict(ToyConfig, data, '--set')


def test_reduced_run_compares_the_objectives_on_the_same_data():
    """A short run already separates them: the plain student is wider than the mixture and
    puts more mass off the modes than the smoothed one."""
    cfg = ToyConfig(data_size=4000, eval_states=3, eval_samples=500)
    cfg.unequal.vdd.iterations, cfg.unequal.vdd.batch_size = 400, 64
    m = run_unequal(cfg, seed=0, show_bar=False)['metrics']
    assert m['objective'] == 'smoothed' and list(m['objectives']) == ['smoothed', 'plain']
    smoothed, plain = m['objectives']['smoothed'], m['objectives']['plain']
    for metrics in (smoothed, plain):
        assert metrics['modes_covered'] == 5 and metrics['distinct']
        assert len(metrics['expert_std_range']) == 5 and metrics['seconds'] > 0
    assert min(r[0] for r in plain['expert_std_range']) > 0.3          # true: 0.25
    assert plain['off_mode_mass'] > 0.1 > 0.05 > smoothed['off_mode_mass']
    assert m['data']['off_mode_mass'] < 0.03
