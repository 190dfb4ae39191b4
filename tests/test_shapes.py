"""Shape bank (build, files, cubes) and procedural shapes."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_affine, require_shared

from synthvox.errors import InputError
from synthvox.shapes import ShapeBank, build_bank, default_bank_path, load_default_bank
from synthvox.shapes import procedural as P
from synthvox.shapes.bank import template_to_cube
from synthvox.volume import Volume, spacing_of


def ellipsoid(shape, centre, semi):
    grids = torch.meshgrid(*[torch.arange(float(s)) for s in shape], indexing="ij")
    return sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, semi)) < 1


# Map A (40x36x24, 1 x 1.2 x 2 mm, oblique, one axis flipped): label 3 twice, label 7 once, a label-9 speck.
A_SHAPE = (40, 36, 24)
A_AFFINE = make_affine(spacing=(1.0, 1.2, 2.0), angles=(0.3, -0.2, 0.5), flips=(-1, 1, 1))
A_PARTS = [  # (label, centre, semi-axes in voxels)
    (3, (11, 10, 7), (9, 6, 4)),
    (3, (30, 27, 17), (5, 4, 3)),
    (7, (30, 10, 12), (6, 8, 4)),
]
# Map B (24x32x28, 2 x 1 x 1.5 mm, another obliquity): label 1 once.
B_SHAPE = (24, 32, 28)
B_AFFINE = make_affine(spacing=(2.0, 1.0, 1.5), angles=(-0.4, 0.25, 1.1), origin=(3.0, -7.0, 40.0))
B_PARTS = [(1, (12, 15, 13), (7, 10, 6))]


def label_map(shape, parts, speck=False) -> torch.Tensor:
    lab = torch.zeros(shape, dtype=torch.int64)
    for label, centre, semi in parts:
        lab[ellipsoid(shape, centre, semi)] = label
    if speck:
        lab[1:3, 33:35, 21] = 9  # 4 voxels, ~10 mm^3: below the size threshold
    return lab[None]


def canonical_extent(affine, shape, centre, semi) -> np.ndarray:
    """Physical size of a rendered ellipsoid's voxel box, in the order of the canonical axes."""
    mask = ellipsoid(shape, centre, semi)
    counts = [int(mask.any(dim=tuple(d for d in range(3) if d != ax)).sum()) for ax in range(3)]
    size = np.asarray(counts) * spacing_of(affine)
    ornt = nib.orientations.io_orientation(affine)
    out = np.zeros(3)
    for i, (j, _) in enumerate(ornt):
        out[int(j)] = size[i]
    return out


@pytest.fixture(scope="module")
def bank() -> ShapeBank:
    maps = [Volume(label_map(A_SHAPE, A_PARTS, speck=True), A_AFFINE), Volume(label_map(B_SHAPE, B_PARTS), B_AFFINE)]
    return build_bank(maps, ["a.nii.gz", "b.nii.gz"], spacing=1.5, min_voxels=8, max_extent=None)


# ----------------------------------------------------------------------------------------------- build


def test_build_counts_and_provenance(bank):
    assert len(bank) == 4  # the speck of label 9 is dropped
    got = [(p["source"], p["label"], p["component"]) for p in bank.provenance]
    assert got == [("a.nii.gz", 3, 0), ("a.nii.gz", 3, 1), ("a.nii.gz", 7, 0), ("b.nii.gz", 1, 0)]
    assert bank.spacing == 1.5
    for i in range(len(bank)):
        t = bank.get(i)
        assert t.dtype == torch.bool and t.ndim == 3
        # cropped to the bounding box: every face touches the shape
        for ax in range(3):
            assert t.select(ax, 0).any() and t.select(ax, t.shape[ax] - 1).any()


def test_build_physical_extents_and_volume(bank):
    expected = [(A_AFFINE, A_SHAPE, *part[1:]) for part in A_PARTS] + [(B_AFFINE, B_SHAPE, *B_PARTS[0][1:])]
    for i, (affine, shape, centre, semi) in enumerate(expected):
        want = canonical_extent(affine, shape, centre, semi)
        assert len(set(np.round(want, 3))) == 3  # distinct sizes: a wrong axis order would fail
        assert np.all(np.abs(bank.extents_mm[i] - want) <= bank.spacing + 1e-6), (i, bank.extents_mm[i], want)
        # volume is kept: template voxels x spacing^3 vs the ellipsoid's volume
        true_volume = 4 / 3 * np.pi * np.prod(np.asarray(semi) * spacing_of(affine))
        got_volume = bank.get(i).sum().item() * bank.spacing**3
        assert abs(got_volume / true_volume - 1) < 0.15


