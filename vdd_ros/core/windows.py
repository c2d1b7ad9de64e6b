"""Training windows of camera demonstrations, assembled batch by batch from the dataset file.

`make_windows` holds every window of a state dataset in memory. A camera dataset cannot be
held so (a 64x64 RGB frame is 12288 values, two cameras and two time steps per window), so
`CameraWindows` keeps the low-dimensional part of every window in memory, normalised, and
reads the frames of a batch when the batch is asked for: each demo's frames of a camera in
one read (`FrameRef`), kept in a least-recently-used cache of decoded uint8 frames bounded
by `cache_bytes` (a dataset larger than it is read again as batches need it). Indexing it as
a trainer indexes a tensor of windows, `windows[idx]`, gives the same normalised flat windows
`(B, obs_horizon * obs_dim)` with pixels scaled to [0, 1].
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np
import torch

from vdd_ros.core.data import Demo
from vdd_ros.core.fields import camera_fields, is_camera, join_cameras
from vdd_ros.core.normalizer import Normalizer


class FrameCache:
    """Decoded frames by (camera, demo), least recently used first out once they hold more
    than `limit` bytes (the latest entry always stays)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.bytes = int(limit), 0
        self.entries: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: tuple[str, int], read: Callable[[], np.ndarray]) -> np.ndarray:
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            return found
        frames = self.entries[key] = read()
        self.bytes += frames.nbytes
        while self.bytes > self.limit and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
        return frames


def window_steps(lengths: Sequence[int], obs_horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """(demo index, time step) `(N, obs_horizon)` of every window, as `make_windows` pads:
    one window per step of every demo, earlier steps clipped to the first."""
    demo, step = [], []
    for i, length in enumerate(lengths):
        t = np.arange(length)[:, None] + np.arange(-obs_horizon + 1, 1)[None, :]
        step.append(np.clip(t, 0, length - 1))
        demo.append(np.full_like(step[-1], i))
    return np.concatenate(demo), np.concatenate(step)


class CameraWindows:
    """The normalised flat windows of camera demos (see the module docstring).

    `low` holds the normalised low-dimensional fields `(N, obs_horizon, low_dim)`; the frames
    of window n, step k are those of demo `demo[n, k]` at step `step[n, k]`.
    """

    CACHE_BYTES = 512 * 2 ** 20

    def __init__(self, demos: Sequence[Demo], fields: Sequence[tuple[str, int]],
                 obs_horizon: int, low: torch.Tensor,
                 device: torch.device | str = 'cpu', cache_bytes: int = CACHE_BYTES) -> None:
        self.fields = [(str(k), int(n)) for k, n in fields]
        self.obs_horizon = int(obs_horizon)
        self.cameras = camera_fields(self.fields)
        self.refs = {key: [d.frames[key] for d in demos] for key, _ in self.cameras}
        self.demo, self.step = window_steps([len(d) for d in demos], self.obs_horizon)
        self.low = low
        self.device = torch.device(device)
        self.obs_dim = sum(n for _, n in self.fields)
        self.shape = (len(self.demo), self.obs_horizon * self.obs_dim)
        self.cache = FrameCache(cache_bytes)

    def __len__(self) -> int:
        return self.shape[0]

    def to(self, device: torch.device | str) -> 'CameraWindows':
        """The same windows (sharing the frame cache) delivered on `device`."""
        out = object.__new__(CameraWindows)
        out.__dict__.update(self.__dict__, device=torch.device(device))
        return out

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What identifies the data (for a training state's fingerprint)."""
        return (self.low, torch.from_numpy(self.demo), torch.from_numpy(self.step))

    def frames(self, demo: np.ndarray, step: np.ndarray) -> dict[str, np.ndarray]:
        """Each camera's frames `(len(demo), H, W, 3)` uint8 at (demo, step) pairs."""
        out = {}
        order = np.argsort(demo, kind='stable')
        starts = np.flatnonzero(np.r_[True, np.diff(demo[order]) != 0, True])
        for key, side in self.cameras:
            images = np.empty((len(demo), side, side, 3), dtype=np.uint8)
            for a, b in zip(starts[:-1], starts[1:]):
                rows = order[a:b]
                images[rows] = self._demo_frames(key, int(demo[rows[0]]))[step[rows]]
            out[key] = images
        return out

    def _demo_frames(self, key: str, demo: int) -> np.ndarray:
        """One demo's frames of one camera, from the cache or read whole (one read)."""
        return self.cache.get((key, demo), lambda: np.asarray(self.refs[key][demo][:]))

    def __getitem__(self, idx: Any) -> torch.Tensor:
        idx = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx).reshape(-1)
        demo, step = self.demo[idx].reshape(-1), self.step[idx].reshape(-1)
        frames = {k: v.astype(np.float32) / 255.0 for k, v in self.frames(demo, step).items()}
        low = self.low[torch.as_tensor(idx)].reshape(len(demo), -1).numpy()
        flat = join_cameras(low, frames, self.fields)
        return torch.from_numpy(flat.reshape(len(idx), -1)).to(self.device)



# training observations: flat normalised windows, or camera windows assembled per batch
Windows = torch.Tensor | CameraWindows

def camera_entries(fields: Sequence[tuple[str, int]]) -> np.ndarray:
    """Boolean mask of the flat observation's camera entries."""
    return np.concatenate([np.full(n, is_camera(k)) for k, n in fields])


def low_columns(fields: Sequence[tuple[str, int]]) -> torch.Tensor:
    """Indices of the flat observation's low-dimensional entries."""
    return torch.from_numpy(np.flatnonzero(~camera_entries(fields)))


@torch.no_grad()
def fit_observations(normalizer: Normalizer, low: torch.Tensor,
                     fields: Sequence[tuple[str, int]]) -> None:
    """Standardise the low-dimensional entries on the training windows `low (..., low_dim)`;
    camera entries get offset 0 and scale 255 (pixels to [0, 1])."""
    part = Normalizer(low.shape[-1]).fit(low, 'standard')
    cams = torch.from_numpy(camera_entries(fields))
    normalizer.offset.zero_()
    normalizer.scale.fill_(255.0)
    normalizer.offset[~cams] = part.offset
    normalizer.scale[~cams] = part.scale


def normalize_low(normalizer: Normalizer, low: torch.Tensor,
                  fields: Sequence[tuple[str, int]]) -> torch.Tensor:
    """The low-dimensional entries `(..., low_dim)` normalised by a full observation
    normalizer."""
    cols = low_columns(fields)
    return (low - normalizer.offset[cols]) / normalizer.scale[cols]
