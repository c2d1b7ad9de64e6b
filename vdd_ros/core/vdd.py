"""Variational Diffusion Distillation: the objective as pure functions and its training loop.

Upper bound per expert z (Zhou et al., 2024):
    U_z(s) = E_{a ~ q(a|s,z)} [ -log pi_T(a|s) - log q~(z|a,s) ] - H[q(.|s,z)]
with q~ the responsibilities of the current model (parameters detached, gradient through a) and
grad_a log pi_T replaced by the teacher's score at a noise level sigma ~ U[min, max]. Objective
'plain' (the reference code) treats the student's sample a as already noised, so the student
matches the sigma-smoothed teacher pi_T * N(0, sigma^2 I) and is wider than the teacher.
Objective 'smoothed' bounds the smoothed divergence instead: it scores a_sigma = a + sigma * eps'
and takes q~ and H from the smoothed student, a Gaussian mixture with covariances
Sigma_z + sigma^2 I. Smoothing both sides by the same kernel, its optimum is the unsmoothed
teacher. The gating is fitted to responsibilities of dataset actions (unsmoothed) either way.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from vdd_ros.core.config import VDDConfig
from vdd_ros.core.distributed import DataParallel
from vdd_ros.core.moe import LOG_2PI, MixtureOfExperts
from vdd_ros.core.progress import ProgressCallback, ProgressTracker
from vdd_ros.core.scores import ScoreFunction
from vdd_ros.core.train_state import TrainingState
from vdd_ros.core.windows import Windows


class ExpertDraws(NamedTuple):
    """The random draws of one expert step, `(B, Z, V, ...)`: standard normal `eps` for the
    reparameterised samples, the teacher's noise levels `sigma`, and (objective 'smoothed') the
    standard normal smoothing noise `noise`."""

    eps: torch.Tensor
    sigma: torch.Tensor
    noise: torch.Tensor | None = None

    def take(self, rows: slice) -> 'ExpertDraws':
        """The draws of these rows of the batch (a data-parallel rank's share)."""
        return ExpertDraws(*(None if d is None else d[rows] for d in self))


def expert_draws(moe: MixtureOfExperts, batch: int, cfg: VDDConfig,
                 device: torch.device | str = 'cpu', generator: torch.Generator | None = None
                 ) -> ExpertDraws:
    """The draws of one expert step for `batch` states (data-parallel ranks draw a global batch
    and take their rows). The smoothing noise is drawn last, so the 'plain' objective's random
    stream does not depend on it."""
    z, v = moe.num_experts, cfg.samples_per_expert
    eps = torch.randn(batch, z, v, moe.dim, device=device, generator=generator)
    sigma = torch.empty(batch, z, v, device=device).uniform_(
        cfg.score_sigma_min, cfg.score_sigma_max, generator=generator)
    noise = None
    if cfg.objective == 'smoothed':
        noise = torch.randn(batch, z, v, moe.dim, device=device, generator=generator)
    return ExpertDraws(eps, sigma, noise)


def smoothed_terms(moe: MixtureOfExperts, a: torch.Tensor, sigma: torch.Tensor,
                   log_gate: torch.Tensor, means: torch.Tensor, scales: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Terms of the bound for the student smoothed by N(0, sigma^2 I), with a sigma per sample.

    For samples `a (B, Z, V, D)` of expert z at levels `sigma (B, Z, V)`: log q~_sigma(z|a,s),
    the responsibility of the sample's own expert under the mixture whose covariances are
    Sigma_z' + sigma^2 I (parameters detached, gradient through `a`), and the entropy of
    N(mu_z, Sigma_z + sigma^2 I) (gradient through the scales); both `(B, Z, V)`. A full
    covariance is diagonalised once, Sigma = U diag(lambda) U^T, so that Sigma + sigma^2 I =
    U diag(lambda + sigma^2) U^T for every sigma (only the eigenvalues carry gradient, which is
    defined even where they coincide).
    """
    if moe.full:
        var, basis = torch.linalg.eigh(scales @ scales.transpose(-1, -2))   # (B, Z, D, D)
        var, basis = var.clamp_min(0.0), basis.detach()
    else:
        var, basis = scales ** 2, None                                      # (B, Z, D)
    s2 = sigma[..., None] ** 2                                              # (B, Z, V, 1)
    entropy = 0.5 * (var[:, :, None] + s2).log().sum(-1) + 0.5 * moe.dim * (1 + LOG_2PI)
    diff = a[:, :, :, None] - means.detach()[:, None, None]                # (B, Z, V, Z', D)
    if basis is not None:
        diff = torch.einsum('bkde,bzvkd->bzvke', basis, diff)              # U^T (a - mu)
    total = var.detach()[:, None, None] + s2[..., None]                     # (B, Z, V, Z', D)
    joint = log_gate[:, None, None] - 0.5 * (diff.pow(2) / total + total.log()).sum(-1)
    log_resp = joint - torch.logsumexp(joint, dim=-1, keepdim=True)         # (B, Z, V, Z')
    return log_resp.diagonal(dim1=1, dim2=3).transpose(1, 2), entropy


def expert_loss(moe: MixtureOfExperts, obs: torch.Tensor, score_fn: ScoreFunction,
                cfg: VDDConfig, uniform_gating: bool = False,
                generator: torch.Generator | None = None,
                draws: ExpertDraws | None = None, student: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Surrogate of sum_z q(z|s) U_z(s), averaged over the batch of states `obs (B, F)`.

    `obs` are what the score reads; `student` (default `obs`) what the MoE reads of the same
    states: the conditions of its own encoder. `draws` are `expert_draws` for these states;
    without them they are drawn from `generator`.
    Objective 'plain' scores the samples a = mu_z + L_z eps at sigma as they are; 'smoothed'
    scores a_sigma = a + sigma * noise and takes q~ and the entropy from the smoothed student
    (`smoothed_terms`). Either way <stopgrad(score), a> has the gradient of E[log pi_T(a)].
    """
    b, z, v = obs.shape[0], moe.num_experts, cfg.samples_per_expert
    eps, sigma, noise = expert_draws(moe, b, cfg, obs.device, generator) if draws is None \
        else draws
    h = moe.features(obs if student is None else student)
    if uniform_gating:
        log_gate = torch.full((b, z), -math.log(z), device=obs.device)
    else:
        log_gate = moe.log_gating(h).detach()
    means, scales = moe.means(h), moe.scales(h)
    # a = mu_z + L_z eps, as MixtureOfExperts.rsample_experts                   (B, Z, V, D)
    if moe.full:
        a = means[:, :, None] + (scales[:, :, None] @ eps[..., None])[..., 0]
    else:
        a = means[:, :, None] + scales[:, :, None] * eps
    if cfg.objective == 'smoothed':
        a = a + sigma[..., None] * noise
    with torch.no_grad():
        score = score_fn(a.detach(), obs[:, None, None], sigma)
    if cfg.objective == 'smoothed':
        own, entropy = smoothed_terms(moe, a, sigma, log_gate, means.detach(), scales)
        entropy = entropy.mean(-1)                                            # (B, Z)
    else:
        log_resp = moe.responsibilities(a.reshape(b, z * v, -1), log_gate, means.detach(),
                                        scales.detach())                      # (B, Z*V, Z)
        own = log_resp.view(b, z, v, z).diagonal(dim1=1, dim2=3).transpose(1, 2)  # (B, Z, V)
        entropy = moe.entropy(scales)                                         # (B, Z)
    per_expert = ((score * a).sum(-1) + own).mean(-1) + entropy
    loss = -(log_gate.exp() * per_expert).sum(-1).mean()
    stats = {'entropy': float(entropy.detach().mean()), 'log_resp': float(own.detach().mean())}
    return loss, stats


def gating_loss(moe: MixtureOfExperts, obs: torch.Tensor,
                actions: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of q(z|s) toward the responsibilities of dataset actions (M-step)."""
    h = moe.features(obs).detach()
    log_gate = moe.log_gating(h)
    with torch.no_grad():
        resp = moe.responsibilities(actions[:, None], log_gate, moe.means(h),
                                    moe.scales(h))[:, 0].exp()
    return -(resp * log_gate).sum(-1).mean()


def expert_param_groups(moe: MixtureOfExperts, backbone_lr_scale: float) -> list[dict]:
    """Optimizer groups of the expert step: every expert's own parameters at the full rate
    (the heads of a shared backbone, or the whole MLP of an independent expert), and the
    shared backbone, if any, at `backbone_lr_scale` (left out at 0: frozen)."""
    groups = [{'params': list(moe.expert_parameters()), 'lr_scale': 1.0}]
    trunk = list(moe.trunk_parameters())
    if backbone_lr_scale > 0 and trunk:
        groups.append({'params': trunk, 'lr_scale': backbone_lr_scale})
    return groups


def linear_decay(iterations: int, final_fraction: float) -> Callable[[int], float]:
    return lambda it: 1.0 - (1.0 - final_fraction) * min(it / max(iterations, 1), 1.0)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)


def distill(moe: MixtureOfExperts, score_fn: ScoreFunction, obs: torch.Tensor,
            actions: torch.Tensor, cfg: VDDConfig, *, seed: int = 0,
            progress: ProgressCallback | None = None, stop: threading.Event | None = None,
            show_bar: bool = True, on_checkpoint: Callable[[MixtureOfExperts], Any] | None = None,
            checkpoint_every: int = 0, dp: DataParallel | None = None,
            state: TrainingState | None = None, stage: str = 'vdd',
            windows: Windows | None = None) -> list[tuple[int, float]]:
    """Train `moe` by VDD against `score_fn` on dataset states `obs (N, F)`.

    `obs` are what the score reads. With `windows` (the same states as normalised windows)
    the MoE reads its own encoder's conditions of them and trains that encoder with its
    experts; without, it reads `obs`. `actions (N, D)` are the dataset actions for the gating
    step. Raises DivergenceError naming the iteration if the loss turns NaN or Inf. Returns the
    loss history. With `dp` each rank takes its share of every global batch, teacher score
    calls included (distributed.py); with `state` the loop resumes from and saves a training
    state.
    """
    dp = dp or DataParallel()
    device = obs.device
    gen = torch.Generator(device=device).manual_seed(seed)
    groups = expert_param_groups(moe, cfg.backbone_lr_scale)
    if windows is not None:
        groups.append({'params': list(moe.encoder.parameters()), 'lr_scale': 1.0})
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    gate_opt = torch.optim.Adam(moe.gating_parameters(), lr=cfg.gating_lr)
    decay = linear_decay(cfg.iterations, cfg.final_lr_fraction)
    warmup = int(cfg.uniform_gating_fraction * cfg.iterations)
    n = obs.shape[0]
    batch = min(cfg.batch_size, n)
    dp.check_batch(batch, stage)
    rows, share = dp.rows(batch), dp.share(batch)
    parts = {'model': moe, 'opt': opt, 'gate_opt': gate_opt, 'gen': gen}
    resumed = state.restore(stage, parts) if state is not None else (0, [])
    if resumed is None:
        return []
    start, history = resumed
    dp.broadcast_(moe)
    # the parameters the expert step trains (without the backbone at backbone_lr_scale 0):
    # only these are synchronised and clipped
    experts = [p for group in opt.param_groups for p in group['params']]
    gate = list(moe.gating_parameters())
    tracker = ProgressTracker(stage, cfg.iterations, progress if dp.is_main else None, stop,
                              show_bar and dp.is_main, initial=start, history=history)
    moe.train()
    try:
        for it in range(start, cfg.iterations):
            uniform = it < warmup
            set_lr(opt, cfg.lr * decay(it))
            set_lr(gate_opt, cfg.gating_lr * decay(it))
            for _ in range(cfg.expert_steps):
                idx = torch.randint(n, (batch,), device=device, generator=gen)[rows]
                draws = expert_draws(moe, batch, cfg, device, gen).take(rows)
                student = None if windows is None else moe.condition(windows[idx])
                loss, stats = expert_loss(moe, obs[idx], score_fn, cfg, uniform, draws=draws,
                                          student=student)
                moe.zero_grad(set_to_none=True)   # (a frozen backbone's too: never summed)
                loss.backward()
                value, *logged = dp.sync(experts, share, [loss, *stats.values()],
                                         tracker.should_stop)
                stats = dict(zip(stats, logged))
                nn.utils.clip_grad_norm_(experts, cfg.grad_clip)
                opt.step()
            g_loss = float('nan')
            if not uniform:
                for _ in range(cfg.gating_steps):
                    idx = torch.randint(n, (batch,), device=device, generator=gen)[rows]
                    if windows is None:
                        g = gating_loss(moe, obs[idx], actions[idx])
                    else:
                        with torch.no_grad():
                            student = moe.condition(windows[idx])
                        g = gating_loss(moe, student, actions[idx])
                    gate_opt.zero_grad(set_to_none=True)
                    g.backward()
                    (g_loss,) = dp.sync(gate, share, [g], tracker.should_stop)
                    gate_opt.step()
            tracker.update(it, value, gating_loss=g_loss, **stats)
            stopping = dp.should_stop(tracker.should_stop)
            if (on_checkpoint is not None and dp.is_main and checkpoint_every
                    and (it + 1) % checkpoint_every == 0):
                on_checkpoint(moe)
            if state is not None:
                state.step(stage, it + 1, parts, tracker.history, force=stopping)
            if stopping:
                break
    finally:
        tracker.close()
    moe.eval()
    return tracker.history
