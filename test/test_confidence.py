"""The observation density, its calibrated levels and its storage (vdd_ros/core/confidence.py)."""
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vdd_ros.core.confidence import (CONFIDENCE_FILE, Calibration, ConfidenceMonitor,
                                     ObservationDensity, auroc, load_confidence,
                                     peak_sustained, save_confidence, sustained_levels)
from vdd_ros.errors import UserError


def correlated(n=4000, dim=6, draw=0):
    """Observations on a tilted, elongated Gaussian (strongly correlated features); `draw`
    picks the sample, the distribution stays the same."""
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((dim, dim)) * np.linspace(3.0, 0.05, dim)
    shift = rng.standard_normal(dim)
    return np.random.default_rng([1, draw]).standard_normal((n, dim)) @ mix.T + shift, mix


def clusters(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0, 0, 0], [6, 0, 1, -2], [0, 6, -3, 1]], dtype=float)
    idx = rng.integers(3, size=n)
    return centres[idx] + 0.3 * rng.standard_normal((n, 4)), centres


@pytest.fixture(scope='module')
def gaussian():
    x, _ = correlated()
    return x, ObservationDensity.fit(x, components=1)


def test_one_component_is_the_gaussian_negative_log_density(gaussian):
    x, d = gaussian
    z = (x - x.mean(0)) / x.std(0)
    cov = np.cov(z.T, bias=True) + 1e-3 * np.eye(z.shape[1])
    probe = x[:50] * 1.7
    zp = (probe - x.mean(0)) / x.std(0)
    maha = np.einsum('nd,de,ne->n', zp, np.linalg.inv(cov), zp)
    expected = 0.5 * (maha + np.linalg.slogdet(cov)[1] + z.shape[1] * math.log(2 * math.pi))
    np.testing.assert_allclose(d.score_batch(probe) * z.shape[1], expected, rtol=1e-6)
    # the control-loop path gives the same numbers
    np.testing.assert_allclose([d.score(p) for p in probe], d.score_batch(probe), rtol=1e-9)


def test_noise_of_three_stds_is_told_apart_from_the_data(gaussian):
    """Correlated features: per-feature noise leaves the data's thin directions, which the
    density sees and a per-feature range check would not."""
    x, d = gaussian
    held, _ = correlated(n=1000, draw=1)
    rng = np.random.default_rng(2)
    for k, floor in ((1.0, 0.9), (3.0, 0.99)):
        shifted = held + k * x.std(0) * rng.standard_normal(held.shape)
        assert auroc(d.score_batch(held), d.score_batch(shifted)) >= floor


def test_mixture_finds_the_clusters_and_scores_between_them_high():
    x, centres = clusters()
    d = ObservationDensity.fit(x, components=3, seed=1)
    at_centres = d.score_batch(centres)
    between = d.score_batch((centres[:, None] + centres[None]).reshape(-1, 4)[[1, 2, 5]] / 2)
    assert at_centres.max() < between.min() - 5
    single = ObservationDensity.fit(x, components=1)
    # one Gaussian covers the gaps between the clusters; the mixture does not
    assert single.score_batch(centres.mean(0, keepdims=True))[0] < \
        d.score_batch(centres.mean(0, keepdims=True))[0] - 5


@settings(max_examples=60, deadline=None)
@given(direction=st.lists(st.floats(-1, 1), min_size=4, max_size=4),
       t1=st.floats(0, 200), dt=st.floats(0.01, 200))
def test_farther_out_is_never_more_familiar(direction, t1, dt):
    """Along any ray from the data's mean (one Gaussian), and beyond the data for a
    mixture, the score grows with the distance."""
    u = np.asarray(direction)
    if np.linalg.norm(u) < 1e-3:
        return
    u = u / np.linalg.norm(u)
    x, _ = clusters()
    for d, r0 in ((SINGLE, 0.0), (MIXTURE, 60.0)):
        mean = x.mean(0)
        near, far = mean + (r0 + t1) * u * x.std(0), mean + (r0 + t1 + dt) * u * x.std(0)
        assert d.score(far) >= d.score(near) - 1e-9


SINGLE = ObservationDensity.fit(clusters()[0], components=1)
MIXTURE = ObservationDensity.fit(clusters()[0], components=3, seed=1)


def test_constant_features_keep_raw_units_and_bad_input_is_one_error():
    x, _ = correlated(n=500, dim=3)
    x = np.concatenate([x, np.full((500, 1), 0.25)], axis=1)
    d = ObservationDensity.fit(x, components=2)
    assert d.scale[-1] == 1.0 and np.all(np.isfinite(d.score_batch(x)))
    with pytest.raises(UserError, match='at least 2 finite observations'):
        ObservationDensity.fit(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(UserError, match='at least 2 finite observations'):
        ObservationDensity.fit(np.zeros(5))


@settings(max_examples=200, deadline=None)
@given(neg=st.lists(st.integers(0, 5), min_size=1, max_size=12),
       pos=st.lists(st.integers(0, 5), min_size=1, max_size=12))
@example(neg=[1, 1], pos=[1])
def test_auroc_is_the_share_of_ordered_pairs(neg, pos):
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in pos for n in neg]
    assert auroc(np.array(neg), np.array(pos)) == pytest.approx(np.mean(pairs))


