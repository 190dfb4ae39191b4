"""An affine written by ANTs as ``synthvox register``'s start moves the image as antsApplyTransforms does
(issue 25, item 1).

A nichart dev T1 (FIXED) and MOVING, FIXED carried by a known affine ``T`` (a 12 degree rotation about
an oblique axis, a 4% scaling, a translation of 7 mm), resampled by ANTs itself. ``T`` is written by
antspyx (``ants.write_transform``) as an ANTs ``.mat`` and as ITK text, about a centre that is not the
origin, as ANTs' registrations write them. For each file:

- ``start alone``: ``synthvox register FIXED MOVING --initial-transform FILE --transform affine
  --no-affine`` against ``ants.apply_transforms(FIXED, MOVING, [FILE])`` (linear, both): the largest
  voxel difference of the two moved images, in intensity and as a share of FIXED's 99th percentile,
  where the voxel's sample lies inside MOVING's grid (between its first and last voxel centres), and
  apart the edge band beyond it (within a voxel of MOVING's field of view), where the two
  conventions differ: ITK extends the edge voxel by half a voxel and is zero beyond, synthvox
  interpolates linearly towards zero;
- ``affine stage``: the same with the affine stage after the start (``--transform affine``): how far
  its map moves FIXED's foreground from ``T`` (mean and largest distance, mm), and the moved images'
  median voxel difference; the start being exact, the stage keeps it;
- ``affine stage, start off``: ``T`` after a 3 degree turn and a 3 mm shift (``ants_off.mat``), the
  affine stage after it: how far it ends from ``T`` (the voxel differences then compare a registered
  image with ANTs' moved image of the wrong start, and are not a figure of the convention).

Needs antspyx (the ``bench`` extra); the command runs as a user runs it, in a child process.

    python -m benchmarks.ants_chain [--subject Subj1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

NAME = "ants_chain"


def known_affine(fixed_affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``T`` (RAS, fixed world to moving world): 12 degrees about an oblique axis through FIXED's
    centre, scaled by 1.04, then moved by (5, -4, 3) mm."""
    from scipy.spatial.transform import Rotation

    centre = fixed_affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + fixed_affine[:3, 3]
    axis = np.array([1.0, -2.0, 0.5]) / np.linalg.norm([1.0, -2.0, 0.5])
    lin = Rotation.from_rotvec(np.radians(12.0) * axis).as_matrix() * 1.04
    t = np.eye(4)
    t[:3, :3] = lin
    t[:3, 3] = centre - lin @ centre + np.array([5.0, -4.0, 3.0])
    return t


def ants_transform(ants: Any, t_ras: np.ndarray, centre_lps: np.ndarray) -> Any:
    """``t_ras`` as an antspyx affine transform in LPS about ``centre_lps`` (as ANTs writes them)."""
    from synthvox.volume import ras_to_itk_matrix

    m = ras_to_itk_matrix(t_ras)
    return ants.create_ants_transform(transform_type="AffineTransform", dimension=3, matrix=m[:3, :3],
                                      translation=m[:3, :3] @ centre_lps + m[:3, 3] - centre_lps, center=centre_lps)


