"""A montage of synthetic samples for people to look at: middle slices of labels and both views.

Returns a matplotlib figure (Agg backend, no screen needed); writing it is the caller's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: The three planes shown, as (name, array axis sliced through).
PLANES: tuple[tuple[str, int], ...] = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def label_colors(n: int, seed: int = 0) -> np.ndarray:
    """``(n, 4)`` RGBA colours for label ids ``0..n-1``: black background, distinct shuffled hues."""
    rng = np.random.default_rng(seed)
    k = max(n - 1, 1)
    hues = (np.arange(k) * 0.618033988749895) % 1.0  # golden-ratio spacing
    sat = 0.55 + 0.45 * rng.random(k)
    val = 0.65 + 0.35 * rng.random(k)
    import matplotlib.colors as mcolors

    rgb = mcolors.hsv_to_rgb(np.stack([hues, sat, val], axis=1))
    rgb = rgb[rng.permutation(k)]
    out = np.ones((n, 4))
    out[0, :3] = 0.0
    out[1:, :3] = rgb[: n - 1]
    return out


def artefact_summary(view: dict) -> str:
    """The artefacts a view received, in words, from its appearance parameters (as in params.json).

    E.g. ``"bias 0.04, blur 0.4 vox, 2 spikes, gaussian noise 0.034"``; ``"no artefacts"`` when none.
    """
    axes = "xyz"
    parts = []
    if view.get("bias"):
        parts.append(f"bias {float(view['bias'].get('strength', 0.0)):.2f}")
    if view.get("gamma") is not None:
        parts.append(f"gamma {float(view['gamma']):.2f}")
    if view.get("blur"):
        parts.append(f"blur {max(float(b) for b in view['blur']):.1f} vox")
    if view.get("sharpen"):
        parts.append("sharpened")
    if view.get("low_res"):
        lr = view["low_res"]
        parts.append(f"thick slices x{float(lr.get('factor', 1.0)):.1f} ({axes[int(lr.get('axis', 0))]})")
    if view.get("spikes"):
        n = len(view["spikes"].get("positions", []))
        parts.append(f"{n} spike{'s' if n != 1 else ''}")
    if view.get("gibbs"):
        parts.append(f"Gibbs ({''.join(axes[int(a)] for a in view['gibbs'].get('axes', []))})")
    if view.get("noise"):
        nz = view["noise"]
        parts.append(f"{nz.get('kind', '')} noise {float(nz.get('std', 0.0)):.3f}".strip())
    return ", ".join(parts) or "no artefacts"


def scene_summary(labels: dict) -> str:
    """Where the scene sits and how it was moved, in words, from a sample's ``labels`` record.

    Example: ``"foreground shifted (+5, -3, +0) vox; scene mirrored x, z, scaled 0.8-1.2, rotated 31°"``.
    """
    import math

    parts = []
    fg = labels.get("foreground")
    if fg is None:
        parts.append("no foreground")
    else:
        shift = fg.get("shift", [0.0, 0.0, 0.0])
        parts.append("foreground shifted (" + ", ".join(f"{v:+.0f}" for v in shift) + ") vox")
    scene = labels.get("scene")
    if scene is None:
        parts.append("scene unmoved")
    else:
        moves = []
        flips = [a for a, f in zip("xyz", scene.get("flip", [])) if f]
        if flips:
            moves.append("mirrored " + ", ".join(flips))
        scale = scene.get("scale", [1.0, 1.0, 1.0])
        if any(abs(v - 1.0) > 1e-9 for v in scale):
            moves.append(f"scaled {min(scale):.2f}-{max(scale):.2f}")
        w = min(1.0, abs(float(scene.get("rotation", [1.0])[0])))
        if w < 1.0 - 1e-12:
            moves.append(f"rotated {math.degrees(2 * math.acos(w)):.0f}°")
        parts.append("scene " + ", ".join(moves or ["unmoved"]))
    return "; ".join(parts)


def _slice(vol: np.ndarray, axis: int) -> np.ndarray:
    """Middle slice through ``axis``, oriented for display (first remaining axis left to right)."""
    sl = np.take(vol, vol.shape[axis] // 2, axis=axis)
    return sl.T


def preview_figure(
    labels: Sequence[torch.Tensor | np.ndarray],
    view1: Sequence[torch.Tensor | np.ndarray],
    view2: Sequence[torch.Tensor | np.ndarray],
    titles: Sequence[str] | None = None,
    planes: Sequence[tuple[str, int]] = PLANES,
    notes: Sequence[str] | None = None,
):
    """Montage: one row per sample; per plane, the labels, view 1 and view 2 side by side.

    Args:
        labels: per sample, a ``(X, Y, Z)`` (or ``(1, X, Y, Z)``) integer label map.
        view1: per sample, the first view (same shape, float).
        view2: per sample, the second view.
        titles: optional row titles.
        planes: planes to show, as ``(name, axis)``.
        notes: optional caption under each row (``synthvox synth``: the artefacts of each view,
            see :func:`artefact_summary`).

    Returns:
        A :class:`matplotlib.figure.Figure` (Agg canvas).
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    if not (len(labels) == len(view1) == len(view2)) or len(labels) == 0:
        raise ValueError("preview_figure needs the same positive number of label maps and views")

    def arr(x) -> np.ndarray:
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return a[0] if a.ndim == 4 else a

    n = len(labels)
    cols = 3 * len(planes)
    row_h = 1.8 + (0.5 if notes is not None else 0.0)
    fig = Figure(figsize=(1.7 * cols, row_h * n + 0.5), dpi=100)
    fig.patch.set_facecolor("black")
    axes = fig.subplots(n, cols, squeeze=False)
    for r in range(n):
        lab = arr(labels[r]).astype(np.int64)
        v1, v2 = arr(view1[r]).astype(np.float32), arr(view2[r]).astype(np.float32)
        cmap = ListedColormap(label_colors(int(lab.max()) + 1, seed=r))
        for p, (name, axis) in enumerate(planes):
            panels = [
                (_slice(lab, axis), dict(cmap=cmap, vmin=-0.5, vmax=lab.max() + 0.5, interpolation="nearest")),
                (_slice(v1, axis), dict(cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")),
                (_slice(v2, axis), dict(cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")),
            ]
            for k, (img, kw) in enumerate(panels):
                ax = axes[r, 3 * p + k]
                ax.imshow(img, origin="lower", **kw)
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if r == 0:
                    ax.set_title(f"{name}\n{('labels', 'view 1', 'view 2')[k]}", color="white", fontsize=8)
        if titles is not None:
            axes[r, 0].set_ylabel(titles[r], color="white", fontsize=8)
        if notes is not None:
            axes[r, cols // 2].set_xlabel(notes[r], color="white", fontsize=7)
    hspace = 0.3 if notes is not None else 0.06
    bottom = 0.25 / (row_h * n + 0.5) if notes is not None else 0.01
    fig.subplots_adjust(left=0.03, right=0.99, top=1 - 0.5 / (row_h * n + 0.5), bottom=bottom, wspace=0.04, hspace=hspace)
    return fig
