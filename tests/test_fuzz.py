"""Every flag a student may change: a seeded draw of flag combinations within the ranges --help and
check_flags accept, run end to end on a tiny folder. Each run must end normally, or stop with one line
that names a flag; none may end in a traceback, and a stopped run never leaves a broken model.pt.

    FUZZ_RUNS=300 python -m pytest tests/test_fuzz.py     (more draws than CI makes: 18)
"""

import math
import os
import random

import pytest
import torch
from PIL import Image, ImageDraw

import ae
import common
import dae
import vae

SCRIPTS = {"ae": ae, "dae": dae, "vae": vae}
RUNS = int(os.environ.get("FUZZ_RUNS", 18))
PHOTOS = 24  # readable ones; 3 more files are not photos
TYPES = ["Tshirts", "Dresses", "Sports Shoes", "Heels"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 drawn products of 4 types with a fashion.csv, and 3 files that are not readable photos."""
    root = tmp_path_factory.mktemp("fuzz") / "photos"
    rows = []
    for index in range(PHOTOS):
        product_type = TYPES[index % 4]
        (root / product_type).mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (60, 80), "white")
        colour = ((index * 97) % 200, (index * 57) % 200, (index * 31) % 200)
        ImageDraw.Draw(image).rectangle((5 + index % 7, 8 + index % 5, 50, 30 + 2 * index), fill=colour)
        image.save(root / product_type / f"{700 + index}.jpg")
        rows.append(f"{700 + index},Men,Apparel,Sub,{product_type},Red,Casual,T,{700 + index}.jpg,u\n")
    (root / "fashion.csv").write_text("ProductId,Gender,Category,SubCategory,ProductType,Colour,Usage,ProductTitle,"
                                      "Image,ImageURL\n" + "".join(rows))
    (root / "Tshirts" / "empty.jpg").write_bytes(b"")
    (root / "Heels" / "text.png").write_text("not a photo")
    (root / "Dresses" / "cut.jpg").write_bytes((root / "Dresses" / "701.jpg").read_bytes()[:200])
    return root


def draw_flags(rng, script, training_photos):
    """One combination of the flags a student changes, each within what --help and check_flags accept."""
    flags = {"--epochs": rng.choice([1, 1, 2, 3]),  # a batch of a fifth of the photos: 5 steps in one epoch
             "--batch-size": rng.choice([1, 2, 7, 16, math.ceil(training_photos / 5), training_photos,
                                         training_photos + 5]),
             "--lr": 10 ** rng.uniform(-5, 1),
             "--seed": rng.randint(0, 3),
             "--latent-dim": rng.choice([1, 2, 3, rng.randint(4, 300)]),
             "--image-size": rng.choice([32, 48, 64, 80])}
    if rng.random() < 0.15:
        flags["--bf16"] = None
    if script == "vae":
        flags["--beta"] = rng.choice([0.0, 1.0, 10 ** rng.uniform(-2, 3)])
        flags["--edge-weight"] = rng.choice([0.0, 1.0, 10 ** rng.uniform(-2, 2)])
    if script in ("ae", "vae"):
        flags["--num-samples"] = rng.randint(0, 3)
        if rng.random() < 0.3:
            flags["--product-type"] = rng.choice(TYPES)
    if script == "dae":
        flags["--noise"] = rng.choice(dae.NOISE_KINDS)
        flags["--noise-strength"] = rng.uniform(0.01, 0.99)
    return flags


def tool_flags(rng, script, folder, out):
    """A second run on the trained model: a tool, or the figures again."""
    photo = str(next(folder.rglob("70*.jpg")))
    if script == "dae":
        return rng.choice([["--figures-only"], ["--clean", photo, str(folder / "Heels" / "text.png")]])
    return rng.choice([["--figures-only"], ["--figures-only", "--num-samples", "2"], ["--query", photo, "705"],
                       ["--duplicates", str(rng.uniform(0.5, 1))]])


def as_argv(flags):
    return [str(item) for flag, value in flags.items() for item in ([flag] if value is None else [flag, value])]


def run(script, argv):
    """Runs a script's main; None if it ended normally, else the one-line message it stopped with."""
    try:
        SCRIPTS[script].main(argv)
    except SystemExit as stop:
        message = str(stop.code)
        assert "\n" not in message and message.startswith("error:") and "--" in message, message
        return message
    return None


def test_every_drawn_flag_combination_ends_normally_or_with_one_line(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")
    rng, tools = random.Random(2028), random.Random(2029)  # the flags drawn do not depend on how runs end
    training_photos = len(common.load_catalogue(folder, 32).train_index)
    drawn, diverged = [], []
    for number in range(RUNS):
        script = ["ae", "vae", "dae"][number % 3]
        flags = draw_flags(rng, script, training_photos)
        out = tmp_path / f"run{number}"
        argv = [*as_argv(flags), "--data", str(folder), "--out", str(out), "--device", "cpu"]
        drawn.append((script, flags))
        message = run(script, argv)
        if message is None:
            message = run(script, [*tool_flags(tools, script, folder, out), "--data", str(folder), "--out", str(out),
                                   "--device", "cpu"])
        if message is not None and "diverged" in message:
            diverged.append((script, flags["--lr"]))
        if (out / "model.pt").exists():  # whatever happened, the model kept is a whole one
            assert torch.load(out / "model.pt", weights_only=True)["script"] == f"{script}.py"
    # The draw reaches the three corners that once ended in a traceback: a code of one number, a
    # schedule of five steps in all, and an AE's learning rate of 1 or more.
    assert any(flags["--latent-dim"] == 1 and script != "dae" for script, flags in drawn)
    assert any(flags["--epochs"] * math.ceil(training_photos / flags["--batch-size"]) == 5 for _, flags in drawn)
    assert any(flags["--lr"] >= 1 and script == "ae" for script, flags in drawn)
    # Stopping is for runs that diverged: each of them stepped at over 5 times the default learning rate.
    assert diverged and all(lr > 5 * SCRIPTS[script].parse_args([]).lr for script, lr in diverged), diverged


BAD_VALUES = {"--image-size": ["60", "16", "0"], "--epochs": ["0"], "--batch-size": ["-1"], "--lr": ["0", "-0.1"],
              "--latent-dim": ["0"], "--device": ["nosuch", "cuda:7"], "--data": ["/no/such/folder"]}


def test_a_bad_flag_is_named_before_anything_looks_at_out(folder, tmp_path, monkeypatch, capsys):
    # A student who changes a flag to a bad value is told about that flag, not about the model in --out.
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")
    rng = random.Random(2030)
    trained = {}
    for script in SCRIPTS:
        trained[script] = tmp_path / script
        SCRIPTS[script].main(["--data", str(folder), "--out", str(trained[script]), "--device", "cpu", "--epochs", "1",
                              "--image-size", "32", "--latent-dim", "4", "--batch-size", "8"])
    capsys.readouterr()
    for _ in range(9):
        script, flag = rng.choice(sorted(SCRIPTS)), rng.choice(sorted(BAD_VALUES))
        value = rng.choice(BAD_VALUES[flag])
        if flag == "--device" and value.startswith("cuda") and torch.cuda.device_count() > 7:
            continue
        argv = ["--data", str(folder), "--out", str(trained[script]), "--device", "cpu", flag, value]
        with pytest.raises(SystemExit):
            SCRIPTS[script].main(argv)
        said = capsys.readouterr()
        message = (said.err + said.out).strip().splitlines()[-1]
        assert f"{flag} " in message and "holds a model" not in message and "decoding" not in said.out, (argv, message)
