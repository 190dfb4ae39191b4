"""Label ensembles: random scenes of 20-40 overlapping anatomical templates (the method's step 2).

Sample, then apply: :func:`sample_label_params` draws a :class:`LabelParams` record (which templates,
their affines and centres, the foreground) from an explicit generator; :func:`render_labels` /
:func:`render_labels_batch` turn records into label maps deterministically.

Geometry. A template is an occupancy cube (``ShapeBank.cubes`` format): centred, its longest side
filling the cube. It keeps its physical size: a longest side of ``L`` mm (from the bank's extents)
spans ``L / voxel_mm`` output voxels, where ``voxel_mm = fov_mm / max(size)``. The default field of
view, 192 mm, gives 1.5 mm voxels at 128³, the resolution at which the method places its
TotalSegmentator templates; any other size shows the same kind of scene at another resolution.
Procedural shapes (without a bank, or a fraction of templates with one) come from a fixed pool drawn
from ``procedural_seed`` and get a longest side drawn as a fraction of the field of view. Each
template gets a random affine (scale 0.5-1.5, any rotation, shear up to 0.5, flips) and a random
centre anywhere in the volume; later templates overwrite earlier ones.

Speed. No full-volume pass per template. Each distinct template is prepared once and cached
(:class:`TemplateSet`): its cube is blurred and upsampled in one separable pass (three small
matmuls), thresholded, and bit-packed. Placing it then touches only its bounding box in the output:
each voxel's cube index under the inverse affine is a sum of three 1D ramps (a few elementwise
operations), followed by one gather, several times cheaper than ``grid_sample``. Painting order is
kept by writing ``max(map, rank * occupancy)``, which equals "later templates overwrite earlier ones".

Smoothing. The Gaussian blur (``smoothing`` cube voxels) before thresholding at 0.5 gives smooth,
non-blocky boundaries at any scale; the foreground is smoothed the same way.

Foreground. In ``p_foreground`` (2/3) of maps, templates are confined to a large randomly deformed
sphere: outside is background (0) and the sphere's empty space becomes a label of its own. In
``p_envelope`` (about 1/3) of maps, a shell straddling the sphere's surface (like a dilation minus
an erosion, 2-4 voxels on each side at 128³) becomes one more label, like skin or skull. As in the
method, the envelope comes only with a foreground sphere. The sphere's centre (and its templates with
it) is shifted by up to ``foreground_shift`` of the size along each axis.

Scene. Last, the whole scene is mirrored (``scene_flip``) and transformed by a random affine
(``scene_affine``: scale and rotation), as the reference's training applies to both views; voxels
mapped from outside become background. With the shift, nothing sits at a fixed place relative to the
volume's centre or border, so position is no shortcut for the network.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from synthvox.synth.spatial import AffineParams, AffineRange, sample_affine, sampling_grid, warp_labels


@dataclass
class LabelConfig:
    """Settings of the label-ensemble generator.

    Attributes:
        size: output shape ``(X, Y, Z)``; any shape, anisotropic included.
        n_templates: number of templates per map, uniform in this inclusive range.
        affine: ranges of each template's random affine.
        fov_mm: physical extent of the volume's longest axis (voxels are isotropic,
            ``fov_mm / max(size)`` mm).
        p_foreground: probability of a deformed-sphere foreground.
        p_envelope: overall probability of an envelope label (drawn only with a foreground).
        envelope_width: envelope half-width in voxels at 128³, inclusive range (scaled with size).
        foreground_radius: mean radius of the foreground sphere as a fraction of the volume's size.
        foreground_roughness: range of the sphere's log-radius perturbation.
        procedural_fraction: fraction of procedural shapes when a bank is given (all without one).
        procedural_size: longest side of a procedural shape as a fraction of ``fov_mm``.
        procedural_pool: number of distinct procedural shapes (drawn once each, then cached).
        procedural_seed: seed of the procedural pool.
        smoothing: Gaussian sigma applied to each template before thresholding, in voxels of its
            prepared cube (``max_resolution`` per side); 0.5 or less: plain linear interpolation.
        threshold: occupancy level that counts as inside a (solid) template.
        min_threshold: lowest level used for thin templates, whose level is lowered so that their
            volume is kept (a thin sheet would otherwise blur below ``threshold`` and vanish).
        max_resolution: side of the cached template cubes; a template spanning more output voxels
            than this is looked up at slightly coarser resolution.
        max_template_extent: a template whose longest side (after its affine) would exceed this
            fraction of the volume's largest side is shrunk to it (keeps giant structures from
            filling the whole map with one coarse label).
        foreground_shift: the foreground sphere's centre (and its templates) moves by up to this
            fraction of the size along each axis, uniformly (the reference's ±32 voxels at 128³), so
            that no structure sits at a fixed place relative to the volume's centre or border.
        scene_flip: probability of mirroring the whole scene; each axis is then mirrored with
            probability 1/2 (the reference's ``RandomFlip(p=0.9)``).
        scene_affine: probability of a whole-scene affine transform (the reference's
            ``RandomAffine(p=0.5)``), of per-axis scale in ``1 ± scene_scale`` and a rotation of up to
            ``scene_rotation_deg`` degrees about a random axis. Voxels mapped from outside the
            volume become background, so the scene's field of view varies as a real scan's does.
        scene_scale: see ``scene_affine``.
        scene_rotation_deg: see ``scene_affine``.
    """

    size: tuple[int, int, int] = (128, 128, 128)
    n_templates: tuple[int, int] = (20, 40)
    affine: AffineRange = field(default_factory=AffineRange)
    fov_mm: float = 144.0
    p_foreground: float = 2.0 / 3.0
    p_envelope: float = 1.0 / 3.0
    envelope_width: tuple[int, int] = (2, 4)
    foreground_radius: tuple[float, float] = (0.38, 0.5)
    foreground_roughness: tuple[float, float] = (0.1, 0.3)
    procedural_fraction: float = 0.2
    procedural_size: tuple[float, float] = (0.15, 0.6)
    procedural_pool: int = 500
    procedural_seed: int = 0
    smoothing: float = 1.0
    threshold: float = 0.5
    min_threshold: float = 0.2
    max_resolution: int = 64
    max_template_extent: float = 1.0
    foreground_shift: float = 0.25
    scene_flip: float = 0.9
    scene_affine: float = 0.5
    scene_scale: float = 0.4
    scene_rotation_deg: float = 45.0

    def __post_init__(self) -> None:
        from synthvox.errors import InputError

        if isinstance(self.affine, dict):
            self.affine = AffineRange(**self.affine)
        size = tuple(self.size)
        if len(size) != 3 or any(int(v) != v or v < 2 for v in size):
            raise InputError(f"label map size must be three integers >= 2, got {self.size}")
        self.size = tuple(int(v) for v in size)  # type: ignore[assignment]
        lo, hi = self.n_templates
        if not 1 <= lo <= hi <= 250:
            raise InputError(f"n_templates must be a range 1 <= low <= high <= 250, got {self.n_templates}")
        if not self.fov_mm > 0:
            raise InputError(f"fov_mm must be positive, got {self.fov_mm}")
        for name in ("p_foreground", "p_envelope", "procedural_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.procedural_pool < 1 or self.max_resolution < 8:
            raise InputError("procedural_pool must be >= 1 and max_resolution >= 8")
        for name in ("scene_flip", "scene_affine"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.foreground_shift <= 0.5:
            raise InputError(f"foreground_shift must be in [0, 0.5], got {self.foreground_shift}")
        if not 0.0 <= self.scene_scale < 1.0:
            raise InputError(f"scene_scale must be in [0, 1), got {self.scene_scale}")
        if not 0.0 <= self.scene_rotation_deg <= 180.0:
            raise InputError(f"scene_rotation_deg must be in [0, 180], got {self.scene_rotation_deg}")

    @property
    def voxel_mm(self) -> float:
        """Voxel size in mm (isotropic)."""
        return float(self.fov_mm) / max(self.size)


@dataclass(frozen=True)
class TemplatePlacement:
    """One template in a scene.

    Attributes:
        source: ``"bank"`` or ``"procedural"``.
        index: index in the bank or in the procedural pool.
        affine: its random affine (its translation is unused: ``centre`` places the template).
        centre: where the template's centre lands, in output voxel coordinates.
        size_mm: longest side in mm before the affine (procedural shapes only; bank templates use the
            bank's extents).
    """

    source: str
    index: int
    affine: AffineParams
    centre: tuple[float, float, float]
    size_mm: float = 0.0

    def to_dict(self) -> dict:
        """A JSON-serialisable record."""
        return {
            "source": self.source,
            "index": int(self.index),
            "affine": self.affine.to_dict(),
            "centre": [float(c) for c in self.centre],
            "size_mm": float(self.size_mm),
        }

    @classmethod
    def from_dict(cls, d: dict) -> TemplatePlacement:
        """Inverse of :meth:`to_dict`."""
        if d.get("source") not in ("bank", "procedural"):
            raise ValueError(f"unknown template source {d.get('source')!r}")
        return cls(
            source=str(d["source"]),
            index=int(d["index"]),
            affine=AffineParams.from_dict(d["affine"]),
            centre=tuple(float(c) for c in d["centre"]),
            size_mm=float(d.get("size_mm", 0.0)),
        )


@dataclass(frozen=True)
class Foreground:
    """The deformed-sphere foreground: ``seed`` of its noise, mean ``radius`` (fraction of the size),
    ``roughness`` (std of the log-radius), the envelope half-width in voxels (0: none) and the
    ``shift`` of its centre from the volume's centre, in voxels."""

    seed: int
    radius: float
    roughness: float
    envelope: int
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class LabelParams:
    """Everything random about one label map; JSON-serialisable through :meth:`to_dict`.

    Attributes:
        size: output shape.
        voxel_mm: isotropic voxel size in mm.
        templates: placements, in painting order (later overwrite earlier).
        foreground: the deformed-sphere foreground, or ``None``.
        scene: the whole-scene transform (flips and affine, applied after the foreground, as
            :func:`synthvox.synth.spatial.sampling_grid` reads it), or ``None``.
    """

    size: tuple[int, int, int]
    voxel_mm: float
    templates: tuple[TemplatePlacement, ...]
    foreground: Foreground | None
    scene: AffineParams | None = None

    def to_dict(self) -> dict:
        """A JSON-serialisable record."""
        fg = self.foreground
        return {
            "size": list(self.size),
            "voxel_mm": float(self.voxel_mm),
            "templates": [t.to_dict() for t in self.templates],
            "foreground": None
            if fg is None
            else {
                "seed": int(fg.seed),
                "radius": float(fg.radius),
                "roughness": float(fg.roughness),
                "envelope": int(fg.envelope),
                "shift": [float(v) for v in fg.shift],
            },
            "scene": None if self.scene is None else self.scene.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LabelParams:
        """Inverse of :meth:`to_dict`."""
        fg = d.get("foreground")
        return cls(
            size=tuple(int(s) for s in d["size"]),
            voxel_mm=float(d["voxel_mm"]),
            templates=tuple(TemplatePlacement.from_dict(t) for t in d["templates"]),
            foreground=None
            if fg is None
            else Foreground(
                int(fg["seed"]),
                float(fg["radius"]),
                float(fg["roughness"]),
                int(fg["envelope"]),
                tuple(float(v) for v in fg.get("shift", (0.0, 0.0, 0.0))),
            ),
            scene=None if d.get("scene") is None else AffineParams.from_dict(d["scene"]),
        )


def _rand(generator: torch.Generator) -> float:
    return float(torch.rand(1, generator=generator, dtype=torch.float64))


def _between(generator: torch.Generator, rng: tuple[float, float]) -> float:
    return rng[0] + (rng[1] - rng[0]) * _rand(generator)


def sample_label_params(generator: torch.Generator, cfg: LabelConfig, n_bank: int) -> LabelParams:
    """Draw one scene's :class:`LabelParams`.

    Every template consumes the same random numbers whatever it turns out to be, so the draws do not
    shift when a probability changes. With a foreground, template centres are uniform inside the
    sphere's mean ellipsoid (templates may still reach outside it, where they are cut); without
    one, anywhere in the volume.

    Args:
        generator: CPU generator; the result depends only on its state, ``cfg`` and ``n_bank``.
        cfg: generator settings.
        n_bank: number of templates in the bank (0: procedural shapes only).
    """
    lo, hi = cfg.n_templates
    n = int(torch.randint(lo, hi + 1, (1,), generator=generator))
    fg_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    radius = _between(generator, cfg.foreground_radius)
    roughness = _between(generator, cfg.foreground_roughness)
    has_fg = _rand(generator) < cfg.p_foreground
    p_env_given_fg = min(1.0, cfg.p_envelope / cfg.p_foreground) if cfg.p_foreground > 0 else 0.0
    has_env = _rand(generator) < p_env_given_fg
    w_lo, w_hi = cfg.envelope_width
    width128 = int(torch.randint(w_lo, w_hi + 1, (1,), generator=generator))
    width = max(1, round(width128 * max(cfg.size) / 128)) if has_env else 0

    size = torch.tensor(cfg.size, dtype=torch.float64)
    templates = []
    for _ in range(n):
        procedural = n_bank <= 0 or _rand(generator) < cfg.procedural_fraction
        bank_index = int(torch.randint(0, max(n_bank, 1), (1,), generator=generator))
        pool_index = int(torch.randint(0, cfg.procedural_pool, (1,), generator=generator))
        size_mm = _between(generator, cfg.procedural_size) * cfg.fov_mm
        affine = sample_affine(generator, cfg.affine)
        u = torch.rand(3, generator=generator, dtype=torch.float64)
        if has_fg:
            # Uniform in the foreground's mean ellipsoid (the sphere is centred in the volume).
            r = float(u[0]) ** (1.0 / 3.0)
            cos_t, phi = 2.0 * float(u[1]) - 1.0, 2.0 * math.pi * float(u[2])
            sin_t = math.sqrt(max(0.0, 1.0 - cos_t * cos_t))
            d = torch.tensor([sin_t * math.cos(phi), sin_t * math.sin(phi), cos_t], dtype=torch.float64)
            c = (size - 1) / 2 + r * radius * size * d
        else:
            c = u * size - 0.5
        centre = tuple(c.tolist())
        if procedural:
            templates.append(TemplatePlacement("procedural", pool_index, affine, centre, size_mm))
        else:
            templates.append(TemplatePlacement("bank", bank_index, affine, centre))
    # Drawn after the templates (always the same count), so that a zero shift and zero scene
    # probabilities leave every other draw as it was.
    shift_u = torch.rand(3, generator=generator, dtype=torch.float64)
    shift = ((2.0 * shift_u - 1.0) * cfg.foreground_shift * size).tolist() if has_fg else [0.0, 0.0, 0.0]
    if has_fg and any(shift):
        templates = [dataclasses.replace(t, centre=tuple(c + d for c, d in zip(t.centre, shift))) for t in templates]
    return LabelParams(
        size=tuple(cfg.size),
        voxel_mm=cfg.voxel_mm,
        templates=tuple(templates),
        foreground=Foreground(fg_seed, radius, roughness, width, tuple(shift)) if has_fg else None,
        scene=sample_scene(generator, cfg),
    )


def sample_scene(generator: torch.Generator, cfg: LabelConfig) -> AffineParams | None:
    """The whole-scene transform: mirrored axes (with probability ``scene_flip``) and an affine (with
    probability ``scene_affine``) in one record, or ``None`` when neither is drawn.

    Always consumes the same random numbers.
    """
    flip_u, affine_u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    rng = AffineRange(
        scale=(1.0 - cfg.scene_scale, 1.0 + cfg.scene_scale),
        max_rotation_deg=cfg.scene_rotation_deg,
        shear=0.0,
        flip_prob=0.5,
    )
    drawn = sample_affine(generator, rng)
    flip = drawn.flip if flip_u < cfg.scene_flip else (False, False, False)
    if affine_u < cfg.scene_affine:
        scene = AffineParams(scale=drawn.scale, rotation=drawn.rotation, flip=flip)
    else:
        scene = AffineParams(flip=flip)
    return None if scene == AffineParams() else scene


# ----------------------------------------------------------------------------------------------------
# Rendering


def resample_matrix(n_in: int, n_out: int, sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n_out, n_in)`` matrix resampling one axis onto ``n_out`` voxels spanning the same extent.

    Each output voxel centre gets a Gaussian-weighted sum (``sigma`` in input voxels) of the input,
    as if the input continued with zeros outside; ``sigma <= 0.5`` gives linear interpolation.
    Applying one such matrix per axis blurs and upsamples a volume in one separable pass.
    """
    x = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5  # output centres, input units
    a = torch.arange(n_in, dtype=torch.float64)
    d = x[:, None] - a[None, :]
    if sigma <= 0.5:
        w = (1.0 - d.abs()).clamp_min(0.0)  # sums to 1 over the infinite grid
    else:
        w = torch.exp(-0.5 * (d / sigma) ** 2)
        r = int(math.ceil(6 * sigma)) + 1
        full = torch.arange(-r, n_in + r, dtype=torch.float64)
        z = torch.exp(-0.5 * ((x[:, None] - full[None, :]) / sigma) ** 2).sum(dim=1, keepdim=True)
        w = w / z
    return w.to(device=device, dtype=torch.float32)


def resample_separable(x: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, kz: torch.Tensor) -> torch.Tensor:
    """Apply one matrix per axis to ``(N, A, B, C)``: returns ``(N, X, Y, Z)`` (three matmuls)."""
    n, a = x.shape[:2]
    x = torch.matmul(x, kz.T)
    x = torch.matmul(ky, x)
    y, z = x.shape[2:]
    return torch.matmul(kx, x.reshape(n, a, y * z)).reshape(n, kx.shape[0], y, z)


def _bounds(occ: torch.Tensor, margin: float = 0.0) -> np.ndarray:
    """Occupied extent of each ``(N, R, R, R)`` bool cube in normalised coordinates: ``(N, 3, 2)``.

    ``margin`` widens it by that many cube voxels on each side. Empty cubes get ``nan``.
    """
    n, r = occ.shape[:2]
    idx = torch.arange(r, device=occ.device)
    rows = []
    for axis in (1, 2, 3):
        anyv = occ.any(dim=tuple(a for a in (1, 2, 3) if a != axis))
        first = torch.where(anyv, idx, r).amin(dim=1)
        last = torch.where(anyv, idx, -1).amax(dim=1)
        rows.append(torch.stack([first, last], dim=1))
    fl = torch.stack(rows, dim=1).cpu().numpy().astype(np.float64)
    out = np.stack([2.0 * (fl[..., 0] - margin) / r - 1.0, 2.0 * (fl[..., 1] + 1 + margin) / r - 1.0], axis=-1)
    out[(fl[..., 1] < fl[..., 0]).any(axis=1)] = np.nan
    return out


def _volume_thresholds(blurred: torch.Tensor, volumes: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Per cube, the level whose superlevel set has about ``volumes`` voxels, clamped to ``[lo, hi]``.

    Thresholding a blurred solid shape at 0.5 keeps its volume, but a thin sheet or tube blurs below
    0.5 and would vanish; its volume-preserving level is lower. Found on a 256-bin histogram.
    """
    n = blurred.shape[0]
    bins = 256
    idx = (blurred.reshape(n, -1).clamp(0, 1) * (bins - 1)).to(torch.int64)
    idx += torch.arange(n, device=idx.device)[:, None] * bins
    hist = torch.bincount(idx.view(-1), minlength=n * bins).view(n, bins)
    above = hist.flip(1).cumsum(1).flip(1)  # voxels with bin >= j
    # The level whose superlevel count is closest to the target volume (thin shapes change in whole
    # layers, so the count jumps; the nearest count is the best volume match).
    miss = (above.to(torch.float64) - volumes.to(torch.float64)[:, None]).abs()
    j = miss.argmin(dim=1)
    return (j.to(torch.float32) / (bins - 1)).clamp_(lo, hi)


def _prepare(
    cubes: torch.Tensor, res: int, smoothing: float, threshold: float, min_threshold: float
) -> tuple[torch.Tensor, np.ndarray]:
    """Resample ``(n, S, S, S)`` occupancy cubes to ``res`` with a Gaussian blur, threshold, bit-pack.

    ``smoothing`` is the blur sigma in output (``res``) voxels. The threshold keeps each shape's
    volume (see :func:`_volume_thresholds`), between ``min_threshold`` and ``threshold``.
    Returns the packed occupancy ``(n, ceil((res + 2)**3 / 8))`` uint8 of the cube padded by one
    empty voxel (bit ``k`` of byte ``i`` is voxel ``8 i + k`` of the flattened padded cube) and the
    bounds (see :func:`_bounds`).
    """
    n, s = cubes.shape[:2]
    x = cubes.to(torch.float32)
    k = resample_matrix(s, res, smoothing * s / res, cubes.device)
    blurred = resample_separable(x, k, k, k)
    volumes = x.sum(dim=(1, 2, 3)) * (res / s) ** 3
    occ = blurred > _volume_thresholds(blurred, volumes, min_threshold, threshold).view(n, 1, 1, 1)
    bounds = _bounds(occ)
    m = (res + 2) ** 3
    flat = torch.zeros((n, m + (-m) % 8), dtype=torch.uint8, device=cubes.device)
    flat[:, :m].view(n, res + 2, res + 2, res + 2)[:, 1:-1, 1:-1, 1:-1] = occ
    eight = flat.view(n, -1, 8)
    packed = eight[..., 0].clone()
    for b in range(1, 8):
        packed.bitwise_or_(eight[..., b].bitwise_left_shift(b))
    return packed, bounds


def prepare_settings(cfg: LabelConfig) -> dict[str, Any]:
    """The label settings a prepared template depends on (nothing else of ``cfg`` changes it)."""
    return {"max_resolution": int(cfg.max_resolution), "smoothing": float(cfg.smoothing),
            "threshold": float(cfg.threshold), "min_threshold": float(cfg.min_threshold)}


def prepare_bank(bank: Any, cfg: LabelConfig | None = None) -> Any:
    """Prepare every template of ``bank`` for the engine now (on the CPU) and attach the result.

    A bank saved afterwards carries its prepared templates, so an engine with the same
    :func:`prepare_settings` starts with a full cache: its first sample costs what its hundredth does.
    Prepared on the CPU, the templates are the same on every machine.
    """
    cfg = cfg or LabelConfig()
    ts = TemplateSet.from_bank(bank, cfg, "cpu")
    ts._cache.clear()  # prepare afresh, not from what the bank carries
    items = ts.get(list(range(len(bank))))
    bits = torch.stack([b for b, _ in items]).numpy() if items else np.zeros((0, 0), np.uint8)
    bounds = np.stack([r for _, r in items]) if items else np.zeros((0, 3, 2))
    bank.set_prepared(prepare_settings(cfg), bits, bounds)
    return bank


class TemplateSet:
    """Templates prepared for placement, each built once on first use and cached.

    A bank that carries prepared templates for the same settings (:func:`prepare_bank`) fills the
    cache at once.

    A template's cube is blurred (``cfg.smoothing``), upsampled to ``cfg.max_resolution`` per side,
    thresholded and bit-packed (about 36 kB per template at 64³).

    Args:
        make_cubes: returns the ``(n, 1, S, S, S)`` occupancy cubes of a list of template indices.
        count: number of templates.
        cfg: label settings (``smoothing``, ``threshold``, ``max_resolution``).
        device: where the prepared templates live.
        half_mm: half the longest side of each template in mm (bank templates), or ``None`` when the
            placements carry their size (procedural shapes).
    """

    def __init__(
        self,
        make_cubes: Callable[[list[int]], torch.Tensor],
        count: int,
        cfg: LabelConfig,
        device: torch.device | str = "cpu",
        half_mm: np.ndarray | None = None,
    ) -> None:
        self.make_cubes = make_cubes
        self.count = int(count)
        self.device = torch.device(device)
        self.half_mm = half_mm
        self.res = int(cfg.max_resolution)
        self.smoothing = float(cfg.smoothing)
        self.threshold = float(cfg.threshold)
        self.min_threshold = float(cfg.min_threshold)
        self._cache: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    @classmethod
    def from_cubes(
        cls, cubes: torch.Tensor, extents: torch.Tensor | np.ndarray, cfg: LabelConfig, device: torch.device | str = "cpu"
    ) -> TemplateSet:
        """Templates given as ``(N, 1, S, S, S)`` cubes (``ShapeBank.cubes``) with ``(N, 3)`` extents in mm."""
        ext = np.asarray(torch.as_tensor(extents, dtype=torch.float64).cpu())
        if ext.shape != (cubes.shape[0], 3):
            raise ValueError(f"extents must be ({cubes.shape[0]}, 3), got {ext.shape}")

        def make(idx: list[int]) -> torch.Tensor:
            return cubes[torch.tensor(idx, device=cubes.device)]

        return cls(make, cubes.shape[0], cfg, device, ext.max(axis=1) / 2.0)

    @classmethod
    def from_bank(cls, bank: Any, cfg: LabelConfig, device: torch.device | str = "cpu") -> TemplateSet:
        """Templates of a :class:`synthvox.shapes.ShapeBank`, cubed from their native-resolution masks
        straight at ``cfg.max_resolution`` (no detour through a coarser cube, so thin parts survive)."""
        from synthvox.shapes import template_to_cube

        res = int(cfg.max_resolution)

        def make(idx: list[int]) -> torch.Tensor:
            return torch.stack([template_to_cube(bank.get(i), res) for i in idx])[:, None]

        out = cls(make, len(bank), cfg, device, np.asarray(bank.extents_mm, np.float64).max(axis=1) / 2.0)
        prepared = getattr(bank, "prepared", None)
        if prepared is not None and prepared["settings"] == prepare_settings(cfg):
            bits = torch.from_numpy(prepared["bits"]).to(out.device)
            for i in range(len(bank)):
                out._cache[i] = (bits[i], prepared["bounds"][i])
        return out

    @classmethod
    def procedural(cls, cfg: LabelConfig, device: torch.device | str = "cpu", cube_size: int = 32) -> TemplateSet:
        """The pool of ``cfg.procedural_pool`` procedural shapes; shape ``k`` depends only on
        ``(cfg.procedural_seed, k)``, so the pool is the same however it is filled."""
        from synthvox.seeding import generator
        from synthvox.shapes.procedural import procedural_cubes

        def make(idx: list[int]) -> torch.Tensor:
            out = []
            for k in idx:
                out.append(procedural_cubes(1, cube_size, generator(cfg.procedural_seed, k), device))
            return torch.cat(out)

        return cls(make, cfg.procedural_pool, cfg, device, None)

    def __len__(self) -> int:
        return self.count

    def get(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, np.ndarray]]:
        """Packed bits and bounds of each template in ``indices``, preparing the missing ones."""
        missing = sorted({int(i) for i in indices if int(i) not in self._cache})
        if missing and (missing[0] < 0 or missing[-1] >= self.count):
            raise ValueError(f"template index out of range for a set of {self.count}")
        for start in range(0, len(missing), 64):
            chunk = missing[start : start + 64]
            sel = self.make_cubes(chunk)[:, 0].to(self.device)
            packed, bounds = _prepare(sel, self.res, self.smoothing, self.threshold, self.min_threshold)
            for j, i in enumerate(chunk):
                self._cache[i] = (packed[j], bounds[j])
        return [self._cache[int(i)] for i in indices]


@dataclass
class _Placed:
    sample: int
    rank: int
    data: torch.Tensor  # flattened padded occupancy, bit-packed
    bounds: np.ndarray
    res: int
    fwd: np.ndarray  # (3, 3): normalised cube coords -> output voxel offset from the centre
    centre: np.ndarray


def render_labels(
    params: LabelParams,
    cfg: LabelConfig,
    cubes: torch.Tensor | TemplateSet | None,
    extents: torch.Tensor | np.ndarray | None,
    device: torch.device | str = "cpu",
    *,
    procedural: TemplateSet | None = None,
    cube_size: int = 32,
) -> torch.Tensor:
    """Render one label map: a ``(X, Y, Z)`` int64 tensor with contiguous ids ``0..K-1`` (0 background).

    Args:
        params: the scene.
        cfg: rendering settings (``smoothing``, ``threshold``, ``max_resolution``, procedural pool).
        cubes: the bank's ``(N, 1, S, S, S)`` occupancy cubes, a :class:`TemplateSet` (faster for many
            scenes: templates are prepared once), or ``None`` (procedural shapes only).
        extents: the bank's ``(N, 3)`` template extents in mm (unused with a :class:`TemplateSet`).
        device: where to render.
        procedural: the procedural pool (made from ``cfg`` when ``None``).
        cube_size: cube side of the procedural shapes.
    """
    if cubes is not None and not isinstance(cubes, TemplateSet):
        if extents is None:
            raise ValueError("render_labels needs the bank's extents with its cubes")
        cubes = TemplateSet.from_cubes(cubes, extents, cfg, device)
    if procedural is None:
        procedural = TemplateSet.procedural(cfg, device, cube_size)
    return render_labels_batch([params], cfg, cubes, procedural, device)[0]


def render_labels_batch(
    params_list: Sequence[LabelParams],
    cfg: LabelConfig,
    bank: TemplateSet | None,
    procedural: TemplateSet,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Render several scenes of one size: ``(B, X, Y, Z)`` int64 (see :func:`render_labels`)."""
    device = torch.device(device)
    if not params_list:
        raise ValueError("render_labels_batch needs at least one scene")
    size = tuple(int(v) for v in params_list[0].size)
    if any(tuple(p.size) != size for p in params_list):
        raise ValueError("all scenes of a batch must have the same size")
    n_max = max(len(p.templates) for p in params_list) + 3
    dtype = torch.uint8 if n_max < 256 else torch.int16

    placed: list[_Placed] = []
    for b, p in enumerate(params_list):
        bank_idx = [t.index for t in p.templates if t.source == "bank"]
        if bank_idx and bank is None:
            raise ValueError("these label params use bank templates, but no bank was given")
        prepared = {
            "bank": iter(bank.get(bank_idx) if bank_idx else []),
            "procedural": iter(procedural.get([t.index for t in p.templates if t.source == "procedural"])),
        }
        for rank, t in enumerate(p.templates, start=1):
            packed, bounds = next(prepared[t.source])
            if t.source == "bank":
                half, res = float(bank.half_mm[t.index]), bank.res
            else:
                half, res = float(t.size_mm) / 2.0, procedural.res
            fwd = t.affine.matrix() * (half / p.voxel_mm)
            stretch = 2.0 * float(np.linalg.norm(fwd, ord=2))  # longest extent in output voxels
            cap = cfg.max_template_extent * max(size)
            if stretch > cap:
                fwd = fwd * (cap / stretch)
            if half > 0 and abs(np.linalg.det(fwd)) > 1e-9 and np.isfinite(bounds).all():
                placed.append(_Placed(b, rank, packed, bounds, res, fwd, np.asarray(t.centre, np.float64)))

    out = torch.zeros((len(params_list), *size), dtype=dtype, device=device)
    size_np = np.asarray(size)
    for pl in placed:
        _paint(out[pl.sample], pl, size_np)

    result = torch.empty((len(params_list), *size), dtype=torch.int64, device=device)
    for b, p in enumerate(params_list):
        n_t = len(p.templates)
        lab = out[b]
        if p.foreground is not None:
            fg, shell = _foreground(size, p.foreground, device)
            lab.masked_fill_(~fg, 0)
            lab.masked_fill_(fg & (lab == 0), n_t + 1)
            if shell is not None:
                lab.masked_fill_(shell, n_t + 2)
        if p.scene is not None:
            grid = sampling_grid(size, p.scene, device=device)
            lab = warp_labels(lab[None, None], grid)[0, 0]
        result[b] = _contiguous(lab, n_t + 3)
    return result


_CORNERS = np.array([[(c >> a) & 1 for a in range(3)] for c in range(8)])


def _paint(lab: torch.Tensor, pl: _Placed, size: np.ndarray) -> None:
    """``lab = max(lab, rank * occupancy)`` over the template's bounding box only."""
    res = pl.res
    corners = np.where(_CORNERS == 1, pl.bounds[:, 1], pl.bounds[:, 0])  # (8, 3)
    pts = corners @ pl.fwd.T + pl.centre
    lo = np.maximum(np.floor(pts.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(pts.max(axis=0)).astype(int) + 1, size)
    if (hi <= lo).any():
        return
    ext = [int(e) for e in hi - lo]
    # Padded cube index of output voxel p: j = (inv (p - centre) + 1) * res / 2 + 1, clamped into the
    # zero border [0, res + 1]; separable in p, so each component is a sum of three 1D ramps.
    inv = np.linalg.inv(pl.fwd) * (res / 2.0)
    base = inv @ (lo - pl.centre) + res / 2.0 + 1.0
    ramps = [torch.arange(e, dtype=torch.float32, device=lab.device) for e in ext]
    p = res + 2
    flat = None
    for c, mult in enumerate((p * p, p, 1)):
        ax = ramps[0] * float(inv[c, 0]) + float(base[c])
        ay = ramps[1] * float(inv[c, 1])
        az = ramps[2] * float(inv[c, 2])
        j = (ax.view(-1, 1, 1) + ay.view(1, -1, 1)) + az.view(1, 1, -1)
        j = torch.floor(j.clamp_(0.0, float(res + 1)))  # (in-place floor_ has a slow CPU path)
        flat = j.mul_(float(mult)) if flat is None else flat.add_(j, alpha=float(mult))
    fi = flat.to(torch.int32)
    byte = fi.bitwise_right_shift(3).view(-1)
    bit = fi.bitwise_and_(7).to(torch.uint8)
    vals = pl.data.index_select(0, byte).view(*ext).bitwise_right_shift_(bit).bitwise_and_(1)
    view = lab[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    torch.maximum(view, vals.mul_(pl.rank).to(lab.dtype), out=view)


def _foreground(
    size: tuple[int, int, int], fg: Foreground, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The deformed-sphere foreground mask (and its envelope shell, or ``None``) at ``size``.

    The sphere is drawn at half resolution, then blurred and upsampled in one separable pass into a
    smooth field ``f`` (Gaussian sigma ``w`` voxels, ``w`` the envelope half-width, else 1): the
    foreground is ``f > 0.5``; the envelope is the band ``|f - 0.5| < Phi(1) - 0.5``, i.e. within
    about ``w`` voxels of the surface on either side (as a dilation minus an erosion would be).
    """
    from synthvox.shapes.procedural import deformed_sphere

    half = tuple(max(1, (n + 1) // 2) for n in size)
    gen = torch.Generator().manual_seed(int(fg.seed))
    shift = [d * h / n for d, h, n in zip(fg.shift, half, size)]
    sphere = deformed_sphere(half, gen, device, radius_frac=fg.radius, roughness=fg.roughness, centre_shift=shift)
    sigma = float(fg.envelope) if fg.envelope > 0 else 1.0
    mats = [resample_matrix(h, n, sigma * h / n, device) for h, n in zip(half, size)]
    f = resample_separable(sphere.to(device=device, dtype=torch.float32)[None], *mats)[0]
    mask = f > 0.5
    shell = (f - 0.5).abs_() < 0.3413447 if fg.envelope > 0 else None
    return mask, shell


def _contiguous(lab: torch.Tensor, n_ids: int) -> torch.Tensor:
    """Map the ids present to ``0..K-1`` keeping their order; 0 stays 0."""
    idx = lab.reshape(-1).to(torch.int32)
    counts = torch.bincount(idx, minlength=n_ids)
    present = counts > 0
    present[0] = True
    lut = torch.cumsum(present.to(torch.int64), 0) - 1
    return lut.index_select(0, idx).view(lab.shape)