def test_build_is_orientation_independent():
    """The same physical ellipsoid in an axis-aligned 1 mm grid and in an oblique anisotropic one."""
    iso = Volume(label_map((40, 40, 40), [(2, (20, 20, 20), (12, 8, 5))]), np.eye(4))
    # Oblique grid whose voxel axes are the iso grid's axes rotated; ellipsoid semi-axes given in its voxels.
    aff = make_affine(spacing=(1.5, 1.0, 2.5), angles=(0.35, 0.1, -0.6))
    obl = Volume(label_map((24, 24, 20), [(2, (12, 12, 10), (8, 8, 2))]), aff)
    b = build_bank([iso, obl], ["iso", "obl"], spacing=1.0, min_voxels=8, max_extent=None)
    for i, vol in enumerate([iso, obl]):
        source_mm3 = (vol.data > 0).sum().item() * abs(np.linalg.det(vol.affine[:3, :3]))
        assert abs(b.get(i).sum().item() * b.spacing**3 / source_mm3 - 1) < 0.1
    want = canonical_extent(aff, (24, 24, 20), (12, 12, 10), (8, 8, 2))
    assert np.all(np.abs(b.extents_mm[1] - want) <= b.spacing + 1e-6)


def test_build_caps_extent_and_keeps_physical_size():
    vol = Volume(label_map((60, 20, 20), [(5, (30, 10, 10), (28, 6, 6))]), np.diag([2.0, 2.0, 2.0, 1.0]))
    b = build_bank([vol], ["long"], spacing=1.0, min_voxels=8, max_extent=32)
    assert max(b.get(0).shape) <= 32
    assert b.template_spacings[0] > 1.0
    np.testing.assert_allclose(b.extents_mm[0][0], 112.0, atol=b.template_spacings[0] + 2.0)


def test_build_large_label_ids_and_bool_input():
    lab = label_map((20, 20, 20), [(70000, (10, 10, 10), (6, 5, 4))])
    b = build_bank([Volume(lab, np.eye(4))], ["big-id"], spacing=1.0, min_voxels=8)
    assert [p["label"] for p in b.provenance] == [70000]
    b2 = build_bank([Volume(lab > 0, np.eye(4))], ["bool"], spacing=1.0, min_voxels=8)
    assert torch.equal(b.get(0), b2.get(0))


@pytest.mark.parametrize(
    "data, message",
    [
        (torch.rand(1, 16, 16, 16) * 3, "non-integer"),
        (torch.zeros(1, 16, 16, 16, dtype=torch.int64), "empty"),
        (torch.ones(2, 16, 16, 16, dtype=torch.int64), "single 3D volume"),
        (torch.arange(16 * 16 * 16).reshape(1, 16, 16, 16), "distinct values"),
        (-torch.ones(1, 16, 16, 16, dtype=torch.int64), "negative"),
    ],
)
def test_build_rejects_bad_label_maps(data, message):
    with pytest.raises(InputError, match=message):
        build_bank([Volume(data, np.eye(4))], ["bad"], spacing=2.0, min_voxels=1)


# ----------------------------------------------------------------------------------------------- files


def test_save_load_round_trip_is_bit_exact(bank, tmp_path):
    path = bank.save(tmp_path / "bank.npz")
    loaded = ShapeBank.load(path)
    assert len(loaded) == len(bank) and loaded.spacing == bank.spacing
    assert loaded.provenance == bank.provenance
    np.testing.assert_array_equal(loaded.template_spacings, bank.template_spacings)
    np.testing.assert_array_equal(loaded.extents_mm, bank.extents_mm)
    for i in range(len(bank)):
        assert torch.equal(loaded.get(i), bank.get(i))
    with pytest.raises(InputError, match="exists"):
        bank.save(path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # permissions of a plain new file, not mkstemp's 0600


def test_load_rejects_foreign_and_pickled_files(tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.arange(3))
    with pytest.raises(InputError, match="not a synthvox shape bank"):
        ShapeBank.load(foreign)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{k: np.array([{"a": 1}], dtype=object) for k in ("meta", "shapes", "spacings", "offsets", "bits", "provenance")})
    with pytest.raises(InputError, match="cannot read shape bank"):
        ShapeBank.load(pickled)
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(InputError):
        ShapeBank.load(text)
    with pytest.raises(InputError, match="not found"):
        ShapeBank.load(tmp_path / "missing.npz")


