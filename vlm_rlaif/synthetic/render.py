"""Draw a scene as frames: a pure function of the scene record (its noise has its own seed).

The background is mottled (grey noise in 8-px blocks, fixed over time) with clutter specks;
objects are drawn in flat colour on top, so every pixel of an object has exactly the colour
its scene record says. Blocky noise keeps a frame's PNG near 0.5 KB, where per-pixel noise
would cost 8 KB, and the world lives in git (through the in-repo DVC remote).
"""

from __future__ import annotations

import numpy as np

from vlm_rlaif.synthetic.scene import Scene

NOISE_BLOCK = 8


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean [size, size] mask of a shape; its middle pixel is always inside."""
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size]
    if shape == "circle":
        return (x - c) ** 2 + (y - c) ** 2 <= (size / 2) ** 2
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "triangle":
        return np.abs(x - c) <= (y + 1) / 2
    if shape == "diamond":
        return np.abs(x - c) + np.abs(y - c) <= size / 2
    if shape == "cross":
        return (np.abs(x - c) <= size / 6) | (np.abs(y - c) <= size / 6)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> np.ndarray:
    """uint8 frames [num_frames, frame_size, frame_size, 3]."""
    t_count, size = scene.num_frames, scene.frame_size
    base = np.empty((size, size, 3), np.float32)
    base[:] = scene.background
    for x, y, side, grey in scene.clutter:
        base[y : y + side, x : x + side] = grey
    blocks = -(-size // NOISE_BLOCK)
    noise = np.random.default_rng(scene.render_seed).standard_normal((blocks, blocks, 3), dtype=np.float32)
    noise = noise.repeat(NOISE_BLOCK, 0).repeat(NOISE_BLOCK, 1)[:size, :size]
    frame = np.clip(np.rint(base + scene.noise * noise), 0, 255).astype(np.uint8)
    frames = np.repeat(frame[None], t_count, axis=0)
    for obj in scene.objects:
        mask = shape_mask(obj.shape, obj.size)
        first, end = scene.span(obj)
        for t in range(first, end):
            x0, y0 = obj.box(t)
            frames[t, y0 : y0 + obj.size, x0 : x0 + obj.size][mask] = scene.rgb_at(obj, t)
    return frames