def register(fixed: Path, moving: Path, start: Path, out: Path, *extra: str) -> tuple[float, dict[str, Any]]:
    """``synthvox register`` as a user runs it; its seconds and report."""
    cmd = [sys.executable, "-m", "synthvox", "register", str(fixed), str(moving), "--out", str(out),
           "--initial-transform", str(start), "--transform", "affine", "--features", "mind", "--device", "cpu",
           "--quiet", *extra]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=common.with_repo_on_path(dict(os.environ)))
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return time.perf_counter() - t, json.loads((out / "report.json").read_text())


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ants

    from synthvox import io
    from synthvox.registration.foreground import foreground

    paths = common.nichart_paths(args.subject)
    fixed_vol = io.load(paths["t1"])
    t = known_affine(fixed_vol.affine, fixed_vol.shape)
    centre_lps = np.array([11.0, -23.0, 17.5])
    rows = []
    with tempfile.TemporaryDirectory(prefix="ants_chain.") as tmp:
        d = Path(tmp)
        fixed = d / "fixed.nii.gz"
        io.save(fixed_vol, fixed)
        f_ants = ants.image_read(str(fixed))
        # MOVING(T x) = FIXED(x): ANTs resamples FIXED through T's inverse, on FIXED's grid
        ants.write_transform(ants_transform(ants, np.linalg.inv(t), centre_lps), str(d / "inverse.mat"))
        moving = d / "moving.nii.gz"
        ants.image_write(ants.apply_transforms(f_ants, f_ants, [str(d / "inverse.mat")], interpolator="linear"),
                         str(moving))
        m_ants = ants.image_read(str(moving))
        scale = float(np.percentile(fixed_vol.data.numpy(), 99))
        fg = foreground(fixed_vol.data).numpy()
        idx = np.argwhere(fg)[:: max(1, int(fg.sum()) // 20000)].astype(np.float64)
        pts = idx @ fixed_vol.affine[:3, :3].T + fixed_vol.affine[:3, 3]
        inside, edge = _inside_and_edge(fixed_vol, io.load(moving), t)
        for name, start, stages in (("ants.mat", t, (("start alone", ["--no-affine"]), ("affine stage", []))),
                                    ("ants.txt", t, (("start alone", ["--no-affine"]), ("affine stage", []))),
                                    ("ants_off.mat", t @ _off(fixed_vol), (("affine stage, start off", []),))):
            ants.write_transform(ants_transform(ants, start, centre_lps), str(d / name))
            theirs = ants.apply_transforms(f_ants, m_ants, [str(d / name)], interpolator="linear").numpy()
            for stage, extra in stages:
                out = d / f"{name}_{len(extra)}"
                seconds, report = register(fixed, moving, d / name, out, *extra)
                ours = io.load(out / "moved.nii.gz").data[0].numpy()
                diff = np.abs(ours - theirs)
                w = np.asarray(report["world_affine"])
                dist = np.linalg.norm(pts @ (w - t)[:3, :3].T + (w - t)[:3, 3], axis=1)
                rows.append({"file": name, "stage": stage, "max_voxel_diff": float(diff[inside].max()),
                             "max_voxel_diff_share": float(diff[inside].max()) / scale,
                             "median_voxel_diff": float(np.median(diff[fg])),
                             "edge_voxels": int(edge.sum()), "edge_max_diff_share": float(diff[edge].max()) / scale,
                             "map_mean_mm": float(dist.mean()), "map_max_mm": float(dist.max()), "seconds": seconds})
                print(f"{name:9s} {stage:13s} max voxel difference {diff[inside].max():.4g} inside MOVING's grid "
                      f"({diff[inside].max() / scale:.2e} of the 99th percentile; edge band {diff[edge].max() / scale:.2f}), "
                      f"map from T: mean {dist.mean():.3f} mm, max {dist.max():.3f} mm ({seconds:.1f} s)", file=sys.stderr)
    return {"subject": args.subject, "shape": list(fixed_vol.shape), "intensity_p99": scale,
            "inside_voxels": int(inside.sum()), "ants_version": getattr(ants, "__version__", "unknown"), "rows": rows}


def _off(fixed: Any) -> np.ndarray:
    """3 degrees about FIXED's centre (an oblique axis) and a 3 mm shift: a start that is off."""
    from scipy.spatial.transform import Rotation

    centre = fixed.affine[:3, :3] @ ((np.asarray(fixed.shape) - 1) / 2.0) + fixed.affine[:3, 3]
    rot = Rotation.from_rotvec(np.radians(3.0) * np.array([0.6, 0.0, 0.8])).as_matrix()
    e = np.eye(4)
    e[:3, :3] = rot
    e[:3, 3] = centre - rot @ centre + np.array([2.0, 2.0, -1.0])
    return e


def _inside_and_edge(fixed: Any, moving: Any, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FIXED's voxels whose sample through ``t`` lies inside MOVING's grid (between its first and last
    voxel centres along every axis), and those within one voxel beyond that (the edge band)."""
    idx = np.indices(fixed.shape).reshape(3, -1).T.astype(np.float64)
    m = np.linalg.inv(moving.affine) @ t @ fixed.affine
    v = idx @ m[:3, :3].T + m[:3, 3]
    n = np.asarray(moving.shape, np.float64)
    inside = np.all((v >= 0) & (v <= n - 1), axis=1)
    near = np.all((v > -1) & (v < n), axis=1)
    return inside.reshape(fixed.shape), (near & ~inside).reshape(fixed.shape)


def markdown(res: dict[str, Any], info: dict[str, Any]) -> str:
    rows = [[r["file"], r["stage"], f"{r['max_voxel_diff']:.3g}", f"{r['max_voxel_diff_share']:.1e}",
             f"{r['median_voxel_diff']:.3g}", f"{r['edge_max_diff_share']:.2f} ({r['edge_voxels']})",
             f"{r['map_mean_mm']:.3f}", f"{r['map_max_mm']:.3f}", f"{r['seconds']:.1f}"] for r in res["rows"]]
    table = common.md_table(["file", "synthvox stage", "max voxel difference vs antsApplyTransforms (inside MOVING)",
                             "as a share of p99", "median on the foreground", "edge band: max share (voxels)",
                             "map vs T: mean mm", "max mm", "command s"], rows)
    return (f"{res['subject']} T1 {'x'.join(map(str, res['shape']))}, antspyx {res['ants_version']}; "
            f"{common.machine_line(info)}\n\n{table}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subject", default="Subj1", choices=common.SUBJECTS)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if not common.require_shared_data():
        return 1
    info = common.header(NAME)
    res = run(args)
    js, md = common.write_results(NAME, {**info, **res}, markdown(res, info["machine"]), args.out)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
