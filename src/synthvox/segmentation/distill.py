"""Atlas accuracy at network speed: distil atlas segmentation of a study into a finetuned network.

The labelled atlases are registered onto each unlabelled scan of a study and their labels fused
(:func:`synthvox.segmentation.atlas.segment_with_atlases`, what ``synthvox segment --atlas-image``
does, with the same defaults); the fused label map and its confidence, the fused probability of the
chosen label (its share of the atlases' weighted votes), are kept in ``MODEL/pseudo/``. Then the
network is finetuned on the atlases plus those pseudo-labels (:func:`synthvox.segmentation.loop.finetune`
with :class:`~synthvox.segmentation.data.PseudoLabels`): each pseudo-labelled voxel's loss weighted by
its confidence, zero below ``min_confidence``; every ``labelled_every``-th step draws from the atlases.
The checks score the atlases only (left out in turn, as plain finetuning does): pseudo-labels are
not ground truth. ``synthvox segment --model MODEL`` then segments the whole study at network speed.

A registration costs about 40 s per scan on a 2-core CPU, so each scan's pseudo-labels are written as
soon as they are made (each file atomically, its record ``NAME.json`` last): an interrupted or failed
run keeps the finished ones, and ``resume=True`` reuses them; a record made from other atlases,
settings or another image is refused rather than silently mixed in.

>>> from synthvox.segmentation.atlas import Atlas
>>> from synthvox.segmentation.distill import distil
>>> model = distil([Atlas(img1, lab1), Atlas(img2, lab2)], {"scan1": s1, "scan2": s2}, out_dir="MODEL")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from synthvox.errors import InputError
from synthvox.segmentation.atlas import DEFAULT_BETA, Atlas, check_atlases, check_fusion, segment_with_atlases
from synthvox.segmentation.config import FinetuneConfig
from synthvox.segmentation.data import PseudoLabels, check_pseudo_settings
from synthvox.segmentation.modeldir import PSEUDO_DIR, write_json
from synthvox.volume import Volume

#: What the confidence of a pseudo-labelled voxel is (recorded in the model's metadata).
CONFIDENCE = "the fused probability of the chosen label: its share of the atlases' (locally weighted) votes"


def labels_path(pseudo_dir: Path, name: str) -> Path:
    """Where the fused label map of scan ``name`` is kept."""
    return pseudo_dir / f"{name}_labels.nii.gz"


def confidence_path(pseudo_dir: Path, name: str) -> Path:
    """Where the confidence map of scan ``name`` is kept."""
    return pseudo_dir / f"{name}_confidence.nii.gz"


def record_path(pseudo_dir: Path, name: str) -> Path:
    """The record of scan ``name`` (written last: a scan is finished when it exists)."""
    return pseudo_dir / f"{name}.json"


def volume_digest(vol: Volume) -> str:
    """A sha256 of a volume's values, shape and affine (which image a pseudo-label was made on)."""
    h = hashlib.sha256()
    h.update(str(tuple(vol.data.shape)).encode())
    h.update(vol.data.detach().cpu().contiguous().numpy().tobytes())
    h.update(vol.affine.astype("float64").tobytes())
    return h.hexdigest()


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\\0") \
            or not name.isprintable():
        raise InputError(f"unlabelled scan name {name!r} cannot name a file: use letters, digits, '-', '_' and '.'")
    return name


def _pseudo_key(atlases: Sequence[Atlas], fusion: str, beta: float, features: str, weights: Any,
                registration: Any) -> dict[str, Any]:
    """What a pseudo-label depends on besides its image (a finished one is reused only when it matches)."""
    reg = None if registration is None else (dataclasses.asdict(registration) if dataclasses.is_dataclass(registration)
                                             else repr(registration))
    key = {
        "atlases": [{"name": a.name or f"atlas {i + 1}", "image_sha256": volume_digest(a.image),
                     "labels_sha256": volume_digest(a.labels)} for i, a in enumerate(atlases)],
        "fusion": fusion,
        "beta": beta if fusion == "weighted" else None,
        "features": features,
        "weights": None if weights is None else str(weights),
        "registration": reg,
    }
    return json.loads(json.dumps(key, default=str))  # the form it has once read back


def _finished(pseudo_dir: Path) -> bool:
    return pseudo_dir.is_dir() and any(pseudo_dir.glob("*.json"))


def _read_record(path: Path) -> dict[str, Any]:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {' '.join(str(exc).split())} (delete it to make that pseudo-label again)") from None
    if not isinstance(rec, dict):
        raise InputError(f"{path} is not a pseudo-label record (delete it to make that pseudo-label again)")
    return rec


