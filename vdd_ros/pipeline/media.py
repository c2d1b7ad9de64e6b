"""Media of a pipeline run: the per-action latency bench and the GIF of each mode's rollouts."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vdd_ros.core.io import atomic_path


def query_latency(policy: Any, dataset: Path, queries: int, warmup: int = 20
                  ) -> dict[str, float]:
    """Per-action inference latency of a loaded ModelPolicy, with no chunk to amortise it.

    Every `act` call queries the network (the policy's `action_exec` is set to 1), on the
    demonstrations' observations in episode order, one thread, batch 1: the cost of each
    action when the policy is queried at every control step, as `vdd-ros bench` measures it.
    A camera policy's image encoders are also timed alone on the same windows
    (`encoder_ms_p50`), the part of each query that is the same for every policy kind.
    """
    import numpy as np
    import torch

    from vdd_ros.core.bench import time_calls
    from vdd_ros.core.data import load_dataset
    data = load_dataset(dataset, [k for k, _ in policy.spec.obs_fields])
    steps = [(i, t) for i, demo in enumerate(data.demos) for t in range(len(demo))]
    steps = (steps * (1 + (queries + warmup) // max(len(steps), 1)))[:queries + warmup]
    observations = [(i, t, data.demos[i].flat(data.obs_fields, t)) for i, t in steps]
    policy.spec = dataclasses.replace(policy.spec, action_exec=1)
    cursor = iter(observations)

    def step() -> None:
        episode, t, obs = next(cursor)
        if t == 0:
            policy.reset(episode)
        policy.act(obs)
    model = policy.model
    encoder = model.encoder if model.encoder.has_cameras else None
    windows = iter([torch.from_numpy(np.stack([obs] * policy.spec.obs_horizon))[None]
                    for _, _, obs in observations] if encoder is not None else [])

    @torch.inference_mode()
    def encode() -> None:
        window = next(windows)
        encoder(model.obs_normalizer.normalize(window).reshape(1, -1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms = time_calls(step, queries, warmup)
        encoder_ms = time_calls(encode, queries, warmup) if encoder is not None else None
    finally:
        torch.set_num_threads(threads)
    out = {'query_ms_p50': float(np.percentile(ms, 50)),
           'query_ms_p99': float(np.percentile(ms, 99)), 'query_ms_mean': float(ms.mean()),
           'query_count': int(queries)}
    if encoder_ms is not None:     # a camera policy: its image encoders alone, per query
        out['encoder_ms_p50'] = float(np.percentile(encoder_ms, 50))
    return out


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
