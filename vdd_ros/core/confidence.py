"""Out-of-distribution monitoring: is an observation like the ones the policy was trained on?

`ObservationDensity` is a Gaussian mixture (full covariances) fitted by EM on the training
observations, standardised per feature. Its score is the negative log density per feature,
so a larger score means farther from the data; far enough out it grows with the squared
distance, so an observation farther out is never scored as more familiar.

`ConfidenceMonitor` turns the per-action score into a level against thresholds calibrated on
validation data and stored with the checkpoint (`confidence.safetensors`): WARN once the score
has exceeded `warn` for `sustain` consecutive actions, ERROR likewise above `error`. Scoring
one observation is a few small matrix products in numpy (no torch).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vdd_ros.errors import UserError

CONFIDENCE_FILE = 'confidence.safetensors'
LEVELS = ('OK', 'WARN', 'ERROR')
LOG_2PI = math.log(2 * math.pi)


@dataclass
class ObservationDensity:
    """A Gaussian mixture over standardised observations: `score(x)` = -log p(x) / dim."""

    offset: np.ndarray      # (D,) feature means of the training observations
    scale: np.ndarray       # (D,) their standard deviations (1 for constant features)
    means: np.ndarray       # (K, D) component means, standardised units
    whiten: np.ndarray      # (K, D, D) upper Cholesky factors of the precisions
    log_norm: np.ndarray    # (K,) log weight + log det(whiten) - D/2 log 2 pi

    def __post_init__(self) -> None:
        # the control-loop path: one affine map of the raw observation gives every
        # component's whitened residual, y = x A - c, (K * D,)
        k, d = self.means.shape if np.ndim(self.means) == 2 else (0, 0)
        if k and np.shape(self.whiten) == (k, d, d) and np.shape(self.scale) == (d,):
            w = np.asarray(self.whiten, dtype=np.float64).transpose(1, 0, 2).reshape(d, k * d)
            self._a = w / np.asarray(self.scale, dtype=np.float64)[:, None]
            self._c = (np.asarray(self.offset, dtype=np.float64) @ self._a
                       + np.einsum('kd,kde->ke', self.means, self.whiten).reshape(-1))

    @property
    def dim(self) -> int:
        return int(self.offset.shape[0])

    @property
    def components(self) -> int:
        return int(self.means.shape[0])

    @classmethod
    def fit(cls, obs: np.ndarray, components: int = 8, iterations: int = 100,
            reg: float = 1e-3, seed: int = 0, min_scale: float = 1e-4) -> 'ObservationDensity':
        """EM on `obs (N, D)`; `reg` is added to every covariance's diagonal (standardised
        units), which also bounds how sharply one flat direction of the data can score. A
        feature that varies by less than `min_scale` keeps its raw units, as the models'
        normalizers do."""
        x = np.asarray(obs, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2 or not np.all(np.isfinite(x)):
            raise UserError(f'observation density: needs at least 2 finite observations as '
                            f'(N, D), got shape {x.shape}')
        k = max(1, min(int(components), x.shape[0] // max(2 * x.shape[1], 1), x.shape[0]))
        offset = x.mean(0)
        std = x.std(0)
        scale = np.where(std < min_scale, 1.0, std)
        z = (x - offset) / scale
        rng = np.random.default_rng(seed)
        means = _farthest_points(z, k, rng)
        resp = _assign(z, means)
        for _ in range(int(iterations) if k > 1 else 1):
            weights, means, covs = _m_step(z, resp, reg)
            log_joint = _log_gauss(z, means, covs) + np.log(weights)
            new = np.exp(log_joint - _logsumexp(log_joint, 1)[:, None])
            if np.abs(new - resp).max() < 1e-5:
                resp = new
                break
            resp = new
        weights, means, covs = _m_step(z, resp, reg)
        prec_chol = np.linalg.cholesky(np.linalg.inv(covs))          # lower L, P = L L^T
        whiten = np.ascontiguousarray(prec_chol)
        log_det = np.log(np.diagonal(prec_chol, axis1=1, axis2=2)).sum(-1)
        log_norm = np.log(weights) + log_det - 0.5 * z.shape[1] * LOG_2PI
        return cls(offset.astype(np.float64), scale.astype(np.float64), means, whiten,
                   log_norm)

    def score_batch(self, obs: np.ndarray) -> np.ndarray:
        """Scores of `obs (N, D)`: -log p per feature (standardised units), `(N,)`."""
        z = (np.asarray(obs, dtype=np.float64) - self.offset) / self.scale
        diff = z[:, None, :] - self.means[None]                       # (N, K, D)
        y = np.einsum('nkd,kde->nke', diff, self.whiten)
        log_p = _logsumexp(self.log_norm - 0.5 * (y * y).sum(-1), 1)
        return -log_p / self.dim

    def score(self, obs: np.ndarray) -> float:
        """The score of one flat observation (the control-loop path)."""
        y = np.asarray(obs, dtype=np.float64).reshape(-1) @ self._a - self._c
        y *= y
        log_k = self.log_norm - 0.5 * y.reshape(self.components, -1).sum(1)
        top = log_k.max()
        return float(-(top + math.log(np.exp(log_k - top).sum())) / self.dim)


@dataclass
class Calibration:
    """Thresholds on a signal's score, chosen on validation data."""

    signal: str
    warn: float
    error: float
    sustain: int = 3
    source: str = ''

    def __post_init__(self) -> None:
        if not (math.isfinite(self.warn) and math.isfinite(self.error)
                and self.warn <= self.error):
            raise UserError(f'confidence calibration: thresholds must be finite with warn <= '
                            f'error, got warn {self.warn}, error {self.error}')
        if int(self.sustain) < 1:
            raise UserError(f'confidence calibration: sustain must be >= 1, got '
                            f'{self.sustain}')
        self.sustain = int(self.sustain)


