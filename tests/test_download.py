"""download.py: the first run fetches the dataset into data/, with kagglehub.dataset_download replaced by
stand-ins (conftest's `offline` makes every other call fail as it does without a network)."""

import errno
from pathlib import Path
from types import SimpleNamespace

import kagglehub
import pytest
import requests
import torch

import common
import download
import vae
from conftest import write_catalogue

FLAGS = ["--epochs", "1", "--image-size", "32", "--latent-dim", "8", "--batch-size", "8", "--device", "cpu"]


@pytest.fixture
def empty_data(tmp_path, monkeypatch):
    """The repo's data/ as a fresh clone has it: no photos. The dataset is 24 photos here, not 2,906."""
    monkeypatch.setattr(common, "DEFAULT_DATA", tmp_path / "data")
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "data" / "processed")
    monkeypatch.setattr(download, "DATASET_PHOTOS", 24)
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


def kaggle(nested="", count=24, csv=True, then=None):
    """A stand-in for kagglehub.dataset_download: writes the dataset in Kaggle's layout into output_dir
    (or one folder deeper), then raises `then` if given, as an interrupted download would."""
    calls = []

    def dataset_download(handle, path=None, *, force_download=False, output_dir=None):
        calls.append(handle)
        root = write_catalogue(Path(output_dir) / nested, count)
        if not csv:
            (root / "fashion.csv").unlink()
        if then:
            raise then
        return output_dir

    dataset_download.calls = calls
    return dataset_download


def lines(text, start):
    return [line for line in text.splitlines() if line.startswith(start)]


