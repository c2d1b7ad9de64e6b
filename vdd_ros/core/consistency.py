"""Consistency distillation (Song et al., 2023; Consistency Policy, Prasad et al., 2024): a
one-step student of the EDM diffusion teacher, the distilled baseline VDD is weighed against.

The student f(x, sigma; s) maps a point of the teacher's probability-flow ODE at level sigma to
the ODE's end at sigma_min, so that one network call from x = sigma_max * eps draws an action
chunk. It has the teacher's network and noise range (a TeacherConfig) and the parameterisation
of Song et al. (Appendix C) with the teacher's sigma_data:

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, s, c_noise(sigma))
    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2),  c_out = sd (sigma - sigma_min) / sqrt(sd^2
    + sigma^2),

so f(x, sigma_min) = x exactly (c_skip = 1, c_out = 0). c_in and c_noise are the teacher's, so
the teacher's weights are a sensible start (there f is close to the teacher's denoiser).

Training (`train_consistency`, CD with Heun): the teacher's Karras schedule over [sigma_min,
sigma_max] is cut into `bins` levels t_1 < ... < t_N; for a point x at level t_{n+1}, one Heun
step of the teacher's ODE down to t_n gives x_hat, and f_theta(x, t_{n+1}) is pulled toward the
stop-gradient target f_theta-(x_hat, t_n), theta- an exponential moving average of theta (decay
`ema_decay`), by a pseudo-Huber (default) or squared distance. The points x come from the
forward process (x = a + t_{n+1} eps for a data action a, as in Song et al.) and, for a
`trajectory_fraction` of each batch, from the teacher's own sampling trajectories started at
sigma_max * eps (`Walkers`): with sigma_max = 1, about the data's scale, those trajectories lie
away from the forward process, and a student trained on the forward process alone is queried
where it never trained (on lift_carry it then sampled worse than one teacher step).
"""
from __future__ import annotations

import copy
import math
import threading
from typing import Any, Callable, Protocol

import torch
from torch import nn

from vdd_ros.core.config import ConsistencyConfig, TeacherConfig
from vdd_ros.core.distributed import DataParallel
from vdd_ros.core.model import DenoisingModel
from vdd_ros.core.progress import ProgressCallback, ProgressTracker
from vdd_ros.core.train_state import TrainingState
from vdd_ros.core.vdd import linear_decay, set_lr

HUBER_SCALE = 0.00054   # pseudo-Huber c = HUBER_SCALE * sqrt(dim) (Song & Dhariwal, 2023)


