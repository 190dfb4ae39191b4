"""Procedural shapes, so the data engine runs with no shape bank at all.

Four kinds, each an implicit function ``g(p) > 0`` (``g`` approximately a signed distance, in the
shape's own normalised units) of points ``p`` in ``[-1, 1]^3``:

- **deformed spheres**: the radius is a smooth random function of direction (low-frequency noise
  sampled on the unit sphere, like a random low-order spherical-harmonic expansion);
- **ellipsoids**: random semi-axes, any orientation;
- **tubes**: a smooth random 3D curve (a random Fourier series), sometimes with a branch,
  thickened with a smoothly varying radius;
- **blobs**: thresholded smooth noise under a soft spherical window (one or several lumps).

:func:`procedural_cubes` returns them in the same format as :meth:`synthvox.shapes.ShapeBank.cubes`:
each shape centred in an ``S^3`` cube, scaled so its longest side fills it, as fractional occupancy
(a one-voxel soft edge), ``float16``. Everything is vectorised torch and deterministic given the
``torch.Generator``: random numbers are drawn on the generator's device and then moved, so a CPU
generator gives the same shapes on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

KINDS: tuple[str, ...] = ("deformed_sphere", "ellipsoid", "tube", "blob")

#: (bandwidth, weight) of the noise that perturbs a sphere's log-radius over directions.
_SPHERE_OCTAVES = ((1.5, 1.0), (3.0, 0.5))

Field = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# random numbers and smooth noise


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device=device, dtype=torch.float32)


def _randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device=device, dtype=torch.float32)


def _uniform(shape: tuple[int, ...], lo: float, hi: float, generator: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * _rand(shape, generator, device)


class FourierNoise:
    """Smooth random functions of 3D points: sums of random plane waves (random Fourier features).

    ``f(p) = sum_k a_k cos(w_k . p + phi_k)`` with Gaussian frequencies ``w_k`` (standard deviation
    ``bandwidth`` per octave), uniform phases and amplitudes giving unit variance. It can be evaluated
    at any points, costs ``O(points x waves)``, and has no lattice artefacts; on the unit sphere it
    behaves like a random low-order spherical-harmonic expansion.

    Args:
        n: number of independent functions (one per sample).
        octaves: ``(bandwidth, weight)`` pairs.
        waves: plane waves per octave.
        generator: source of randomness.
        device: where evaluation happens.
    """

    def __init__(
        self,
        n: int,
        octaves: tuple[tuple[float, float], ...],
        generator: torch.Generator,
        device: torch.device | str,
        waves: int = 16,
    ) -> None:
        omegas, phases, amps = [], [], []
        total = math.sqrt(sum(w * w for _, w in octaves))
        for bandwidth, weight in octaves:
            omegas.append(_randn((n, 3, waves), generator, device) * bandwidth)
            phases.append(_uniform((n, 1, waves), 0, 2 * math.pi, generator, device))
            amps.append(torch.full((waves,), weight / total * math.sqrt(2 / waves), device=device))
        self.omega = torch.cat(omegas, 2)  # (n, 3, K)
        self.phase = torch.cat(phases, 2)  # (n, 1, K)
        self.amp = torch.cat(amps)  # (K,)

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        """Evaluate at points ``(n, P, 3)``; returns ``(n, P)``."""
        n, count, _ = p.shape
        k = self.omega.shape[2]
        chunk = max(1024, (1 << 22) // max(1, n * k))  # bound the (n, chunk, K) intermediate
        out = []
        for start in range(0, count, chunk):
            waves = torch.cos(torch.baddbmm(self.phase, p[:, start : start + chunk], self.omega))
            out.append(waves @ self.amp)
        return torch.cat(out, 1)

    def lattice(self, size: int, radial: bool = False) -> torch.Tensor:
        """Tabulate on a ``size^3`` lattice over ``[-1, 1]^3`` for fast lookups with :func:`sample_lattice`.

        With ``radial``, each node holds the value at its direction (the node scaled to unit length).
        """
        axis = torch.linspace(-1, 1, size, device=self.omega.device)
        pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(1, -1, 3)
        if radial:
            pts = pts / pts.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        n = self.omega.shape[0]
        return self(pts.expand(n, -1, -1)).reshape(n, 1, size, size, size)


def sample_lattice(table: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Trilinear lookup of ``(n, 1, L, L, L)`` tables (over ``[-1, 1]^3``) at points ``(n, P, 3)``; ``(n, P)``."""
    grid = p.flip(-1)[:, :, None, None, :]  # grid_sample wants (W, H, D) order for (D, H, W) data
    out = F.grid_sample(table, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[:, 0, :, 0, 0]


def _random_rotations(n: int, generator: torch.Generator, device) -> torch.Tensor:
    """Uniformly random rotation matrices ``(n, 3, 3)`` (from normalised Gaussian quaternions)."""
    q = _randn((n, 4), generator, device)
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-8)
    w, x, y, z = q.unbind(1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        1,
    )


