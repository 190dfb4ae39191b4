"""Quality-control picture: fixed, moved and a checkerboard of the two in three orthogonal planes."""

from __future__ import annotations

from typing import Any

import numpy as np

from synthvox.volume import Volume, to_canonical


def _unit(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [1, 99.5])
    return np.clip((x - lo) / (hi - lo if hi > lo else 1.0), 0, 1)


def _planes(vol: np.ndarray) -> list[np.ndarray]:
    cx, cy, cz = (s // 2 for s in vol.shape)
    # sagittal (y, z), coronal (x, z), axial (x, y); transposed so that up is superior / anterior
    return [vol[cx].T, vol[:, cy].T, vol[:, :, cz].T]


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """A checkerboard of two equally shaped 2D arrays."""
    ys = (np.arange(a.shape[0]) * tiles // max(a.shape[0], 1)) % 2
    xs = (np.arange(a.shape[1]) * tiles // max(a.shape[1], 1)) % 2
    board = (ys[:, None] + xs[None, :]) % 2 == 0
    return np.where(board, a, b)


def label_edges_rgba(labels: np.ndarray) -> np.ndarray:
    """An RGBA overlay of a 2D label map's boundaries, one colour per label id (transparent elsewhere)."""
    lab = labels.astype(np.int64)
    edge = np.zeros(lab.shape, bool)
    edge[1:] |= lab[1:] != lab[:-1]
    edge[:-1] |= lab[1:] != lab[:-1]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, 1:] != lab[:, :-1]
    edge &= lab > 0
    import matplotlib

    colours = matplotlib.colormaps["tab20"](np.arange(20))
    rgba = np.zeros(lab.shape + (4,))
    rgba[edge] = colours[lab[edge] % 20]
    rgba[edge, 3] = 1.0
    return rgba


def qc_figure(fixed: Volume, moved: Volume, title: str = "", fixed_labels: Volume | None = None,
              moved_labels: Volume | None = None) -> Any:
    """A matplotlib figure (Agg) with rows fixed / moved / checkerboard and columns sagittal, coronal, axial.

    Both volumes must share a grid (``moved`` is on FIXED's grid); shown in RAS orientation with the
    voxel aspect ratio kept. Label maps on that grid, when given, are drawn as coloured outlines: the
    fixed labels on the fixed row, the moved labels on the moved row, both on the checkerboard.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    f = to_canonical(Volume(fixed.data[:1].float().cpu(), fixed.affine))
    m = to_canonical(Volume(moved.data[:1].float().cpu(), moved.affine))
    fa, ma = _unit(f.data[0].numpy()), _unit(m.data[0].numpy())
    sp = f.spacing
    aspects = [sp[2] / sp[1], sp[2] / sp[0], sp[1] / sp[0]]
    fig = Figure(figsize=(9, 9), dpi=100)
    rows = [("fixed", _planes(fa)), ("moved", _planes(ma)),
            ("checkerboard", [checkerboard(x, y) for x, y in zip(_planes(fa), _planes(ma))])]

    def planes_of(lab: Volume | None) -> list[np.ndarray] | None:
        if lab is None:
            return None
        return _planes(to_canonical(Volume(lab.data[:1].cpu(), lab.affine)).data[0].numpy())

    fl, ml = planes_of(fixed_labels), planes_of(moved_labels)
    overlays = [[fl], [ml], [fl, ml]]
    for r, (name, planes) in enumerate(rows):
        for c, (img, asp) in enumerate(zip(planes, aspects)):
            ax = fig.add_subplot(3, 3, r * 3 + c + 1)
            ax.imshow(img, cmap="gray", origin="lower", aspect=asp, vmin=0, vmax=1, interpolation="nearest")
            for lab in overlays[r]:
                if lab is not None:
                    ax.imshow(label_edges_rgba(lab[c]), origin="lower", aspect=asp, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def qc_png_bytes(fixed: Volume, moved: Volume, title: str = "", fixed_labels: Volume | None = None,
                 moved_labels: Volume | None = None) -> bytes:
    """The QC figure rendered as PNG bytes (the caller writes them)."""
    import io as _io

    buf = _io.BytesIO()
    qc_figure(fixed, moved, title, fixed_labels, moved_labels).savefig(buf, format="png")
    return buf.getvalue()

