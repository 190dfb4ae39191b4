"""Random spatial transforms: affine (scale, any rotation, shear, flips) and smooth elastic warps.

Sample, then apply: :func:`sample_affine` and :func:`sample_elastic` draw small frozen parameter
records from an explicit :class:`torch.Generator`; :func:`sampling_grid` turns them into a
``grid_sample`` grid, and :func:`warp_image` / :func:`warp_labels` apply that one grid to an image
(linear) and to its label map (nearest), so both move identically. The label-ensemble renderer uses
:meth:`AffineParams.matrix` to place templates; few-shot augmentation uses the whole-volume path.

Coordinate convention: a transform maps an *output* voxel ``p`` (array index order ``x, y, z``) to the
*input* voxel it samples, ``q = c + M (p + d(p) - c) + t``, with ``c`` the volume centre, ``M`` the
affine's 3x3 matrix, ``t`` its translation (voxels) and ``d`` the elastic displacement (voxels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AffineRange:
    """Ranges for :func:`sample_affine` (the method's defaults).

    Attributes:
        scale: per-axis scale factors are drawn uniformly from this interval.
        isotropic: draw one scale for all three axes.
        max_rotation_deg: ``None`` draws a rotation uniformly over SO(3) (any direction); a number
            draws a uniformly random axis and an angle uniform in ``[-max, max]`` degrees.
        shear: the three upper off-diagonal shear entries are uniform in ``[-shear, shear]``.
        flip_prob: probability of mirroring each axis.
        translation: translation in voxels, uniform in ``[-translation, translation]`` per axis.
    """

    scale: tuple[float, float] = (0.5, 1.5)
    isotropic: bool = False
    max_rotation_deg: float | None = None
    shear: float = 0.5
    flip_prob: float = 0.5
    translation: float = 0.0


@dataclass(frozen=True)
class AffineParams:
    """One affine transform, as drawn by :func:`sample_affine`.

    The 3x3 matrix is ``R @ H @ diag(scale * flip)``: mirror and scale along the axes, shear (unit
    upper-triangular ``H``, determinant 1), then rotate. Its determinant's magnitude is the volume
    ratio ``prod(scale)``.

    Attributes:
        scale: positive scale per axis.
        rotation: unit quaternion ``(w, x, y, z)``.
        shear: upper-triangular shear entries ``(h_xy, h_xz, h_yz)``.
        flip: mirror each axis.
        translation: in voxels (used by whole-volume warps; template placement uses a centre instead).
    """

    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    rotation: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 0.0)
    shear: tuple[float, float, float] = (0.0, 0.0, 0.0)
    flip: tuple[bool, bool, bool] = (False, False, False)
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def rotation_matrix(self) -> np.ndarray:
        """The 3x3 rotation of the unit quaternion."""
        w, x, y, z = np.asarray(self.rotation, dtype=np.float64) / np.linalg.norm(self.rotation)
        return np.array(
            [
                [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
            ]
        )

    def matrix(self) -> np.ndarray:
        """The 3x3 linear part ``R @ H @ diag(scale * flip)`` as float64."""
        h = np.eye(3)
        h[0, 1], h[0, 2], h[1, 2] = self.shear
        signs = np.where(np.asarray(self.flip, dtype=bool), -1.0, 1.0)
        return self.rotation_matrix() @ h @ np.diag(np.asarray(self.scale, dtype=np.float64) * signs)

    def to_dict(self) -> dict:
        """A JSON-serialisable record."""
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> AffineParams:
        """Inverse of :meth:`to_dict`."""
        return cls(
            scale=tuple(float(v) for v in d["scale"]),
            rotation=tuple(float(v) for v in d["rotation"]),
            shear=tuple(float(v) for v in d["shear"]),
            flip=tuple(bool(v) for v in d["flip"]),
            translation=tuple(float(v) for v in d.get("translation", (0.0, 0.0, 0.0))),
        )


def _uniform(generator: torch.Generator, n: int, lo: float, hi: float) -> list[float]:
    r = torch.rand(n, generator=generator, dtype=torch.float64)
    return (lo + (hi - lo) * r).tolist()


def sample_affine(generator: torch.Generator, rng: AffineRange = AffineRange()) -> AffineParams:
    """Draw one :class:`AffineParams` within ``rng``.

    Always consumes the same amount of random numbers from ``generator`` whatever the options, so
    the draws that follow do not depend on them.
    """
    lo, hi = rng.scale
    scales = _uniform(generator, 3, lo, hi)
    if rng.isotropic:
        scales = [scales[0]] * 3
    # Rotation: a normalised 4D Gaussian is a uniform unit quaternion (uniform over SO(3)).
    gauss = torch.randn(4, generator=generator, dtype=torch.float64)
    angle_u = float(torch.rand(1, generator=generator, dtype=torch.float64))
    if rng.max_rotation_deg is None:
        q = gauss / gauss.norm().clamp_min(1e-12)
    else:
        axis = gauss[1:] / gauss[1:].norm().clamp_min(1e-12)
        angle = math.radians(rng.max_rotation_deg) * (2 * angle_u - 1)
        q = torch.cat([torch.tensor([math.cos(angle / 2)], dtype=torch.float64), math.sin(angle / 2) * axis])
    shear = _uniform(generator, 3, -rng.shear, rng.shear)
    flips = (torch.rand(3, generator=generator, dtype=torch.float64) < rng.flip_prob).tolist()
    trans = _uniform(generator, 3, -rng.translation, rng.translation)
    return AffineParams(
        scale=tuple(scales),
        rotation=tuple(q.tolist()),
        shear=tuple(shear),
        flip=tuple(bool(f) for f in flips),
        translation=tuple(trans),
    )


@dataclass(frozen=True)
class ElasticRange:
    """Ranges for :func:`sample_elastic`.

    Attributes:
        control_points: coarse grid size per axis (more points, finer warps).
        max_std: the displacement's standard deviation (voxels of the output) is uniform in
            ``[0, max_std]``.
    """

    control_points: tuple[int, int, int] = (5, 5, 5)
    max_std: float = 2.0


@dataclass(frozen=True)
class ElasticParams:
    """A smooth random displacement: a Gaussian coarse grid (from ``seed``) upsampled trilinearly.

    Attributes:
        seed: seed of the coarse grid's values.
        control_points: coarse grid size per axis.
        std: standard deviation of the displacement at the control points, in output voxels.
    """

    seed: int = 0
    control_points: tuple[int, int, int] = (5, 5, 5)
    std: float = 0.0

    def to_dict(self) -> dict:
        """A JSON-serialisable record."""
        return {"seed": int(self.seed), "control_points": list(self.control_points), "std": float(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> ElasticParams:
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["seed"]), tuple(int(v) for v in d["control_points"]), float(d["std"]))


def sample_elastic(generator: torch.Generator, rng: ElasticRange = ElasticRange()) -> ElasticParams:
    """Draw one :class:`ElasticParams` within ``rng``."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    std = float(torch.rand(1, generator=generator, dtype=torch.float64)) * rng.max_std
    return ElasticParams(seed=seed, control_points=tuple(rng.control_points), std=std)


def elastic_displacement(
    params: ElasticParams, shape: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The displacement field of ``params`` on a volume of ``shape``: ``(3, X, Y, Z)`` in voxels.

    The coarse values are drawn on the CPU from ``params.seed`` (identical on every device), then
    upsampled with trilinear interpolation (``align_corners=True``) on ``device``.
    """
    gen = torch.Generator().manual_seed(int(params.seed))
    coarse = torch.randn((1, 3, *params.control_points), generator=gen, dtype=torch.float32) * params.std
    coarse = coarse.to(device)
    return F.interpolate(coarse, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True)[0]


def _as_list(x, n: int) -> list:
    if x is None or isinstance(x, (AffineParams, ElasticParams)):
        return [x] * n
    x = list(x)
    if len(x) != n:
        raise ValueError(f"expected {n} parameter records, got {len(x)}")
    return x


def sampling_grid(
    shape: Sequence[int],
    affine: AffineParams | Sequence[AffineParams | None] | None = None,
    elastic: ElasticParams | Sequence[ElasticParams | None] | None = None,
    *,
    batch: int = 1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A ``grid_sample`` grid (``align_corners=True``) for ``affine ∘ elastic`` on a volume of ``shape``.

    The output voxel ``p`` samples the input at ``c + M (p + d(p) - c) + t`` (see the module
    docstring). Lists give one transform per batch element; a single record or ``None`` is shared.

    Args:
        shape: spatial shape ``(X, Y, Z)`` of both input and output.
        affine: affine record(s), or ``None`` for the identity.
        elastic: elastic record(s), or ``None`` for none.
        batch: batch size when neither argument is a list.
        device: where the grid lives.

    Returns:
        ``(B, X, Y, Z, 3)`` float32 grid in normalised coordinates, last axis ordered ``(z, y, x)`` as
        :func:`torch.nn.functional.grid_sample` expects.
    """
    shape = tuple(int(s) for s in shape)
    for arg in (affine, elastic):
        if arg is not None and not isinstance(arg, (AffineParams, ElasticParams)):
            batch = len(list(arg))
    affines = _as_list(affine, batch)
    elastics = _as_list(elastic, batch)
    dev = torch.device(device)
    mats = torch.tensor(
        np.stack([a.matrix() if a is not None else np.eye(3) for a in affines]), dtype=torch.float32, device=dev
    )
    trans = torch.tensor(
        [list(a.translation) if a is not None else [0.0, 0.0, 0.0] for a in affines], dtype=torch.float32, device=dev
    )
    centre = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float32, device=dev)
    # Normalisation to [-1, 1] (align_corners=True); a singleton axis maps to 0.
    norm = torch.tensor([2.0 / (s - 1) if s > 1 else 0.0 for s in shape], dtype=torch.float32, device=dev)
    axes = [torch.arange(s, dtype=torch.float32, device=dev) - centre[i] for i, s in enumerate(shape)]
    if all(e is None or e.std == 0 for e in elastics):
        # q_k - c_k = sum_j M_kj (p_j - c_j) + t_k, built by broadcasting three 1D axes.
        comps = []
        for k in range(3):
            m = mats[:, k]  # (B, 3)
            q = (
                m[:, 0, None, None, None] * axes[0][None, :, None, None]
                + m[:, 1, None, None, None] * axes[1][None, None, :, None]
                + m[:, 2, None, None, None] * axes[2][None, None, None, :]
                + trans[:, k, None, None, None]
            )
            comps.append(q * norm[k])
        return torch.stack(comps[::-1], dim=-1)
    base = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)  # (3, X, Y, Z)
    pts = base.unsqueeze(0).repeat(len(elastics), 1, 1, 1, 1)
    for i, e in enumerate(elastics):
        if e is not None and e.std != 0:
            pts[i] += elastic_displacement(e, shape, dev)
    q = torch.einsum("bkj,bjxyz->bxyzk", mats, pts) + trans[:, None, None, None, :]
    return (q * norm).flip(-1).contiguous()


