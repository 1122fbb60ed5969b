"""bookkeeping.py, through the three scripts: --resume, --checkpoint, --out, metrics.csv, Ctrl-C, divergence."""

import csv
import math
import os
import re
import shlex
import signal
import subprocess
import sys

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import ae
import bookkeeping
import common
import dae
import vae
from conftest import ctrl_c_in_epoch, held

SCRIPTS = [ae, dae, vae]
TIMINGS = {"seconds", "images_per_second"}  # the only columns that may differ between two equal runs


def metrics(path):
    with open(path) as handle:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(handle)]


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """Runs on the synthetic catalogue, on purpose (and the default data/ folder is empty), at 32 px."""
    monkeypatch.setattr(common, "DEFAULT_DATA", tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    return ["--image-size", "32", "--latent-dim", "8", "--batch-size", "64", "--device", "cpu", "--epochs", "5",
            "--data", "synthetic"]  # asked for: a drawn model given way to no run (that is for an offline run's)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
def test_an_interrupted_run_resumed_ends_as_an_uninterrupted_one(script, synthetic, tmp_path, monkeypatch):
    script.main([*synthetic, "--out", str(tmp_path / "whole")])
    first = tmp_path / "first"
    with ctrl_c_in_epoch(script, 4, monkeypatch), pytest.raises(SystemExit, match=f"interrupted: {first / 'model.pt'} "
                                                                                   f"holds the last finished epoch"):
        script.main([*synthetic, "--out", str(first)])
    assert len(metrics(first / "metrics.csv")) == 3  # one row per finished epoch, kept
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


def photo_folder(root, count, csv=False):
    """`count` distinct drawn products in two folders (Apparel/, Footwear/), with or without fashion.csv."""
    for index in range(count):
        folder = root / ("Apparel" if index % 2 else "Footwear")
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (48, 64), "white")
        colour = ((index * 97) % 256, (index * 57) % 256, (index * 31) % 256)
        ImageDraw.Draw(image).rectangle((4 + 3 * index % 20, 8, 44, 20 + 5 * index % 40), fill=colour)
        image.save(folder / f"{500 + index}.png")
    return root


