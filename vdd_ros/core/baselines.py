"""Baselines trained directly on the data: Gaussian BC (Z=1) and an EM-trained MoE.

Both use one loop: an E-step (responsibilities of the dataset actions under the current model,
no gradient) and an M-step (responsibility-weighted maximum likelihood for the experts, soft
cross-entropy for the gating). With one expert this is plain maximum-likelihood BC.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from vdd_ros.core.config import BaselineConfig
from vdd_ros.core.moe import MixtureOfExperts
from vdd_ros.core.progress import ProgressCallback, ProgressTracker
from vdd_ros.core.vdd import linear_decay, set_lr


def em_loss(moe: MixtureOfExperts, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Negative expected complete-data log-likelihood under fixed responsibilities."""
    log_gate, means, scales = moe(obs)
    comp = moe.component_log_prob(actions[:, None], means, scales)[:, 0]     # (B, Z)
    with torch.no_grad():
        resp = torch.softmax(log_gate + comp, dim=-1)
    return -(resp * (comp + log_gate)).sum(-1).mean()


def train_em(moe: MixtureOfExperts, obs: torch.Tensor, actions: torch.Tensor,
             cfg: BaselineConfig, *, seed: int = 0, stage: str = 'em_moe',
             progress: ProgressCallback | None = None, stop: threading.Event | None = None,
             show_bar: bool = True) -> list[tuple[int, float]]:
    """Fit `moe` to flat normalised `obs (N, F)`, `actions (N, D)` by stochastic EM."""
    device = obs.device
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.Adam(moe.parameters(), lr=cfg.lr)
    decay = linear_decay(cfg.iterations, cfg.final_lr_fraction)
    tracker = ProgressTracker(stage, cfg.iterations, progress, stop, show_bar)
    moe.train()
    n = obs.shape[0]
    try:
        for it in range(cfg.iterations):
            set_lr(opt, cfg.lr * decay(it))
            idx = torch.randint(n, (min(cfg.batch_size, n),), device=device, generator=gen)
            loss = em_loss(moe, obs[idx], actions[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(moe.parameters(), 10.0)
            opt.step()
            tracker.update(it, loss.item())
            if tracker.should_stop:
                break
    finally:
        tracker.close()
    moe.eval()
    return tracker.history