@settings(max_examples=150, deadline=None)
@given(scores=st.lists(st.one_of(st.floats(-5, 5), st.just(math.inf)), max_size=30),
       sustain=st.integers(1, 4))
def test_monitor_levels_match_the_offline_levels(scores, sustain):
    cal = Calibration('density', warn=0.0, error=2.0, sustain=sustain)
    density = ObservationDensity.fit(np.random.default_rng(0).standard_normal((50, 1)), 1)

    class Fixed(ObservationDensity):
        def score(self, obs):
            return float(obs[0])

    import dataclasses
    monitor = ConfidenceMonitor(Fixed(**{f.name: getattr(density, f.name)
                                         for f in dataclasses.fields(density)}), cal)
    online = [LEVEL[monitor.update(np.array([s]))] for s in scores]
    assert online == list(sustained_levels(np.array(scores), cal))
    # the peak that `sustain` scores hold is the lowest threshold that never trips
    if len(scores) >= sustain and all(math.isfinite(s) for s in scores):
        peak = peak_sustained(np.array(scores), sustain)
        assert not np.any(sustained_levels(np.array(scores), Calibration(
            'density', peak, peak, sustain)))
        assert np.any(sustained_levels(np.array(scores), Calibration(
            'density', peak - 1e-6, peak - 1e-6, sustain)))


LEVEL = {'OK': 0, 'WARN': 1, 'ERROR': 2}


def test_non_finite_observation_scores_as_far_out_as_any():
    x, _ = correlated(n=300, dim=3)
    monitor = ConfidenceMonitor(ObservationDensity.fit(x, 1),
                                Calibration('density', 5.0, 9.0, sustain=1))
    assert monitor.update(np.array([np.nan, 0.0, 0.0])) == 'ERROR'
    assert monitor.score == math.inf
    assert monitor.update(x[0]) == 'OK'


@pytest.mark.parametrize('kwargs, match', [
    ({'warn': 2.0, 'error': 1.0}, 'warn <= error'),
    ({'warn': math.nan, 'error': 1.0}, 'finite'),
    ({'warn': 1.0, 'error': 2.0, 'sustain': 0}, 'sustain must be >= 1'),
])
def test_bad_calibration_is_one_error(kwargs, match):
    with pytest.raises(UserError, match=match):
        Calibration('density', **kwargs)


def test_storage_round_trip_and_damaged_files(tmp_path, gaussian):
    x, d = gaussian
    cal = Calibration('density', warn=3.0, error=5.0, sustain=2, source='test')
    assert load_confidence(tmp_path) is None
    path = save_confidence(tmp_path, d, cal, {'auroc': 0.97})
    assert path.name == CONFIDENCE_FILE
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]   # no temp left
    monitor = load_confidence(tmp_path)
    assert monitor.calibration == cal
    np.testing.assert_allclose(monitor.density.score_batch(x[:20]), d.score_batch(x[:20]))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match=f'{CONFIDENCE_FILE}: not a readable confidence file'):
        load_confidence(tmp_path)
    broken = ObservationDensity(d.offset, d.scale, d.means, d.whiten[:, :2], d.log_norm)
    save_confidence(tmp_path, broken, cal)
    with pytest.raises(UserError, match='inconsistent shapes'):
        load_confidence(tmp_path)


def _intact() -> bytes:
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as folder:
        path = save_confidence(folder, ObservationDensity.fit(correlated(n=200, dim=3)[0], 2),
                               Calibration('density', 1.0, 4.0, sustain=2))
        return Path(path).read_bytes()


INTACT = _intact()


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_a_damaged_confidence_file_is_refused_or_still_scores_finitely(tmp_path_factory, data):
    """Any byte flipped, or the file cut short: one UserError, or a monitor whose levels
    stay OK, WARN or ERROR on every observation (never an exception in the control loop)."""
    folder = tmp_path_factory.mktemp('damaged')
    x, _ = correlated(n=200, dim=3)
    path = folder / CONFIDENCE_FILE
    blob = bytearray(INTACT)
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            at = data.draw(st.integers(0, len(blob) - 1))
            blob[at] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(blob))
    try:
        monitor = load_confidence(folder)
    except UserError as exc:
        assert str(path) in str(exc)
        return
    for obs in (x[0], x[0] * 1e6, np.full(3, np.nan)):
        assert monitor.update(obs) in LEVEL
