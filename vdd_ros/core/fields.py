"""Observation fields: cameras and low-dimensional values (numpy only).

A camera is a field named `<camera>_image` (robomimic's naming) whose `H * W * 3` values are
the pixels (0-255, square, row-major HWC, upright) of one RGB image; every other field is
low-dimensional. Flat observations carry cameras inline; datasets and demos keep their images
apart as uint8 (`split_cameras`, `join_cameras`).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

IMAGE_SUFFIX = '_image'
CHANNELS = 3


def is_camera(key: str) -> bool:
    """Whether an observation field is a camera (robomimic's `<camera>_image` naming)."""
    return key.endswith(IMAGE_SUFFIX)


def image_side(key: str, size: int) -> int:
    """The side of a square RGB camera field of `size` values; ValueError otherwise."""
    side = math.isqrt(max(size // CHANNELS, 0))
    if side < 8 or side * side * CHANNELS != size:
        raise ValueError(f'camera field {key!r}: {size} values are not a square RGB image '
                         f'of at least 8x8 (H * W * 3)')
    return side


def camera_fields(fields: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """(key, side) of each camera field, in order."""
    return [(k, image_side(k, n)) for k, n in fields if is_camera(k)]


def split_cameras(flat: np.ndarray, fields: Sequence[tuple[str, int]]
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Flat observations `(T, obs_dim)` -> (low-dimensional fields `(T, low_dim)` float32,
    {camera: `(T, H, W, 3)` uint8})."""
    flat = np.asarray(flat)
    low, frames, start = [], {}, 0
    for key, size in fields:
        part = flat[:, start:start + size]
        if is_camera(key):
            side = image_side(key, size)
            frames[key] = np.clip(np.rint(part), 0, 255).astype(np.uint8) \
                .reshape(-1, side, side, 3)
        else:
            low.append(part.astype(np.float32))
        start += size
    return (np.concatenate(low, axis=1) if low else np.zeros((len(flat), 0), np.float32),
            frames)


def join_cameras(low: np.ndarray, frames: Mapping[str, np.ndarray],
                 fields: Sequence[tuple[str, int]]) -> np.ndarray:
    """The inverse of `split_cameras`: flat float32 `(..., obs_dim)` from low-dimensional
    values `(..., low_dim)` and images `(..., H, W, 3)`, in the order of `fields`."""
    parts, start = [], 0
    lead = low.shape[:-1]
    for key, size in fields:
        if is_camera(key):
            parts.append(np.asarray(frames[key], dtype=np.float32).reshape(*lead, size))
        else:
            parts.append(np.asarray(low[..., start:start + size], dtype=np.float32))
            start += size
    return np.concatenate(parts, axis=-1)


def low_dim_fields(fields: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """The fields that are not cameras."""
    return [(k, n) for k, n in fields if not is_camera(k)]
