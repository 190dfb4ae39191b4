"""Evaluation metrics: Dice per label, HD95 (MONAI), Jacobian determinant and folding of a warp."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch


def _as_int_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise ValueError(f"label maps must be 3D (or (1, X, Y, Z)), got shape {tuple(t.shape)}")
    return t.long()


def _label_sets(
    labels: Iterable[int] | Mapping[str, Sequence[int]] | None, pred: torch.Tensor, ref: torch.Tensor
) -> dict[str, list[int]]:
    if labels is None:
        ids = torch.unique(torch.cat([torch.unique(pred), torch.unique(ref)])).tolist()
        return {str(i): [int(i)] for i in ids if i != 0}
    if isinstance(labels, Mapping):
        return {str(k): [int(i) for i in v] for k, v in labels.items()}
    return {str(int(i)): [int(i)] for i in labels}


def dice_per_label(
    pred: torch.Tensor | np.ndarray,
    ref: torch.Tensor | np.ndarray,
    labels: Iterable[int] | Mapping[str, Sequence[int]] | None = None,
) -> dict[str, float]:
    """Dice overlap of each label (or group of labels) between two label maps on one grid.

    Args:
        pred: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` label map.
        ref: the reference, same shape.
        labels: ids to score (default: every non-zero id in either map), or a mapping from a structure
            name to the ids it merges (e.g. left and right).

    Returns:
        ``{name: dice}``; a structure absent from both maps scores ``nan``.
    """
    p, r = _as_int_tensor(pred), _as_int_tensor(ref)
    if p.shape != r.shape:
        raise ValueError(f"label maps differ in shape: {tuple(p.shape)} vs {tuple(r.shape)}")
    sets = _label_sets(labels, p, r)
    # one pass over the voxels: the joint histogram of (pred, ref) ids, then every structure's counts
    # from it (a brain parcellation's 140 labels took 4 s one mask at a time, 0.2 s so)
    values, inverse = torch.unique(torch.cat([p.reshape(-1), r.reshape(-1)]), return_inverse=True)
    k = int(values.numel())
    if k > MAX_JOINT_IDS:
        return _dice_by_masks(p, r, sets)
    n = p.numel()
    joint = torch.bincount(inverse[:n] * k + inverse[n:], minlength=k * k).reshape(k, k)
    count_p, count_r = joint.sum(1), joint.sum(0)
    index = {int(v): i for i, v in enumerate(values.tolist())}
    out: dict[str, float] = {}
    for name, ids in sets.items():
        sel = torch.as_tensor(sorted({index[i] for i in ids if i in index}), dtype=torch.long, device=joint.device)
        denom = int(count_p[sel].sum() + count_r[sel].sum())
        out[name] = float("nan") if denom == 0 else 2.0 * int(joint[sel][:, sel].sum()) / denom
    return out


#: Most distinct ids for the joint histogram of :func:`dice_per_label` (more: one mask per structure).
MAX_JOINT_IDS = 2048


def _dice_by_masks(p: torch.Tensor, r: torch.Tensor, sets: Mapping[str, list[int]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, ids in sets.items():
        ids_t = torch.as_tensor(ids, device=p.device)
        a, b = torch.isin(p, ids_t), torch.isin(r, ids_t)
        denom = int(a.sum() + b.sum())
        out[name] = float("nan") if denom == 0 else 2.0 * int((a & b).sum()) / denom
    return out


def hd95_per_label(
    pred: torch.Tensor | np.ndarray,
    ref: torch.Tensor | np.ndarray,
    spacing: Sequence[float],
    labels: Iterable[int] | Mapping[str, Sequence[int]] | None = None,
) -> dict[str, float]:
    """95th-percentile Hausdorff distance in mm per label (MONAI's ``compute_hausdorff_distance``).

    ``nan`` when a structure is missing from either map.
    """
    from monai.metrics import compute_hausdorff_distance

    p, r = _as_int_tensor(pred), _as_int_tensor(ref)
    out: dict[str, float] = {}
    for name, ids in _label_sets(labels, p, r).items():
        ids_t = torch.as_tensor(ids, device=p.device)
        a, b = torch.isin(p, ids_t), torch.isin(r, ids_t)
        if not bool(a.any()) or not bool(b.any()):
            out[name] = float("nan")
            continue
        val = compute_hausdorff_distance(
            a[None, None].float(), b[None, None].float(), percentile=95, spacing=[float(s) for s in spacing]
        )
        out[name] = float(val.reshape(-1)[0])
    return out


def jacobian_determinant(disp: torch.Tensor, affine: np.ndarray | None = None,
                         spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Jacobian determinant of the map ``x -> x + d(x)`` for a displacement field.

    Args:
        disp: ``(3, X, Y, Z)`` displacement in mm, its components along the world axes of ``affine``
            (or along the array axes when only ``spacing`` is given).
        affine: the field's voxel-to-world affine (oblique and flipped grids are handled).
        spacing: voxel size along the array axes, used when ``affine`` is not given (default 1 mm).

    Returns:
        ``(X, Y, Z)`` determinants (central differences inside, one-sided at the borders).
    """
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise ValueError(f"a displacement field must be (3, X, Y, Z), got {tuple(disp.shape)}")
    d = disp.to(torch.float64)
    if affine is not None:
        lin = torch.as_tensor(np.asarray(affine, np.float64)[:3, :3], device=d.device)
    else:
        sp = [1.0, 1.0, 1.0] if spacing is None else [float(s) for s in spacing]
        lin = torch.diag(torch.tensor(sp, dtype=torch.float64, device=d.device))
    inv = torch.linalg.inv(lin).tolist()
    # g[i][j] = d(d_i) / d(v_j) along array axis j (voxel units); jac = I + g lin^-1, entry by entry
    g = [torch.gradient(d[i], dim=(0, 1, 2)) for i in range(3)]
    jac = [[sum(g[i][j] * inv[j][k] for j in range(3) if inv[j][k] != 0.0) + (1.0 if i == k else 0.0)
            for k in range(3)] for i in range(3)]
    # the 3x3 determinant written out (a batched linalg.det is several times slower)
    return (jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
            - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
            + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0]))


def folding_percent(disp: torch.Tensor, affine: np.ndarray | None = None,
                    spacing: Sequence[float] | None = None, mask: torch.Tensor | None = None) -> float:
    """Percentage of voxels (inside ``mask`` when given) whose Jacobian determinant is ``<= 0``."""
    det = jacobian_determinant(disp, affine=affine, spacing=spacing)
    if mask is not None:
        m = torch.as_tensor(mask).to(det.device).reshape(det.shape).bool()
        det = det[m]
    if det.numel() == 0:
        return 0.0
    return 100.0 * float((det <= 0).double().mean())
