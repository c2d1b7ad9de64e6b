"""Closed-loop rollouts: one runner for evaluation, collection, the CLI, ROS checks and tests.

`evaluate` runs a policy (a checkpoint folder, an oracle name, or a picklable factory) on a
fixed list of evaluation seeds, in worker processes that each build one environment and one
policy and reuse them across episodes, and returns a metrics dict. Episodes run in a
registered task (a name) or in the robosuite environment a dataset was recorded in
(`DatasetEnvRef`: rebuilt from its `env_args`, the policy's observation keys, no modes).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing as mp
import os
import pickle
import time
import uuid
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Union

import numpy as np
from tqdm import tqdm

from vdd_ros.core.policy import Policy
from vdd_ros.errors import UserError
from vdd_ros.sim.tasks import TaskSpec, get_task

# Evaluation (test) seeds start here; collection seeds must stay below it. Validation seeds,
# on which settings and thresholds are chosen, start at VALID_SEED_BASE, above both.
EVAL_SEED_BASE = 1_000_000
VALID_SEED_BASE = 2_000_000
ORACLE_NAMES = ('scripted', 'averaged')

PolicyRef = Union[str, os.PathLike, Callable[[], Policy]]


@dataclass(frozen=True)
class DatasetEnvRef:
    """The environment a dataset was recorded in: its `env_args`, an episode horizon, and the
    observation keys to flatten (set from the policy by `for_policy`)."""

    path: str
    env_args_json: str
    horizon: int
    action_dim: int
    obs_keys: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f'{json.loads(self.env_args_json).get("env_name")} ({Path(self.path).name})'

    def with_keys(self, keys: Any) -> 'DatasetEnvRef':
        return dataclasses.replace(self, obs_keys=tuple(str(k) for k in keys))

    def for_policy(self, spec: Any) -> 'DatasetEnvRef':
        return self.with_keys(k for k, _ in spec.obs_fields)

    def make(self, render: bool = False) -> Any:
        from vdd_ros.sim.robosuite_env import DatasetEnv
        return DatasetEnv(json.loads(self.env_args_json), list(self.obs_keys), self.horizon,
                          where=self.path, render=render)


def dataset_env(path: str | os.PathLike, horizon: int | None = None) -> DatasetEnvRef:
    """The environment of dataset `path` (checked now: one line when it cannot be rebuilt);
    the horizon defaults to the longest demonstration."""
    from vdd_ros.core.data import load_dataset
    from vdd_ros.sim.robosuite_env import check_env_args
    data = load_dataset(path)
    check_env_args(data.env_args, str(path))
    if horizon is not None and int(horizon) < 1:
        raise UserError(f'horizon: must be >= 1, got {horizon}')
    longest = max(len(d) for d in data.demos)
    return DatasetEnvRef(str(path), json.dumps(data.env_args, sort_keys=True),
                         int(horizon or longest), int(data.action_dim))


def standard_env(name: str) -> DatasetEnvRef:
    """A standard robosuite environment with no dataset behind it (only 'Lift': robomimic's
    keys and horizon, see robosuite_env.LIFT_KEYS)."""
    from vdd_ros.sim.robosuite_env import LIFT_HORIZON, LIFT_KEYS, standard_lift_args
    if name != 'Lift':
        raise UserError(f'no standard environment {name!r} (known: Lift)')
    return DatasetEnvRef('robosuite Lift', json.dumps(standard_lift_args(), sort_keys=True),
                         LIFT_HORIZON, 7, LIFT_KEYS)


EnvRef = Union[str, DatasetEnvRef]


def env_info(env: EnvRef) -> tuple[str, list[str], TaskSpec | None]:
    """(name, behaviour modes, task spec or None) of an environment reference."""
    if isinstance(env, DatasetEnvRef):
        return env.name, [], None
    spec = get_task(env)
    return spec.name, list(spec.modes), spec


_SEALED = [0]   # > 0 while the test seeds are sealed (tuning)


@contextlib.contextmanager
def sealed_test_seeds() -> Iterator[None]:
    """While inside, reading a test (evaluation) seed raises: tuning chooses settings on
    validation seeds only, so nothing chosen can have seen the reported table's seeds."""
    _SEALED[0] += 1
    try:
        yield
    finally:
        _SEALED[0] -= 1


def check_unsealed(seeds: Iterable[int]) -> None:
    """Raise RuntimeError if any of `seeds` is a test seed while they are sealed."""
    if _SEALED[0] and any(EVAL_SEED_BASE <= int(s) < VALID_SEED_BASE for s in seeds):
        raise RuntimeError('a test seed was read while tuning (the test seeds are sealed: '
                           'tuning evaluates on validation seeds only)')


def evaluation_seeds(n: int) -> list[int]:
    """The first `n` evaluation (test) seeds (disjoint from every collection seed)."""
    seeds = [EVAL_SEED_BASE + i for i in range(int(n))]
    check_unsealed(seeds)
    return seeds


