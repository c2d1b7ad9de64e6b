"""Camera observations: per-camera image encoders and the observation encoder of every model.

A camera is a field of the flat observation like any other: its `H * W * 3` pixel values
(0-255, row-major HWC, upright) follow the low-dimensional fields in the order the spec lists
them, so the policy interface, the windows and the checks stay those of state observations.
The models' normalizers leave pixels at 0-255 / 255 (offset 0, scale 255).

`ObservationEncoder` turns a normalised flat window `(B, obs_horizon * obs_dim)` into the
condition the networks see: the low-dimensional values as they are, then per camera and time
step the features of its image encoder. Without cameras it is the identity. Encoders:

- `conv` (default, robomimic's low-cost choice): three small convolutions, a 1x1 convolution
  to `keypoints` maps, spatial softmax (each map's expected x, y) and a linear layer to
  `feature_dim`;
- `resnet18`: ResNet-18 (torchvision's layout, BasicBlocks 2-2-2-2) with GroupNorm instead of
  BatchNorm (Diffusion Policy's choice), randomly initialised, so nothing is downloaded; its
  last feature map goes through the same spatial-softmax head. It is built here: the
  torchvision wheels on PyPI are linked against CUDA builds of torch and do not import with
  the CPU build.

While training, each image is shifted at random by up to `shift` pixels (replicate padding,
then a random crop back to its size: DrQ's augmentation).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vdd_ros.core.config import VisionConfig
from vdd_ros.core.fields import CHANNELS, camera_fields, is_camera

class SpatialSoftmax(nn.Module):
    """`(B, K, H, W)` maps -> `(B, 2K)`: each map's softmax-expected (x, y), in [-1, 1]
    (x left to right, y top to bottom), with a learned temperature."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        ys, xs = torch.meshgrid(torch.linspace(-1.0, 1.0, height),
                                torch.linspace(-1.0, 1.0, width), indexing='ij')
        self.register_buffer('grid', torch.stack([xs.reshape(-1), ys.reshape(-1)], -1),
                             persistent=False)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        b, k = maps.shape[:2]
        weights = torch.softmax(maps.reshape(b, k, -1) / self.log_temperature.exp(), dim=-1)
        return (weights @ self.grid).reshape(b, 2 * k)


class KeypointHead(nn.Module):
    """Feature map -> `keypoints` 1x1 maps -> spatial softmax -> linear to `feature_dim`."""

    def __init__(self, channels: int, height: int, width: int, keypoints: int,
                 feature_dim: int) -> None:
        super().__init__()
        self.maps = nn.Conv2d(channels, keypoints, 1)
        self.softmax = SpatialSoftmax(height, width)
        self.out = nn.Linear(2 * keypoints, feature_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.softmax(self.maps(features)))


def _groupnorm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(channels // 16, 1), channels)


def _conv_trunk() -> nn.Module:
    """robomimic-style shallow trunk: a quarter of the resolution, 32 channels."""
    return nn.Sequential(
        nn.Conv2d(CHANNELS, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with a skip (a 1x1 projection when the shape changes)."""

    def __init__(self, inp: int, out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inp, out, 3, stride, 1, bias=False), _groupnorm(out), nn.ReLU(),
            nn.Conv2d(out, out, 3, 1, 1, bias=False), _groupnorm(out))
        self.skip = nn.Identity() if stride == 1 and inp == out else nn.Sequential(
            nn.Conv2d(inp, out, 1, stride, bias=False), _groupnorm(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def _resnet_trunk() -> nn.Module:
    """ResNet-18 with GroupNorm, without its pooling and classifier: 512 channels at 1/32 of
    the resolution."""
    layers: list[nn.Module] = [nn.Conv2d(CHANNELS, 64, 7, 2, 3, bias=False), _groupnorm(64),
                               nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    inp = 64
    for out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(inp, out, stride), BasicBlock(out, out, 1)]
        inp = out
    return nn.Sequential(*layers)


class ImageEncoder(nn.Module):
    """One camera: `(N, 3, side, side)` floats in [0, 1] -> `(N, feature_dim)`."""

    def __init__(self, cfg: VisionConfig, side: int) -> None:
        super().__init__()
        self.trunk = _resnet_trunk() if cfg.encoder == 'resnet18' else _conv_trunk()
        with torch.no_grad():
            channels, out_side = self.trunk(torch.zeros(1, CHANNELS, side, side)).shape[1:3]
        self.head = KeypointHead(int(channels), int(out_side), int(out_side), cfg.keypoints,
                                 cfg.feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images * 2.0 - 1.0))


def random_shift(images: torch.Tensor, pad: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of `(N, C, H, W)` shifted by an independent random offset in [-pad, pad]
    pixels per axis (replicate padding, then a crop back to H x W)."""
    if pad <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode='replicate')
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), device=images.device, generator=generator)
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)        # (N, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=images.device)        # (N, W)
    index = rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]               # (N, H, W)
    flat = padded.reshape(n, padded.shape[1], -1)
    return flat.gather(2, index.reshape(n, 1, -1).expand(-1, flat.shape[1], -1)) \
        .reshape(n, -1, h, w)


class ObservationEncoder(nn.Module):
    """Normalised flat window `(B, obs_horizon * obs_dim)` -> condition `(B, out_dim)`:
    per time step, the low-dimensional values, then each camera's features."""

    def __init__(self, fields: Sequence[tuple[str, int]], obs_horizon: int,
                 cfg: VisionConfig | None = None) -> None:
        super().__init__()
        self.fields = [(str(k), int(n)) for k, n in fields]
        self.obs_horizon = int(obs_horizon)
        self.obs_dim = sum(n for _, n in self.fields)
        self.cameras = camera_fields(self.fields)
        self.shift = 0
        low, images, start = [], [], 0
        for key, size in self.fields:
            (images.append((key, start)) if is_camera(key)
             else low.extend(range(start, start + size)))
            start += size
        self.low_dim = len(low)
        self.starts = [s for _, s in images]
        self.register_buffer('low_index', torch.tensor(low, dtype=torch.long), persistent=False)
        self.encoders = nn.ModuleDict()
        self.cfg = cfg or VisionConfig()
        if self.cameras:
            cfg = self.cfg
            self.shift = int(cfg.shift)
            self.encoders.update({k: ImageEncoder(cfg, side) for k, side in self.cameras})
            self.feature_dim = int(cfg.feature_dim)
        else:
            self.feature_dim = 0
        self.step_dim = self.low_dim + self.feature_dim * len(self.cameras)
        self.out_dim = self.step_dim * self.obs_horizon

    @property
    def has_cameras(self) -> bool:
        return bool(self.cameras)

    def forward(self, obs: torch.Tensor, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        if not self.cameras:
            return obs
        b = obs.shape[0]
        steps = obs.reshape(b * self.obs_horizon, self.obs_dim)
        parts = [steps.index_select(1, self.low_index)]
        for (key, side), start in zip(self.cameras, self.starts):
            pixels = steps[:, start:start + side * side * CHANNELS]
            images = pixels.reshape(-1, side, side, CHANNELS).permute(0, 3, 1, 2)
            if self.training:
                images = random_shift(images, self.shift, generator)
            parts.append(self.encoders[key](images))
        return torch.cat(parts, dim=-1).reshape(b, self.out_dim)

