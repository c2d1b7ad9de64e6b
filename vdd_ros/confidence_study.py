"""Which signal tells that a policy is out of its depth: fit, calibrate, measure, choose.

`run_study` (behind `vdd-ros confidence`) works in three steps, and reads the test seeds only
in the last:
1. **Fit and compare offline.** Every candidate signal scores the dataset's validation
   demonstrations, the same observations with Gaussian noise of 1, 3 and 10 feature standard
   deviations, and observations from elsewhere (another task's demonstrations of the same
   layout, or initial states with the cube moved out of its training region). AUROC against
   each, whether the signal is monotone (farther out never scores as more familiar), and its
   cost per action at batch 1 on one thread.
2. **Calibrate** each signal on validation data: WARN above the larger of the 99.5th
   percentile of validation-demonstration scores and the highest score that clean, successful
   closed-loop episodes on validation seeds sustained for `sustain` actions (a clean episode
   that fails is no example of familiar states); ERROR at twice WARN's margin
   over the median validation score. The chosen signal (the best validation AUROC among those
   that can run in the policy node within the cost budget) is stored with the checkpoint.
3. **Closed loop on test seeds**: clean and perturbed episodes (`sim/perturbations.py`); for
   each signal, the share of failed perturbed episodes flagged (WARN) at or after the
   perturbation, and before the episode ended, and the false-alarm share of clean episodes.

Candidate signals: `density` (a Gaussian mixture over the observation), `mahalanobis` (one
Gaussian), the MoE's `gating_entropy` and `neg_log_likelihood` of its action, and, given a
teacher, `teacher_residual`: the teacher's denoising residual on the MoE's action at a small
noise level (one teacher pass; the quantity VDD minimises).
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from vdd_ros.core.confidence import (Calibration, ObservationDensity, auroc, peak_sustained,
                                     save_confidence, sustained_levels)
from vdd_ros.errors import UserError

NOISE_LEVELS = (1.0, 3.0, 10.0)
COST_BUDGET_MS = 0.2
STORABLE = ('density', 'mahalanobis')       # signals the policy node runs (numpy only)
VALID_QUANTILE = 99.5
DEFAULT_CONDITIONS = ('displace', 'friction', 'mass', 'obs_noise')


@dataclass
class StudyConfig:
    """What `run_study` measures (validated by `check`)."""

    episodes: int = 30            # closed-loop test episodes per condition (0: offline only)
    validation_episodes: int = 30  # clean closed-loop episodes on validation seeds
    conditions: tuple[str, ...] = DEFAULT_CONDITIONS
    components: int = 8           # Gaussian mixture components of the `density` signal
    sustain: int = 3              # consecutive actions above a threshold before a level
    residual_sigma: float = 0.1   # noise level of the teacher residual (normalised units)
    max_observations: int = 2000  # validation observations scored offline
    initial_states: int = 200     # unusual initial states (without --other-dataset)
    workers: int = 1
    seed: int = 0
    save: bool = True

    def check(self) -> None:
        from vdd_ros.sim.perturbations import KINDS
        for name in ('episodes', 'validation_episodes'):
            if getattr(self, name) < 0:
                raise UserError(f'{name}: must be >= 0, got {getattr(self, name)}')
        if self.episodes and self.validation_episodes < 1:
            raise UserError('validation_episodes: closed-loop tests need validation episodes '
                            'to calibrate on (>= 1)')
        for name in ('components', 'sustain', 'max_observations', 'initial_states',
                     'workers'):
            if getattr(self, name) < 1:
                raise UserError(f'{name}: must be >= 1, got {getattr(self, name)}')
        bad = [c for c in self.conditions if c not in KINDS or c == 'clean']
        if bad:
            raise UserError(f'conditions: unknown {bad} (known: '
                            f'{", ".join(k for k in KINDS if k != "clean")})')
        if not (math.isfinite(self.residual_sigma) and self.residual_sigma > 0):
            raise UserError(f'residual_sigma: must be > 0, got {self.residual_sigma}')


# -- signals ----------------------------------------------------------------------------------
class Signals:
    """Every candidate signal of one policy, scoring observation windows `(N, T_o, obs_dim)`
    (a larger score: less familiar). Picklable: worker processes rebuild it from paths."""

    def __init__(self, policy_path: str, densities: dict[str, ObservationDensity],
                 teacher_path: str | None = None, residual_sigma: float = 0.1) -> None:
        self.policy_path, self.teacher_path = policy_path, teacher_path
        self.densities, self.residual_sigma = densities, residual_sigma
        self._models: tuple[Any, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, '_models': None}

    @property
    def names(self) -> list[str]:
        moe = ['gating_entropy', 'neg_log_likelihood'] if self._moe() is not None else []
        return [*self.densities, *moe, *(['teacher_residual'] if self.teacher_path else [])]

    def _load(self) -> tuple[Any, Any]:
        if self._models is None:
            from vdd_ros.core.checkpoint import load_model
            moe = load_model(self.policy_path)[0]
            moe = moe if moe.kind == 'moe' else None
            teacher = load_model(self.teacher_path)[0] if self.teacher_path else None
            self._models = (moe, teacher)
        return self._models

    def _moe(self) -> Any:
        return self._load()[0]

    def score(self, windows: np.ndarray, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Each signal's scores of `windows`, `(N,)` each."""
        names = self.names if names is None else names
        windows = np.asarray(windows, dtype=np.float32)
        out = {n: d.score_batch(windows[:, -1]) for n, d in self.densities.items()
               if n in names}
        torch_names = [n for n in names if n not in self.densities]
        if torch_names:
            out.update(self._torch_scores(windows, torch_names))
        return out

    def one(self, name: str) -> Callable[[np.ndarray], float]:
        """A batch-1 scorer of one signal for one window `(T_o, obs_dim)` (the per-action
        path whose cost is measured)."""
        if name in self.densities:
            density = self.densities[name]
            return lambda window: density.score(window[-1])
        return lambda window: float(self._torch_scores(window[None], [name])[name][0])

    def _torch_scores(self, windows: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        import torch
        moe, teacher = self._load()
        out: dict[str, list[np.ndarray]] = {n: [] for n in names}
        with torch.inference_mode():
            for chunk in np.array_split(windows, max(1, -(-len(windows) // 1024))):
                x = torch.from_numpy(np.ascontiguousarray(chunk))
                obs = moe.obs_normalizer.normalize(x).reshape(len(x), -1)
                log_gate, means, scales = moe(obs)
                if 'gating_entropy' in out:
                    out['gating_entropy'].append(
                        (-(log_gate.exp() * log_gate).sum(-1)).numpy())
                pick = means[torch.arange(len(x)), log_gate.argmax(-1)]          # (N, D)
                if 'neg_log_likelihood' in out:
                    comp = moe.component_log_prob(pick[:, None], means, scales)[:, 0]
                    out['neg_log_likelihood'].append(
                        (-torch.logsumexp(log_gate + comp, -1)).numpy())
                if 'teacher_residual' in out:
                    out['teacher_residual'].append(self._residual(teacher, moe, x, pick))
        return {n: np.concatenate(v).astype(np.float64) for n, v in out.items()}

    def _residual(self, teacher: Any, moe: Any, x: Any, pick: Any) -> np.ndarray:
        """Mean squared denoising residual of the teacher on the MoE's action, in units of
        the noise level, over 4 fixed noise draws."""
        import torch
        n = len(x)
        raw = moe.action_normalizer.unnormalize(pick.view(n, moe.action_horizon, -1))
        a = teacher.action_normalizer.normalize(raw).reshape(n, -1)
        obs = teacher.obs_normalizer.normalize(x).reshape(n, -1)
        gen = torch.Generator().manual_seed(0)
        eps = torch.randn(4, 1, a.shape[1], generator=gen)
        sigma = torch.tensor(self.residual_sigma)
        noisy = a[None] + sigma * eps                                     # (4, N, D)
        d = teacher.denoise(noisy, obs[None].expand(4, -1, -1), sigma)
        return (((d - a[None]) / sigma) ** 2).mean(-1).mean(0).numpy()


def time_signal(fn: Callable[[np.ndarray], float], windows: np.ndarray,
                calls: int = 300) -> float:
    """p50 milliseconds of one call at batch 1 (after a warm-up)."""
    from vdd_ros.core.bench import time_calls
    i = iter(range(10 ** 9))
    ms = time_calls(lambda: fn(windows[next(i) % len(windows)]), calls, warmup=20)
    return float(np.percentile(ms, 50))


# -- offline: AUROC ---------------------------------------------------------------------------
def dataset_windows(demos: list[Any], obs_horizon: int, cap: int,
                    seed: int = 0) -> np.ndarray:
    """Observation windows of every step of `demos` (at most `cap`, evenly subsampled)."""
    from vdd_ros.core.data import make_windows
    windows = make_windows(demos, obs_horizon, 1)[0]
    if len(windows) > cap:
        windows = windows[np.random.default_rng(seed).choice(len(windows), cap, replace=False)]
    return windows


def noisy(windows: np.ndarray, std: np.ndarray, k: float, seed: int) -> np.ndarray:
    """`windows` plus Gaussian noise of `k` standard deviations per feature."""
    rng = np.random.default_rng(seed)
    return (windows + k * std * rng.standard_normal(windows.shape)).astype(np.float32)


def unusual_initial_states(task: str, seeds: list[int], obs_horizon: int,
                           distance: tuple[float, float] = (0.10, 0.15)
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(usual, unusual) initial observation windows: each seed's first observation, and the
    same state with a random cube moved `distance` metres out, in a random direction."""
    from vdd_ros.sim.rollout import cached_env
    env = cached_env(task)
    usual, unusual = [], []
    for seed in seeds:
        rng = np.random.default_rng([seed, 7])
        obs = env.reset(seed)
        name = env.objects[int(rng.integers(len(env.objects)))]
        angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(*distance)
        moved = env.displace_object(name, dist * np.array([math.cos(angle), math.sin(angle),
                                                           0.0]))
        usual.append(np.repeat(obs[None], obs_horizon, 0))
        unusual.append(np.repeat(moved[None], obs_horizon, 0))
    return np.stack(usual), np.stack(unusual)


def offline_table(signals: Signals, valid: np.ndarray, std: np.ndarray,
                  other: tuple[str, np.ndarray, np.ndarray], seed: int) -> dict[str, Any]:
    """Per signal: AUROC at each noise level and against `other` (label, negatives,
    positives), median score per noise level, monotone or not, cost in milliseconds."""
    base = signals.score(valid)
    shifted = {k: signals.score(noisy(valid, std, k, seed + i))
               for i, k in enumerate(NOISE_LEVELS)}
    label, other_neg, other_pos = other
    neg, pos = signals.score(other_neg), signals.score(other_pos)
    rows = {}
    for name in signals.names:
        aucs = [auroc(base[name], shifted[k][name]) for k in NOISE_LEVELS]
        medians = [float(np.median(base[name]))] + [float(np.median(shifted[k][name]))
                                                    for k in NOISE_LEVELS]
        rows[name] = {
            'auroc': dict(zip([f'{k:g}std' for k in NOISE_LEVELS], aucs)),
            'auroc_other': auroc(neg[name], pos[name]),
            'median': dict(zip(['in'] + [f'{k:g}std' for k in NOISE_LEVELS], medians)),
            'monotone': bool(all(b >= a for a, b in zip(medians, medians[1:]))
                             and all(b >= a for a, b in zip(aucs, aucs[1:]))),
            'cost_ms': time_signal(signals.one(name), valid),
            'valid_scores': base[name],
        }
    return {'other': label, 'signals': rows}


def choose(rows: dict[str, Any]) -> str:
    """The signal to deploy: storable, monotone, within the cost budget, best mean AUROC
    (3 and 10 std, and the other set) on validation data."""
    def merit(name: str) -> float:
        r = rows[name]
        return float(np.mean([r['auroc']['3std'], r['auroc']['10std'], r['auroc_other']]))
    fit = [n for n in STORABLE if n in rows and rows[n]['monotone']
           and rows[n]['cost_ms'] <= COST_BUDGET_MS]
    pool = fit or [n for n in STORABLE if n in rows]
    return max(pool, key=merit)


def calibrate(valid_scores: np.ndarray, episode_scores: list[np.ndarray], sustain: int,
              signal: str) -> Calibration:
    """Thresholds from validation data (see the module docstring)."""
    warn = float(np.percentile(valid_scores, VALID_QUANTILE))
    peaks = [peak_sustained(s, sustain) for s in episode_scores]
    if peaks:
        warn = max(warn, max(peaks))
    median = float(np.median(valid_scores))
    error = warn + max(warn - median, 0.0)
    source = f'{len(valid_scores)} validation observations' + \
        (f', {len(peaks)} clean validation episodes' if peaks else '')
    return Calibration(signal=signal, warn=warn, error=error, sustain=sustain, source=source)


# -- closed loop ------------------------------------------------------------------------------
class ScoredPolicy:
    """A policy whose every observation is scored by each signal before it acts."""

    def __init__(self, policy: Any, signals: Signals) -> None:
        self.policy, self.signals = policy, signals
        self.spec = policy.spec
        self.names = signals.names
        self.scores: dict[str, list[float]] = {}
        self._window: list[np.ndarray] = []

    def reset(self, seed: int | None = None) -> None:
        self.policy.reset(seed)
        self.scores = {n: [] for n in self.names}
        self._window = []

    def act(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        horizon = self.spec.obs_horizon
        self._window = self._window[1:] + [obs] if self._window else [obs] * horizon
        # every signal of this window at once: the MoE's forward pass serves all its signals
        for n, v in self.signals.score(np.stack(self._window)[None], self.names).items():
            self.scores[n].append(float(v[0]))
        return self.policy.act(obs)


_CACHE: dict[str, Any] = {}


def _episode_job(job: tuple[int, str, float | None, int, str, Signals, np.ndarray, str]
                 ) -> tuple[int, dict[str, Any]]:
    index, kind, size, seed, task, signals, std, token = job
    from vdd_ros.sim.perturbations import Perturbation, PerturbedEnv
    from vdd_ros.sim.rollout import build_policy, cached_env, run_episode
    if _CACHE.get('token') != token:
        _CACHE.update(token=token, policy=ScoredPolicy(
            build_policy(signals.policy_path, task), signals))
    policy = _CACHE['policy']
    env = PerturbedEnv(cached_env(task), Perturbation(kind, size), std)
    try:
        rec = run_episode(env, policy, seed)
    finally:
        env.close()
    return index, {'condition': kind, 'seed': seed, 'success': rec['success'],
                   'length': rec['length'], 'start': env.start if kind not in
                   ('clean', 'friction', 'mass') else 0,
                   'scores': {n: np.asarray(v) for n, v in policy.scores.items()}}


def run_episodes(jobs: list[tuple[str, float | None, int]], task: str, signals: Signals,
                 std: np.ndarray, workers: int, desc: str) -> list[dict[str, Any]]:
    """Closed-loop episodes (condition, magnitude, seed), each scored by every signal."""
    from vdd_ros.sim.rollout import worker_pool
    token = uuid.uuid4().hex
    full = [(i, kind, size, seed, task, signals, std, token)
            for i, (kind, size, seed) in enumerate(jobs)]
    out: list[dict[str, Any] | None] = [None] * len(full)
    with tqdm(total=len(full), desc=desc, dynamic_ncols=True, leave=False) as bar, \
            worker_pool(min(workers, max(len(full), 1))) as pool:
        results = map(_episode_job, full) if pool is None else \
            pool.imap_unordered(_episode_job, full)
        for index, rec in results:
            out[index] = rec
            bar.update(1)
    return [r for r in out if r is not None]


def closed_loop_table(records: list[dict[str, Any]],
                      calibrations: dict[str, Calibration]) -> dict[str, Any]:
    """Per signal and condition: false alarms (clean) or flagged failures (perturbed)."""
    table: dict[str, Any] = {}
    for name, cal in calibrations.items():
        rows: dict[str, Any] = {}
        pooled: list[Any] = [0, 0, []]
        for cond in dict.fromkeys(r['condition'] for r in records):
            recs = [r for r in records if r['condition'] == cond]
            firsts = []
            for r in recs:
                levels = sustained_levels(r['scores'][name], cal)
                hits = np.flatnonzero(levels[r['start']:] >= 1)
                early = np.flatnonzero(levels >= 1)
                firsts.append((int(hits[0]) + r['start'] if len(hits) else None,
                               int(early[0]) if len(early) else None,
                               bool(np.any(levels >= 2))))
            fails = [(r, f) for r, f in zip(recs, firsts) if not r['success']]
            row = {'episodes': len(recs), 'failures': len(fails),
                   'success_rate': 1 - len(fails) / len(recs) if recs else math.nan}
            if cond == 'clean':
                row['false_alarms'] = sum(f[1] is not None for f in firsts)
                row['false_alarm_rate'] = row['false_alarms'] / len(recs) if recs else math.nan
                row['error_alarms'] = sum(f[2] for f in firsts)
            else:
                flagged = [f for r, f in fails if f[0] is not None and f[0] < r['length']]
                row['flagged'] = len(flagged)
                row['flagged_rate'] = len(flagged) / len(fails) if fails else math.nan
                leads = [r['length'] - f[0] for r, f in fails if f[0] is not None]
                row['lead_steps_median'] = float(np.median(leads)) if leads else math.nan
                pooled[2] += leads
                row['flagged_successes'] = sum(
                    f[0] is not None for r, f in zip(recs, firsts) if r['success'])
                pooled[0] += len(flagged)
                pooled[1] += len(fails)
            rows[cond] = row
        rows['pooled'] = {'flagged': pooled[0], 'failures': pooled[1],
                          'flagged_rate': pooled[0] / pooled[1] if pooled[1] else math.nan,
                          'lead_steps_median': float(np.median(pooled[2])) if pooled[2]
                          else math.nan}
        table[name] = rows
    return table


# -- the study --------------------------------------------------------------------------------
def run_study(policy: str, dataset: str, cfg: StudyConfig, teacher: str | None = None,
              other_dataset: str | None = None, out: str | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit, compare, calibrate and (with `cfg.episodes`) test the confidence signals of the
    MoE checkpoint `policy` trained on `dataset`; write the chosen calibration into the
    checkpoint (`cfg.save`) and a report into `out`. Returns the results."""
    import torch
    from vdd_ros.core.checkpoint import read_meta
    from vdd_ros.core.data import load_dataset
    from vdd_ros.core.policy import PolicySpec
    from vdd_ros.sim.rollout import evaluation_seeds, validation_seeds
    cfg.check()
    torch.set_num_threads(1)
    meta = read_meta(policy)
    if meta['kind'] != 'moe':
        raise UserError(f'{policy}: the confidence study needs an MoE checkpoint (its gating '
                        f'and likelihood are candidates), this is a {meta["kind"]}')
    if teacher is not None and read_meta(teacher)['kind'] != 'teacher':
        raise UserError(f'{teacher}: --teacher must be a teacher checkpoint')
    spec = PolicySpec.from_dict(meta['spec'])
    data = load_dataset(dataset, obs_keys=[k for k, _ in spec.obs_fields])
    if [(k, n) for k, n in data.obs_fields] != [(k, n) for k, n in spec.obs_fields]:
        raise UserError(f'{dataset}: observation fields {data.obs_fields} differ from the '
                        f'policy\'s {spec.obs_fields}')
    if not data.valid_demos():
        raise UserError(f'{dataset}: no validation demonstrations (mask/valid) to calibrate on')
    task = spec.task or data.env_args.get('task')
    start = time.perf_counter()

    train_obs = np.concatenate([d.obs for d in data.train_demos()]).astype(np.float64)
    log(f'fitting observation densities on {len(train_obs)} training observations')
    densities = {'density': ObservationDensity.fit(train_obs, cfg.components, seed=cfg.seed),
                 'mahalanobis': ObservationDensity.fit(train_obs, 1)}
    std = train_obs.std(0)
    signals = Signals(str(policy), densities, teacher and str(teacher), cfg.residual_sigma)
    valid = dataset_windows(data.valid_demos(), spec.obs_horizon, cfg.max_observations,
                            cfg.seed)
    if other_dataset:
        other_data = load_dataset(other_dataset)
        if list(other_data.obs_fields) != list(data.obs_fields):
            raise UserError(f'{other_dataset}: observation layout {other_data.obs_fields} '
                            f'differs from the policy\'s; another task\'s demonstrations '
                            f'must share it')
        other = (f'demonstrations of {other_data.env_args.get("task", other_dataset)}', valid,
                 dataset_windows(other_data.demos, spec.obs_horizon, cfg.max_observations,
                                 cfg.seed))
    elif task:
        log('scoring unusual initial states (the cube moved 10-15 cm out of its region)')
        usual, unusual = unusual_initial_states(task, validation_seeds(cfg.initial_states),
                                                 spec.obs_horizon)
        other = ('initial states, cube moved 10-15 cm', usual, unusual)
    else:
        raise UserError('no task to build unusual initial states in: give --other-dataset')
    log(f'offline comparison of {", ".join(signals.names)} on {len(valid)} validation '
        f'observations')
    offline = offline_table(signals, valid, std, other, cfg.seed)
    chosen = choose(offline['signals'])

    records_valid: list[dict[str, Any]] = []
    records_test: list[dict[str, Any]] = []
    if cfg.episodes:
        if not task:
            raise UserError(f'{policy}: closed-loop tests need the task the policy was made '
                            f'for')
        records_valid = run_episodes(
            [('clean', None, s) for s in validation_seeds(cfg.validation_episodes)], task,
            signals, std, cfg.workers, 'validation episodes')
    calibrations = {
        name: calibrate(row['valid_scores'],
                        [r['scores'][name] for r in records_valid if r['success']],
                        cfg.sustain, name)
        for name, row in offline['signals'].items()}
    if cfg.episodes:
        jobs = [(kind, None, s) for kind in ('clean', *cfg.conditions)
                for s in evaluation_seeds(cfg.episodes)]
        records_test = run_episodes(jobs, task, signals, std, cfg.workers, 'test episodes')
    closed = closed_loop_table(records_test, calibrations) if records_test else {}
    report = {'policy': str(policy), 'dataset': str(dataset), 'teacher': teacher,
              'task': task, 'config': asdict(cfg),
              'chosen': chosen, 'other': offline['other'],
              'offline': {n: {k: v for k, v in r.items() if k != 'valid_scores'}
                          for n, r in offline['signals'].items()},
              'calibrations': {n: asdict(c) for n, c in calibrations.items()},
              'closed_loop': closed, 'wall_s': time.perf_counter() - start,
              'validation_seeds': [r['seed'] for r in records_valid],
              'validation_successes': sum(r['success'] for r in records_valid),
              'test_seeds': sorted({r['seed'] for r in records_test})}
    if cfg.save:
        save_confidence(policy, densities[chosen], calibrations[chosen],
                        {'offline': report['offline'][chosen],
                         'closed_loop': closed.get(chosen, {})})
        log(f'calibrated {chosen!r} stored in {Path(policy) / "confidence.safetensors"}')
    if out:
        write_report(out, report, offline, records_test, calibrations)
    return report


# -- report -----------------------------------------------------------------------------------
def format_report(report: dict[str, Any]) -> str:
    """Markdown tables of a study's results."""
    lines = [f'# Confidence signals: {report["policy"]}', '',
             f'Task {report["task"]}, dataset {report["dataset"]}; chosen signal: '
             f'**{report["chosen"]}**. Offline figures on the dataset\'s validation '
             f'demonstrations; "other": {report["other"]}.', '',
             '| signal | AUROC 1 std | AUROC 3 std | AUROC 10 std | AUROC other | medians '
             '(in, 1, 3, 10 std) | monotone | cost per action |',
             '|---|---|---|---|---|---|---|---|']
    for name, r in report['offline'].items():
        a, m = r['auroc'], r['median']
        lines.append(
            f'| {name} | {a["1std"]:.3f} | {a["3std"]:.3f} | {a["10std"]:.3f} | '
            f'{r["auroc_other"]:.3f} | {", ".join(f"{v:.3g}" for v in m.values())} | '
            f'{"yes" if r["monotone"] else "no"} | {r["cost_ms"] * 1e3:.0f} us |')
    closed = report.get('closed_loop') or {}
    if closed:
        conds = [c for c in next(iter(closed.values())) if c not in ('clean', 'pooled')]
        lines += ['', f'Closed loop, test seeds ({len(report["test_seeds"])} per condition); '
                  'flagged: failed episodes with a sustained WARN at or after the perturbation '
                  'and before the episode ended; lead: median control steps from the first '
                  'flag to the end of a failed episode.', '',
                  '| signal | false alarms (clean) | ' + ' | '.join(
                      f'{c} flagged' for c in conds) + ' | all failures flagged | lead |',
                  '|---|---|' + '---|' * len(conds) + '---|---|']
        for name, rows in closed.items():
            clean = rows['clean']
            cells = [f'{rows[c]["flagged"]}/{rows[c]["failures"]}' for c in conds]
            pooled = rows['pooled']
            lines.append(f'| {name} | {clean["false_alarms"]}/{clean["episodes"]} | '
                         + ' | '.join(cells) + f' | {pooled["flagged"]}/{pooled["failures"]}'
                         f' ({pooled["flagged_rate"]:.0%}) | {pooled["lead_steps_median"]:.0f} |')
        first = next(iter(closed.values()))
        lines += ['', 'Success rate per condition: ' + ', '.join(
            f'{c} {first[c]["success_rate"]:.2f}' for c in first if c != 'pooled') + '.']
    return '\n'.join(lines) + '\n'


def write_report(out: str, report: dict[str, Any], offline: dict[str, Any],
                 records: list[dict[str, Any]], calibrations: dict[str, Calibration]) -> None:
    """`out/confidence.md`, `out/confidence.json` and `out/confidence.png` (atomically)."""
    from vdd_ros.core.io import atomic_path, write_json, write_text
    folder = Path(out)
    write_text(folder / 'confidence.md', format_report(report))
    write_json(folder / 'confidence.json', _jsonable(report))
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    chosen = report['chosen']
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    base = offline['signals'][chosen]['valid_scores']
    ax.hist(base, bins=60, alpha=0.6, label='validation', density=True)
    ax.axvline(calibrations[chosen].warn, color='orange', label='WARN')
    ax.axvline(calibrations[chosen].error, color='red', label='ERROR')
    ax.set_xlabel(f'{chosen} score')
    ax.set_title('validation observations')
    ax.legend()
    ax = axes[1]
    for cond in dict.fromkeys(r['condition'] for r in records):
        recs = [r for r in records if r['condition'] == cond][:5]
        for i, r in enumerate(recs):
            ax.plot(r['scores'][chosen], lw=0.8, alpha=0.8,
                    color=f'C{list(dict.fromkeys(x["condition"] for x in records)).index(cond)}',
                    label=cond if i == 0 else None)
    ax.axhline(calibrations[chosen].warn, color='orange', ls='--')
    ax.axhline(calibrations[chosen].error, color='red', ls='--')
    ax.set_yscale('symlog')
    ax.set_xlabel('control step')
    ax.set_title('closed loop (first 5 test episodes per condition)')
    if records:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(folder / 'confidence.png') as tmp:
        fig.savefig(tmp, format='png', dpi=110)
    plt.close(fig)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x