def test_load_rejects_truncated_bits(bank, tmp_path):
    path = bank.save(tmp_path / "bank.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["bits"] = arrays["bits"][:-5]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(InputError, match="corrupt"):
        ShapeBank.load(bad)


def test_subset_and_merge(bank):
    sub = bank.subset([3, 0])
    assert len(sub) == 2 and sub.provenance == [bank.provenance[3], bank.provenance[0]]
    assert torch.equal(sub.get(0), bank.get(3))
    merged = ShapeBank.merge([bank, sub])
    assert len(merged) == 6 and torch.equal(merged.get(5), bank.get(0))
    np.testing.assert_array_equal(merged.extents_mm[4:], sub.extents_mm)
    other = ShapeBank.from_masks([np.ones((3, 3, 3), bool)], 2.0, [{"source": "x", "label": 1, "component": 0}])
    with pytest.raises(InputError, match="different spacings"):
        ShapeBank.merge([bank, other])


# ----------------------------------------------------------------------------------------------- cubes


def test_cubes_shape_centring_and_aspect(bank):
    size = 24
    cubes = bank.cubes(size)
    assert cubes.shape == (len(bank), 1, size, size, size) and cubes.dtype == torch.float16
    assert float(cubes.min()) >= 0 and float(cubes.max()) <= 1
    assert bank.cubes(size) is cubes  # cached
    grid = torch.stack(torch.meshgrid(*[torch.arange(float(size))] * 3, indexing="ij"))
    for i in range(len(bank)):
        occ = cubes[i, 0].float()
        com = (grid * occ).flatten(1).sum(1) / occ.sum()
        np.testing.assert_allclose(com.numpy(), (size - 1) / 2, atol=1.0)  # symmetric shapes: centred
        inside = occ > 0.5
        ext = np.array([int(inside.any(dim=tuple(d for d in range(3) if d != ax)).sum()) for ax in range(3)])
        assert ext.max() >= size - 1  # the longest side fills the cube
        want = bank.shapes[i] / bank.shapes[i].max() * size  # aspect ratio kept
        np.testing.assert_allclose(ext, want, atol=2.0)


def test_cube_downsampling_keeps_thin_structures_and_mass():
    plate = torch.zeros(64, 48, 4, dtype=torch.bool)
    plate[:, :, 1] = True  # one voxel thick, downsampled 4x
    cube = template_to_cube(plate, 16)
    assert cube.max() > 0.2  # nearest-neighbour sampling could miss the plate entirely
    # area averaging conserves occupancy: mass scales with the volume ratio
    np.testing.assert_allclose(float(cube.sum()), plate.sum().item() * (16 / 64) ** 3, rtol=0.02)
    small = template_to_cube(torch.ones(4, 8, 2, dtype=torch.bool), 16)  # upsampling
    inside = small > 0.5
    assert inside.any(dim=(1, 2)).sum() == 8 and inside.any(dim=(0, 1)).sum() == 4


# ----------------------------------------------------------------------------------------------- default bank


def test_default_bank_ships():
    path = default_bank_path()
    assert path.is_file() and path.stat().st_size < 10 * 2**20
    b = load_default_bank()
    assert len(b) > 500 and b.spacing == 2.0
    datasets = {p["source"].split("/")[0] for p in b.provenance}
    assert datasets == {"synthseg_brain", "l2r_abdomen_ct", "totalseg_example"}
    assert all(set(p) >= {"source", "label", "component"} for p in b.provenance)
    ext = b.extents_mm
    assert ext.shape == (len(b), 3) and ext.min() >= 2.0 and ext.max() < 400
    cubes = b.subset(range(0, len(b), 97)).cubes(16)
    assert cubes.shape[1:] == (1, 16, 16, 16) and bool((cubes.flatten(1).amax(1) > 0.5).all())
    assert (path.parent / "BANK.md").is_file()
    assert "synthvox shapes" in (path.parent / "BANK.md").read_text(encoding="utf-8")


def test_default_bank_is_reproducible_from_shared_data():
    """Rebuilding the TotalSegmentator part with the recorded settings gives the shipped templates."""
    from synthvox import io

    folder = require_shared("data", "shapes", "totalseg_example")
    b = load_default_bank()
    names = ["ct_seg.nii.gz", "mr_seg.nii.gz"]
    m = b.meta
    rebuilt = build_bank(
        [io.load_labels(folder / n) for n in names],
        [f"totalseg_example/{n}" for n in names],
        spacing=m["spacing"],
        min_voxels=m["min_voxels"],
        max_extent=m["max_extent"],
    )
    shipped = [i for i, p in enumerate(b.provenance) if p["source"].startswith("totalseg_example/")]
    assert len(rebuilt) == len(shipped) > 40
    for j, i in enumerate(shipped):
        assert rebuilt.provenance[j] == b.provenance[i]
        assert torch.equal(rebuilt.get(j), b.get(i))


# ----------------------------------------------------------------------------------------------- procedural


def _bbox_extent(occ: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    inside = occ > 0.5
    lo, hi = [], []
    for ax in range(3):
        idx = inside.any(dim=tuple(d for d in range(3) if d != ax)).nonzero().flatten()
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]))
    return np.array(lo), np.array(hi)