def validation_seeds(n: int) -> list[int]:
    """The first `n` validation seeds (disjoint from collection and evaluation seeds)."""
    return [VALID_SEED_BASE + i for i in range(int(n))]


def describe_policy(policy: PolicyRef) -> str:
    """A short printable name of a policy reference."""
    if isinstance(policy, (str, os.PathLike)):
        return os.fspath(policy)
    return getattr(policy, '__qualname__', None) or getattr(policy, '__name__', None) or \
        type(policy).__name__


def build_policy(policy: PolicyRef, task: EnvRef, device: str = 'cpu') -> Policy:
    """Instantiate a policy reference and check that it fits the task's observation (a
    dataset's environment: its action size; its keys are checked when it is built)."""
    if isinstance(policy, (str, os.PathLike)) and os.fspath(policy) in ORACLE_NAMES:
        if isinstance(task, DatasetEnvRef):
            raise UserError(f'the {os.fspath(policy)!r} oracle exists for the registered '
                            f'tasks only, not for {task.name}')
        from vdd_ros.sim.demonstrators import make_oracle
        built = make_oracle(task, kind=os.fspath(policy))
    elif isinstance(policy, (str, os.PathLike)):
        path = Path(policy)
        if not path.exists():
            raise UserError(f'no such checkpoint: {path} (a policy is a checkpoint folder, '
                            f'{" or ".join(repr(n) for n in ORACLE_NAMES)})')
        from vdd_ros.core.checkpoint import load_policy
        built = load_policy(path, device=device)
    elif callable(policy):
        built = policy()
    else:
        raise UserError(f'cannot make a policy from {policy!r}')
    pspec = getattr(built, 'spec', None)
    if isinstance(task, DatasetEnvRef):
        if pspec is not None and int(pspec.action_dim) != task.action_dim:
            raise UserError(f'policy {describe_policy(policy)} outputs {pspec.action_dim} '
                            f'actions, {task.name} takes {task.action_dim}')
        return built
    spec = get_task(task)
    if pspec is not None:
        if getattr(pspec, 'task', None) not in (None, spec.name):
            raise UserError(f'policy {describe_policy(policy)} was made for task '
                            f'{pspec.task!r}, not {spec.name!r}')
        fields = [(str(k), int(n)) for k, n in pspec.obs_fields]
        privileged = getattr(built, 'privileged', False)
        given = get_task(spec.family).obs_fields if privileged else spec.obs_fields
        if fields != list(given):
            raise UserError(f'policy {describe_policy(policy)} expects observation fields '
                            f'{fields}, task {spec.name} gives {list(given)}')
        if int(pspec.action_dim) != spec.action_dim:
            raise UserError(f'policy {describe_policy(policy)} outputs {pspec.action_dim} '
                            f'actions, task {spec.name} takes {spec.action_dim}')
    return built


def run_episode(env: Any, policy: Policy, seed: int, record: bool = False,
                frames: list[np.ndarray] | None = None, frame_step: int = 1
                ) -> dict[str, Any]:
    """Run one seeded episode of `policy` in `env` (a SimEnv).

    Returns seed, success, mode, length, the oracle's mode (`policy_mode`, None for learned
    policies), per-action latencies in ms and, with `record`, the robomimic arrays (obs[t] and
    states[t] are seen before actions[t]; rewards[t] and dones[t] follow it). With `frames`,
    appends one rendered frame per step. A `privileged` policy (a camera task's scripted
    oracle) acts on the state observation; the recorded `obs` are the task's own.
    `frame_step` > 1 renders only every `frame_step`-th step's frame, and the last one.
    """
    if frame_step < 1:
        raise ValueError(f'frame_step must be >= 1, got {frame_step}')
    obs = env.reset(seed)
    policy.reset(seed)
    privileged = getattr(policy, 'privileged', False)  # (duck-typed policies have none)
    latencies: list[float] = []
    rec: dict[str, list] = {'obs': [], 'actions': [], 'rewards': [], 'dones': [], 'states': []}
    if frames is not None:
        frames.append(env.render_frame())
    done, t0 = False, time.perf_counter()
    while not done:
        if record:
            rec['obs'].append(obs)
            rec['states'].append(env.get_state())
        start = time.perf_counter()
        action = np.asarray(policy.act(env.state_observation() if privileged else obs),
                            dtype=np.float32).reshape(-1)
        latencies.append((time.perf_counter() - start) * 1e3)
        obs, reward, done = env.step(action)
        if record:
            rec['actions'].append(action)
            rec['rewards'].append(reward)
            rec['dones'].append(done)
        if frames is not None and (done or env.t % frame_step == 0):
            frames.append(env.render_frame())
    out: dict[str, Any] = {
        'seed': int(seed), 'success': bool(env.success()), 'mode': env.mode(),
        'length': int(env.t), 'policy_mode': getattr(policy, 'mode', None),
        'latency_ms': latencies, 'episode_s': time.perf_counter() - t0}
    if record:
        out['obs'] = np.stack(rec['obs']).astype(np.float32)
        out['actions'] = np.stack(rec['actions']).astype(np.float32)
        out['rewards'] = np.asarray(rec['rewards'], dtype=np.float64)
        out['dones'] = np.asarray(rec['dones'], dtype=np.int64)
        out['states'] = np.stack(rec['states'])
    return out


