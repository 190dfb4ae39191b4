"""The two-view engine: label ensembles rendered twice with independent appearances.

``SynthEngine(config, device, bank).batch(indices)`` returns label maps and their two views on the
device, ready for contrastive pretraining. Sample ``i`` of seed ``s`` is the same on every run, worker
and rank: all its random choices come from one CPU :class:`torch.Generator` derived from ``(s, i)``
(:func:`sample_generator`), never from global random state. Every sample's parameters are recorded
as plain JSON (:attr:`SynthBatch.params`), and :meth:`SynthEngine.replay` renders them again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from synthvox.errors import InputError
from synthvox.synth.appearance import AppearanceConfig, AppearanceParams, render_batch, sample_appearance
from synthvox.synth.labels import (
    LabelConfig,
    LabelParams,
    TemplateSet,
    render_labels_batch,
    sample_label_params,
)
from synthvox.synth.spatial import AffineRange

#: Version of the per-sample parameter record written by :meth:`SynthEngine.batch`.
PARAMS_VERSION = 1


@dataclass
class SynthConfig:
    """Settings of the data engine.

    Attributes:
        labels: the label-ensemble generator (size, number of templates, affines, foreground...).
        appearance: the appearance model of both views.
        use_bank: place templates from a shape bank (the shipped one unless one is given); ``False``
            uses procedural shapes only.
        cube_size: side of the cubes procedural shapes are drawn in (bank templates are cubed from
            their native masks at ``labels.max_resolution``).
        seed: base seed; sample ``i`` depends only on ``(seed, i)`` and these settings.
    """

    labels: LabelConfig = field(default_factory=LabelConfig)
    appearance: AppearanceConfig = field(default_factory=AppearanceConfig)
    use_bank: bool = True
    cube_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.labels, dict):
            self.labels = LabelConfig(**self.labels)
        if isinstance(self.appearance, dict):
            self.appearance = AppearanceConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in self.appearance.items()}
            )
        if int(self.cube_size) < 8:
            raise InputError(f"cube_size must be at least 8, got {self.cube_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (for run folders and parameter records)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SynthConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        labels = dict(d.pop("labels", {}))
        if "affine" in labels:
            labels["affine"] = AffineRange(**{k: tuple(v) if isinstance(v, list) else v for k, v in labels["affine"].items()})
        labels = {k: tuple(v) if isinstance(v, list) else v for k, v in labels.items()}
        return cls(labels=LabelConfig(**labels), appearance=d.pop("appearance", {}), **d)


@dataclass
class SynthBatch:
    """A batch of synthetic pairs.

    Attributes:
        labels: ``(B, 1, X, Y, Z)`` int64 label maps, ids ``0..K-1`` (0 background).
        view1: ``(B, 1, X, Y, Z)`` float32 first rendering, in ``[0, 1]``.
        view2: ``(B, 1, X, Y, Z)`` float32 second rendering, in ``[0, 1]``.
        params: one JSON-serialisable record per sample (see :meth:`SynthEngine.replay`).
    """

    labels: torch.Tensor
    view1: torch.Tensor
    view2: torch.Tensor
    params: list[dict]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> SynthBatch:
        """The same batch on ``device``."""
        return SynthBatch(self.labels.to(device), self.view1.to(device), self.view2.to(device), self.params)


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample ``index`` of ``seed``: a hash of both through NumPy's SeedSequence.

    Neighbouring seeds and indices give unrelated streams; the result is the same on every machine.
    """
    from synthvox.seeding import generator

    if int(index) < 0:
        raise ValueError(f"sample index must be non-negative, got {index}")
    return generator(seed, index)


