"""Offscreen camera images of a robosuite scene, for camera tasks.

Each environment gets its own offscreen OpenGL context (robosuite's EGL context class, or its
OSMesa one when MUJOCO_GL=osmesa, whatever was imported first) and renders each named camera
at side x side into upright (first row at the top) uint8 RGB. Software rendering on CPU (EGL
through Mesa's llvmpipe) pays per triangle, not per pixel, so the scene is drawn without
reflections, shadows and multisampling: a 64x64 agentview frame of the Stack scene took 78 ms
with robosuite's defaults and 21 ms without these, on a loaded 2-core machine. Instead of
multisampling, each camera is rendered at SUPERSAMPLE times the side and averaged down: a
cube a few pixels wide keeps its colour and sub-pixel position instead of aliasing.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

SUPERSAMPLE = 2     # rendered side / delivered side (a box filter averages the blocks)


def _gl_context(side: int) -> Any:
    if os.environ.get('MUJOCO_GL', '').lower() == 'osmesa':
        from robosuite.renderers.context.osmesa_context import OSMesaGLContext
        return OSMesaGLContext(side, side, device_id=-1)
    from robosuite.renderers.context.egl_context import EGLGLContext
    return EGLGLContext(side, side, device_id=-1)


class CameraRig:
    """Renders `cameras` of a robosuite simulation (`sim`) at `side` pixels square (drawn at
    `side * SUPERSAMPLE` and averaged down)."""

    def __init__(self, sim: Any, cameras: Sequence[str], side: int) -> None:
        import mujoco
        self._mj = mujoco
        self._model, self._data = sim.model._model, sim.data._data
        names = [self._model.camera(i).name for i in range(self._model.ncam)]
        missing = [c for c in cameras if c not in names]
        if missing:
            raise ValueError(f'the scene has no camera {missing[0]!r} (it has '
                             f'{", ".join(names)})')
        self.cameras = list(cameras)
        self._ids = [names.index(c) for c in cameras]
        self.side = int(side)
        drawn = self.side * SUPERSAMPLE
        self._gl = _gl_context(drawn)
        self._gl.make_current()
        vis = self._model.vis
        vis.quality.offsamples = 0                 # no multisampling
        vis.global_.offwidth = max(vis.global_.offwidth, drawn)
        vis.global_.offheight = max(vis.global_.offheight, drawn)
        self._context = mujoco.MjrContext(self._model, mujoco.mjtFontScale.mjFONTSCALE_150)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        self._scene = mujoco.MjvScene(self._model, maxgeom=10000)
        for flag in (mujoco.mjtRndFlag.mjRND_REFLECTION, mujoco.mjtRndFlag.mjRND_SHADOW,
                     mujoco.mjtRndFlag.mjRND_SKYBOX):
            self._scene.flags[flag] = 0
        self._option, self._perturb = mujoco.MjvOption(), mujoco.MjvPerturb()
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._viewport = mujoco.MjrRect(0, 0, drawn, drawn)
        self._pixels = np.empty((drawn, drawn, 3), dtype=np.uint8)

    def render(self) -> dict[str, np.ndarray]:
        """`{'<camera>_image': (side, side, 3) uint8}` of the current state."""
        mj = self._mj
        self._gl.make_current()
        out = {}
        for name, cam in zip(self.cameras, self._ids):
            self._camera.fixedcamid = cam
            mj.mjv_updateScene(self._model, self._data, self._option, self._perturb,
                               self._camera, mj.mjtCatBit.mjCAT_ALL, self._scene)
            mj.mjr_render(self._viewport, self._scene, self._context)
            mj.mjr_readPixels(self._pixels, None, self._viewport, self._context)
            out[f'{name}_image'] = self._downsample(self._pixels[::-1])  # GL rows run up
        return out

    def _downsample(self, pixels: np.ndarray) -> np.ndarray:
        k, side = SUPERSAMPLE, self.side
        blocks = pixels.reshape(side, k, side, k, 3).astype(np.uint16).sum(axis=(1, 3))
        return ((blocks + k * k // 2) // (k * k)).astype(np.uint8)

    def close(self) -> None:
        context, self._context = getattr(self, '_context', None), None
        if context is not None:
            self._gl.make_current()
            context.free()
            self._gl.free()