# -- worker processes -------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def worker_init(owner: int | None = None) -> None:
    """Per-process setup: one torch thread (workers already run in parallel); the worker
    exits when the process `owner` that started the pool does, however it ends."""
    import torch

    from vdd_ros.core.process import watch_process
    if owner is not None:
        watch_process(owner)
    torch.set_num_threads(1)


def cached_env(task: EnvRef) -> Any:
    """This process's environment for `task`, built on first use and then reused."""
    env = _WORKER.get('env')
    if env is None or _WORKER.get('env_ref') != task:
        from vdd_ros.sim.env import SimEnv
        if env is not None:
            env.close()
        env = _WORKER['env'] = task.make() if isinstance(task, DatasetEnvRef) else SimEnv(task)
        _WORKER['env_ref'] = task
    return env


def release_cached_env() -> None:
    """Close this process's cached environment (the in-process runner keeps one for reuse)."""
    env = _WORKER.pop('env', None)
    _WORKER.pop('env_ref', None)
    _WORKER.pop('policy', None)
    _WORKER.pop('token', None)
    if env is not None:
        env.close()


def worker_objects(task: EnvRef, policy: PolicyRef, device: str,
                   token: str) -> tuple[Any, Policy]:
    """This process's environment and policy; the policy is rebuilt once per `token` (one
    evaluation), so a checkpoint rewritten between evaluations is never served stale."""
    env = cached_env(task)
    if _WORKER.get('token') != token:
        _WORKER['policy'] = build_policy(policy, task, device)
        _WORKER['token'] = token
    return env, _WORKER['policy']


