"""Segmenting folders (``segment -i DIR -o DIR``): names like the inputs, checks before any work,
the unreadable file named, nothing half-written, a progress bar, and any per-image segmenter."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_affine
from conftest import two_ellipsoids as layout
from typer.testing import CliRunner

from synthvox import io
from synthvox.cli import app
from synthvox.errors import InputError
from synthvox.models import build_model
from synthvox.segmentation import folder_jobs, segment_folder
from synthvox.segmentation.modeldir import SegmentationMeta, SegmentationNet, save_model_dir
from synthvox.volume import Volume

runner = CliRunner()
AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])


def threshold(image: Volume) -> Volume:
    """A stand-in segmenter: label 5 where the image is bright."""
    return Volume((image.data > 50).long() * 5, image.affine.copy())


def tree(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imagesTs"
    d.mkdir()
    lab = layout()
    io.save(Volume(lab.float() * 2 + 1, AFFINE), d / "case_001_0000.nii.gz")
    io.save(Volume(lab[:, :, :28, :20].float() * 2 + 1, make_affine(spacing=(1.2, 1.7, 2.1))), d / "case_002_0000.nii")
    (d / "dataset.json").write_text("{}")  # not an image: left alone
    (d / "sub").mkdir()  # subfolders are not searched
    io.save(Volume(lab.float(), AFFINE), d / "sub" / "other.nii.gz")
    return d


def test_every_image_gets_a_label_map_of_the_same_name_on_its_grid(images, tmp_path, capsys):
    out = tmp_path / "pred"
    done = segment_folder(images, out, threshold, progress=True)
    assert [d.output.name for d in done] == ["case_001_0000.nii.gz", "case_002_0000.nii"]
    assert tree(out) == ["case_001_0000.nii.gz", "case_002_0000.nii", "quality.csv"]
    for d in done:
        src, seg = nib.load(str(d.image)), nib.load(str(d.output))
        assert seg.shape == src.shape
        np.testing.assert_allclose(seg.affine, src.affine, atol=1e-5)
        assert set(np.unique(np.asarray(seg.dataobj)).tolist()) == {0, 5} and d.labels_present == [0, 5]
    segment_folder(images, out, threshold, force=True, progress=True)
    err = capsys.readouterr().err
    assert "segment" in err and "2/2" in err


def test_everything_is_checked_before_any_work(images, tmp_path):
    calls = []

    def counting(image):
        calls.append(1)
        return threshold(image)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("")
    with pytest.raises(InputError, match=r"no images \(\*.nii, \*.nii.gz, \*.mgz, .*\) in"):
        segment_folder(empty, tmp_path / "o1", counting)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(InputError, match="output folder is a file"):
        segment_folder(images, tmp_path / "a_file", counting)
    with pytest.raises(InputError, match="output folder is the input folder"):
        segment_folder(images, images, counting)
    with pytest.raises(InputError, match="input folder not found"):
        segment_folder(tmp_path / "nope", tmp_path / "o2", counting)
    for name in ("seg.nii.gz", "seg.nrrd"):  # an image file name in any format it could write
        with pytest.raises(InputError, match="not an image file name"):
            segment_folder(images, tmp_path / name, counting)
    out = tmp_path / "pred"
    out.mkdir()
    (out / "case_002_0000.nii").write_text("an earlier result")
    with pytest.raises(InputError, match=r"output exists, not overwriting \(use --force\): .*case_002_0000.nii"):
        segment_folder(images, out, counting)
    assert calls == [] and tree(out) == ["case_002_0000.nii"]
    assert len(folder_jobs(images, out, force=True)) == 2


def test_an_unreadable_image_is_named_recorded_and_the_run_goes_on(images, tmp_path):
    (images / "case_000_0000.nii.gz").write_bytes(b"\x1f\x8b not really gzip")  # sorted first
    out = tmp_path / "pred"
    with pytest.raises(InputError, match="1 of 3 image.*case_000_0000.nii.gz"):
        segment_folder(images, out, threshold)
    # complete maps, the failure's one line, the table; no temporary files
    assert tree(out) == ["case_000_0000.nii.gz.error.txt", "case_001_0000.nii.gz", "case_002_0000.nii", "quality.csv"]
    io.load_labels(out / "case_002_0000.nii")
    rows = quality_rows(out)
    assert rows[0]["image"] == "case_000_0000.nii.gz" and rows[0]["status"] == "failed"
    assert "cannot read" in rows[0]["error"] and [r["status"] for r in rows[1:]] == ["done", "done"]
    # fixed, the rerun tries it again and only it
    io.save(Volume(layout().float(), AFFINE), images / "case_000_0000.nii.gz", force=True)
    calls = []
    done = segment_folder(images, out, lambda im: calls.append(1) or threshold(im))
    assert len(calls) == 1 and [d.image.name for d in done] == ["case_000_0000.nii.gz"]
    assert "case_000_0000.nii.gz.error.txt" not in tree(out)
    assert [r["status"] for r in quality_rows(out)] == ["done"] * 3


def quality_rows(out) -> list[dict[str, str]]:
    import csv

    with open(out / "quality.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_interrupted_and_sharded_runs_give_the_table_of_one_run(images, tmp_path):
    for i in (3, 4, 5):
        io.save(Volume(layout().float() * i, AFFINE), images / f"case_00{i}_0000.nii.gz")
    one = tmp_path / "one"
    segment_folder(images, one, threshold)

    def interrupted(image):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return threshold(image)

    calls: list[int] = []
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        segment_folder(images, out, interrupted)
    assert tree(out) == ["case_001_0000.nii.gz", "case_002_0000.nii"]
    calls = [1, 1, 1]  # no more interruptions
    again = segment_folder(images, out, interrupted)
    assert [d.image.name for d in again] == ["case_003_0000.nii.gz", "case_004_0000.nii.gz", "case_005_0000.nii.gz"]

    def table(folder):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in quality_rows(folder)]

    assert table(out) == table(one)
    sharded = tmp_path / "sharded"
    a = segment_folder(images, sharded, threshold, num_parts=2, part_id=0)
    b = segment_folder(images, sharded, threshold, num_parts=2, part_id=1)
    assert [d.image.name for d in a] == ["case_001_0000.nii.gz", "case_003_0000.nii.gz", "case_005_0000.nii.gz"]
    assert [d.image.name for d in b] == ["case_002_0000.nii", "case_004_0000.nii.gz"]
    assert segment_folder(images, sharded, threshold) == []  # everything finished: nothing to do
    assert table(sharded) == table(one)
    assert len(segment_folder(images, sharded, threshold, force=True)) == 5
    with pytest.raises(InputError, match="--part-id"):
        segment_folder(images, sharded, threshold, num_parts=2, part_id=-1)


def test_interrupted_run_leaves_no_partial_file(images, tmp_path):
    def interrupted(image):
        if image.shape[1] == 28:  # the second image
            raise KeyboardInterrupt
        return threshold(image)

    out = tmp_path / "pred"
    with pytest.raises(KeyboardInterrupt):
        segment_folder(images, out, interrupted)
    assert tree(out) == ["case_001_0000.nii.gz"]


# ------------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "m"
    unet = build_model("tiny", seed=0)
    net = SegmentationNet(unet, unet.out_channels, 2)
    with torch.no_grad():  # every voxel becomes class 1, id 9
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([0.0, 50.0]))
    meta = SegmentationMeta(label_ids=[0, 9], spacing=[1.5, 1.5, 1.5], patch_size=[32, 32, 32], feature_channels=unet.out_channels,
                            normalisation={"method": "percentile", "modality": "mr", "percentiles": [0.5, 99.5]})
    return save_model_dir(net, meta, d)


def one_line_error(r) -> str:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


def test_segment_a_folder_from_the_command_line(images, model, tmp_path):
    out = tmp_path / "pred"
    args = ["segment", "-i", str(images), "-o", str(out), "--model", str(model), "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"wrote 2 label maps and quality.csv to {out}" in r.output
    assert tree(out) == ["case_001_0000.nii.gz", "case_002_0000.nii", "quality.csv"]
    seg = io.load_labels(out / "case_002_0000.nii")
    assert seg.shape == (32, 28, 20) and (seg.data == 9).all()
    # a rerun skips the finished images; --force --tta redo them; a label map not written by a folder
    # run is refused in one line before any work
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "wrote 0 label maps, 2 finished before and quality.csv" in r.output, r.output
    r = runner.invoke(app, [*args, "--force", "--tta"])
    assert r.exit_code == 0, r.output
    io.save(seg, out / "case_002_0000.nii", labels=True, force=True)  # the same map, without its record
    assert "--force" in one_line_error(runner.invoke(app, args))
    r = runner.invoke(app, [*args, "--force", "--num-parts", "2", "--part-id", "1"])
    assert r.exit_code == 0 and "wrote 1 label maps (share 1 of 2)" in r.output, r.output
    # a folder given as IMAGE works the same; a single image still takes -o / --out as a file
    r = runner.invoke(app, ["segment", str(images), "-o", str(tmp_path / "p2"), "--model", str(model), "--device", "cpu"])
    assert r.exit_code == 0 and tree(tmp_path / "p2") == tree(out), r.output
    r = runner.invoke(app, ["segment", "-i", str(images / "case_002_0000.nii"), "-o", str(tmp_path / "one.nii.gz"),
                            "--model", str(model), "--device", "cpu"])
    assert r.exit_code == 0 and "labels present: [9]" in r.output, r.output


def test_segment_folder_errors_are_one_line(images, model, tmp_path, monkeypatch):
    import synthvox.segmentation as segmentation

    def forbidden(*a, **k):
        raise AssertionError("work started before the checks")

    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "a_file").write_text("")
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "case_001_0000.nii.gz").write_text("")
    base = ["--model", str(model), "--device", "cpu"]
    cases = {
        "no images (*.nii, *.nii.gz": ["segment", "-i", str(empty), "-o", str(tmp_path / "o"), *base],
        "output folder is a file": ["segment", "-i", str(images), "-o", str(tmp_path / "a_file"), *base],
        "output exists, not overwriting (use --force)": ["segment", "-i", str(images), "-o", str(pred), *base],
        "not both": ["segment", str(images), "-i", str(images), "-o", str(tmp_path / "o"), *base],
        "nothing to segment": ["segment", "-o", str(tmp_path / "o"), *base],
        "nothing to segment with: give --model": ["segment", "-i", str(images), "-o", str(tmp_path / "o")],
        "not a synthvox segmentation model": ["segment", "-i", str(images), "-o", str(tmp_path / "o"), "--model", str(empty)],
    }
    with monkeypatch.context() as m:
        m.setattr(segmentation, "segment_files", forbidden)
        for expect, args in cases.items():
            assert expect in one_line_error(runner.invoke(app, args)), expect
    assert not (tmp_path / "o").exists()
    (images / "case_000_0000.nii.gz").write_bytes(b"junk")  # sorted first: recorded, the others still segmented
    line = one_line_error(runner.invoke(app, ["segment", "-i", str(images), "-o", str(tmp_path / "o"), *base]))
    assert "case_000_0000.nii.gz" in line and "1 of 3 image(s) failed" in line
    assert tree(tmp_path / "o") == ["case_000_0000.nii.gz.error.txt", "case_001_0000.nii.gz", "case_002_0000.nii", "quality.csv"]
    assert "--part-id" in one_line_error(runner.invoke(app, ["segment", "-i", str(images), "-o", str(tmp_path / "o"), *base,
                                                              "--num-parts", "2", "--part-id", "2"]))
