"""EDM-preconditioned (BESO-style) diffusion teacher: denoiser, training loss, sampler, score.

Actions are handled as flat normalised chunks `(B, action_horizon * action_dim)` and the
observation as a flat normalised window `(B, obs_horizon * obs_dim)`. The process is variance
exploding: x_sigma = a + sigma * eps.
"""
from __future__ import annotations

import copy
import math
import threading
from typing import Any

import torch
from torch import nn

from vdd_ros.core.distributed import DataParallel
from vdd_ros.core.model import DenoisingModel
from vdd_ros.core.progress import ProgressCallback, ProgressTracker
from vdd_ros.core.train_state import TrainingState


class DiffusionTeacher(DenoisingModel):
    """Denoiser D(a; sigma, s) with EDM preconditioning and a few-step Euler/Heun sampler."""

    kind = 'teacher'

    # -- EDM preconditioning ---------------------------------------------------------------
    def denoise(self, a: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(a; sigma, s): the denoised action for noisy `a` (..., flat_act) at level `sigma`,
        given the condition `encode(obs)` of the observation window."""
        sd = self.cfg.sigma_data
        sigma = sigma.to(a.dtype).expand(a.shape[:-1])[..., None]
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1.0 / (sigma ** 2 + sd ** 2).sqrt()
        c_noise = sigma.log()[..., 0] / 4.0
        cond = cond.expand(*a.shape[:-1], cond.shape[-1])
        h = torch.cat([c_in * a, cond, self.embed(c_noise)], dim=-1)
        return c_skip * a + c_out * self.net(h)

    def score(self, a: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Score of the sigma-smoothed action distribution: (D(a; sigma, s) - a) / sigma^2."""
        sig = sigma.to(a.dtype).expand(a.shape[:-1])[..., None]
        return (self.denoise(a, cond, sigma) - a) / sig ** 2

    def training_draws(self, batch: int, device: torch.device | str = 'cpu',
                       generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The standard normal draws of one training batch: the noise levels' `(B,)` and the
        noise's `(B, flat_act)` (data-parallel ranks draw a global batch and take their rows)."""
        n = torch.randn(batch, device=device, generator=generator)
        return n, torch.randn(batch, self.flat_act, device=device, generator=generator)

    def loss(self, a0: torch.Tensor, obs: torch.Tensor,
             generator: torch.Generator | None = None,
             draws: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """EDM denoising loss with log-normal training noise (from `draws` when given) for
        normalised windows `obs` (encoded here: augmented while training)."""
        cfg = self.cfg
        if draws is None:
            draws = self.training_draws(a0.shape[0], a0.device, generator)
        n, noise = draws
        sigma = (cfg.noise_mean + cfg.noise_std * n).exp()
        denoised = self.denoise(a0 + sigma[:, None] * noise, self.encode(obs, generator), sigma)
        sd = cfg.sigma_data
        weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        return (weight[:, None] * (denoised - a0) ** 2).mean()

    # -- sampling ---------------------------------------------------------------------------
    def sigmas(self, steps: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        """Karras noise levels from sigma_max down to sigma_min (`steps` values)."""
        cfg = self.cfg
        if steps == 1:
            return torch.tensor([cfg.sigma_max], device=device)
        ramp = torch.linspace(0, 1, steps, device=device)
        lo, hi = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
        return (hi + ramp * (lo - hi)) ** cfg.rho

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, steps: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw flat normalised action chunks for flat normalised observations `(B, flat_obs)`."""
        steps = self.sampling_steps if steps is None else int(steps)
        sigmas = self.sigmas(steps, obs.device)
        x = torch.randn(obs.shape[0], self.flat_act, device=obs.device,
                        generator=generator) * sigmas[0]
        cond = self.encode(obs)
        for i in range(steps):
            sigma = sigmas[i]
            denoised = self.denoise(x, cond, sigma)
            if i == steps - 1:
                return denoised
            nxt = sigmas[i + 1]
            d = (x - denoised) / sigma
            x_next = x + (nxt - sigma) * d
            if self.cfg.sampler == 'heun':
                d2 = (x_next - self.denoise(x_next, cond, nxt)) / nxt
                x_next = x + (nxt - sigma) * (d + d2) / 2
            x = x_next
        return x



def train_teacher(teacher: DiffusionTeacher, obs: torch.Tensor, actions: torch.Tensor, *,
                  iterations: int | None = None, seed: int = 0,
                  progress: ProgressCallback | None = None,
                  stop: threading.Event | None = None, show_bar: bool = True,
                  on_checkpoint: Any = None, checkpoint_every: int = 0,
                  dp: DataParallel | None = None,
                  state: TrainingState | None = None) -> list[tuple[int, float]]:
    """Train the denoiser on normalised flat `obs (N, flat_obs)` and `actions (N, flat_act)`.

    The weights end as an exponential moving average of the iterates. Returns the loss
    history. `on_checkpoint(teacher)` is called every `checkpoint_every` iterations. With `dp`
    each rank trains on its share of every global batch (distributed.py), and only rank 0
    reports and checkpoints; with `state` the loop resumes from and saves a training state.
    """
    cfg = teacher.cfg
    iterations = cfg.iterations if iterations is None else iterations
    dp = dp or DataParallel()
    device = obs.device
    gen = torch.Generator(device=device).manual_seed(seed)
    trained = _trained(teacher)
    ema = copy.deepcopy(trained).requires_grad_(False)
    params = list(trained.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: 0.5 * (1 + math.cos(math.pi * min(it / iterations, 1.0))))
    n = obs.shape[0]
    batch = min(cfg.batch_size, n)
    dp.check_batch(batch, 'teacher')
    rows, share = dp.rows(batch), dp.share(batch)
    parts = {'model': teacher, 'ema': ema, 'opt': opt, 'sched': sched, 'gen': gen}
    start, history = state.restore('teacher', parts) if state is not None else (0, [])
    dp.broadcast_(teacher)
    dp.broadcast_(ema)
    tracker = ProgressTracker('teacher', iterations, progress if dp.is_main else None, stop,
                              show_bar and dp.is_main, initial=start, history=history)
    teacher.train()
    try:
        for it in range(start, iterations):
            idx = torch.randint(n, (batch,), device=device, generator=gen)[rows]
            draws = teacher.training_draws(batch, device, gen)
            loss = teacher.loss(actions[idx], obs[idx], draws=(draws[0][rows], draws[1][rows]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            (value,) = dp.sync(params, share, [loss], tracker.should_stop)
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            decay = min(cfg.ema_decay, (1 + it) / (10 + it))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), params):
                    pe.lerp_(p, 1 - decay)
            tracker.update(it, value, lr=sched.get_last_lr()[0])
            stopping = dp.should_stop(tracker.should_stop)
            if (on_checkpoint is not None and dp.is_main and checkpoint_every
                    and (it + 1) % checkpoint_every == 0):
                _with_ema(teacher, ema, on_checkpoint)
            if state is not None:
                state.step('teacher', it + 1, parts, tracker.history, force=stopping)
            if stopping:
                break
    finally:
        tracker.close()
    trained.load_state_dict(ema.state_dict())
    teacher.eval()
    return tracker.history


def _trained(teacher: DiffusionTeacher) -> nn.Module:
    """What training updates (and averages): the network, and the camera encoders if any."""
    if not teacher.encoder.has_cameras:
        return teacher.net
    return nn.ModuleDict({'net': teacher.net, 'encoder': teacher.encoder})


def _with_ema(teacher: DiffusionTeacher, ema: nn.Module, fn: Any) -> None:
    """Call fn(teacher) with the EMA weights swapped in, then restore the live weights."""
    trained = _trained(teacher)
    live = copy.deepcopy(trained.state_dict())
    trained.load_state_dict(ema.state_dict())
    try:
        fn(teacher)
    finally:
        trained.load_state_dict(live)