def _eval_job(job: tuple[int, int, EnvRef, PolicyRef, str, str]) -> tuple[int, dict[str, Any]]:
    index, seed, task, policy, device, token = job
    env, pol = worker_objects(task, policy, device, token)
    return index, run_episode(env, pol, seed)


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[Any]:
    """A pool of `workers` processes (None for one: run in this process); joined when the block
    ends normally, terminated when it raises."""
    if workers <= 1:
        yield None
        return
    pool = mp_context().Pool(workers, initializer=worker_init, initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    pool.close()
    pool.join()


def mp_context() -> mp.context.BaseContext:
    """Process start method for workers: forkserver where available (its server preloads
    torch and robosuite, so workers start fast), else spawn."""
    if 'forkserver' in mp.get_all_start_methods():
        ctx = mp.get_context('forkserver')
        ctx.set_forkserver_preload(['vdd_ros.sim.preload'])
        return ctx
    return mp.get_context('spawn')


# -- metrics ----------------------------------------------------------------------------------
def mode_entropy(counts: dict[str, int], n_modes: int) -> float:
    """Normalised entropy -sum p log p / log M of a mode histogram (0 when it is empty)."""
    total = sum(counts.values())
    if total == 0 or n_modes < 2:
        return 0.0
    p = np.array([c / total for c in counts.values() if c > 0])
    return max(0.0, float(-(p * np.log(p)).sum() / math.log(n_modes)))   # one mode: +0, not -0


def summarize(records: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    """Metrics over episode records (see `evaluate`)."""
    n = len(records)
    wins = [r for r in records if r['success']]
    counts = {m: 0 for m in modes}
    for r in wins:
        if r['mode'] in counts:
            counts[r['mode']] += 1
    lat = np.concatenate([np.asarray(r['latency_ms'], dtype=np.float64) for r in records]) \
        if records else np.zeros(0)
    lengths = [r['length'] for r in records]
    return {
        'episodes': n,
        'successes': len(wins),
        'success_rate': len(wins) / n if n else 0.0,
        'mode_counts': counts,
        'mode_entropy': mode_entropy(counts, len(modes)),
        'mean_length': float(np.mean(lengths)) if lengths else 0.0,
        'mean_length_success': float(np.mean([r['length'] for r in wins])) if wins else 0.0,
        'latency_ms_p50': float(np.percentile(lat, 50)) if lat.size else 0.0,
        'latency_ms_p99': float(np.percentile(lat, 99)) if lat.size else 0.0,
        'latency_ms_mean': float(lat.mean()) if lat.size else 0.0,
        'episodes_detail': [
            {'seed': r['seed'], 'success': r['success'], 'mode': r['mode'],
             'length': r['length'], 'policy_mode': r.get('policy_mode')} for r in records],
    }


# -- evaluation -------------------------------------------------------------------------------
def evaluate(policy: PolicyRef, task: EnvRef, episodes: int, workers: int = 1,
             seeds: list[int] | None = None, video: str | None = None,
             show_progress: bool = True, device: str = 'cpu') -> dict:
    """Roll `policy` out on `task` for `episodes` seeded episodes and return the metrics.

    `policy` is a checkpoint folder, 'scripted', 'averaged' or a picklable factory returning a
    Policy. Seeds default to `evaluation_seeds(episodes)`. Metrics: episodes, successes,
    success_rate, mode_counts and mode_entropy (over successful rollouts), mean_length,
    latency_ms_p50/p99/mean, episodes_detail (seed, success, mode, length per episode), plus
    task, policy, workers and wall_s. With `video` (a .gif path), the first seed is replayed
    with offscreen rendering and written as a GIF. In a dataset's environment (`task` a
    DatasetEnvRef) `modes` is empty: no mode metrics (`modes_defined` False).
    """
    name, modes, _ = env_info(task)
    episodes = int(episodes)
    if episodes < 1:
        raise UserError(f'episodes must be at least 1, got {episodes}')
    if workers < 1:
        raise UserError(f'workers must be at least 1, got {workers}')
    if seeds is None:
        seeds = evaluation_seeds(episodes)
    elif len(seeds) < episodes:
        raise UserError(f'{episodes} episodes need {episodes} seeds, got {len(seeds)}')
    seeds = [int(s) for s in seeds[:episodes]]
    check_unsealed(seeds)
    if video is not None and not str(video).lower().endswith('.gif'):
        raise UserError(f'--video must name a .gif file, got {video}')
    local = build_policy(policy, task, device)  # fails early, here, on a bad policy
    if isinstance(task, DatasetEnvRef):
        task = task.for_policy(local.spec)
        cached_env(task)                          # here too: the keys it cannot provide
    workers = min(int(workers), episodes)
    records: list[dict[str, Any] | None] = [None] * episodes
    start = time.perf_counter()
    bar = tqdm(total=episodes, desc=f'evaluate {task}', disable=not show_progress,
               dynamic_ncols=True, leave=False)
    if workers > 1:
        try:
            pickle.dumps(policy)
        except Exception as exc:
            raise UserError(f'workers > 1 need a picklable policy factory (a module-level '
                            f'function or functools.partial), not {policy!r}: {exc}') from None
    try:
        with worker_pool(workers) as pool:
            if pool is None:
                env = cached_env(task)
                results: Any = ((i, run_episode(env, local, s)) for i, s in enumerate(seeds))
            else:
                token = uuid.uuid4().hex
                jobs = [(i, s, task, policy, device, token) for i, s in enumerate(seeds)]
                results = pool.imap_unordered(_eval_job, jobs)
            wins = 0
            for index, rec in results:
                records[index] = rec
                wins += rec['success']
                bar.update(1)
                bar.set_postfix(success=f'{wins}/{bar.n}', refresh=False)
    finally:
        bar.close()
    metrics = summarize([r for r in records if r is not None], modes)
    metrics.update(task=name, policy=describe_policy(policy), workers=workers,
                   wall_s=time.perf_counter() - start, modes_defined=bool(modes))
    if video is not None:
        metrics['video'] = record_video(policy, task, seeds[0], video, device=device)
    return metrics


def render_env(task: EnvRef, policy: Policy) -> tuple[Any, int]:
    """An environment for `task` that renders offscreen, with `policy`'s keys, and its
    control frequency."""
    from vdd_ros.sim.env import SimEnv
    if isinstance(task, DatasetEnvRef):
        kwargs = json.loads(task.env_args_json).get('env_kwargs', {})
        return task.for_policy(policy.spec).make(render=True), \
            int(kwargs.get('control_freq', 20))
    return SimEnv(task, render=True), get_task(task).control_freq


def record_video(policy: PolicyRef, task: EnvRef, seed: int, path: str | os.PathLike,
                 device: str = 'cpu', fps: int | None = None) -> str:
    """Render one seeded episode offscreen and write it as a GIF (atomically). Returns path."""
    from PIL import Image
    pol = build_policy(policy, task, device)
    frames: list[np.ndarray] = []
    env, freq = render_env(task, pol)
    fps = fps or freq
    with env:
        run_episode(env, pol, seed, frames=frames)
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UserError(f'cannot write {path}: folder {path.parent} does not exist')
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    images = [Image.fromarray(f) for f in frames]
    try:
        images[0].save(tmp, format='GIF', save_all=True, append_images=images[1:],
                       duration=int(round(1000 / fps)), loop=0)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return str(path)