@pytest.mark.parametrize("kind", ["deformed_spheres", "ellipsoids", "tubes", "blobs"])
def test_procedural_kind_format(kind):
    size, n = 24, 6
    cubes = getattr(P, kind)(n, size, torch.Generator().manual_seed(3), "cpu")
    assert cubes.shape == (n, 1, size, size, size) and cubes.dtype == torch.float16
    assert float(cubes.min()) >= 0 and float(cubes.max()) <= 1
    for i in range(n):
        lo, hi = _bbox_extent(cubes[i, 0].float())
        assert (hi - lo + 1).max() >= size - 2  # longest side fills the cube
        np.testing.assert_allclose((lo + hi) / 2, (size - 1) / 2, atol=1.5)  # centred
    flat = (cubes.flatten(1).float() > 0.5).float()
    iou = (flat @ flat.T) / (flat.sum(1)[:, None] + flat.sum(1)[None] - flat @ flat.T)
    assert float(iou[~torch.eye(n, dtype=torch.bool)].max()) < 0.97  # a batch is varied


def test_procedural_cubes_deterministic_and_varied():
    a = P.procedural_cubes(12, 20, torch.Generator().manual_seed(7), "cpu")
    b = P.procedural_cubes(12, 20, torch.Generator().manual_seed(7), "cpu")
    c = P.procedural_cubes(12, 20, torch.Generator().manual_seed(8), "cpu")
    assert a.shape == (12, 1, 20, 20, 20) and a.dtype == torch.float16
    assert torch.equal(a, b)
    assert (a.float() - c.float()).abs().mean() > 0.05
    # a mix of kinds: filled fractions range from thin tubes to near-full blobs
    fill = (a.flatten(1).float() > 0.5).float().mean(1)
    assert fill.max() / fill.min().clamp_min(1e-3) > 2