def bank_digest(bank: Any) -> str:
    """A short fingerprint of a shape bank (template shapes, spacings and provenance)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(bank.extents_mm, dtype=np.float64).tobytes())
    h.update(json.dumps(bank.provenance, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class SynthEngine:
    """Makes pairs of views of random label ensembles, deterministically by ``(seed, index)``.

    Args:
        config: engine settings.
        device: where label maps and views are rendered and returned.
        bank: the shape bank (:class:`synthvox.shapes.ShapeBank`); ``None`` loads the shipped one
            when ``config.use_bank``. Ignored when ``config.use_bank`` is false.

    Example:
        >>> engine = SynthEngine(SynthConfig(), torch.device("cpu"))
        >>> b = engine.batch([0, 1])  # b.labels, b.view1, b.view2: (2, 1, 128, 128, 128)
    """

    def __init__(self, config: SynthConfig, device: torch.device | str = "cpu", bank: Any | None = None) -> None:
        self.config = config
        self.device = torch.device(device)
        lcfg = config.labels
        self.bank = None
        self.bank_info: dict[str, Any] | None = None
        self._bank_set: TemplateSet | None = None
        if config.use_bank:
            if bank is None:
                from synthvox.shapes import load_default_bank

                bank = load_default_bank()
            if len(bank) == 0:
                raise InputError("the shape bank holds no templates")
            self.bank = bank
            self._bank_set = TemplateSet.from_bank(bank, lcfg, self.device)
            self.bank_info = {"templates": len(bank), "spacing": float(bank.spacing), "digest": bank_digest(bank)}
        self._procedural = TemplateSet.procedural(lcfg, self.device, int(config.cube_size))
        self._render_key = self._render_settings()

    # ------------------------------------------------------------------------------ parameters
    def _render_settings(self) -> dict[str, Any]:
        """Settings that change a rendering without being part of its random parameters."""
        c = self.config.labels
        return {
            "smoothing": float(c.smoothing),
            "threshold": float(c.threshold),
            "min_threshold": float(c.min_threshold),
            "max_resolution": int(c.max_resolution),
            "max_template_extent": float(c.max_template_extent),
            "cube_size": int(self.config.cube_size),
            "procedural_pool": int(c.procedural_pool),
            "procedural_seed": int(c.procedural_seed),
            "bank": self.bank_info,
        }

    @property
    def n_bank(self) -> int:
        """Number of bank templates in use (0 without a bank)."""
        return 0 if self._bank_set is None else len(self._bank_set)

    def prepare(self) -> None:
        """Prepare every template now (bank and procedural pool) instead of on first use.

        Templates are cached as they are first placed, so early batches are slower than later
        ones; call this before timing, or before a long run, to pay that cost up front.
        """
        if self._bank_set is not None:
            self._bank_set.get(range(len(self._bank_set)))
        self._procedural.get(range(len(self._procedural)))

    def generator(self, index: int) -> torch.Generator:
        """The generator of sample ``index`` (see :func:`sample_generator`)."""
        return sample_generator(self.config.seed, index)

    # ------------------------------------------------------------------------------ rendering
    def batch(self, indices: Sequence[int]) -> SynthBatch:
        """Samples ``indices`` of this engine's seed, rendered on its device."""
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("batch() needs at least one index")
        gens = [self.generator(i) for i in indices]
        label_params = [sample_label_params(g, self.config.labels, self.n_bank) for g in gens]
        labels = render_labels_batch(label_params, self.config.labels, self._bank_set, self._procedural, self.device)
        n_labels = [int(v) + 1 for v in labels.amax(dim=(1, 2, 3)).tolist()]
        a1 = [sample_appearance(g, n, self.config.appearance) for g, n in zip(gens, n_labels)]
        a2 = [sample_appearance(g, n, self.config.appearance) for g, n in zip(gens, n_labels)]
        records = [
            self._record(i, lp, n, p1, p2) for i, lp, n, p1, p2 in zip(indices, label_params, n_labels, a1, a2)
        ]
        return self._views(labels, a1, a2, records)

    def sample(self, index: int) -> SynthBatch:
        """Sample ``index`` alone (a batch of one)."""
        return self.batch([index])

    def replay(self, params: dict | Sequence[dict]) -> SynthBatch:
        """Render recorded parameters again (one record, or a list of records of one size).

        Raises:
            InputError: a record that is not a synthvox sample, or that was made with other
                rendering settings or another shape bank than this engine's.
        """
        records = [params] if isinstance(params, dict) else list(params)
        if not records:
            raise InputError("replay() needs at least one parameter record")
        label_params, a1, a2 = [], [], []
        for r in records:
            try:
                if int(r.get("version", -1)) != PARAMS_VERSION:
                    raise InputError(f"unsupported sample record version {r.get('version')!r}")
                lp = LabelParams.from_dict(r["labels"])
                p1 = AppearanceParams.from_dict(r["view1"])
                p2 = AppearanceParams.from_dict(r["view2"])
            except (KeyError, TypeError, ValueError) as exc:
                if isinstance(exc, InputError):
                    raise
                raise InputError(f"not a synthvox sample record ({type(exc).__name__}: {exc})") from None
            render = r.get("render", {})
            if render != self._render_key:
                diff = sorted(k for k in set(render) | set(self._render_key) if render.get(k) != self._render_key.get(k))
                raise InputError(f"this record was made with other engine settings ({', '.join(diff)}); use the same config and bank")
            label_params.append(lp)
            a1.append(p1)
            a2.append(p2)
        labels = render_labels_batch(label_params, self.config.labels, self._bank_set, self._procedural, self.device)
        for r, n in zip(records, labels.amax(dim=(1, 2, 3)).tolist()):
            if int(n) + 1 != int(r.get("n_labels", -1)):
                raise InputError("the replayed label map does not match its record (different bank or version)")
        return self._views(labels, a1, a2, [dict(r) for r in records])

    def _record(
        self, index: int, lp: LabelParams, n_labels: int, p1: AppearanceParams, p2: AppearanceParams
    ) -> dict[str, Any]:
        return {
            "version": PARAMS_VERSION,
            "seed": int(self.config.seed),
            "index": int(index),
            "n_labels": int(n_labels),
            "render": self._render_key,
            "labels": lp.to_dict(),
            "view1": p1.to_dict(),
            "view2": p2.to_dict(),
        }

    def _views(
        self, labels: torch.Tensor, a1: list[AppearanceParams], a2: list[AppearanceParams], records: list[dict]
    ) -> SynthBatch:
        view1 = render_batch(labels, a1)
        view2 = render_batch(labels, a2)
        return SynthBatch(labels[:, None], view1, view2, records)