def make_pseudo_label(image: Volume, atlases: Sequence[Atlas], *, fusion: str = "weighted", beta: float = DEFAULT_BETA,
                      features: str = "mind", weights: Any = None, registration: Any = None,
                      device: torch.device | str = "cpu") -> tuple[Volume, Volume, dict[str, Any]]:
    """Atlas segmentation of one scan as ``synthvox segment --atlas-image`` makes it: its label map
    ``(1, X, Y, Z)``, its confidence ``(1, X, Y, Z)`` (float32, the fused probability of the chosen
    label) and the fusion's report, on the scan's grid."""
    seg = segment_with_atlases(image, atlases, fusion=fusion, beta=beta, features=features, weights=weights,
                               device=device, config=registration, probabilities=True)
    assert seg.probabilities is not None
    confidence = seg.probabilities.data.max(0, keepdim=True).values.float()
    return seg.labels, Volume(confidence, image.affine.copy()), seg.report


def pseudo_label_study(
    unlabelled: Mapping[str, Volume],
    atlases: Sequence[Atlas],
    pseudo_dir: str | os.PathLike,
    *,
    fusion: str = "weighted",
    beta: float = DEFAULT_BETA,
    features: str = "mind",
    weights: Any = None,
    registration: Any = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[list[Volume], list[Volume], dict[str, Any]]:
    """The pseudo-labels and confidence maps of every scan, made (and kept in ``pseudo_dir``) or reused.

    A scan whose record in ``pseudo_dir`` matches (same image, atlases and settings) is read back; one
    without a record is registered, fused and written (label map, confidence, then the record). Every
    map is read back from its file, so a resumed run trains on exactly what the first one did.

    Returns:
        The label maps and confidence maps (on each scan's grid, in ``unlabelled``'s order), and a
        summary: scans made and reused, seconds, mean atlas agreement.

    Raises:
        InputError: a record made from other atlases, settings or another image, or an unreadable one.
    """
    from synthvox import io

    pdir = Path(pseudo_dir)
    pdir.mkdir(parents=True, exist_ok=True)
    key = _pseudo_key(atlases, fusion, beta, features, weights, registration)
    labels, confidence, agreement = [], [], []
    made, reused, seconds = 0, 0, 0.0
    n = len(unlabelled)
    for k, (name, image) in enumerate(unlabelled.items(), start=1):
        digest = volume_digest(image)
        rec_file = record_path(pdir, name)
        if rec_file.is_file():
            rec = _read_record(rec_file)
            if rec.get("key") != key or rec.get("image_sha256") != digest:
                what = "another image" if rec.get("key") == key else "other atlases or settings"
                raise InputError(f"the pseudo-label of {name} in {pdir} was made from {what}: start over with --force "
                                 "or write the model elsewhere")
            reused += 1
            if progress:
                print(f"pseudo-labels {k}/{n} {name}: reused", file=sys.stderr, flush=True)
        else:
            t = time.perf_counter()
            lab, conf, report = make_pseudo_label(image, atlases, fusion=fusion, beta=beta, features=features,
                                                  weights=weights, registration=registration, device=device)
            secs = time.perf_counter() - t
            io.save(lab, labels_path(pdir, name), labels=True, force=True)
            io.save(conf, confidence_path(pdir, name), force=True)
            write_json(rec_file, {"scan": name, "image_sha256": digest, "key": key, "seconds": round(secs, 2),
                                  "agreement": report.get("agreement"), "report": report})
            rec = _read_record(rec_file)
            made, seconds = made + 1, seconds + secs
            if progress:
                print(f"pseudo-labels {k}/{n} {name}: {secs:.1f} s, atlas agreement {report.get('agreement', 0.0):.3f}",
                      file=sys.stderr, flush=True)
        lab = io.load_labels(labels_path(pdir, name), what=f"pseudo-label map of {name}")
        conf = io.load(confidence_path(pdir, name), what=f"confidence map of {name}")
        if lab.shape != image.shape or conf.shape != image.shape:
            raise InputError(f"the pseudo-label of {name} in {pdir} is not on its image's grid: delete {rec_file.name} "
                             "to make it again")
        # on exactly the image's grid (a NIfTI header keeps the affine in float32)
        labels.append(Volume(lab.data, image.affine.copy()))
        confidence.append(Volume(conf.data.float().clamp(0.0, 1.0), image.affine.copy()))
        if isinstance(rec.get("agreement"), (int, float)):
            agreement.append(float(rec["agreement"]))
    summary = {"made": made, "reused": reused, "seconds_this_run": round(seconds, 2),
               "mean_agreement": round(sum(agreement) / len(agreement), 4) if agreement else None}
    return labels, confidence, summary


def distil(
    atlases: Sequence[Atlas],
    unlabelled: Mapping[str, Volume],
    config: FinetuneConfig | None = None,
    *,
    out_dir: str | os.PathLike,
    fusion: str = "weighted",
    beta: float = DEFAULT_BETA,
    features: str = "mind",
    weights: Any = None,
    registration: Any = None,
    min_confidence: float = 0.5,
    labelled_every: int = 3,
    device: torch.device | str = "cpu",
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    **settings: Any,
) -> Path:
    """Pseudo-label a study's unlabelled scans with the atlases, then finetune on atlases and pseudo-labels.

    Args:
        atlases: the labelled pairs (:class:`~synthvox.segmentation.atlas.Atlas`: image, label map, name).
        unlabelled: the study's scans to pseudo-label, by name (``NAME`` of ``MODEL/pseudo/NAME_*``).
        config: the finetuning settings, as for :func:`~synthvox.segmentation.loop.finetune`
            (``None``: what suits ``device``), with ``settings`` on top.
        out_dir: the model directory (its ``pseudo/`` keeps the pseudo-labels).
        fusion, beta, features, weights: atlas fusion's settings
            (:func:`~synthvox.segmentation.atlas.segment_with_atlases`; its defaults are ``segment``'s).
        registration: a :class:`~synthvox.registration.RegistrationConfig` for every registration
            (``None``: atlas segmentation's default).
        min_confidence: pseudo-labelled voxels less confident than this weigh zero in the loss.
        labelled_every: every this many steps draw from the atlases, the others from the pseudo-labels.
        device: where registration and training run.
        resume: reuse the finished pseudo-labels and continue the newest checkpoint in ``out_dir``.
        force: start over in a model directory that holds a run (pseudo-labels included).
        progress: one line per scan and the training progress on stderr.
        **settings: :class:`FinetuneConfig` fields (``steps=``, ``minutes=``, ``patch_size=``, ...).

    Returns:
        The model directory; ``segmentation.json`` records the distillation under ``train.pseudo_labels``.

    Raises:
        InputError: no atlases or scans, an atlas label map off its image's grid or with one label, a
            scan that is not a single-channel 3D image, a name that cannot name a file, bad settings, a
            model directory that holds a run (without ``resume`` or ``force``), or finished
            pseudo-labels made from other atlases or settings (with ``resume``). All but the last are
            refused before anything is written.
    """
    from synthvox.io import cleanup_on_failure
    from synthvox.segmentation.infer import check_image
    from synthvox.segmentation.loop import RUN_ENTRIES, finetune
    from synthvox.train.checkpointing import list_checkpoints
    from synthvox.train.rundir import check_run_dir, prepare_run_dir
    from synthvox.train.runner import CHECKPOINT_DIR

    out = Path(out_dir)
    dev = torch.device(device)
    # everything is checked before any registration: a mistake costs no time and writes nothing
    check_fusion(fusion, beta)
    check_atlases(atlases)
    if not isinstance(unlabelled, Mapping) or len(unlabelled) == 0:
        raise InputError("distillation needs at least one unlabelled scan (a mapping of name -> image)")
    for name, image in unlabelled.items():
        check_image(image, f"unlabelled scan {_check_name(name)}")
    if len({n.lower() for n in unlabelled}) != len(unlabelled):
        raise InputError("two unlabelled scans have the same name (ignoring case): rename one")
    check_pseudo_settings(min_confidence, labelled_every)
    if config is not None and not isinstance(config, FinetuneConfig):
        raise InputError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    (FinetuneConfig.for_device(dev) if config is None else config).with_settings(**settings).checked()
    check_run_dir(out, RUN_ENTRIES, resume, force, what="a model")

    pdir = out / PSEUDO_DIR

    def worth_keeping() -> bool:  # finished pseudo-labels and checkpoints are what --resume continues
        return _finished(pdir) or bool(list_checkpoints(out / CHECKPOINT_DIR))

    with cleanup_on_failure(out, keep=worth_keeping):
        prepare_run_dir(out, RUN_ENTRIES, resume, force, what="a model")
        labels, confidence, summary = pseudo_label_study(
            unlabelled, atlases, pdir, fusion=fusion, beta=beta, features=features, weights=weights,
            registration=registration, device=dev, progress=progress)
        record = {
            "method": "atlas fusion, as synthvox segment --atlas-image: each atlas registered onto each scan",
            "atlases": [a.name or f"atlas {i + 1}" for i, a in enumerate(atlases)],
            "fusion": fusion,
            "beta": beta if fusion == "weighted" else None,
            "features": features,
            "weights": None if weights is None else str(weights),
            "confidence": CONFIDENCE,
            "pseudo_dir": PSEUDO_DIR,
            **summary,
        }
        pseudo = PseudoLabels([unlabelled[n] for n in unlabelled], labels, confidence, list(unlabelled),
                              float(min_confidence), labelled_every, record)
        return finetune([a.image for a in atlases], [a.labels for a in atlases], config, out_dir=out, device=dev,
                        resume=resume, progress=progress, pseudo=pseudo, **settings)
