"""What pretraining and finetuning share: the learning-rate schedule, the run folder and its log."""

from __future__ import annotations

import csv

import pytest

from synthvox.errors import InputError
from synthvox.segmentation.config import FinetuneConfig
from synthvox.segmentation.loop import lr_at as finetune_lr
from synthvox.train.config import resolve_config
from synthvox.train.pretrain import lr_at as pretrain_lr
from synthvox.train.rundir import RunLog, check_run_dir, prepare_run_dir
from synthvox.train.schedule import warmup_decay


def test_one_schedule_for_both():
    ft = FinetuneConfig(steps=200, lr=1e-3, warmup=10).resolved()
    assert [finetune_lr(s, ft) for s in range(200)] == [warmup_decay(s, 1e-3, 200, 10) for s in range(200)]
    assert finetune_lr(9, ft) == pytest.approx(1e-3) and finetune_lr(199, ft) < 1e-6
    pt = resolve_config("tiny", ["steps=300", "optim.warmup=20", "optim.decay=linear"])
    o = pt.optim
    assert [pretrain_lr(s, pt, 150) for s in range(300)] == [
        warmup_decay(s, o.lr, 300, 20, "linear", o.final_lr_ratio, rewarm_from=150) for s in range(300)
    ]
    with pytest.raises(ValueError, match="decay"):
        warmup_decay(0, 1.0, 10, 0, "step")


def test_run_folder_is_refused_cleared_or_kept(tmp_path):
    run = tmp_path / "run"
    owned = ("log.csv", "checkpoints")
    prepare_run_dir(run, owned, resume=False, force=False)  # a new folder is made
    (run / "checkpoints").mkdir()
    (run / "log.csv").write_text("step\n")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"already holds a run \(log.csv, checkpoints\).*--resume.*--force"):
        check_run_dir(run, owned, resume=False, force=False)
    assert check_run_dir(run, owned, resume=True, force=False) == []  # resume keeps everything
    prepare_run_dir(run, owned, resume=False, force=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # only the run's own entries go
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="a file is there"):
        check_run_dir(tmp_path / "file", owned, resume=False, force=True)


def test_log_is_cut_back_to_the_resumed_step(tmp_path):
    path = tmp_path / "log.csv"
    with RunLog(path, ["step", "loss", "val"]) as log:
        for s in range(1, 6):
            log.append({"step": s, "loss": s / 10})
    with RunLog(path, ["step", "loss", "val"], resume_from=3) as log:
        log.append([4, 0.04, 0.9])
    rows = list(csv.DictReader(open(path)))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"] and rows[3]["loss"] == "0.04" and rows[0]["val"] == ""
    with RunLog(path, ["step", "loss"]) as log:  # a new run starts a new log
        pass
    assert path.read_text().splitlines() == ["step,loss"]
