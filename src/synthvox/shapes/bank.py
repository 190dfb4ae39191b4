"""The shape bank: binary templates of anatomical structures, cut from label maps.

Every label of every label map is split into connected components; each component large enough is
cropped to its bounding box and resampled, through the label map's affine, onto an isotropic grid of
a common spacing (oblique and anisotropic inputs are handled: the mask is resampled linearly and
thresholded at 0.5). The templates are stored bit-packed in one ``.npz`` file with their provenance.

The data engine reads templates through :meth:`ShapeBank.cubes` (each template centred and scaled
into a cube, for fast placement with ``grid_sample``) together with :attr:`ShapeBank.extents_mm`
(their physical size).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synthvox.errors import InputError
from synthvox.volume import Volume, resample_to_grid, spacing_of, to_canonical

FORMAT_NAME = "synthvox-shape-bank"
FORMAT_VERSION = 1
_KEYS = ("meta", "shapes", "spacings", "offsets", "bits", "provenance")

#: Defaults of :func:`build_bank` (and of ``synthvox shapes``).
DEFAULT_SPACING = 2.0
DEFAULT_MIN_VOXELS = 64
DEFAULT_MAX_EXTENT = 64
#: A "label map" with more distinct values than this is taken for an intensity image.
DEFAULT_MAX_LABELS = 1000


def _json_array(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, separators=(",", ":")).encode("utf-8"), dtype=np.uint8).copy()


def _json_from_array(arr: np.ndarray) -> Any:
    return json.loads(arr.astype(np.uint8).tobytes().decode("utf-8"))


class ShapeBank:
    """A collection of binary templates with a common nominal spacing.

    Templates are kept bit-packed in memory; :meth:`get` unpacks one. Templates whose extent exceeded
    ``max_extent`` at build time were resampled at a coarser spacing of their own
    (:attr:`template_spacings`), so :attr:`extents_mm` is always their true physical size.

    Attributes:
        spacing: the common isotropic spacing (mm) the templates were resampled to.
        provenance: one dict per template with at least ``source`` (file name), ``label`` (label id)
            and ``component`` (0 for the largest connected component of that label, 1 for the next...).
        meta: free-form build information (parameters), stored with the bank.
    """

    def __init__(
        self,
        packed: Sequence[np.ndarray],
        shapes: np.ndarray,
        spacing: float,
        provenance: Sequence[dict],
        template_spacings: np.ndarray | None = None,
        meta: dict | None = None,
    ) -> None:
        shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 3)
        n = len(shapes)
        if len(packed) != n or len(provenance) != n:
            raise ValueError(f"ShapeBank: {len(packed)} masks, {n} shapes and {len(provenance)} provenance records")
        if np.any(shapes < 1):
            raise ValueError("ShapeBank: every template needs a positive shape")
        for i, (p, s) in enumerate(zip(packed, shapes)):
            if p.dtype != np.uint8 or p.ndim != 1 or p.size != (int(np.prod(s)) + 7) // 8:
                raise ValueError(f"ShapeBank: packed mask {i} does not match its shape {tuple(s)}")
        self.spacing = float(spacing)
        self._packed = list(packed)
        self._shapes = shapes
        ts = np.full(n, self.spacing) if template_spacings is None else np.asarray(template_spacings, np.float64)
        if ts.shape != (n,) or np.any(ts <= 0):
            raise ValueError("ShapeBank: template_spacings must be positive, one per template")
        self.template_spacings = ts
        self.provenance = [dict(p) for p in provenance]
        self.meta = dict(meta or {})
        self._cube_cache: dict[tuple[int, str], torch.Tensor] = {}
        #: The data engine's prepared templates (see :func:`synthvox.synth.labels.prepare_bank`):
        #: ``{"settings": {...}, "bits": (N, B) uint8, "bounds": (N, 3, 2) float64}``, or ``None``.
        self.prepared: dict[str, Any] | None = None

    def set_prepared(self, settings: dict[str, Any], bits: np.ndarray, bounds: np.ndarray) -> None:
        """Attach the engine's prepared templates (one row of packed bits and bounds per template)."""
        bits = np.ascontiguousarray(bits, dtype=np.uint8)
        bounds = np.asarray(bounds, dtype=np.float64)
        if bits.ndim != 2 or len(bits) != len(self) or bounds.shape != (len(self), 3, 2):
            raise ValueError(f"prepared templates must be one per template ({len(self)}), got {bits.shape} and {bounds.shape}")
        self.prepared = {"settings": dict(settings), "bits": bits, "bounds": bounds}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_masks(
        cls,
        masks: Sequence[np.ndarray | torch.Tensor],
        spacing: float,
        provenance: Sequence[dict],
        template_spacings: Sequence[float] | None = None,
        meta: dict | None = None,
    ) -> ShapeBank:
        """Make a bank from boolean 3D masks (each cropped to its bounding box by this call)."""
        packed, shapes = [], []
        for i, m in enumerate(masks):
            a = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
            a = _crop_to_bbox(a.astype(bool))
            if a is None:
                raise ValueError(f"ShapeBank.from_masks: mask {i} is empty")
            packed.append(np.packbits(a.ravel()))
            shapes.append(a.shape)
        ts = None if template_spacings is None else np.asarray(template_spacings, np.float64)
        return cls(packed, np.asarray(shapes).reshape(-1, 3), spacing, provenance, ts, meta)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._packed)

    def __repr__(self) -> str:
        return f"ShapeBank({len(self)} templates, spacing={self.spacing:g} mm)"

    @property
    def shapes(self) -> np.ndarray:
        """``(N, 3)`` voxel shape of each template."""
        return self._shapes.copy()

    @property
    def extents_mm(self) -> np.ndarray:
        """``(N, 3)`` physical bounding-box size of each template in mm."""
        return self._shapes * self.template_spacings[:, None]

    def get(self, i: int) -> torch.Tensor:
        """Template ``i`` as a ``torch.bool`` tensor of shape ``(X, Y, Z)``, cropped to its bounding box."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"template index {i} out of range for a bank of {n}")
        shape = tuple(int(s) for s in self._shapes[i])
        bits = np.unpackbits(self._packed[i], count=int(np.prod(shape)))
        return torch.from_numpy(bits.astype(bool).reshape(shape))

    def voxel_counts(self) -> np.ndarray:
        """``(N,)`` number of foreground voxels of each template."""
        return np.array([int(np.unpackbits(p).sum()) for p in self._packed], dtype=np.int64)

    # ------------------------------------------------------------------ cubes for the engine
    def cubes(self, size: int = 32, device: torch.device | str = "cpu") -> torch.Tensor:
        """Every template centred in a cube, for placement with ``grid_sample``.

        Each template is scaled isotropically so its longest side fills the cube (aspect ratio kept)
        and centred. Downscaling averages over areas, so occupancy is fractional and thin structures
        are not lost; upscaling is trilinear. Cached per ``(size, device)``.

        Args:
            size: cube side ``S`` in voxels.
            device: where the result lives.

        Returns:
            ``(N, 1, S, S, S)`` float16 occupancy in ``[0, 1]``.
        """
        if size < 2:
            raise ValueError(f"cube size must be at least 2, got {size}")
        device = torch.device(device)
        key = (int(size), str(device))
        if key not in self._cube_cache:
            cpu_key = (int(size), "cpu")
            if cpu_key not in self._cube_cache:
                out = torch.zeros(len(self), 1, size, size, size, dtype=torch.float16)
                for i in range(len(self)):
                    out[i, 0] = template_to_cube(self.get(i), size).to(torch.float16)
                self._cube_cache[cpu_key] = out
            if key != cpu_key:
                self._cube_cache[key] = self._cube_cache[cpu_key].to(device)
        return self._cube_cache[key]

    # ------------------------------------------------------------------ combining
    def subset(self, indices: Sequence[int] | np.ndarray) -> ShapeBank:
        """A new bank holding the templates at ``indices`` (in that order)."""
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).ravel()]
        n = len(self)
        for i in idx:
            if not -n <= i < n:
                raise IndexError(f"template index {i} out of range for a bank of {n}")
        return ShapeBank(
            [self._packed[i] for i in idx],
            self._shapes[idx].reshape(-1, 3),
            self.spacing,
            [self.provenance[i] for i in idx],
            self.template_spacings[idx],
            self.meta,
        )

    @staticmethod
    def merge(banks: Sequence[ShapeBank]) -> ShapeBank:
        """Concatenate banks of the same spacing into one."""
        banks = list(banks)
        if not banks:
            raise ValueError("ShapeBank.merge needs at least one bank")
        spacings = {b.spacing for b in banks}
        if len(spacings) > 1:
            raise InputError(f"cannot merge shape banks of different spacings: {sorted(spacings)} mm")
        return ShapeBank(
            [p for b in banks for p in b._packed],
            np.concatenate([b._shapes for b in banks]).reshape(-1, 3),
            banks[0].spacing,
            [p for b in banks for p in b.provenance],
            np.concatenate([b.template_spacings for b in banks]),
            {"merged_from": [b.meta for b in banks]},
        )

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the bank to one compressed ``.npz`` file, atomically.

        The masks are bit-packed (``np.packbits``) and concatenated; provenance and metadata are JSON
        text stored as ``uint8`` arrays, so :meth:`load` never unpickles.

        Args:
            path: the output file; ``.npz`` is expected.
            force: overwrite an existing file.
        """
        from synthvox.files import atomic_path
        from synthvox.io import check_output

        p = check_output(path, force)
        sizes = np.array([q.size for q in self._packed], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        bits = np.concatenate(self._packed) if self._packed else np.zeros(0, np.uint8)
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "spacing": self.spacing,
            "count": len(self),
            "meta": self.meta,
        }
        arrays = {
            "meta": _json_array(meta),
            "shapes": self._shapes.astype(np.int32),
            "spacings": self.template_spacings.astype(np.float64),
            "offsets": offsets,
            "bits": bits.astype(np.uint8),
            "provenance": _json_array(self.provenance),
        }
        if self.prepared is not None:
            meta["prepared"] = self.prepared["settings"]
            arrays["meta"] = _json_array(meta)
            arrays["prepared_bits"] = self.prepared["bits"]
            arrays["prepared_bounds"] = self.prepared["bounds"]
        with atomic_path(p) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
            _chmod_like_new_file(tmp)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShapeBank:
        """Read a bank written by :meth:`save` (never unpickles).

        Raises:
            InputError: missing file or a file that is not a synthvox shape bank.
        """
        import zipfile

        p = Path(path)
        if not p.is_file():
            raise InputError(f"shape bank not found: {p}")
        if not zipfile.is_zipfile(p):
            raise InputError(f"not a synthvox shape bank (expected a .npz file written by 'synthvox shapes'): {p}")
        try:
            with np.load(p, allow_pickle=False) as z:
                missing = [k for k in _KEYS if k not in z.files]
                if missing:
                    raise InputError(f"not a synthvox shape bank (missing {', '.join(missing)}): {p}")
                arrays = {k: z[k] for k in _KEYS}
                for k in ("prepared_bits", "prepared_bounds"):
                    if k in z.files:
                        arrays[k] = z[k]
        except InputError:
            raise
        except Exception as exc:  # zipfile/ValueError/OSError for foreign or corrupt files
            raise InputError(f"cannot read shape bank {p}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        try:
            meta = _json_from_array(arrays["meta"])
            provenance = _json_from_array(arrays["provenance"])
        except (UnicodeDecodeError, ValueError):
            raise InputError(f"not a synthvox shape bank (unreadable metadata): {p}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise InputError(f"not a synthvox shape bank: {p}")
        version = meta.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InputError(f"shape bank {p} has an invalid format version {version!r}")
        if version > FORMAT_VERSION:
            raise InputError(f"shape bank {p} has format version {version}; this synthvox reads up to {FORMAT_VERSION}")
        spacing = meta.get("spacing")
        if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not (0 < spacing < float("inf")):
            raise InputError(f"shape bank {p} has an invalid spacing {spacing!r}")
        extra = meta.get("meta", {})
        if not isinstance(extra, dict) or not isinstance(provenance, list):
            raise InputError(f"not a synthvox shape bank (metadata of the wrong type): {p}")
        if any(arrays[k].dtype.kind not in "iu" for k in ("shapes", "offsets")) or arrays["bits"].dtype != np.uint8:
            raise InputError(f"shape bank {p} is corrupt (arrays of the wrong type)")
        shapes = arrays["shapes"].astype(np.int64).reshape(-1, 3)
        offsets = arrays["offsets"].astype(np.int64)
        bits = arrays["bits"]
        spacings = np.asarray(arrays["spacings"])
        n = len(shapes)
        if n and shapes.min() < 1:
            raise InputError(f"shape bank {p} is corrupt (empty template shapes)")
        expected = (np.prod(shapes, axis=1) + 7) // 8
        if (
            len(offsets) != n + 1
            or len(provenance) != n
            or not np.array_equal(np.diff(offsets), expected)
            or (n and offsets[-1] != bits.size)
            or spacings.dtype.kind != "f"
            or spacings.shape != (n,)
            or not (np.isfinite(spacings).all() and (spacings > 0).all())
        ):
            raise InputError(f"shape bank {p} is corrupt (sizes do not match)")
        packed = [bits[offsets[i] : offsets[i + 1]] for i in range(n)]
        bank = cls(packed, shapes, float(spacing), provenance, spacings, extra)
        settings = meta.get("prepared")
        if settings is not None:
            pb, pr = arrays.get("prepared_bits"), arrays.get("prepared_bounds")
            if not isinstance(settings, dict) or pb is None or pr is None or pb.dtype != np.uint8 \
                    or pr.dtype.kind != "f":
                raise InputError(f"shape bank {p} is corrupt (prepared templates of the wrong type)")
            try:
                bank.set_prepared(settings, pb, pr)
            except ValueError:
                raise InputError(f"shape bank {p} is corrupt (prepared templates do not match)") from None
        return bank


def _chmod_like_new_file(path: Path) -> None:
    """Give a temporary file (created 0600) the permissions a plain ``open`` would have given it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ---------------------------------------------------------------------------------------------------
# Building


def _crop_to_bbox(mask: np.ndarray) -> np.ndarray | None:
    """``mask`` cropped to the bounding box of its ``True`` voxels; ``None`` when empty."""
    if not mask.any():
        return None
    sl = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        nz = np.flatnonzero(mask.any(axis=other))
        sl.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return mask[tuple(sl)]


def template_to_cube(mask: torch.Tensor, size: int) -> torch.Tensor:
    """One template scaled isotropically so its longest side is ``size`` voxels, centred in a cube.

    Args:
        mask: ``(X, Y, Z)`` boolean or float occupancy.
        size: cube side.

    Returns:
        ``(size, size, size)`` float32 occupancy in ``[0, 1]``.
    """
    m = mask.to(torch.float32)[None, None]
    shape = np.asarray(m.shape[2:])
    scale = size / shape.max()
    target = tuple(int(t) for t in np.clip(np.round(shape * scale), 1, size))
    if scale < 1:
        # Adaptive average pooling is area interpolation: occupancy is conserved, thin parts survive.
        small = F.adaptive_avg_pool3d(m, target)
    elif scale > 1:
        small = F.interpolate(m, size=target, mode="trilinear", align_corners=False)
    else:
        small = m
    out = torch.zeros(size, size, size, dtype=torch.float32)
    lo = [(size - t) // 2 for t in target]
    out[lo[0] : lo[0] + target[0], lo[1] : lo[1] + target[1], lo[2] : lo[2] + target[2]] = small[0, 0].clamp(0, 1)
    return out


def _frame(affine: np.ndarray) -> np.ndarray:
    """The rotation closest to the affine's direction cosines (removes any shear)."""
    direction = affine[:3, :3] / spacing_of(affine)
    u, _, vt = np.linalg.svd(direction)
    r = u @ vt
    if np.linalg.det(r) < 0:  # keep a proper rotation; to_canonical makes this the usual case
        u[:, -1] *= -1
        r = u @ vt
    return r


def _check_label_volume(vol: Volume, source: str) -> np.ndarray:
    """Validate a label map and return it as an integer numpy array ``(X, Y, Z)``."""
    if vol.data.ndim != 4 or vol.data.shape[0] != 1:
        raise InputError(f"label map {source} must be a single 3D volume, got shape {tuple(vol.data.shape)}")
    if min(vol.shape) < 2:
        raise InputError(f"label map {source} must be a 3D volume, got shape {vol.shape}")
    data = vol.data[0]
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    if torch.is_floating_point(data):
        if not torch.isfinite(data).all():
            raise InputError(f"label map {source} contains NaN or infinite values")
        rounded = data.round()
        if not torch.allclose(data, rounded, atol=1e-3):
            raise InputError(f"{source} is not a label map (it has non-integer values)")
        data = rounded.to(torch.int64)
    arr = data.cpu().numpy()
    if arr.min() < 0:
        raise InputError(f"label map {source} has negative label ids")
    if not arr.any():
        raise InputError(f"label map {source} is empty (all voxels are 0)")
    return arr


def _compact_labels(arr: np.ndarray, source: str, max_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Label ids ``(K,)`` present (without 0) and an array whose values index them 1..K (0 = background)."""
    hi = int(arr.max())
    if hi <= 65535:
        present = np.flatnonzero(np.bincount(arr.ravel().astype(np.int64), minlength=hi + 1))
        ids = present[present > 0]
        if len(ids) > max_labels:
            raise InputError(f"{source} does not look like a label map: it has {len(ids)} distinct values (more than {max_labels})")
        lut = np.zeros(hi + 1, dtype=np.int32)
        lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
        return ids, lut[arr]
    ids, inverse = np.unique(arr, return_inverse=True)
    if len(ids) - int(ids[0] == 0) > max_labels:
        raise InputError(f"{source} does not look like a label map: it has {len(ids)} distinct values (more than {max_labels})")
    compact = inverse.reshape(arr.shape).astype(np.int32) + int(ids[0] != 0)
    return ids[ids > 0], compact


def templates_from_label_map(
    vol: Volume,
    source: str,
    spacing: float = DEFAULT_SPACING,
    min_voxels: int = DEFAULT_MIN_VOXELS,
    max_extent: int | None = DEFAULT_MAX_EXTENT,
    device: torch.device | str = "cpu",
    max_labels: int = DEFAULT_MAX_LABELS,
) -> tuple[list[np.ndarray], list[float], list[dict]]:
    """Cut one label map into templates (see :func:`build_bank`).

    Returns:
        ``(masks, template_spacings, provenance)``: cropped boolean masks on isotropic grids, the
        spacing of each (``spacing`` unless capped by ``max_extent``), and one provenance dict each.
    """
    from scipy import ndimage

    if not (0 < spacing < float("inf")):
        raise InputError(f"spacing must be a positive, finite number of mm, got {spacing}")
    if max_extent is not None and max_extent < 2:
        raise InputError(f"max extent must be at least 2 voxels, got {max_extent}")
    vol = to_canonical(vol)
    arr = _check_label_volume(vol, source)
    ids, compact = _compact_labels(arr, source, max_labels)
    del arr
    src_spacing = spacing_of(vol.affine)
    voxel_mm3 = float(np.abs(np.linalg.det(vol.affine[:3, :3])))
    frame = _frame(vol.affine)
    structure = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: thin oblique structures stay whole
    masks: list[np.ndarray] = []
    spacings: list[float] = []
    provenance: list[dict] = []
    for k, sl in enumerate(ndimage.find_objects(compact)):
        if sl is None:
            continue
        label_id = int(ids[k])
        crop = compact[sl] == k + 1
        comp, ncomp = ndimage.label(crop, structure=structure)
        counts = np.bincount(comp.ravel(), minlength=ncomp + 1)[1:]
        volumes = counts * voxel_mm3
        keep = np.flatnonzero(volumes >= min_voxels * spacing**3)
        keep = keep[np.argsort(-counts[keep], kind="stable")]
        comp_slices = ndimage.find_objects(comp)
        for rank, c in enumerate(keep):
            csl = comp_slices[c]
            sub = comp[csl] == c + 1
            start = np.array([s.start + t.start for s, t in zip(sl, csl)])
            mask, tsp = _resample_component(sub, vol.affine, start, frame, spacing, max_extent, device)
            if mask is None:
                continue
            masks.append(mask)
            spacings.append(tsp)
            provenance.append(
                {
                    "source": source,
                    "label": label_id,
                    "component": rank,
                    "volume_mm3": round(float(volumes[c]), 1),
                    "source_spacing": [round(float(s), 4) for s in src_spacing],
                }
            )
    return masks, spacings, provenance


def _resample_component(
    sub: np.ndarray,
    affine: np.ndarray,
    start: np.ndarray,
    frame: np.ndarray,
    spacing: float,
    max_extent: int | None,
    device: torch.device | str,
) -> tuple[np.ndarray | None, float]:
    """Resample one cropped binary component onto an isotropic grid aligned with ``frame``."""
    # The crop, padded by one voxel so the linear interpolation falls off to 0 at its border.
    padded = np.pad(sub, 1)
    shift = np.eye(4)
    shift[:3, 3] = start - 1
    crop_affine = affine @ shift
    # Physical box of the crop (voxel corners) in the template frame.
    n = np.asarray(padded.shape, np.float64)
    corners = np.stack(np.meshgrid(*[[-0.5, s - 0.5] for s in n], indexing="ij"), -1).reshape(-1, 3)
    world = corners @ crop_affine[:3, :3].T + crop_affine[:3, 3]
    local = world @ frame  # coordinates along the frame's axes
    lo, hi = local.min(0), local.max(0)
    extent = hi - lo
    tsp = float(spacing)
    if max_extent is not None:
        # The structure's own box (without the padding) decides the cap.
        inner = np.stack(np.meshgrid(*[[0.5, s + 0.5] for s in sub.shape], indexing="ij"), -1).reshape(-1, 3)
        inner_local = (inner @ crop_affine[:3, :3].T + crop_affine[:3, 3]) @ frame
        longest = float((inner_local.max(0) - inner_local.min(0)).max())
        if longest / tsp > max_extent - 1:
            tsp = longest / (max_extent - 1)
    shape = tuple(int(max(1, np.ceil(e / tsp))) for e in extent)
    out_affine = np.eye(4)
    out_affine[:3, :3] = frame * tsp
    # Grid centred on the box.
    centre_local = (lo + hi) / 2
    origin_local = centre_local - tsp * (np.asarray(shape) - 1) / 2
    out_affine[:3, 3] = frame @ origin_local
    src = Volume(torch.from_numpy(padded.astype(np.float32))[None].to(device), crop_affine)
    res = resample_to_grid(src, shape, out_affine, mode="linear")
    mask = _crop_to_bbox((res.data[0] > 0.5).cpu().numpy())
    if mask is None:
        return None, tsp
    if max_extent is not None and max(mask.shape) > max_extent:
        # Rare rounding overshoot: shrink by area averaging to fit exactly.
        factor = max_extent / max(mask.shape)
        target = tuple(max(1, int(np.floor(s * factor))) for s in mask.shape)
        small = F.adaptive_avg_pool3d(torch.from_numpy(mask.astype(np.float32))[None, None], target)[0, 0]
        new = _crop_to_bbox((small > 0.5).numpy())
        if new is None:
            return None, tsp
        tsp = tsp * max(mask.shape) / max(target)
        mask = new
    return mask, tsp


def build_bank(
    label_maps: Iterable[Volume],
    sources: Sequence[str],
    spacing: float = DEFAULT_SPACING,
    min_voxels: int = DEFAULT_MIN_VOXELS,
    max_extent: int | None = DEFAULT_MAX_EXTENT,
    *,
    device: torch.device | str = "cpu",
    max_labels: int = DEFAULT_MAX_LABELS,
    progress: Callable[[int, str, int], None] | None = None,
) -> ShapeBank:
    """Cut label maps into a shape bank.

    Each map is reoriented to canonical, every label is split into connected components
    (26-connectivity, ``scipy.ndimage.label``), and each component whose physical volume is at least
    ``min_voxels`` voxels of the target spacing is cropped to its bounding box and resampled through
    the affine onto an isotropic grid of ``spacing`` mm aligned with the map's (de-sheared) axes:
    the mask is resampled linearly and thresholded at 0.5. Only each label's bounding box is
    processed, so large maps with many labels are cheap.

    Args:
        label_maps: ``(1, X, Y, Z)`` integer volumes (an iterable, so maps can be loaded lazily).
        sources: a name for each map, recorded in the provenance.
        spacing: target isotropic spacing in mm.
        min_voxels: drop components smaller than this many voxels of ``spacing`` mm.
        max_extent: templates longer than this many voxels along any axis are resampled at a
            coarser spacing of their own so that they fit (``None`` keeps all at ``spacing``).
        device: where resampling runs.
        max_labels: reject maps with more distinct values than this (intensity images).
        progress: called as ``progress(index, source, templates_so_far)`` after each map.

    Returns:
        The bank, templates ordered by source, then label id, then component size (largest first).

    Raises:
        InputError: a map that is not a 3D label map or is empty, or bad parameters.
    """
    if min_voxels < 1:
        raise InputError(f"min voxels must be at least 1, got {min_voxels}")
    masks: list[np.ndarray] = []
    spacings: list[float] = []
    provenance: list[dict] = []
    count = 0
    for i, vol in enumerate(label_maps):
        if i >= len(sources):
            raise ValueError("build_bank: more label maps than sources")
        m, s, p = templates_from_label_map(vol, sources[i], spacing, min_voxels, max_extent, device, max_labels)
        masks += m
        spacings += s
        provenance += p
        count = i + 1
        if progress is not None:
            progress(i, sources[i], len(masks))
    if count != len(sources):
        raise ValueError(f"build_bank: {count} label maps for {len(sources)} sources")
    meta = {
        "spacing": float(spacing),
        "min_voxels": int(min_voxels),
        "max_extent": None if max_extent is None else int(max_extent),
        "connectivity": 26,
        "sources": list(sources),
    }
    return ShapeBank.from_masks(masks, spacing, provenance, spacings, meta)


def default_bank_path() -> Path:
    """Path of the shape bank shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "data" / "shapes_default.npz"


_DEFAULT_BANK: dict[tuple[str, int, int], ShapeBank] = {}


def load_default_bank() -> ShapeBank:
    """The shape bank shipped inside the package (see ``synthvox/data/BANK.md``), with the engine's
    prepared templates; read once per process (the same object is returned while the file is
    unchanged), as engines only read it."""
    path = default_bank_path()
    if not path.is_file():
        raise InputError(f"the default shape bank is missing from the installation: {path}")
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _DEFAULT_BANK:
        _DEFAULT_BANK.clear()
        _DEFAULT_BANK[key] = ShapeBank.load(path)
    return _DEFAULT_BANK[key]