FLAGS = ["--image-size", "32", "--latent-dim", "8", "--batch-size", "8", "--device", "cpu", "--epochs", "1"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
@pytest.mark.parametrize("count", [3, 12], ids=["the minimum", "no fashion.csv"])
def test_a_folder_without_csv_or_with_the_fewest_photos_runs_end_to_end(script, count, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")
    out = tmp_path / "out"
    script.main([*FLAGS, "--data", str(photo_folder(tmp_path / "photos", count)), "--out", str(out)])
    assert (out / "model.pt").is_file() and (out / "metrics.csv").is_file()
    assert len(list(out.glob("*.png"))) >= 2  # the figures that need no labels are drawn
    assert "first folder level is the only label" in capsys.readouterr().out


def test_fewer_photos_than_a_run_needs_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(SystemExit, match="2 readable photos .* split into 1 training and 1 test .* at least 2 and 1"):
        vae.main([*FLAGS, "--data", str(photo_folder(tmp_path / "photos", 2)), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # a failed run leaves no empty folder behind


def test_a_script_will_not_train_into_a_folder_holding_another_scripts_model(synthetic, tmp_path):
    ae.main([*synthetic, "--epochs", "1", "--out", str(tmp_path / "shared")])
    before = (tmp_path / "shared" / "model.pt").read_bytes()
    with pytest.raises(SystemExit, match="holds a model of ae.py; train vae.py into another --out"):
        vae.main([*synthetic, "--epochs", "1", "--out", str(tmp_path / "shared")])
    assert (tmp_path / "shared" / "model.pt").read_bytes() == before


def test_the_defaults_mean_the_repos_own_folders_wherever_the_script_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert common.DEFAULT_DATA == common.REPO / "data" and common.DEFAULT_DATA.is_absolute()
    for script in SCRIPTS:
        assert script.parse_args([]).out == common.REPO / "out" / script.__name__


def test_the_first_line_is_a_command_that_reruns_the_run(synthetic, tmp_path, capsys):
    dae.main([*synthetic, "--epochs", "1", "--out", str(tmp_path / "run"), "--bf16"][:-1])
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (f"python dae.py --epochs 1 --latent-dim 8 --image-size 32 --out {tmp_path / 'run'} "
                     f"--device cpu --data synthetic")  # --batch-size 64 is the default
    assert dae.parse_args(first.split()[2:]).epochs == 1  # it parses back


def test_the_first_line_reruns_a_run_with_several_photos_and_spaces_in_names(smoke_flags, tmp_path, capsys):
    import shlex

    dae.main([*smoke_flags, "--epochs", "1"])
    photos = [tmp_path / "a photo.png", tmp_path / "b.png"]
    for photo in photos:
        Image.new("RGB", (40, 36), "white").save(photo)
    capsys.readouterr()
    dae.main([*smoke_flags, "--clean", *map(str, photos)])
    first = capsys.readouterr().out.splitlines()[0]
    assert "[" not in first and dae.parse_args(shlex.split(first)[2:]).clean == list(map(str, photos))


def test_a_synthetic_run_says_so_at_the_end_and_the_model_remembers_it(synthetic, tmp_path, capsys):
    vae.main([*synthetic, "--epochs", "1", "--out", str(tmp_path / "run")])
    assert "SYNTHETIC catalogue: not real results" in capsys.readouterr().out.splitlines()[-1]
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["args"]["catalogue"]
    assert saved["synthetic"] and saved["photos"] == 600


def test_a_checkpoint_from_another_script_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"script": "ae.py", "state_dict": {}, "args": {}}, path)
    args = vae.parse_args(["--checkpoint", str(path), "--figures-only"])
    with pytest.raises(SystemExit, match="saved by ae.py, not by vae.py"):
        bookkeeping.load_checkpoint(path, "vae.py", args, vars(vae.parse_args([])), vae.MODEL_FLAGS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
def test_a_new_run_never_trains_over_a_model_unless_told_to(script, synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    script.main([*synthetic, "--epochs", "1", "--out", str(out)])
    finished = (out / "model.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"holds a model of .* \(1 of 1 epochs\); pass another --out, --resume to "
                                         r"continue it, or --overwrite to replace it"):
        script.main([*synthetic, "--epochs", "2", "--latent-dim", "4", "--out", str(out)])
    assert (out / "model.pt").read_bytes() == finished  # nothing lost
    capsys.readouterr()
    script.main([*synthetic, "--epochs", "1", "--seed", "3", "--out", str(out), "--overwrite"])
    assert (out / "model.pt").read_bytes() != finished  # told to: the new run replaces it


def test_resume_on_a_finished_run_says_so_and_only_redraws(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    vae.main([*synthetic, "--epochs", "1", "--out", str(out)])
    finished = (out / "model.pt").read_bytes()
    (out / "samples.png").unlink()
    capsys.readouterr()
    vae.main(["--resume", "--out", str(out), "--device", "cpu"])
    assert "has finished all 1 epochs: nothing to resume" in capsys.readouterr().out
    assert (out / "model.pt").read_bytes() == finished and (out / "samples.png").is_file()


@pytest.mark.parametrize("script", [ae, vae], ids=lambda module: module.__name__)
def test_the_decoder_starts_out_drawing_the_training_photos_average_colour(script, smoke_flags, tiny_catalogue,
                                                                          tmp_path):
    script.main([*smoke_flags, "--epochs", "1", "--lr", "1e-9"])  # a rate so small that training moves nothing
    weights = torch.load(tmp_path / "out" / "model.pt", weights_only=True)["state_dict"]
    last = [name for name in weights if name.startswith("decoder.")][-1]  # the sigmoid's input: its bias
    catalogue = common.load_catalogue(tiny_catalogue, 32)
    colour = catalogue.images[catalogue.train_index].float().mean((0, 2, 3)) / 255  # (3,), mostly white
    assert last.endswith(".bias") and torch.allclose(torch.sigmoid(weights[last]), colour, atol=1e-4)


@pytest.mark.parametrize("steps", range(1, 41))
def test_the_one_cycle_schedule_takes_any_number_of_steps(steps):
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1.0)
    schedule = bookkeeping.one_cycle(optimizer, 1.0, steps, 0.2)  # 5 steps: a climb of one step, 0/0 in PyTorch's
    rates = []  # the rate each step is taken at
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert all(0 <= rate <= 1 for rate in rates) and rates[-1] < 1e-3  # the last step is annealed
    if steps >= 5:
        assert max(rates) > 0.9  # and the peak is reached on the way


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
def test_a_run_of_five_steps_in_all_trains(script, smoke_flags, tmp_path):
    # The tiny catalogue has 22 training products: batches of 5 make 5 steps in one epoch.
    flags = [*smoke_flags[:-4], "--device", "cpu", "--batch-size", "5", "--epochs", "1"]
    script.main(flags)
    assert len(metrics(tmp_path / "out" / "metrics.csv")) == 1


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
def test_a_run_that_diverges_stops_with_one_line_and_keeps_the_last_good_epoch(script, smoke_flags, tmp_path,
                                                                               monkeypatch):
    out = tmp_path / "out"
    script.main([*smoke_flags, "--epochs", "1"])
    good = (out / "model.pt").read_bytes()
    with pytest.raises(SystemExit) as stop:  # --lr 10: Adam moves every weight by ~10 a step
        script.main([*smoke_flags, "--epochs", "2", "--lr", "10", "--overwrite"])
    message = str(stop.value.code)
    assert "\n" not in message and re.match(r"error: training diverged in epoch 1 \(.*\); try a smaller --lr than "
                                            r"10\. no epoch finished, so no model was saved", message), message
    assert (out / "model.pt").read_bytes() == good  # the model that was there is not lost
    # Diverging in epoch 2 keeps epoch 1: a limit that the first epoch meets and the second does not.
    check_epoch = bookkeeping.check_epoch

    def judged(epoch, train, test, seconds, count, args, limit):  # the same limit, moved below or above every loss
        moved = {**limit, "loss": -math.inf if epoch == 2 else math.inf}
        return check_epoch(epoch, train, test, seconds, count, args, moved)

    monkeypatch.setattr(script, "check_epoch", judged)
    with pytest.raises(SystemExit, match=f"diverged in epoch 2 .* {out / 'model.pt'} still holds the model of "
                                         f"epoch 1"):
        script.main([*smoke_flags, "--epochs", "2", "--overwrite"])
    assert torch.load(out / "model.pt", weights_only=True)["history"][-1]["epoch"] == 1


def test_the_divergence_limit_is_a_flat_picture_of_the_average_colour_with_twice_its_error():
    photos = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    colour = torch.tensor([0.2, 0.5, 0.9])
    images = photos.float() / 255
    flat_error = ((colour.view(1, 3, 1, 1) - images) ** 2).flatten(1).sum(1).mean()

    def summed_squares(recon, images):
        return ((recon - images) ** 2).flatten(1).sum(1).mean()

    limit = bookkeeping.divergence_limit(summed_squares, colour, photos, block=2)  # blocks of 2, 2 and 1
    assert limit["loss"] == pytest.approx(2 * flat_error.item(), rel=1e-5)
    assert limit["start"] == "a flat picture of the photos' average colour"
    # A denoiser whose noisy input is worse than the flat picture: the noisy input sets the limit, and is named.
    worse = bookkeeping.divergence_limit(summed_squares, colour, photos, corrupt=lambda images: 1 - images)
    noisy_error = ((1 - 2 * images) ** 2).flatten(1).sum(1).mean()
    assert noisy_error > flat_error and worse["start"] == "the noisy input itself"
    assert worse["loss"] == pytest.approx(2 * noisy_error.item(), rel=1e-5)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
def test_a_tool_on_an_out_without_a_model_says_how_to_train_one_there(script, tmp_path):
    tool = ["--clean", "a.png"] if script is dae else ["--query", "a.png"]
    out = tmp_path / "no model here"
    with pytest.raises(SystemExit) as stop:
        script.main([*tool, "--out", str(out)])
    command = str(stop.value.code).split("train first: ")[1].rstrip(")")
    assert str(stop.value.code).startswith(f"error: --out {out}: no model.pt there")
    assert shlex.split(command) == ["python", f"{script.__name__}.py", "--out", str(out)]  # runnable as printed


def written(printed):
    """The paths a run says it wrote, one "wrote PATH (what it is)" line each."""
    return [re.match(r"wrote (.+?)(?: \(.*\))?$", line).group(1) for line in printed.splitlines()
            if line.startswith("wrote ")]


def files_under(folder):
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def test_every_tool_names_each_file_it_writes_once_and_the_paths_exist(smoke_flags, tiny_catalogue, tmp_path,
                                                                         capsys):
    photo = next(tiny_catalogue.rglob("101.jpg"))
    ae.main([*smoke_flags, "--epochs", "1"])
    dae.main([*smoke_flags[:2], "--out", str(tmp_path / "dae"), *smoke_flags[4:], "--epochs", "1"])
    capsys.readouterr()
    for run in ([ae, "--query", str(photo), "102"], [ae, "--duplicates", "0.5"],
                [ae, "--figures-only", "--num-samples", "2"], [dae, "--clean", str(photo), "--out", str(tmp_path / "dae")]):
        before = {**files_under(tmp_path / "out"), **files_under(tmp_path / "dae")}
        run[0].main([*smoke_flags, *run[1:]])
        paths = written(capsys.readouterr().out)
        assert paths and len(paths) == len(set(paths)), run
        assert all(Path(path).exists() for path in paths), paths
        # Every file the tool wrote or changed is named, itself or by the folder it is in.
        after = {**files_under(tmp_path / "out"), **files_under(tmp_path / "dae")}
        changed = [path for path, stamp in after.items() if before.get(path) != stamp]
        assert changed and all(any(path == Path(named) or Path(named) in path.parents for named in map(Path, paths))
                               for path in changed), (run, changed, paths)


def test_new_samples_never_lie_beside_the_samples_of_an_earlier_call(smoke_flags, tmp_path, capsys):
    vae.main([*smoke_flags, "--epochs", "1", "--num-samples", "8", "--product-type", "Tshirts"])
    capsys.readouterr()
    vae.main([*smoke_flags, "--figures-only", "--num-samples", "4", "--product-type", "Heels"])
    assert sorted(path.name for path in (tmp_path / "out" / "samples").iterdir()) == [
        f"sample_{i:04d}.png" for i in range(4)]
    assert f"wrote {tmp_path / 'out' / 'samples'}/ (4 new products of type Heels; the 8 of an earlier call were " \
           f"removed)" in capsys.readouterr().out


def test_resume_with_more_epochs_says_why_a_finished_schedule_cannot_be_stretched(smoke_flags):
    vae.main([*smoke_flags, "--epochs", "2"])
    with pytest.raises(SystemExit) as stop:
        vae.main([*smoke_flags, "--resume", "--epochs", "5"])
    message = str(stop.value.code)
    assert "\n" not in message and "was trained with --epochs 2, but this run asks for 5" in message
    assert "learning rate falls to ~0 at its last epoch" in message and "train anew with --overwrite" in message


# ----------------------------------------------------------------------------- one run per folder, no model lost
REPO = Path(__file__).resolve().parents[1]


def start(script, flags, out):
    """A script run in a process of its own (as a user runs it), printing each line as it comes."""
    return subprocess.Popen([sys.executable, f"{script}.py", *flags, "--out", str(out)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(process, start_of_line):
    """Read the process's lines until one starts so; all it printed until then."""
    printed = []
    for line in process.stdout:
        printed.append(line)
        if line.startswith(start_of_line):
            return printed
    raise AssertionError("".join(printed))


def interrupted_run(script, smoke_flags, out, monkeypatch, epochs=4):
    """A run of `epochs` stopped by Ctrl-C in its second epoch: its model.pt holds epoch 1."""
    with ctrl_c_in_epoch(script, 2, monkeypatch), pytest.raises(SystemExit, match="interrupted"):
        script.main([*smoke_flags[:2], *smoke_flags[4:], "--epochs", str(epochs), "--out", str(out)])


def test_resuming_another_runs_checkpoint_never_replaces_a_finished_model(smoke_flags, tmp_path, monkeypatch):
    finished_out, stopped = tmp_path / "out", tmp_path / "P"
    vae.main([*smoke_flags, "--epochs", "2"])
    interrupted_run(vae, smoke_flags, stopped, monkeypatch)
    kept = {name: (finished_out / name).read_bytes() for name in ("model.pt", "metrics.csv")}
    with pytest.raises(SystemExit) as stop:
        vae.main(["--resume", "--checkpoint", str(stopped / "model.pt"), "--out", str(finished_out), "--device", "cpu"])
    message = str(stop.value.code)
    assert "\n" not in message and message.startswith(f"error: --out {finished_out} holds another model of vae.py "
                                                      f"(2 of 2 epochs, finished)") and "--overwrite" in message
    assert {name: (finished_out / name).read_bytes() for name in kept} == kept  # byte for byte as it was
    # Into an empty folder it continues, and so it does into the folder it came from; the checkpoint given is
    # never written.
    given = (stopped / "model.pt").read_bytes()
    vae.main(["--resume", "--checkpoint", str(stopped / "model.pt"), "--out", str(tmp_path / "empty"), "--device", "cpu"])
    assert (stopped / "model.pt").read_bytes() == given and len(metrics(tmp_path / "empty" / "metrics.csv")) == 4
    # --overwrite says so: then the finished model is replaced by the continued run.
    vae.main(["--resume", "--checkpoint", str(stopped / "model.pt"), "--out", str(finished_out), "--device", "cpu",
              "--overwrite"])
    assert metrics(finished_out / "metrics.csv") == metrics(tmp_path / "empty" / "metrics.csv")
    # A copy of P further along than the checkpoint given is not rolled back to it.
    with pytest.raises(SystemExit, match="holds this run further along \\(4 of 4 epochs\\)"):
        vae.main(["--resume", "--checkpoint", str(stopped / "model.pt"), "--out", str(tmp_path / "empty"),
                  "--device", "cpu"])
    vae.main(["--resume", "--out", str(stopped), "--device", "cpu"])
    assert len(torch.load(stopped / "model.pt", weights_only=True)["history"]) == 4


def test_a_second_run_into_a_folder_in_use_refuses_and_the_first_ends_whole(smoke_flags, tmp_path):
    out = tmp_path / "C"
    first = start("vae", [*smoke_flags[:2], *smoke_flags[4:], "--epochs", "3"], out)
    wait_for(first, "epoch   1/")  # the run holds --out until its figures are drawn
    assert held(out)
    for flags in ([], ["--overwrite"], ["--figures-only"]):
        with pytest.raises(SystemExit) as stop:
            vae.main([*smoke_flags[:2], *smoke_flags[4:], "--out", str(out), *flags])
        assert str(stop.value.code) == (f"error: --out {out} is in use by another run; wait for it to end, or pass "
                                        f"another --out")
    assert first.wait(timeout=120) == 0, first.stdout.read()
    state = torch.load(out / "model.pt", weights_only=True)
    assert len(state["history"]) == 3 and len(metrics(out / "metrics.csv")) == 3
    assert not held(out)


def test_the_hold_of_a_run_that_was_killed_is_gone_with_it(smoke_flags, tmp_path, capsys):
    out = tmp_path / "C"
    killed = start("vae", [*smoke_flags[:2], *smoke_flags[4:], "--epochs", "6"], out)
    wait_for(killed, "epoch   1/")
    assert held(out)
    killed.send_signal(signal.SIGKILL)  # no clean-up runs in the process: the system lets go of its lock
    killed.wait()
    assert (out / "run.lock").exists() and not held(out)
    vae.main([*smoke_flags[:2], *smoke_flags[4:], "--out", str(out), "--resume"])
    assert "note:" not in capsys.readouterr().out  # nothing to take over, nothing to say
    state = torch.load(out / "model.pt", weights_only=True)
    assert len(state["history"]) == len(metrics(out / "metrics.csv")) == 6 and not held(out)


def test_no_two_writes_share_a_temporary_name_and_a_failed_one_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("the old model")
    with bookkeeping.written_whole(path) as first, bookkeeping.written_whole(path) as second:
        assert first != second and Path(first).parent == Path(second).parent == tmp_path
        Path(first).write_text("new")
        Path(second).write_text("newer")
    assert path.read_text() == "new"  # the write that ended last (the outer one): whole, not mixed
    with pytest.raises(ZeroDivisionError), bookkeeping.written_whole(path) as temporary:
        Path(temporary).write_text("half")
        1 / 0
    assert path.read_text() == "new" and sorted(tmp_path.iterdir()) == [path]


# ----------------------------------------------------------------------------- promises about files
def test_the_model_and_metrics_get_the_mode_of_any_file_the_user_writes(synthetic, tmp_path):
    previous = os.umask(0o022)
    try:
        ae.main([*synthetic, "--epochs", "1", "--out", str(tmp_path / "run")])
    finally:
        os.umask(previous)
    mode = {name: (tmp_path / "run" / name).stat().st_mode & 0o777 for name in
            ("model.pt", "metrics.csv", "loss_curves.png")}
    assert mode == {"model.pt": 0o644, "metrics.csv": 0o644, "loss_curves.png": 0o644}


def test_a_file_written_whole_is_on_the_disk_before_its_name_is(tmp_path, monkeypatch):
    calls, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda descriptor: calls.append("fsync") or fsync(descriptor))
    monkeypatch.setattr(os, "replace", lambda *paths: calls.append("replace") or replace(*paths))
    with bookkeeping.written_whole(tmp_path / "metrics.csv") as temporary:
        Path(temporary).write_text("epoch\n1\n")
    assert calls[:2] == ["fsync", "replace"] and (tmp_path / "metrics.csv").read_text() == "epoch\n1\n"


def test_figures_only_and_the_tools_read_the_photos_the_model_was_trained_on(smoke_flags, tiny_catalogue, tmp_path,
                                                                             monkeypatch, capsys):
    monkeypatch.setattr(common, "DEFAULT_DATA", tmp_path / "empty")  # a fresh clone: no photos in data/
    downloads = []
    monkeypatch.setattr(download_module(), "download", lambda root: downloads.append(root) or False)
    vae.main([*smoke_flags, "--epochs", "1"])  # trained with --data tiny_catalogue
    capsys.readouterr()
    model = str(tmp_path / "out" / "model.pt")
    vae.main(["--figures-only", "--checkpoint", model, "--out", str(tmp_path / "again"), "--device", "cpu"])
    vae.main(["--query", "101", "--out", str(tmp_path / "out"), "--device", "cpu"])
    printed = capsys.readouterr().out
    said = [line for line in printed.splitlines() if line.startswith("loaded ") and f"--data {tiny_catalogue}" in line]
    assert len(said) == 2 and "SYNTHETIC" not in printed and not downloads
    # A model of real photos whose photos are gone is not shown the drawn catalogue unless that is asked for.
    other = tmp_path / "default"
    state = torch.load(model, weights_only=True)
    state["args"]["data"] = None  # as if trained on the repo's data/, which is empty now
    other.mkdir()
    torch.save(state, other / "model.pt")
    with pytest.raises(SystemExit) as stop:
        vae.main(["--figures-only", "--out", str(other), "--device", "cpu"])
    assert str(stop.value.code).startswith("error: the model was trained on real photos") and "--data" in str(
        stop.value.code)


def download_module():
    import download

    return download


def test_an_offline_runs_drawn_model_gives_way_to_the_run_on_real_photos(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setattr(common, "DEFAULT_DATA", data)
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")
    flags = ["--image-size", "32", "--latent-dim", "8", "--batch-size", "8", "--device", "cpu", "--epochs", "1",
             "--out", str(tmp_path / "out")]
    vae.main(flags)  # offline, data/ empty: the drawn catalogue
    assert torch.load(tmp_path / "out" / "model.pt", weights_only=True)["args"]["catalogue"]["synthetic"]
    from conftest import write_catalogue

    write_catalogue(data)  # the photos arrive (downloaded, or unzipped by hand)
    capsys.readouterr()
    vae.main(flags)  # the same command trains on them
    assert "trained on the drawn catalogue (1 of 1 epochs); this run replaces it" in capsys.readouterr().out
    assert not torch.load(tmp_path / "out" / "model.pt", weights_only=True)["args"]["catalogue"]["synthetic"]
    # A model of real photos stays protected, and so does a drawn one trained on purpose (--data synthetic).
    with pytest.raises(SystemExit, match="holds a model of vae.py"):
        vae.main(flags)
    vae.main([*flags[:-1], str(tmp_path / "drawn"), "--data", "synthetic"])
    with pytest.raises(SystemExit, match="holds a model of vae.py"):
        vae.main([*flags[:-1], str(tmp_path / "drawn"), "--data", "synthetic"])


def test_no_module_of_the_project_imports_one_that_imports_it():
    import ast

    modules = {path.stem: path for path in REPO.glob("*.py")}
    imports = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):  # anywhere in the file, inside functions too
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
        imports[name] = found & set(modules)
    assert "download" in imports["common"] and not imports["download"]

    def reaches(start, target, seen=()):
        return any(step == target or (step not in seen and reaches(step, target, (*seen, step)))
                   for step in imports[start])

    assert [name for name in modules if reaches(name, name)] == []


def test_no_paragraph_or_bullet_of_the_readme_is_over_100_words():
    text = (REPO / "README.md").read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code aside
    blocks, current = [], []
    for line in text.splitlines():
        if not line.strip() or line.startswith(("|", "#", "![")) or line.lstrip().startswith("- "):
            blocks.append(" ".join(current))
            current = [] if not line.lstrip().startswith("- ") else [line]
        else:
            current.append(line)
    blocks.append(" ".join(current))
    long = [block[:60] for block in blocks if len(block.split()) > 100]
    assert long == []