class Denoiser(Protocol):
    """What distillation needs of a teacher: D(a; sigma, s), as DiffusionTeacher.denoise."""

    def denoise(self, a: torch.Tensor, obs: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor: ...


class ConsistencyStudent(DenoisingModel):
    """Consistency function f(x, sigma; s) on the teacher's network: one call per action chunk.

    Same constructor, normalizers, module names and policy interface as DiffusionTeacher, so a
    teacher's state dict loads into it. `sampling_steps` (1) is the number of network calls per
    chunk; more run multistep consistency sampling.
    """

    kind = 'consistency'

    def __init__(self, cfg: TeacherConfig, obs_dim: int, action_dim: int, obs_horizon: int = 1,
                 action_horizon: int = 1, **encoder: Any) -> None:
        super().__init__(cfg, obs_dim, action_dim, obs_horizon, action_horizon, **encoder)
        self.sampling_steps = 1

    def consistency(self, x: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor,
                    net: nn.Module | None = None) -> torch.Tensor:
        """f(x, sigma; s) for `x (..., flat_act)` at `sigma` (scalar or `x`'s leading shape)
        given the condition `encode(obs)`, with `net` in place of the student's network when
        given (the EMA target).

        The boundary offset sigma - sigma_min is taken in sigma's own dtype, so at sigma_min it
        is exactly 0 and f(x, sigma_min) = x bit for bit."""
        cfg, sd = self.cfg, self.cfg.sigma_data
        offset = (sigma - cfg.sigma_min).to(x.dtype).expand(x.shape[:-1])[..., None]
        sigma = sigma.to(x.dtype).expand(x.shape[:-1])[..., None]
        c_skip = sd ** 2 / (offset ** 2 + sd ** 2)
        c_out = sd * offset / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1.0 / (sigma ** 2 + sd ** 2).sqrt()
        cond = cond.expand(*x.shape[:-1], cond.shape[-1])
        h = torch.cat([c_in * x, cond, self.embed(sigma.log()[..., 0] / 4.0)], dim=-1)
        return c_skip * x + c_out * (self.net if net is None else net)(h)

    # -- sampling ---------------------------------------------------------------------------
    def sigmas(self, steps: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        """The `steps` levels of multistep sampling: the Karras levels of steps + 1 points from
        sigma_max to sigma_min, without sigma_min (where f is the identity)."""
        cfg = self.cfg
        ramp = torch.linspace(0, 1, steps + 1, device=device)[:-1]
        lo, hi = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
        levels = (hi + ramp * (lo - hi)) ** cfg.rho
        levels[0] = cfg.sigma_max
        return levels

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, steps: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw flat normalised action chunks for flat normalised observations `(B, flat_obs)`:
        f(sigma_max * eps, sigma_max), then per further step re-noise to the next level
        (x = f + sqrt(sigma^2 - sigma_min^2) eps') and apply f again."""
        steps = self.sampling_steps if steps is None else int(steps)
        sigmas = self.sigmas(steps, obs.device)
        shape = (obs.shape[0], self.flat_act)
        x = torch.randn(shape, device=obs.device, generator=generator) * sigmas[0]
        cond = self.encode(obs)
        out = self.consistency(x, cond, sigmas[0])
        for sigma in sigmas[1:]:
            noise = torch.randn(shape, device=obs.device, generator=generator)
            x = out + (sigma ** 2 - self.cfg.sigma_min ** 2).sqrt() * noise
            out = self.consistency(x, cond, sigma)
        return out



# -- consistency distillation -------------------------------------------------------------
def bin_sigmas(cfg: TeacherConfig, bins: int, device: torch.device | str = 'cpu'
               ) -> torch.Tensor:
    """The `bins` Karras levels t_1 = sigma_min < ... < t_N = sigma_max of the teacher (the
    ends exact, not rounded through the rho-th root: f is the identity at t_1)."""
    ramp = torch.linspace(0, 1, bins, device=device)
    lo, hi = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
    levels = (lo + ramp * (hi - lo)) ** cfg.rho
    levels[0], levels[-1] = cfg.sigma_min, cfg.sigma_max
    return levels


@torch.no_grad()
def heun_step(teacher: Denoiser, x: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor,
              to: torch.Tensor) -> torch.Tensor:
    """One Heun step of the teacher's ODE dx/dsigma = (x - D(x; sigma)) / sigma from `sigma`
    down to `to` (both `x`'s leading shape, `to` > 0)."""
    s, t = sigma[..., None], to[..., None]
    d = (x - teacher.denoise(x, obs, sigma)) / s
    euler = x + (t - s) * d
    d2 = (euler - teacher.denoise(euler, obs, to)) / t
    return x + (t - s) * (d + d2) / 2


def distance(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row distance `(B,)`: 'l2' the mean squared error over the chunk, 'pseudo_huber'
    sqrt(|d|^2 + c^2) - c with c = HUBER_SCALE * sqrt(dim) (robust, ~|d| for |d| >> c)."""
    diff = pred - target
    if kind == 'l2':
        return diff.pow(2).mean(-1)
    c = HUBER_SCALE * math.sqrt(diff.shape[-1])
    return (diff.pow(2).sum(-1) + c * c).sqrt() - c


def consistency_loss(student: ConsistencyStudent, target: nn.Module, x: torch.Tensor,
                     x_hat: torch.Tensor, obs: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor,
                     kind: str) -> torch.Tensor:
    """The CD loss of a batch of pairs (x at level `hi`, its teacher step `x_hat` at `lo`):
    mean over rows of d(f_theta(x, hi), stopgrad f_target(x_hat, lo)), `target` the EMA
    network."""
    with torch.no_grad():
        goal = student.consistency(x_hat, obs, lo, net=target)
    return distance(student.consistency(x, obs, hi), goal, kind).mean()


class Walkers(nn.Module):
    """Points on the teacher's sampling trajectories, the inputs the one-step student meets.

    Walker i is at `x[i]` on level `levels[level[i]]` for training state `row[i]`: started at
    x = sigma_max * eps like the teacher's sampler and moved one level down per iteration by the
    teacher's Heun step, it starts afresh (new eps, new state) on reaching sigma_min. With the
    teacher's small sigma_max (1, the data's scale) the sampler's start N(0, sigma_max^2 I) is
    far from the forward process's a + sigma_max eps, and so are its trajectories; a student
    trained on the forward process alone is queried where it never trained. Buffers, so that a
    training state saves and restores them.
    """

    def __init__(self, count: int, dim: int) -> None:
        super().__init__()
        self.register_buffer('x', torch.zeros(count, dim))
        self.register_buffer('level', torch.zeros(count, dtype=torch.long))
        self.register_buffer('row', torch.zeros(count, dtype=torch.long))

    def restart(self, which: torch.Tensor, levels: torch.Tensor, rows: int,
                generator: torch.Generator | None = None) -> None:
        """Put the walkers of mask `which` at the sampler's start with new states."""
        k, device = int(which.sum()), self.x.device
        if k:
            self.x[which] = levels[-1] * torch.randn(k, self.x.shape[1], device=device,
                                                     generator=generator)
            self.level[which] = len(levels) - 1
            self.row[which] = torch.randint(rows, (k,), device=device, generator=generator)

    @torch.no_grad()
    def start(self, teacher: Denoiser, obs: torch.Tensor, levels: torch.Tensor,
              generator: torch.Generator | None = None) -> None:
        """Start every walker and walk it down its trajectory to a uniform random level in
        [1, N - 1] (the population's steady state)."""
        every = torch.ones_like(self.level, dtype=torch.bool)
        self.restart(every, levels, obs.shape[0], generator)
        stop = torch.randint(1, len(levels), self.level.shape, device=self.x.device,
                             generator=generator)
        for k in range(len(levels) - 1, 1, -1):
            move = stop < k
            if move.any():
                count = int(move.sum())
                self.x[move] = heun_step(teacher, self.x[move], obs[self.row[move]],
                                         levels[k].expand(count), levels[k - 1].expand(count))
        self.level.copy_(stop)

    @torch.no_grad()
    def advance(self, stepped: torch.Tensor, levels: torch.Tensor, rows: int,
                generator: torch.Generator | None = None) -> None:
        """Move every walker to its teacher step `stepped` one level down; those at sigma_min
        restart."""
        self.x.copy_(stepped)
        self.level.sub_(1)
        self.restart(self.level == 0, levels, rows, generator)


def _teacher_step(teacher: Denoiser, x: torch.Tensor, obs: torch.Tensor, hi: torch.Tensor,
                  lo: torch.Tensor) -> torch.Tensor:
    return heun_step(teacher, x, obs, hi, lo) if len(x) else x.clone()


def train_consistency(student: ConsistencyStudent, teacher: Denoiser, obs: torch.Tensor,
                      actions: torch.Tensor, cfg: ConsistencyConfig, *, seed: int = 0,
                      progress: ProgressCallback | None = None,
                      stop: threading.Event | None = None, show_bar: bool = True,
                      on_checkpoint: Callable[[ConsistencyStudent], Any] | None = None,
                      checkpoint_every: int = 0, dp: DataParallel | None = None,
                      state: TrainingState | None = None,
                      stage: str = 'consistency') -> list[tuple[int, float]]:
    """Consistency-distil `teacher` (its `denoise`, frozen) into `student` on normalised flat
    `obs (N, flat_obs)` and `actions (N, flat_act)`; the student starts from its current weights.

    Each batch pairs points with their teacher Heun step one level down: a `1 -
    trajectory_fraction` share from the forward process (a data action a, a uniform level
    t_{n+1}, x = a + t_{n+1} eps, as in Song et al.) and the rest from the `Walkers` on the
    teacher's sampling trajectories. The target network is an EMA of the student's (decay
    `ema_decay`); the weights end as the slower EMA `model_ema_decay`, as the teacher's do.
    Returns the loss history; raises DivergenceError on a non-finite loss. `on_checkpoint(
    student)` (EMA weights in) is called every `checkpoint_every` iterations. With `dp` each
    rank takes its share of every global batch (distributed.py), of the teacher's steps on the
    forward-process rows too; every rank steps all the walkers, which stay identical. With
    `state` the loop resumes from and saves a training state.
    """
    dp = dp or DataParallel()
    device = obs.device
    if isinstance(teacher, nn.Module):
        teacher.eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    levels = bin_sigmas(student.cfg, cfg.bins, device)
    target = copy.deepcopy(student.net).requires_grad_(False)
    ema = copy.deepcopy(student.net).requires_grad_(False)
    params = list(student.net.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    decay = linear_decay(cfg.iterations, cfg.final_lr_fraction)
    n = obs.shape[0]
    batch = min(cfg.batch_size, n)
    dp.check_batch(batch, stage)
    rows, share = dp.rows(batch), dp.share(batch)
    walkers = Walkers(round(batch * cfg.trajectory_fraction), student.flat_act).to(device)
    data_rows = batch - len(walkers.x)     # the global batch: data rows, then walker rows
    mine = slice(min(rows.start, data_rows), min(rows.stop, data_rows))
    mine_w = slice(max(rows.start - data_rows, 0), max(rows.stop - data_rows, 0))
    parts = {'model': student, 'target': target, 'ema': ema, 'walkers': walkers, 'opt': opt,
             'gen': gen}
    resumed = state.restore(stage, parts) if state is not None else (0, [])
    if resumed is None:
        return []
    start, history = resumed
    if start == 0:
        walkers.start(teacher, obs, levels, gen)
    for module in (student, target, ema, walkers):
        dp.broadcast_(module)
    tracker = ProgressTracker(stage, cfg.iterations, progress if dp.is_main else None, stop,
                              show_bar and dp.is_main, initial=start, history=history)
    student.train()
    try:
        for it in range(start, cfg.iterations):
            set_lr(opt, cfg.lr * decay(it))
            idx = torch.randint(n, (data_rows,), device=device, generator=gen)[mine]
            low = torch.randint(cfg.bins - 1, (data_rows,), device=device,
                                generator=gen)[mine]
            eps = torch.randn(data_rows, student.flat_act, device=device,
                              generator=gen)[mine]
            w_obs = obs[walkers.row]
            w_hi, w_lo = levels[walkers.level], levels[walkers.level - 1]
            stepped = _teacher_step(teacher, walkers.x, w_obs, w_hi, w_lo)
            hi, lo = levels[low + 1], levels[low]
            x = actions[idx] + hi[:, None] * eps
            x_hat = _teacher_step(teacher, x, obs[idx], hi, lo)
            loss = consistency_loss(
                student, target, torch.cat([x, walkers.x[mine_w]]),
                torch.cat([x_hat, stepped[mine_w]]), torch.cat([obs[idx], w_obs[mine_w]]),
                torch.cat([hi, w_hi[mine_w]]), torch.cat([lo, w_lo[mine_w]]), cfg.distance)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            (value,) = dp.sync(params, share, [loss], tracker.should_stop)
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            slow = min(cfg.model_ema_decay, (1 + it) / (10 + it))
            with torch.no_grad():
                for pt, pe, p in zip(target.parameters(), ema.parameters(), params):
                    pt.lerp_(p, 1 - cfg.ema_decay)
                    pe.lerp_(p, 1 - slow)
            walkers.advance(stepped, levels, n, gen)
            tracker.update(it, value, lr=opt.param_groups[0]['lr'])
            stopping = dp.should_stop(tracker.should_stop)
            if (on_checkpoint is not None and dp.is_main and checkpoint_every
                    and (it + 1) % checkpoint_every == 0):
                _with_weights(student, ema, on_checkpoint)
            if state is not None:
                state.step(stage, it + 1, parts, tracker.history, force=stopping)
            if stopping:
                break
    finally:
        tracker.close()
    student.net.load_state_dict(ema.state_dict())
    student.eval()
    return tracker.history


def _with_weights(student: ConsistencyStudent, net: nn.Module,
                  fn: Callable[[ConsistencyStudent], Any]) -> None:
    """Call fn(student) with `net`'s weights swapped in, then restore the live weights."""
    live = copy.deepcopy(student.net.state_dict())
    student.net.load_state_dict(net.state_dict())
    try:
        fn(student)
    finally:
        student.net.load_state_dict(live)