# ---------------------------------------------------------------------------------------------------
# implicit fields of each kind: draw parameters, return g(p) for points p of shape (n, P, 3)


def _deformed_sphere_field(
    n: int, generator: torch.Generator, device, roughness: tuple[float, float] = (0.1, 0.45)
) -> Field:
    noise = FourierNoise(n, _SPHERE_OCTAVES, generator, device).lattice(20, radial=True)
    rough = _uniform((n, 1), *roughness, generator, device)
    stretch = _uniform((n, 1, 3), 0.8, 1.0, generator, device)  # a mild overall anisotropy
    r0 = 0.5

    def g(p: torch.Tensor) -> torch.Tensor:
        q = p / stretch
        norm = q.norm(dim=-1)
        direction = q / norm.clamp_min(1e-6)[..., None]
        radius = r0 * torch.exp(rough * sample_lattice(noise, 0.8 * direction))
        return radius.clamp(max=0.95) - norm

    return g


def _ellipsoid_field(n: int, generator: torch.Generator, device) -> Field:
    axes = _uniform((n, 1, 3), 0.2, 0.95, generator, device)
    rot = _random_rotations(n, generator, device)

    def g(p: torch.Tensor) -> torch.Tensor:
        local = p @ rot  # rot^T p for each point
        return (1 - (local / axes).norm(dim=-1)) * axes.amin(dim=-1)

    return g


def _curve_points(n: int, m: int, generator: torch.Generator, device) -> torch.Tensor:
    """Smooth random curves ``(n, m, 3)``: a random Fourier series with decaying amplitudes."""
    t = torch.linspace(0, 1, m, device=device)
    harmonics = torch.arange(1, 4, device=device, dtype=torch.float32)  # 1, 2, 3
    amp = _randn((n, 3, 3), generator, device) * (0.6 / harmonics**1.5)[None, :, None]  # (n, k, xyz)
    phase = _uniform((n, 3, 3), 0, 2 * math.pi, generator, device)
    line = _randn((n, 1, 3), generator, device) * 0.5  # a straight component: tubes tend to run somewhere
    arg = math.pi * harmonics[None, None, :, None] * t[None, :, None, None] + phase[:, None]
    curve = (amp[:, None] * torch.sin(arg)).sum(2) + line * (t[None, :, None] - 0.5) * 2
    return curve - curve.mean(dim=1, keepdim=True)