def test_deformed_sphere():
    shape = (24, 28, 20)
    exact = P.deformed_sphere(shape, torch.Generator().manual_seed(0), "cpu", radius_frac=0.4, roughness=0.0)
    assert exact.shape == shape and exact.dtype == torch.bool
    # roughness 0: an ellipsoid with semi-axes 0.4 * shape, volume 4/3 pi 0.4^3 of the box
    np.testing.assert_allclose(exact.float().mean().item(), 4 / 3 * np.pi * 0.4**3, rtol=0.05)
    r1 = P.deformed_sphere(shape, torch.Generator().manual_seed(1), "cpu", roughness=0.3)
    r1b = P.deformed_sphere(shape, torch.Generator().manual_seed(1), "cpu", roughness=0.3)
    r2 = P.deformed_sphere(shape, torch.Generator().manual_seed(2), "cpu", roughness=0.3)
    assert torch.equal(r1, r1b)

    def iou(x, y):
        return (x & y).sum().item() / (x | y).sum().item()

    assert iou(r1, exact) < 0.95 and iou(r1, r2) < 0.95
    assert iou(r1, exact) > 0.4  # still a sphere-like foreground
    # centred: centre of mass near the volume centre
    grid = torch.stack(torch.meshgrid(*[torch.arange(float(s)) for s in shape], indexing="ij")).flatten(1)
    com = (grid * r1.flatten().float()).sum(1) / r1.sum()
    np.testing.assert_allclose(com.numpy(), (np.array(shape) - 1) / 2, atol=0.15 * min(shape))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shapes_on_cuda_match_cpu(bank):
    """A CPU generator gives the same shapes on CUDA (up to float rounding at the edges)."""
    gpu = P.procedural_cubes(8, 24, torch.Generator().manual_seed(5), "cuda")
    cpu = P.procedural_cubes(8, 24, torch.Generator().manual_seed(5), "cpu")
    assert gpu.device.type == "cuda"
    assert ((gpu.cpu().float() > 0.5) == (cpu.float() > 0.5)).float().mean() > 0.995
    s_gpu = P.deformed_sphere((40, 48, 32), torch.Generator().manual_seed(2), "cuda", roughness=0.3)
    s_cpu = P.deformed_sphere((40, 48, 32), torch.Generator().manual_seed(2), "cpu", roughness=0.3)
    assert (s_gpu.cpu() == s_cpu).float().mean() > 0.995
    assert torch.equal(bank.cubes(16, "cuda").cpu(), bank.cubes(16))
    maps = [Volume(label_map(B_SHAPE, B_PARTS), B_AFFINE)]
    on_gpu = build_bank(maps, ["b"], spacing=1.5, min_voxels=8, device="cuda")
    on_cpu = build_bank(maps, ["b"], spacing=1.5, min_voxels=8, device="cpu")
    assert on_gpu.get(0).shape == on_cpu.get(0).shape
    assert (on_gpu.get(0) == on_cpu.get(0)).float().mean() > 0.995


# ----------------------------------------------------------------------------------------------- prepared templates


def _small_bank() -> ShapeBank:
    return load_default_bank().subset(list(range(0, 1717, 41)))


def test_default_bank_ships_prepared_for_the_engine_defaults():
    from synthvox.synth.engine import SynthConfig, SynthEngine
    from synthvox.synth.labels import LabelConfig, prepare_settings

    b = load_default_bank()
    assert b.prepared is not None and b.prepared["settings"] == prepare_settings(LabelConfig())
    engine = SynthEngine(SynthConfig(labels=LabelConfig(size=(32, 32, 32))), "cpu")
    assert len(engine._bank_set._cache) == len(b)  # nothing left to prepare at the first sample
    other = SynthEngine(SynthConfig(labels=LabelConfig(size=(32, 32, 32), smoothing=2.0)), "cpu")
    assert len(other._bank_set._cache) == 0  # other settings: prepared on first use, as before


def test_prepared_bank_renders_exactly_what_preparing_on_the_fly_does(tmp_path):
    from synthvox.synth.engine import SynthConfig, SynthEngine
    from synthvox.synth.labels import LabelConfig, prepare_bank

    cfg = SynthConfig(labels=LabelConfig(size=(32, 32, 32)), seed=4)
    plain = _small_bank()
    assert plain.prepared is None  # a subset does not inherit prepared templates
    ref = [SynthEngine(cfg, "cpu", plain).batch([i]) for i in range(3)]
    prepare_bank(plain)
    plain.save(tmp_path / "b.npz")
    loaded = ShapeBank.load(tmp_path / "b.npz")
    assert loaded.prepared is not None and loaded.prepared["bits"].shape[0] == len(loaded)
    got = [SynthEngine(cfg, "cpu", loaded).batch([i]) for i in range(3)]
    for a, b in zip(ref, got):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.view1, b.view1)


def test_corrupt_prepared_templates_are_refused(tmp_path):
    import json

    from synthvox.synth.labels import prepare_bank

    b = prepare_bank(_small_bank())
    b.save(tmp_path / "b.npz")
    with np.load(tmp_path / "b.npz") as z:
        arrays = {k: z[k] for k in z.files}
    bad = dict(arrays, prepared_bits=arrays["prepared_bits"][:-1])
    np.savez(tmp_path / "short.npz", **bad)
    with pytest.raises(InputError, match="prepared templates"):
        ShapeBank.load(tmp_path / "short.npz")
    meta = json.loads(arrays["meta"].astype(np.uint8).tobytes().decode())
    meta["prepared"] = "yes"
    bad = dict(arrays, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    np.savez(tmp_path / "meta.npz", **bad)
    with pytest.raises(InputError, match="prepared templates"):
        ShapeBank.load(tmp_path / "meta.npz")
