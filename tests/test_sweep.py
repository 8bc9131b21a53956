"""The one-line threshold note of runs whose thresholds were tuned for another backbone or dataset (issue 22).

    .venv/bin/python -m pytest -q tests/test_sweep.py
"""
import dataclasses

import pytest

import ppap
from test_audit import small_dinov2  # noqa: F401 (a fixture)


# ---------------------------------------------------------------------------
# the threshold note

def test_the_threshold_note_follows_the_registries(monkeypatch):
    note = lambda *argv: ppap.threshold_note(ppap.parse_args(list(argv)))
    for own in (["--data", "cocostuff"], ["--data", "cocostuff", "--patch", "16"], ["--data", "cityscapes"],
                ["--data", "cityscapes", "--arch", "vit_small"], ["--data", "potsdam"], ["--data", "synthetic"]):
        assert note(*own) is None, own                                    # the authors' (or the demo's) own rows
    line = note("--data", "cocostuff", "--arch", "dinov2_vits14_reg")
    assert line.startswith("note: --phi0 0.55 / --psi0 0.2 were tuned for vit_small/8 on cocostuff, not for "
                           "dinov2_vits14_reg/14 on cocostuff") and "\n" not in line
    assert "python eval.py --propagation --sweep --data cocostuff --arch dinov2_vits14_reg --patch 14" in line
    assert "--weights /w/v2.pth" in note("--data", "cocostuff", "--arch", "dinov2_vitb14", "--weights", "/w/v2.pth")
    assert "the defaults" in note("--data", "imagenet-s")                 # no row of its own, none to borrow
    assert "vit_base/8 on potsdam" in note("--data", "potsdam", "--arch", "vit_small")
    assert note("--data", "cocostuff", "--arch", "dinov2_vits14", "--phi0", "0.9") is None   # chosen for this run
    # a dataset that borrows another's rows, as the coming `--data folder` takes COCO-Stuff's
    monkeypatch.setitem(ppap.DATASETS, "borrowing", dataclasses.replace(ppap.DATASETS["cocostuff"], presets="cocostuff"))
    assert "not for vit_small/8 on borrowing" in note("--data", "borrowing")


def test_a_dinov2_run_prints_the_note_once(small_dinov2, tmp_path, capsys):
    argv = ["--data", "synthetic", "--arch", "dinov2_vits14", "--weights", small_dinov2, "--max-steps", "1",
            "--batch-size", "16", "--img-size", "112", "--val-size", "112", "--val-limit", "2", "--val-every", "0",
            "--run", str(tmp_path / "r"), "--device", "cpu", "--no-progress", "--num-workers", "0"]
    assert ppap.main(argv) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: --phi0")]
    assert len(notes) == 1 and "eval.py --propagation --sweep --data synthetic --arch dinov2_vits14" in notes[0]
    assert ppap.main(["--data", "synthetic", "--max-steps", "1", "--batch-size", "4", "--val-limit", "2",
                      "--val-every", "0", "--run", str(tmp_path / "demo"), "--device", "cpu", "--no-progress",
                      "--num-workers", "0"]) == 0
    assert "note: --phi0" not in capsys.readouterr().out                  # the demo preset is its own
