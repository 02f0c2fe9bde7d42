"""Candlestick charts drawn in memory, many windows at once, and encoded by the CLIP image encoder.

The seed script drew one PNG per window and encoded it alone. Here a window's chart is a uint8 RGB array
made with array operations over all windows of a symbol (no plotting library, no file): white ground, one
column band per bar, the body from open to close (green up, red down), a one-pixel wick from low to high,
prices scaled to the window's own low..high. Charts are drawn at `chart_size` pixels and scaled up
(nearest neighbour, exact) to the model's input size inside the encoder's batches.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

UP = np.array([38, 166, 91], dtype=np.uint8)
DOWN = np.array([214, 48, 49], dtype=np.uint8)
GROUND = 255
RENDER_CHUNK = 2048  # windows per array pass: bounded memory


def render(opens: np.ndarray, highs: np.ndarray, lows: np.ndarray, closes: np.ndarray, size: int) -> np.ndarray:
    """Windows given as [n, bars] arrays -> uint8 charts [n, size, size, 3]."""
    n, bars = closes.shape
    band = size // bars
    if band < 1:
        raise ValueError(f"chart_size {size} is smaller than the {bars} bars of a window")
    lo, hi = lows.min(axis=1, keepdims=True), highs.max(axis=1, keepdims=True)
    scale = (size - 1) / np.where(hi > lo, hi - lo, 1.0)

    def row(values):  # price -> pixel row (0 = top = the window's high)
        return np.rint((hi - values) * scale).astype(np.int32)

    body_top, body_bottom = row(np.maximum(opens, closes)), row(np.minimum(opens, closes))
    wick_top, wick_bottom = row(highs), row(lows)
    pixel_rows = np.arange(size, dtype=np.int32)[None, None, :]
    body = (pixel_rows >= body_top[..., None]) & (pixel_rows <= body_bottom[..., None])  # [n, bars, size]
    wick = (pixel_rows >= wick_top[..., None]) & (pixel_rows <= wick_bottom[..., None])
    columns = np.arange(size)
    bar_of_column = np.minimum(columns // band, bars - 1)
    inside = columns < band * bars
    is_wick = inside & (columns % band == band // 2)
    is_body = inside & ((columns % band < band - 1) if band > 2 else np.ones(size, dtype=bool))
    ink = (body[:, bar_of_column, :] & is_body[None, :, None]) | (wick[:, bar_of_column, :] & is_wick[None, :, None])
    ink = ink.transpose(0, 2, 1)  # [n, rows, columns]
    rising = (closes >= opens)[:, bar_of_column]  # [n, columns]
    colour = np.where(rising[..., None], UP, DOWN)  # [n, columns, 3]
    image = np.full((n, size, size, 3), GROUND, dtype=np.uint8)
    np.copyto(image, np.broadcast_to(colour[:, None, :, :], image.shape), where=ink[..., None])
    return image


def render_windows(bars: pd.DataFrame, ends: np.ndarray, window: int, size: int) -> np.ndarray:
    """The charts of one symbol's windows ending at `ends` -> uint8 [len(ends), size, size, 3]."""
    starts = ends - window + 1
    views = {c: sliding_window_view(bars[c].to_numpy(np.float64), window)[starts] for c in ("open", "high", "low",
                                                                                          "close")}
    out = np.empty((len(ends), size, size, 3), dtype=np.uint8)
    for a in range(0, len(ends), RENDER_CHUNK):
        part = slice(a, a + RENDER_CHUNK)
        out[part] = render(views["open"][part], views["high"][part], views["low"][part], views["close"][part], size)
    return out


class ChartEncoder:
    """Charts of windows -> CLIP image embeddings (the encoder of mlprep.encoders, batched)."""

    def __init__(self, encoder, size: int):
        self.encoder, self.size = encoder, size

    def encode_windows(self, bars: pd.DataFrame, ends: np.ndarray, spec) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        out = []
        target = self.encoder.image_size
        for a in range(0, len(ends), RENDER_CHUNK):
            charts = torch.from_numpy(render_windows(bars, ends[a : a + RENDER_CHUNK], spec.window, self.size))
            pixels = charts.permute(0, 3, 1, 2)
            if self.size != target:
                pixels = F.interpolate(pixels.float(), size=(target, target), mode="nearest").to(torch.uint8)
            out.append(self.encoder.encode_images(pixels.contiguous()))
        return np.concatenate(out) if out else np.zeros((0, self.encoder.dim), np.float32)
