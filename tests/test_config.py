"""The one config dialect (synthvox.config) that pretraining, finetuning and registration share."""

from __future__ import annotations

import pytest
from conftest import two_ellipsoids
from typer.testing import CliRunner

from synthvox.cli import app
from synthvox.config import apply_overrides, from_dict, to_dict
from synthvox.errors import InputError
from synthvox.registration.pipeline import RegistrationConfig
from synthvox.segmentation import AugmentConfig
from synthvox.train.config import resolve_config


@pytest.mark.parametrize("cls", [RegistrationConfig, AugmentConfig])
def test_same_mechanism_for_frozen_configs(cls) -> None:
    base = cls()
    field = next(k for k, v in to_dict(base).items() if isinstance(v, float))
    new = apply_overrides(base, [f"{field}=0.5"])
    assert getattr(new, field) == 0.5
    assert from_dict(cls, to_dict(new)) == new
    for bad in (["bogus=1"], [f"{field}=abc"], ["nokeyvalue"]):
        with pytest.raises(InputError) as e:
            apply_overrides(base, bad)
        assert "\n" not in str(e.value)


def test_registration_tuple_settings_and_pretrain_share_parsing() -> None:
    cfg = apply_overrides(RegistrationConfig(), ["affine_iters=[10, 5]", "adam_iters=7", "inverse_consistent=false"])
    assert cfg.affine_iters == (10, 5) and cfg.adam_iters == 7 and cfg.inverse_consistent is False
    assert resolve_config("tiny", ["optim.lr=1e-3"]).optim.lr == 1e-3  # the same parser underneath


def _pair(tmp_path):
    import numpy as np

    from synthvox import io
    from synthvox.volume import Volume

    lab = two_ellipsoids()
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = []
    for name, img in (("fixed", lab.float()), ("moving", lab.float().roll(2, 1))):
        paths.append(tmp_path / f"{name}.nii.gz")
        io.save(Volume(img, aff), paths[-1])
    return paths


@pytest.mark.parametrize("setting", ["bogus=1", "adam_iters=abc", "adam_iters", "net_spacing=0", "net_spacing=-2.5",
                                     "net_share=0", "net_share=1", "net_share=half"])
def test_register_set_is_checked_before_any_work(tmp_path, setting) -> None:
    fixed, moving = _pair(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["register", str(fixed), str(moving), "--out", str(out), "--set", setting])
    assert res.exit_code == 2 and not out.exists(), res.output
    assert res.output.strip().count("\n") == 0


def test_finetune_set_is_checked_before_any_work(tmp_path) -> None:
    image, _ = _pair(tmp_path)
    out = tmp_path / "model"
    res = CliRunner().invoke(app, ["finetune", "--image", str(image), "--label", str(image), "--out", str(out),
                                   "--set", "p_noise=lots"])
    assert res.exit_code == 2 and not out.exists(), res.output


def test_register_set_reaches_the_solver(tmp_path) -> None:
    import json

    fixed, moving = _pair(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["register", str(fixed), str(moving), "--out", str(out), "--quiet",
                                   "--set", "adam_iters=3", "--set", "affine_iters=[4, 2]"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "report.json").read_text())["config"]
    assert cfg["adam_iters"] == 3 and cfg["affine_iters"] == [4, 2]
