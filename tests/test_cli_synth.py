"""``synthvox synth`` through Typer's runner: outputs, refusal to overwrite, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from synthvox import io
from synthvox.cli import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, ["synth", *args])


def _one_line_error(result) -> str:
    out = (result.stderr if result.stderr_bytes is not None else result.output).strip()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    return lines[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "out"
    result = _run("--out", str(out), "--n", "2", "--size", "32", "--seed", "3", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def test_writes_the_expected_files(made):
    names = sorted(p.name for p in made.iterdir())
    expected = sorted(
        [f"{i:04d}_{k}.nii.gz" for i in range(2) for k in ("labels", "view1", "view2")] + ["params.json", "preview.png"]
    )
    assert names == expected
    lab = io.load_labels(made / "0001_labels.nii.gz")
    v1 = io.load(made / "0001_view1.nii.gz")
    assert lab.shape == v1.shape == (32, 32, 32)
    assert np.allclose(lab.affine, v1.affine)
    assert np.allclose(lab.spacing, lab.spacing[0]) and lab.spacing[0] > 0
    ids = lab.data.unique().tolist()
    assert ids == list(range(len(ids))) and len(ids) >= 4
    assert 0.0 <= float(v1.data.min()) and float(v1.data.max()) <= 1.0
    png = (made / "preview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_params_json_replays_the_written_sample(made):
    from synthvox.synth.engine import SynthConfig, SynthEngine

    doc = json.loads((made / "params.json").read_text())
    assert [s["index"] for s in doc["samples"]] == [0, 1]
    engine = SynthEngine(SynthConfig.from_dict(doc["config"]), torch.device("cpu"))
    again = engine.replay(doc["samples"][1])
    lab = io.load_labels(made / "0001_labels.nii.gz").data
    assert torch.equal(again.labels[0].cpu(), lab)


def test_refuses_to_overwrite_without_force(made):
    before = (made / "0000_view1.nii.gz").read_bytes()
    line = _one_line_error(_run("--out", str(made), "--n", "1", "--size", "32"))
    assert "--force" in line
    assert (made / "0000_view1.nii.gz").read_bytes() == before


def test_force_overwrites(tmp_path):
    out = tmp_path / "o"
    assert _run("--out", str(out), "--n", "1", "--size", "16x24x20").exit_code == 0
    result = _run("--out", str(out), "--n", "1", "--size", "16x24x20", "--seed", "5", "--force")
    assert result.exit_code == 0, result.output
    assert io.load(out / "0000_view2.nii.gz").shape == (16, 24, 20)


@pytest.mark.parametrize("size", ["0", "abc", "32x32", "4", "-8", "32x0x32"])
def test_bad_size_is_a_one_line_error(tmp_path, size):
    line = _one_line_error(_run("--out", str(tmp_path / "x"), "--size", size))
    assert "--size" in line
    assert not (tmp_path / "x" / "preview.png").exists()


def test_bad_n_and_bank(tmp_path):
    assert "--n" in _one_line_error(_run("--out", str(tmp_path / "a"), "--n", "0"))
    assert "not found" in _one_line_error(_run("--out", str(tmp_path / "b"), "--shapes", str(tmp_path / "nope.npz")))
    fake = tmp_path / "fake.npz"
    fake.write_text("not a bank")
    _one_line_error(_run("--out", str(tmp_path / "c"), "--shapes", str(fake), "--size", "16"))


def test_preview_says_which_artefacts_each_view_received():
    from synthvox.synth.appearance import AppearanceConfig, sample_appearance
    from synthvox.synth.preview import artefact_summary

    g = torch.Generator().manual_seed(0)
    off = sample_appearance(g, 5, AppearanceConfig.all_off()).to_dict()
    assert artefact_summary(off) == "no artefacts"
    on = artefact_summary(sample_appearance(g, 5, AppearanceConfig.all_on()).to_dict())
    for word in ("bias", "gamma", "thick slices", "spike", "Gibbs", "noise"):
        assert word in on, on
    assert ("blur" in on) != ("sharpened" in on)  # one or the other
