"""Media of a pipeline run: the per-action latency bench and the GIF of each mode's rollouts."""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from vdd_ros.core.io import atomic_path

LATENCY_ROUNDS = 10    # round-robin turns in which the policies' queries are timed
ENCODER = '/encoder'   # the key of a policy's encoder timings among the timed calls


def query_latencies(policies: Mapping[str, Any], dataset: Path, queries: int,
                    rounds: int = LATENCY_ROUNDS, warmup: int = 20
                    ) -> dict[str, dict[str, float]]:
    """Per-action inference latency of loaded ModelPolicies, with no chunk to amortise it.

    Every `act` call queries the network (each policy's `action_exec` is set to 1), on the
    demonstrations' observations in episode order, one thread, batch 1: the cost of each
    action when the policy is queried at every control step, as `vdd-ros bench` measures it.
    The policies are timed in turn, `rounds` times `queries / rounds` calls each, with the
    garbage collector paused, so that a change of machine load falls on all of them alike
    and their ratios hold. A camera policy's image encoders are also timed alone on the same
    windows (`encoder_ms_p50`), the part of each query that is the same for every kind.
    """
    import gc

    import numpy as np
    import torch

    from vdd_ros.core.bench import time_interleaved
    from vdd_ros.core.data import load_dataset
    needed = warmup + rounds * -(-queries // rounds)     # calls per policy, warm-up included
    calls: dict[str, Callable[[], None]] = {}
    steps: dict[tuple[str, ...], list[tuple[int, int, Any]]] = {}
    for name, policy in policies.items():
        keys = tuple(k for k, _ in policy.spec.obs_fields)
        if keys not in steps:
            data = load_dataset(dataset, list(keys))
            index = [(i, t) for i, demo in enumerate(data.demos) for t in range(len(demo))]
            steps[keys] = [(i, t, data.demos[i].flat(data.obs_fields, t))
                           for i, t in index[:needed]]
        observations = steps[keys]
        policy.spec = dataclasses.replace(policy.spec, action_exec=1)
        calls[name] = _acting(policy, itertools.cycle(observations))
        model = policy.model
        if model.encoder.has_cameras:
            windows = itertools.cycle([
                torch.from_numpy(np.stack([obs] * policy.spec.obs_horizon))[None]
                for _, _, obs in observations])
            calls[f'{name}{ENCODER}'] = _encoding(model, windows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.disable()
    try:
        ms = time_interleaved(calls, queries, warmup, rounds)
    finally:
        gc.enable()
        torch.set_num_threads(threads)
    out = {name: {'query_ms_p50': float(np.percentile(ms[name], 50)),
                  'query_ms_p99': float(np.percentile(ms[name], 99)),
                  'query_ms_mean': float(ms[name].mean()), 'query_count': int(queries)}
           for name in policies}
    for name in policies:
        if f'{name}{ENCODER}' in ms:    # a camera policy: its image encoders alone, per query
            out[name]['encoder_ms_p50'] = float(np.percentile(ms[f'{name}{ENCODER}'], 50))
    return out


def _acting(policy: Any, cursor: Iterator[tuple[int, int, Any]]) -> Callable[[], None]:
    """One timed query of `policy`: its next observation (an episode's first resets it)."""
    def step() -> None:
        episode, t, obs = next(cursor)
        if t == 0:
            policy.reset(episode)
        policy.act(obs)
    return step


def _encoding(model: Any, windows: Iterator[Any]) -> Callable[[], None]:
    """One timed pass of `model`'s image encoders over the next observation window."""
    import torch

    @torch.inference_mode()
    def encode() -> None:
        model.encoder(model.obs_normalizer.normalize(next(windows)).reshape(1, -1))
    return encode


def pick_mode_episodes(detail: list[dict[str, Any]], modes: list[str], per_mode: int
                       ) -> dict[str, list[tuple[int, bool]]]:
    """(seed, succeeded) of up to `per_mode` evaluation episodes per mode: successes first,
    then episodes that committed to the mode but failed; the first episode when none did."""
    picks: dict[str, list[tuple[int, bool]]] = {}
    for mode in modes:
        ranked = [d for d in detail if d['mode'] == mode and d['success']] + \
            [d for d in detail if d['mode'] == mode and not d['success']]
        picks[mode] = [(int(d['seed']), bool(d['success'])) for d in ranked[:per_mode]]
    if not any(picks.values()) and detail:
        picks = {'no mode': [(int(detail[0]['seed']), bool(detail[0]['success']))]}
    return {m: p for m, p in picks.items() if p}


def render_mode_gif(ref: Any, task: Any, detail: list[dict[str, Any]], per_mode: int,
                    out: Path, device: str = 'cpu', frame_step: int = 2
                    ) -> dict[str, list[int]]:
    """Render the picked episodes of each mode side by side, one panel per mode with a
    caption strip, into one GIF (written atomically). Returns the seeds shown per mode.

    The episodes are replayed in this process with the same seeds (and so the same
    outcomes) as in the evaluation; every `frame_step`-th frame, and the last, is rendered.
    """
    import numpy as np
    from PIL import Image

    from vdd_ros.sim.rollout import build_policy, env_info, render_env, run_episode
    _, modes, _ = env_info(task)
    picks = pick_mode_episodes(detail, modes, per_mode)
    policy = build_policy(ref, task, device)
    panels: list[list[np.ndarray]] = []
    env, fps = render_env(task, policy)
    with env:
        for mode, episodes in picks.items():
            frames: list[np.ndarray] = []
            for seed, _ in episodes:
                raw: list[np.ndarray] = []
                rec = run_episode(env, policy, seed, frames=raw, frame_step=frame_step)
                outcome = 'success' if rec['success'] else f'failed ({rec["mode"] or "-"})'
                caption = f'VDD-MoE | {mode} | seed {seed} | {outcome}'
                frames += [_captioned(f, caption) for f in raw]
            panels.append(frames)
    length = max(len(p) for p in panels)
    images = [Image.fromarray(np.concatenate([p[min(i, len(p) - 1)] for p in panels], axis=1))
              for i in range(length)]
    with atomic_path(out) as tmp:
        images[0].save(tmp, format='GIF', save_all=True, append_images=images[1:], loop=0,
                       duration=int(round(1000 * frame_step / fps)))
    return {m: [s for s, _ in p] for m, p in picks.items()}


def _captioned(frame: Any, text: str, height: int = 18) -> Any:
    """`frame` (H x W x 3 uint8) with a caption strip on top."""
    import numpy as np
    from PIL import Image, ImageDraw
    strip = Image.new('RGB', (frame.shape[1], height), (20, 20, 20))
    ImageDraw.Draw(strip).text((4, 3), text, fill=(240, 240, 240))
    return np.concatenate([np.asarray(strip), frame], axis=0)