def warp_image(image: torch.Tensor, grid: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Resample ``image`` ``(B, C, X, Y, Z)`` (float) on ``grid`` with trilinear interpolation."""
    if image.shape[0] != grid.shape[0]:
        grid = grid.expand(image.shape[0], *grid.shape[1:])
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode=padding, align_corners=True)


def warp_labels(labels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample integer ``labels`` ``(B, C, X, Y, Z)`` on ``grid`` by nearest neighbour (ids kept).

    Outside the input, voxels become 0 (background).
    """
    if labels.shape[0] != grid.shape[0]:
        grid = grid.expand(labels.shape[0], *grid.shape[1:])
    # float64 holds every int id below 2**53 exactly; float32 is enough below 2**24.
    dtype = torch.float32 if int(labels.max()) < 2**24 else torch.float64
    out = F.grid_sample(labels.to(dtype), grid.to(dtype), mode="nearest", padding_mode="zeros", align_corners=True)
    return out.round().to(labels.dtype)


def apply_spatial(
    image: torch.Tensor | None,
    labels: torch.Tensor | None,
    affine: AffineParams | Sequence[AffineParams | None] | None = None,
    elastic: ElasticParams | Sequence[ElasticParams | None] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Apply one spatial transform identically to an image (linear) and its labels (nearest).

    Args:
        image: ``(B, C, X, Y, Z)`` float tensor, or ``None``.
        labels: ``(B, C, X, Y, Z)`` integer tensor on the same grid, or ``None``.
        affine: affine record(s), one per batch element or shared.
        elastic: elastic record(s), one per batch element or shared.

    Returns:
        ``(image, labels)`` transformed (``None`` stays ``None``).
    """
    ref = image if image is not None else labels
    if ref is None:
        return None, None
    if image is not None and labels is not None and image.shape[2:] != labels.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} and labels {tuple(labels.shape)} differ in shape")
    grid = sampling_grid(ref.shape[2:], affine, elastic, batch=ref.shape[0], device=ref.device)
    out_img = warp_image(image, grid) if image is not None else None
    out_lab = warp_labels(labels, grid) if labels is not None else None
    return out_img, out_lab
