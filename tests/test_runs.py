"""What the three scripts share about a run: --resume, --checkpoint, metrics.csv, Ctrl-C."""

import csv

import pytest

import ae
import common
import dae
import vae

SCRIPTS = [ae, dae, vae]
TIMINGS = {"seconds", "images_per_second"}  # the only columns that may differ between two equal runs


def metrics(path):
    with open(path) as handle:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(handle)]


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """Runs on the synthetic catalogue (the default data/ folder is empty), at 32 px."""
    monkeypatch.setattr(common, "DEFAULT_DATA", tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    return ["--image-size", "32", "--latent-dim", "8", "--batch-size", "64", "--device", "cpu", "--epochs", "5"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
def test_an_interrupted_run_resumed_ends_as_an_uninterrupted_one(script, synthetic, tmp_path, monkeypatch):
    script.main([*synthetic, "--out", str(tmp_path / "whole")])
    calls, run_epoch = [], script.run_epoch

    def interrupted_in_epoch_4(*args, **kwargs):  # two calls an epoch: train, then test
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return run_epoch(*args, **kwargs)

    monkeypatch.setattr(script, "run_epoch", interrupted_in_epoch_4)
    first = tmp_path / "first"
    with pytest.raises(SystemExit, match=f"interrupted: {first / 'model.pt'} holds the last finished epoch"):
        script.main([*synthetic, "--out", str(first)])
    assert len(metrics(first / "metrics.csv")) == 3  # one row per finished epoch, kept
    monkeypatch.setattr(script, "run_epoch", run_epoch)
    saved = (first / "model.pt").read_bytes()
    # Resumed from the interrupted run's checkpoint into another folder: the checkpoint given is not touched.
    script.main(["--resume", "--checkpoint", str(first / "model.pt"), "--out", str(tmp_path / "second"),
                 "--device", "cpu"])
    assert (first / "model.pt").read_bytes() == saved
    assert metrics(tmp_path / "second" / "metrics.csv") == metrics(tmp_path / "whole" / "metrics.csv")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
def test_a_checkpoint_flag_without_figures_only_or_resume_is_refused(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--checkpoint", "out/vae/model.pt", "--beta" if script is vae else "--seed", "4"])
    assert "--checkpoint names the model to load with --figures-only or --resume" in capsys.readouterr().err


def test_resume_refuses_a_flag_that_changes_the_run(synthetic, tmp_path):
    ae.main([*synthetic, "--epochs", "1", "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="trained with --epochs 1, but this run asks for 9"):
        ae.main(["--resume", "--out", str(tmp_path / "run"), "--epochs", "9"])
