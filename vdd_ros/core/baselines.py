"""Baselines trained directly on the data: Gaussian BC (Z=1) and an EM-trained MoE.

Both use one loop: an E-step (responsibilities of the dataset actions under the current model,
no gradient) and an M-step (responsibility-weighted maximum likelihood for the experts, soft
cross-entropy for the gating). With one expert this is plain maximum-likelihood BC.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch
from torch import nn

from vdd_ros.core.config import BaselineConfig
from vdd_ros.core.distributed import DataParallel
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.progress import ProgressCallback, ProgressTracker
from vdd_ros.core.train_state import TrainingState
from vdd_ros.core.vdd import linear_decay, set_lr


def em_loss(moe: MixtureOfExperts, obs: torch.Tensor, actions: torch.Tensor,
            responsibility_min_std: float | None = None) -> torch.Tensor:
    """Negative expected complete-data log-likelihood under fixed responsibilities.

    With `responsibility_min_std` the responsibilities (the E-step, and so the gating's
    targets) see every expert's std floored there (a full covariance: its Cholesky factor's
    diagonal), while the experts fit down to the MoE's own floor.
    """
    log_gate, means, scales = moe(obs)
    comp = moe.component_log_prob(actions[:, None], means, scales)[:, 0]     # (B, Z)
    with torch.no_grad():
        judged = comp
        if responsibility_min_std is not None:
            judged = moe.component_log_prob(
                actions[:, None], means,
                floor_scales(scales, responsibility_min_std, moe.full))[:, 0]
        resp = torch.softmax(log_gate + judged, dim=-1)
    return -(resp * (comp + log_gate)).sum(-1).mean()


def floor_scales(scales: torch.Tensor, floor: float, full: bool) -> torch.Tensor:
    """Diagonal stds `(..., D)` or (`full`) Cholesky factors `(..., D, D)` with no std
    (diagonal entry) below `floor`."""
    if not full:
        return scales.clamp_min(floor)
    diag = scales.diagonal(dim1=-2, dim2=-1)
    return scales + torch.diag_embed((floor - diag).clamp_min(0.0))


def std_floor_schedule(start: float, final: float | None, iterations: int
                       ) -> Callable[[int], float] | None:
    """The experts' std floor at each iteration when annealed (deterministic annealing):
    `start` at the first, geometrically down (or up) to `final` at the last; None without
    `final`."""
    if final is None:
        return None
    ratio, last = final / start, max(iterations - 1, 1)
    return lambda it: start * ratio ** min(it / last, 1.0)


def train_em(moe: MixtureOfExperts, obs: torch.Tensor, actions: torch.Tensor,
             cfg: BaselineConfig, *, seed: int = 0, stage: str = 'em_moe',
             progress: ProgressCallback | None = None, stop: threading.Event | None = None,
             show_bar: bool = True, dp: DataParallel | None = None,
             state: TrainingState | None = None,
             condition: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> list[tuple[int, float]]:
    """Fit `moe` to flat normalised `obs (N, F)`, `actions (N, D)` by stochastic EM.

    `obs` are the networks' conditions, or windows that `condition` (the MoE's own encoder,
    trained along) turns into them. With `dp` each rank takes its share of every global batch
    (distributed.py); with `state` the loop resumes from and saves a training state (an empty
    history when the state is of a later stage of the job, which this loop then skips).
    """
    dp = dp or DataParallel()
    device = obs.device
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [p for p in moe.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    decay = linear_decay(cfg.iterations, cfg.final_lr_fraction)
    n = obs.shape[0]
    batch = min(cfg.batch_size, n)
    dp.check_batch(batch, stage)
    rows, share = dp.rows(batch), dp.share(batch)
    parts = {'model': moe, 'opt': opt, 'gen': gen}
    resumed = state.restore(stage, parts) if state is not None else (0, [])
    if resumed is None:
        return []
    start, history = resumed
    dp.broadcast_(moe)
    tracker = ProgressTracker(stage, cfg.iterations, progress if dp.is_main else None, stop,
                              show_bar and dp.is_main, initial=start, history=history)
    floor = std_floor_schedule(moe.cfg.min_std, cfg.final_min_std, cfg.iterations)
    moe.train()
    try:
        for it in range(start, cfg.iterations):
            set_lr(opt, cfg.lr * decay(it))
            if floor is not None:
                moe.set_min_std(floor(it))
            idx = torch.randint(n, (batch,), device=device, generator=gen)[rows]
            batch_obs = obs[idx] if condition is None else condition(obs[idx])
            loss = em_loss(moe, batch_obs, actions[idx], cfg.responsibility_min_std)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            (value,) = dp.sync(params, share, [loss], tracker.should_stop)
            nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            tracker.update(it, value)
            stopping = dp.should_stop(tracker.should_stop)
            if state is not None:
                state.step(stage, it + 1, parts, tracker.history, force=stopping)
            if stopping:
                break
    finally:
        tracker.close()
    moe.eval()
    return tracker.history