class ConfidenceMonitor:
    """Per-action score and level of one control loop (`update` each action, `reset` at an
    episode's start)."""

    def __init__(self, density: ObservationDensity, calibration: Calibration) -> None:
        self.density, self.calibration = density, calibration
        self.score = math.nan
        self.level = 'OK'
        self._over = [0, 0]     # consecutive actions above warn, above error

    def reset(self) -> None:
        self.score, self.level, self._over = math.nan, 'OK', [0, 0]

    def update(self, obs: np.ndarray) -> str:
        """Score the latest flat observation and return the level."""
        s = self.density.score(obs)
        if not math.isfinite(s):          # (a non-finite observation is as far out as any)
            s = math.inf
        self.score = s
        cal = self.calibration
        for i, threshold in enumerate((cal.warn, cal.error)):
            self._over[i] = self._over[i] + 1 if s > threshold else 0
        self.level = 'ERROR' if self._over[1] >= cal.sustain else \
            'WARN' if self._over[0] >= cal.sustain else 'OK'
        return self.level


def sustained_levels(scores: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Levels (0 OK, 1 WARN, 2 ERROR) of a sequence of scores, as ConfidenceMonitor gives."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.zeros(len(scores), dtype=np.int64)
    for level, threshold in ((1, calibration.warn), (2, calibration.error)):
        run = 0
        for t, s in enumerate(scores):
            run = run + 1 if not s <= threshold else 0
            if run >= calibration.sustain:
                out[t] = level
    return out


def peak_sustained(scores: np.ndarray, sustain: int) -> float:
    """The largest value that `sustain` consecutive scores all exceed (the lowest threshold
    that never trips on this sequence is at least this)."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) < sustain:
        return -math.inf
    windows = np.lib.stride_tricks.sliding_window_view(s, sustain)
    return float(windows.min(-1).max())


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve for telling `positive` (higher scores) from `negative`:
    the probability that a random positive scores above a random negative (ties count half).
    """
    neg = np.asarray(negative, dtype=np.float64).ravel()
    pos = np.asarray(positive, dtype=np.float64).ravel()
    if not len(neg) or not len(pos):
        return math.nan
    both = np.concatenate([neg, pos])
    both = np.where(np.isnan(both), np.inf, both)
    order = both.argsort(kind='mergesort')
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    pos_ranks = ranks[len(neg):].sum()
    return float((pos_ranks - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


# -- storage ----------------------------------------------------------------------------------
def save_confidence(folder: str | os.PathLike, density: ObservationDensity,
                    calibration: Calibration, report: dict[str, Any] | None = None) -> Path:
    """Write `<folder>/confidence.safetensors` atomically (arrays, and the calibration and a
    small report as JSON metadata)."""
    from safetensors.numpy import save
    from vdd_ros.core.io import atomic_path
    tensors = {k: np.ascontiguousarray(v) for k, v in asdict(density).items()}
    meta = {'calibration': json.dumps(asdict(calibration)),
            'report': json.dumps(report or {})}
    path = Path(folder) / CONFIDENCE_FILE
    with atomic_path(path) as tmp:
        tmp.write_bytes(save(tensors, metadata=meta))
    return path


def load_confidence(path: str | os.PathLike) -> ConfidenceMonitor | None:
    """The calibrated monitor of a checkpoint folder (or of a confidence file), or None when
    there is none; a damaged file is a UserError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIDENCE_FILE
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework='numpy') as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        calibration = Calibration(**json.loads(meta['calibration']))
        density = ObservationDensity(**{k: arrays[k].astype(np.float64) for k in (
            'offset', 'scale', 'means', 'whiten', 'log_norm')})
        _check_shapes(density)
    except UserError as exc:
        raise UserError(f'{path}: {exc}') from None
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f'{path}: not a readable confidence file ({type(exc).__name__}: '
                        f'{exc})') from None
    return ConfidenceMonitor(density, calibration)


def _check_shapes(d: ObservationDensity) -> None:
    k, dim = d.means.shape if d.means.ndim == 2 else (0, 0)
    ok = (d.offset.shape == (dim,) and d.scale.shape == (dim,) and dim > 0
          and d.whiten.shape == (k, dim, dim) and d.log_norm.shape == (k,))
    finite = all(np.all(np.isfinite(a)) for a in asdict(d).values())
    if not ok or not finite or np.any(d.scale <= 0):
        raise UserError('density arrays of inconsistent shapes or non-finite values')


# -- EM helpers -------------------------------------------------------------------------------
def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def _farthest_points(z: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    pool = z if len(z) <= 4096 else z[rng.choice(len(z), 4096, replace=False)]
    picks = [int(rng.integers(len(pool)))]
    dist = ((pool - pool[picks[0]]) ** 2).sum(-1)
    for _ in range(1, k):
        picks.append(int(dist.argmax()))
        dist = np.minimum(dist, ((pool - pool[picks[-1]]) ** 2).sum(-1))
    return pool[picks].copy()


def _assign(z: np.ndarray, means: np.ndarray) -> np.ndarray:
    d = ((z[:, None, :] - means[None]) ** 2).sum(-1)
    resp = np.zeros_like(d)
    resp[np.arange(len(z)), d.argmin(1)] = 1.0
    return resp


def _m_step(z: np.ndarray, resp: np.ndarray,
            reg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_k = resp.sum(0) + 1e-10
    weights = n_k / n_k.sum()
    means = (resp.T @ z) / n_k[:, None]
    covs = np.empty((len(n_k), z.shape[1], z.shape[1]))
    for k in range(len(n_k)):
        diff = z - means[k]
        covs[k] = (resp[:, k, None] * diff).T @ diff / n_k[k] + reg * np.eye(z.shape[1])
    return weights, means, covs


def _log_gauss(z: np.ndarray, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    chol = np.linalg.cholesky(covs)                                   # (K, D, D)
    out = np.empty((len(z), len(means)))
    for k in range(len(means)):
        y = np.linalg.solve(chol[k], (z - means[k]).T)                # (D, N)
        log_det = np.log(np.diagonal(chol[k])).sum()
        out[:, k] = -0.5 * (y * y).sum(0) - log_det - 0.5 * z.shape[1] * LOG_2PI
    return out
