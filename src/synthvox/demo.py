"""The bundled demo: an abdominal MR registered onto a CT of another person.

The pair ships in ``synthvox/data/demo`` (from TotalSegmentator, Apache-2.0; see its LICENSE and
README.md there): ``ct.nii.gz`` / ``ct_seg.nii.gz`` (fixed) and ``mr.nii.gz`` / ``mr_seg.nii.gz``
(moving), 3 mm, with ``organs.json`` naming the 7 organ ids the two label maps share.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthvox.volume import Volume, resample_like


def demo_dir() -> Path:
    """Folder of the bundled demo data."""
    return Path(__file__).resolve().parent / "data" / "demo"


def organs() -> dict[str, int]:
    """The 7 organs both label maps share: name -> label id."""
    raw = json.loads((demo_dir() / "organs.json").read_text(encoding="utf-8"))
    return {k: int(v) for k, v in raw.items() if not k.startswith("_")}


@dataclass
class DemoResult:
    """What :func:`run_demo` computed.

    Attributes:
        registration: the :class:`synthvox.registration.RegistrationResult` of the full registration.
        dice: ``{stage: {organ: dice}}`` for the stages ``headers`` (labels carried through the image
            headers only), ``affine`` (after the initial and affine stages) and ``deformable``.
        fixed: the CT.
        fixed_labels: its label map.
    """

    registration: Any
    dice: dict[str, dict[str, float]] = field(default_factory=dict)
    fixed: Volume | None = None
    fixed_labels: Volume | None = None

    def mean(self, stage: str) -> float:
        return float(np.nanmean(list(self.dice[stage].values())))


def run_demo(features: str = "auto", weights: Any = None, device: torch.device | str = "cpu",
             seed: int = 0, log: Callable[[str], None] | None = None) -> DemoResult:
    """Register the bundled MR onto the bundled CT and score the 7 shared organs at every stage.

    Args:
        features: ``"auto"`` (see :func:`synthvox.registration.network.resolve_features`), ``"net"``,
            ``"mind"`` or ``"both"``.
        weights: model directory for the network features (``None``: the shipped default weights).
        device: where to compute.
        seed: recorded in the report.
        log: progress and warnings, one line each (see :func:`synthvox.registration.register`).
    """
    from synthvox import io
    from synthvox.metrics import dice_per_label
    from synthvox.registration import register
    from synthvox.registration.grids import resample_through

    d = demo_dir()
    ct = io.load(d / "ct.nii.gz", what="demo CT")
    ct_seg = io.load_labels(d / "ct_seg.nii.gz", what="demo CT labels")
    mr = io.load(d / "mr.nii.gz", what="demo MR")
    mr_seg = io.load_labels(d / "mr_seg.nii.gz", what="demo MR labels")
    names = organs()
    groups = {k: [v] for k, v in names.items()}
    # score only the shared organs (the two TotalSegmentator tasks number other structures differently)
    keep = torch.as_tensor(sorted(names.values()))
    ct_seg = Volume(torch.where(torch.isin(ct_seg.data, keep), ct_seg.data, 0), ct_seg.affine)
    mr_seg = Volume(torch.where(torch.isin(mr_seg.data, keep), mr_seg.data, 0), mr_seg.affine)

    res = register(ct, mr, features=features, weights=weights, device=device, moving_labels=mr_seg,
                   fixed_labels=ct_seg, modality_fixed="ct", modality_moving="mr", seed=seed, log=log,
                   label_names={v: k for k, v in names.items()})
    headers = resample_like(mr_seg, ct, mode="nearest")
    affine = resample_through(mr_seg, res.world_affine, ct.shape, ct.affine, mode="nearest")
    assert res.moved_labels is not None
    dice = {
        "headers": dice_per_label(headers.data, ct_seg.data, groups),
        "affine": dice_per_label(affine.data, ct_seg.data, groups),
        "deformable": dice_per_label(res.moved_labels.data, ct_seg.data, groups),
    }
    res.report["demo_dice"] = dice
    return DemoResult(registration=res, dice=dice, fixed=ct, fixed_labels=ct_seg)


def dice_table(result: DemoResult) -> str:
    """A plain-text table of Dice per organ and stage."""
    stages = list(result.dice)
    width = max(len(n) for n in organs()) + 2
    lines = ["organ".ljust(width) + "".join(f"{s:>12s}" for s in stages)]
    for organ in organs():
        lines.append(organ.ljust(width) + "".join(f"{result.dice[s][organ]:12.3f}" for s in stages))
    lines.append("mean".ljust(width) + "".join(f"{result.mean(s):12.3f}" for s in stages))
    return "\n".join(lines)
