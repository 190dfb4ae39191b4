"""The registration QC picture: orientation markers from the affine, display convention, legend, PNG."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_affine

from synthvox.registration import qc
from synthvox.registration.qc import (
    display_orientation,
    legend_entries,
    panel_markers,
    qc_figure,
    qc_png_bytes,
)
from synthvox.volume import Volume

SHAPE = (16, 20, 24)


def _centred(lin: np.ndarray) -> np.ndarray:
    """A 4x4 affine with linear part ``lin`` and the grid centre at world (0, 0, 0)."""
    a = np.eye(4)
    a[:3, :3] = lin
    a[:3, 3] = -lin @ ((np.asarray(SHAPE) - 1) / 2)
    return a


def _world_right_blob(affine: np.ndarray) -> Volume:
    """An image bright where the world x (RAS: the patient's right) is > 2 mm, dark elsewhere."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).astype(np.float64)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    return Volume(torch.from_numpy((world[..., 0] > 2.0).astype(np.float32))[None], affine)


def test_markers_of_ras_and_lps_grids_are_mirrored():
    ras = panel_markers(np.diag([1.0, 1.0, 1.0, 1.0]))
    lps = panel_markers(np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert ras["axial"] == {"left": "L", "right": "R", "bottom": "P", "top": "A"}
    assert lps["axial"] == {"left": "R", "right": "L", "bottom": "A", "top": "P"}
    assert ras["coronal"]["right"] == "R" and lps["coronal"]["right"] == "L"
    assert ras["coronal"]["top"] == lps["coronal"]["top"] == "S"
    assert ras["sagittal"] == {"left": "P", "right": "A", "bottom": "I", "top": "S"}
    assert lps["sagittal"]["right"] == "P"


def test_markers_follow_permuted_and_oblique_axes():
    # array axis 0 points anterior, axis 1 to the left, axis 2 up
    m = panel_markers(_centred(np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])))
    assert m["axial"] == {"left": "P", "right": "A", "bottom": "R", "top": "L"}
    assert m["sagittal"]["right"] == "L"
    # a grid rotated 0.3 rad about each axis and flipped along x: still named by its closest directions
    m = panel_markers(make_affine(spacing=(1.0, 1.2, 2.0), angles=(0.3, -0.2, 0.3), flips=(-1, 1, 1)))
    assert m["axial"]["right"] == "L" and m["axial"]["top"] == "A" and m["coronal"]["top"] == "S"


@pytest.mark.parametrize("lin", [np.diag([1.0, 1.0, 1.0]), np.diag([-1.0, -1.0, 1.0]),
                                 make_affine(spacing=(1.0, 1.2, 1.5), angles=(0.2, -0.1, 0.3), flips=(-1, 1, -1))[:3, :3],
                                 np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])])
@pytest.mark.parametrize("radiological", [True, False])
def test_patient_right_is_drawn_on_the_side_the_markers_say(lin, radiological):
    vol = display_orientation(_world_right_blob(_centred(lin)), radiological)
    markers = panel_markers(vol.affine)
    data = vol.data[0].numpy()
    for plane, img in zip(qc.PLANES[1:], qc._planes(data)[1:]):  # coronal and axial show left-right
        half = img.shape[1] // 2
        left, right = img[:, :half].mean(), img[:, -half:].mean()
        r_side = "left" if radiological else "right"
        assert markers[plane][r_side] == "R"
        assert (left > right) == radiological, (plane, left, right)


def test_legend_lists_ids_names_and_dice():
    entries = legend_entries([42, 3, 7], {"3": "hippocampus", "42": "amygdala"}, {"3": 0.8149, "42": 0.5})
    assert entries == [(3, "3 hippocampus  Dice 0.81"), (7, "7  Dice —"), (42, "42 amygdala  Dice 0.50")]
    assert legend_entries([5], None, None) == [(5, "5")]


def test_figure_titles_planes_and_shows_legend_with_dice(blob_labels):
    aff = make_affine()
    img = Volume(blob_labels.float() + torch.rand(blob_labels.shape, generator=torch.Generator().manual_seed(0)), aff)
    fixed_lab = Volume(blob_labels, aff)
    moved = blob_labels.clone()
    moved[moved == 3] = 7  # label 3 gone from the moved map, taken by label 7
    fig = qc_figure(img, img, "t", fixed_lab, Volume(moved, aff), label_names={7: "seven", 42: "forty-two"})
    titles = [ax.get_title() for ax in fig.axes]
    for plane in ("axial", "coronal", "sagittal"):
        for image in ("fixed", "moved", "overlay"):
            assert any(plane in t and image in t for t in titles), (plane, image, titles)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[0] == "3  Dice —"  # in the fixed map only: no Dice
    assert texts[1].startswith("7 seven  Dice ") and texts[2].startswith("42 forty-two  Dice ")
    d7 = float(texts[1].rsplit(" ", 1)[1])
    assert 0.5 < d7 < 1.0  # label 7 grew into label 3's place in the moved map
    assert "Dice 1.00" in texts[2]
    assert any("radiological" in t.get_text() for t in fig.texts)
    # the Dice given (e.g. the report's) is shown as given
    fig = qc_figure(img, img, "", fixed_lab, Volume(moved, aff), dice={"7": 0.25, "42": 0.75})
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["3  Dice —", "7  Dice 0.25", "42  Dice 0.75"]
    # no labels: no legend
    assert not qc_figure(img, img).legends


def test_png_is_written(tmp_path, blob_labels):
    import matplotlib.image

    aff = make_affine()
    img = Volume(torch.rand((1, *SHAPE), generator=torch.Generator().manual_seed(1)), aff)
    png = qc_png_bytes(img, img, "qc", Volume(blob_labels, aff), None, label_names={7: "x"})
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (tmp_path / "qc.png").write_bytes(png)
    pix = matplotlib.image.imread(tmp_path / "qc.png")
    assert pix.ndim == 3 and pix.shape[0] > 500 and pix.shape[1] > 500
    # the old positional call still works
    assert qc_png_bytes(img, img, "qc", None, None)[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_passes_names_and_dice_to_the_picture(tmp_path, monkeypatch):
    from synthvox.registration.outputs import save

    seen = {}

    def fake_png(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.update(kwargs)
        return b"\x89PNG\r\n\x1a\n"

    monkeypatch.setattr(qc, "qc_png_bytes", fake_png)
    aff = make_affine()
    vol = Volume(torch.rand(1, 8, 8, 8), aff)
    field = Volume(torch.zeros(3, 8, 8, 8), aff)
    lab = Volume(torch.ones(1, 8, 8, 8, dtype=torch.int64), aff)
    report = {"label_names": {"1": "one"}, "dice": {"1": 0.9}}
    result = SimpleNamespace(fixed=vol, moved=vol, warp=field, deformable_warp=field, inverse_warp=field,
                             fixed_labels=lab, moved_labels=lab, world_affine=np.eye(4), report=report)
    save(result, tmp_path / "out")
    assert seen["label_names"] == {"1": "one"} and seen["dice"] == {"1": 0.9}
    assert seen["fixed_labels"] is lab and seen["moved_labels"] is lab