@pytest.mark.parametrize("nested", ["", "fashion-images-v1"], ids=["at the top", "one folder deeper"])
def test_the_first_run_fetches_the_dataset_and_trains_on_it(empty_data, tmp_path, monkeypatch, capsys, nested):
    fetch = kaggle(nested)
    monkeypatch.setattr(kagglehub, "dataset_download", fetch)
    vae.main([*FLAGS, "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert fetch.calls == [download.KAGGLE_DATASET]
    assert len(lines(printed, "downloading the Fashion Images dataset (24 photos")) == 1
    assert lines(printed, "downloaded ") == [f"downloaded 24 photos and {empty_data / 'fashion-images' / 'fashion.csv'}"]
    assert "SYNTHETIC" not in printed
    trained_on = torch.load(tmp_path / "out" / "model.pt", weights_only=True)["args"]["catalogue"]
    assert trained_on["synthetic"] is False and trained_on["photos"] == 24
    assert len(common.find_images(empty_data)) == 24 and not (empty_data / ".download").exists()
    # A second run finds the photos in data/ and never calls the download.
    monkeypatch.setattr(kagglehub, "dataset_download", kaggle(then=AssertionError("a second download")))
    vae.main([*FLAGS, "--out", str(tmp_path / "again")])
    assert "downloading" not in capsys.readouterr().out


def test_without_a_network_one_line_says_why_and_the_run_trains_on_the_drawn_catalogue(empty_data, tmp_path,
                                                                                        capsys):
    vae.main([*FLAGS, "--out", str(tmp_path / "out")])  # conftest's stand-in raises requests' ConnectionError
    printed = capsys.readouterr().out
    notes = lines(printed, "note: could not download")
    assert len(notes) == 1 and "no connection to Kaggle (ConnectionError)" in notes[0]
    assert "https://www.kaggle.com/datasets/vikashrajluhaniwal/fashion-images" in notes[0]
    assert "--data synthetic" in notes[0]
    assert len(lines(printed, "notice: this run uses a SYNTHETIC catalogue")) == 1
    assert "a SYNTHETIC catalogue: not real results" in printed.splitlines()[-1]
    assert torch.load(tmp_path / "out" / "model.pt", weights_only=True)["args"]["catalogue"]["synthetic"] is True


@pytest.mark.parametrize("then", [KeyboardInterrupt(), requests.ConnectionError("connection lost"),
                                  OSError(errno.ENOSPC, "No space left on device")], ids=["Ctrl-C", "lost", "disk full"])
def test_an_interrupted_download_is_never_read_as_the_dataset(empty_data, monkeypatch, capsys, then):
    monkeypatch.setattr(kagglehub, "dataset_download", kaggle(count=10, then=then))
    try:
        assert common.load_catalogue(None, 32).synthetic  # a lost connection or a full disk: the drawn catalogue
    except KeyboardInterrupt:  # Ctrl-C goes on to end the run (the scripts' ends_cleanly says it in one line)
        assert isinstance(then, KeyboardInterrupt)
    assert common.find_images(empty_data) == [] and not (empty_data / "fashion-images").exists()
    # What a killed run would leave (kill -9 skips every clean-up) is skipped, and removed by the next try.
    write_catalogue(empty_data / ".download", 10)
    assert common.find_images(empty_data) == []
    monkeypatch.setattr(kagglehub, "dataset_download", kaggle())
    capsys.readouterr()
    assert not common.load_catalogue(None, 32).synthetic
    assert len(common.find_images(empty_data)) == 24 and not (empty_data / ".download").exists()
    assert "SYNTHETIC" not in capsys.readouterr().out


def test_ctrl_c_in_the_download_ends_the_run_in_one_line(empty_data, tmp_path, monkeypatch):
    monkeypatch.setattr(kagglehub, "dataset_download", kaggle(count=10, then=KeyboardInterrupt()))
    with pytest.raises(SystemExit) as stop:
        vae.main([*FLAGS, "--out", str(tmp_path / "out")])
    assert str(stop.value.code).startswith("interrupted:") and "\n" not in str(stop.value.code)


@pytest.mark.parametrize("wrong", [dict(csv=False), dict(count=20)], ids=["no fashion.csv", "too few photos"])
def test_a_download_that_is_not_the_dataset_is_refused_in_one_line(empty_data, monkeypatch, capsys, wrong):
    monkeypatch.setattr(kagglehub, "dataset_download", kaggle(**wrong))  # 20 of 24 is under 90 %
    assert common.load_catalogue(None, 32).synthetic
    printed = capsys.readouterr().out
    refused = lines(printed, "error: the download holds")
    assert len(refused) == 1 and "so it is not used" in refused[0] and "SYNTHETIC" in printed
    assert common.find_images(empty_data) == [] and not (empty_data / "fashion-images").exists()


def test_the_drawn_catalogue_on_purpose_makes_no_download_call(empty_data, monkeypatch, capsys):
    monkeypatch.setattr(kagglehub, "dataset_download", kaggle(then=AssertionError("a download")))
    assert common.load_catalogue("synthetic", 32).synthetic
    printed = capsys.readouterr().out
    assert "download" not in printed and "SYNTHETIC catalogue of 600 simple drawn products (--data synthetic)" in printed


def http_error(status):
    return requests.HTTPError(f"{status} Client Error", response=SimpleNamespace(status_code=status))


@pytest.mark.parametrize("error, said", [
    (http_error(403), "asks you to sign in or to accept its terms"), (http_error(401), "kaggle.json"),
    (http_error(429), "rate limit"), (http_error(503), "down or busy"), (http_error(404), "no such dataset"),
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    (requests.ConnectionError("unreachable"), "no connection to Kaggle"),
    (requests.ConnectTimeout("slow"), "no connection to Kaggle (ConnectTimeout)")])
def test_each_way_a_download_fails_is_said_with_what_to_do(error, said):
    assert said in download.download_failure(error)


def test_a_folder_in_the_way_without_photos_is_named_in_one_true_line(empty_data, monkeypatch, capsys):
    fetch = kaggle()
    monkeypatch.setattr(kagglehub, "dataset_download", fetch)
    (empty_data / "fashion-images" / "Apparel").mkdir(parents=True)  # a half-finished unzip: folders, no photos
    (empty_data / "fashion-images" / "readme.txt").write_text("unzipping ...")
    assert download.fetch_dataset(empty_data) is False and not fetch.calls  # nothing downloaded in vain
    said = lines(capsys.readouterr().out, "note:")
    assert len(said) == 1 and f"{empty_data / 'fashion-images'}/ is there but holds no photos" in said[0]
    assert "could not download" not in said[0]


def test_a_second_first_run_waits_for_the_download_under_way_and_makes_none(empty_data, monkeypatch, capsys):
    import threading

    import filelock

    fetch = kaggle()
    monkeypatch.setattr(kagglehub, "dataset_download", fetch)
    first = filelock.FileLock(empty_data / ".download.lock", timeout=0)
    first.acquire()  # another run is downloading
    result = []
    second = threading.Thread(target=lambda: result.append(download.fetch_dataset(empty_data)))
    second.start()
    second.join(timeout=2)
    assert second.is_alive() and not result  # it waits
    write_catalogue(empty_data / "fashion-images")  # the first run's download lands
    first.release()
    second.join(timeout=30)
    assert result == [True] and not fetch.calls
    assert "waiting for another run, which is downloading the dataset" in capsys.readouterr().out