def _tube_field(n: int, generator: torch.Generator, device, m: int = 64) -> Field:
    main = _curve_points(n, m, generator, device)
    branch = _curve_points(n, m // 2, generator, device) * 0.6
    where = (_uniform((n,), 0.2, 0.8, generator, device) * (m - 1)).long()
    has_branch = _rand((n,), generator, device) < 0.5
    anchor = main[torch.arange(n, device=device), where][:, None]
    branch = branch - branch[:, :1] + anchor  # the branch starts on the main curve
    radius0 = _uniform((n, 1), 0.1, 0.3, generator, device)
    wobble = _uniform((n, 1), 0.0, 0.4, generator, device)
    freq = _uniform((n, 1), 1.0, 4.0, generator, device)
    t_main = torch.linspace(0, 1, m, device=device)[None]
    t_branch = torch.linspace(0, 1, m // 2, device=device)[None]
    r_main = radius0 * (1 + wobble * torch.sin(2 * math.pi * freq * t_main))
    r_branch = 0.7 * radius0 * (1 - 0.5 * t_branch) * has_branch[:, None]  # zero radius: no branch
    points = torch.cat([main, branch], 1)
    radii = torch.cat([r_main, r_branch.expand(n, -1)], 1)
    valid = torch.cat([torch.ones_like(r_main, dtype=torch.bool), has_branch[:, None].expand(n, m // 2)], 1)

    def g(p: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(p.shape[0]):  # one sample at a time keeps memory at P x M
            d = torch.cdist(p[i], points[i][valid[i]])
            out.append((radii[i][valid[i]][None] - d).amax(dim=1))
        return torch.stack(out)

    # The union of balls has an exact bounding box: no probing needed.
    big = torch.where(valid, radii, torch.zeros_like(radii))[..., None]
    far = torch.where(valid[..., None], points, points[:, :1])
    g.bbox = ((far - big).amin(dim=1), (far + big).amax(dim=1))  # type: ignore[attr-defined]
    return g


def _blob_field(n: int, generator: torch.Generator, device) -> Field:
    bumps = float(_uniform((1,), 1.2, 3.0, generator, "cpu").item())
    noise = FourierNoise(n, ((bumps, 1.0), (2 * bumps, 0.25)), generator, device).lattice(32)
    falloff = _uniform((n, 1), 0.0, 0.8, generator, device)
    fraction = _uniform((n,), 0.08, 0.3, generator, device)

    def raw(p: torch.Tensor) -> torch.Tensor:
        r2 = (p**2).sum(-1)
        # A soft window keeps the blob off the domain's edges (no flat cuts).
        return sample_lattice(noise, p) - 2 * falloff * r2 - 40 * (r2.sqrt() - 0.8).clamp_min(0) ** 2

    # Threshold so that the blob fills the drawn fraction of a calibration grid.
    cal = _cube_points(24, n, device, lo=-1.0, hi=1.0)
    values = raw(cal)
    k = ((1 - fraction) * (values.shape[1] - 1)).long().clamp(0, values.shape[1] - 1)
    sorted_values = values.sort(dim=1).values
    threshold = sorted_values.gather(1, k[:, None])

    def g(p: torch.Tensor) -> torch.Tensor:
        return (raw(p) - threshold) * 0.25  # roughly a distance: noise changes by ~4 per unit

    return g


_FIELDS: dict[str, Callable[..., Field]] = {
    "deformed_sphere": _deformed_sphere_field,
    "ellipsoid": _ellipsoid_field,
    "tube": _tube_field,
    "blob": _blob_field,
}


# ---------------------------------------------------------------------------------------------------
# fitting a field into the cube format


def _cube_points(size: int, n: int, device, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """Voxel-centre coordinates of a ``size^3`` cube spanning ``[lo, hi]``, ``(n, size^3, 3)``."""
    step = (hi - lo) / size
    axis = lo + step * (torch.arange(size, device=device, dtype=torch.float32) + 0.5)
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(1, -1, 3)
    return pts.expand(n, -1, -1)


def _probe_bbox(g: Field, n: int, probe: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding boxes ``(n, 3)`` of ``g > 0`` found on a ``probe^3`` grid over ``[-1, 1]^3``."""
    step = 2.0 / probe
    inside = (g(_cube_points(probe, n, device)) > 0).reshape(n, probe, probe, probe)
    axis = -1 + step * (torch.arange(probe, device=device, dtype=torch.float32) + 0.5)
    lo, hi = [], []
    for dim in range(3):
        other = tuple(d for d in (1, 2, 3) if d != dim + 1)
        occupied = inside.any(dim=other)  # (n, probe)
        first = occupied.float().argmax(dim=1)
        last = probe - 1 - occupied.flip(1).float().argmax(dim=1)
        lo.append(axis[first] - step / 2)
        hi.append(axis[last] + step / 2)
    lo_t, hi_t = torch.stack(lo, 1), torch.stack(hi, 1)
    empty = ~inside.flatten(1).any(dim=1)
    lo_t[empty], hi_t[empty] = -1.0, 1.0
    return lo_t, hi_t


def _fit_to_cubes(g: Field, n: int, size: int, device) -> torch.Tensor:
    """Evaluate ``g`` so that each shape's bounding box is centred and its longest side fills the cube."""
    if hasattr(g, "bbox"):
        lo_t, hi_t = g.bbox
    else:
        lo_t, hi_t = _probe_bbox(g, n, max(size, 32), device)
    centre = (lo_t + hi_t) / 2
    side = (hi_t - lo_t).amax(dim=1)  # (n,)
    unit = _cube_points(size, n, device, lo=-0.5, hi=0.5)
    pts = centre[:, None] + unit * side[:, None, None]
    voxel = side / size
    occupancy = (0.5 + g(pts) / voxel[:, None]).clamp(0, 1)
    return occupancy.reshape(n, 1, size, size, size).to(torch.float16)


def _kind_cubes(kind: str, n: int, size: int, generator: torch.Generator, device) -> torch.Tensor:
    device = torch.device(device)
    if n == 0:
        return torch.zeros(0, 1, size, size, size, dtype=torch.float16, device=device)
    return _fit_to_cubes(_FIELDS[kind](n, generator, device), n, size, device)


def deformed_spheres(n: int, size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` deformed spheres as ``(n, 1, S, S, S)`` float16 cubes (the format of ``ShapeBank.cubes``)."""
    return _kind_cubes("deformed_sphere", n, size, generator, device)


def ellipsoids(n: int, size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` randomly oriented ellipsoids as ``(n, 1, S, S, S)`` float16 cubes."""
    return _kind_cubes("ellipsoid", n, size, generator, device)


def tubes(n: int, size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` tubes (smooth random curves, some branched, thickened) as ``(n, 1, S, S, S)`` float16 cubes."""
    return _kind_cubes("tube", n, size, generator, device)


def blobs(n: int, size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` blobs (thresholded smooth noise) as ``(n, 1, S, S, S)`` float16 cubes."""
    return _kind_cubes("blob", n, size, generator, device)


def procedural_cubes(
    n: int, size: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A random mix of all procedural kinds, in the format of :meth:`ShapeBank.cubes`.

    Args:
        n: number of shapes.
        size: cube side ``S``.
        generator: the only source of randomness; the same generator state gives the same shapes.
        device: where the shapes are computed and returned.

    Returns:
        ``(n, 1, S, S, S)`` float16 occupancy in ``[0, 1]``, each shape centred with its longest side
        filling the cube.
    """
    device = torch.device(device)
    kinds = torch.randint(0, len(KINDS), (n,), generator=generator, device=generator.device).to(device)
    out = torch.zeros(n, 1, size, size, size, dtype=torch.float16, device=device)
    for k, kind in enumerate(KINDS):
        idx = (kinds == k).nonzero().flatten()
        if idx.numel():
            out[idx] = _kind_cubes(kind, int(idx.numel()), size, generator, device)
    return out


def deformed_sphere(
    shape: tuple[int, int, int],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    radius_frac: float = 0.4,
    roughness: float = 0.25,
    centre_shift: Sequence[float] = (0.0, 0.0, 0.0),
) -> torch.Tensor:
    """A large deformed sphere filling a volume, e.g. as the foreground of a label map.

    The sphere is centred in the volume (moved by ``centre_shift`` voxels) with a mean radius of ``radius_frac`` times the volume's size
    along each axis (so it is an ellipsoid in voxels for a non-cubic volume), and its log-radius is
    perturbed by smooth noise on the unit sphere with standard deviation ``roughness``. The radius is
    capped at the volume's half-size.

    Args:
        shape: ``(X, Y, Z)`` of the volume.
        generator: source of randomness.
        device: where the mask is computed.
        radius_frac: mean radius as a fraction of the volume's size along each axis.
        roughness: standard deviation of the log-radius perturbation (0: an exact sphere/ellipsoid).
        centre_shift: offset of the centre from the volume's centre, in voxels per axis (the sphere
            may then reach outside the volume, where it is cut).

    Returns:
        ``(X, Y, Z)`` boolean mask.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"deformed_sphere needs a 3D shape, got {shape}")
    if radius_frac <= 0:
        raise ValueError(f"radius_frac must be positive, got {radius_frac}")
    device = torch.device(device)
    noise = FourierNoise(1, _SPHERE_OCTAVES, generator, device)
    centre = [(s - 1) / 2 + float(d) for s, d in zip(shape, centre_shift)]
    # The radius is a smooth function of direction: evaluate it on a lattice 4x coarser than the volume
    # and upsample (trilinear, same corners); near the centre, where directions turn fast, every voxel is
    # well inside anyway.
    coarse = [max(2, min(s, -(-s // 4) + 1)) for s in shape]
    lattice = [
        torch.linspace(-c0, s - 1 - c0, c, device=device) / (s * radius_frac) for c0, c, s in zip(centre, coarse, shape)
    ]
    q = torch.stack(torch.meshgrid(*lattice, indexing="ij"), -1).reshape(1, -1, 3)
    direction = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    log_radius = (roughness * noise(direction)).reshape(1, 1, *coarse)
    radius = F.interpolate(log_radius, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].exp()
    radius = radius.clamp(max=0.5 / radius_frac)
    x, y, z = [(torch.arange(s, device=device, dtype=torch.float32) - c0) / (s * radius_frac) for s, c0 in zip(shape, centre)]
    norm2 = x[:, None, None] ** 2 + y[None, :, None] ** 2 + z[None, None, :] ** 2  # in units of the mean radius
    return norm2 <= radius**2
