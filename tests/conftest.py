"""A tiny product catalogue in the real dataset's layout, shared by the scripts' smoke tests, and
stand-ins for testing a training loop."""

from contextlib import contextmanager
from types import SimpleNamespace

import filelock
import kagglehub
import pytest
import requests
import torch
from PIL import Image, ImageDraw

import common

CSV_HEADER = "ProductId,Gender,Category,SubCategory,ProductType,Colour,Usage,ProductTitle,Image,ImageURL\n"
TYPES = [("Apparel", "Boys", "Tshirts"), ("Apparel", "Girls", "Dresses"),
         ("Footwear", "Men", "Sports Shoes"), ("Footwear", "Women", "Heels")]


def write_catalogue(root, count=24):
    """`count` small drawn products in the Kaggle dataset's layout under root, with a fashion.csv."""
    rows = []
    for index in range(count):
        category, gender, product_type = TYPES[index % 4]
        colour = ["Black", "Red", "Blue"][index % 3]
        folder = root / category / gender / "Images" / "images_with_product_ids"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (48, 64), "white")
        fill = {"Black": (20, 20, 20), "Red": (200, 30, 30), "Blue": (30, 60, 200)}[colour]
        ImageDraw.Draw(image).rectangle((6 + index % 5, 10, 40, 30 + index), fill=fill)
        image.save(folder / f"{100 + index}.jpg")
        rows.append(f"{100 + index},{gender},{category},Sub,{product_type},{colour},Casual,T,{100 + index}.jpg,u\n")
    (root / "fashion.csv").write_text(CSV_HEADER + "".join(rows))
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test reaches the network: Kaggle's download fails at once, as it does on a machine without one
    (a test that wants a download replaces it)."""
    def no_network(*args, **kwargs):
        raise requests.ConnectionError("the tests reach no network")

    monkeypatch.setattr(kagglehub, "dataset_download", no_network)


@pytest.fixture
def tiny_catalogue(tmp_path, monkeypatch):
    """24 small drawn products with a fashion.csv; the loader's cache goes to tmp_path too."""
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")
    return write_catalogue(tmp_path / "data")


@pytest.fixture
def smoke_flags(tiny_catalogue, tmp_path):
    """Flags for a seconds-long end-to-end run of any of the three scripts on the tiny catalogue."""
    return ["--data", str(tiny_catalogue), "--out", str(tmp_path / "out"), "--image-size", "32",
            "--latent-dim", "8", "--batch-size", "8", "--device", "cpu"]


def losses_over_steps(make_model, loss_of_batch, steps=15):
    """Train a seeded model on one fixed random batch for a few Adam steps; the loss at every step."""
    torch.manual_seed(0)
    model = make_model()
    images = torch.rand(8, 3, 32, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = loss_of_batch(model, images)
        optimizer.zero_grad(), loss.backward(), optimizer.step()
        losses.append(loss.item())
    return losses


class Constant(torch.nn.Module):
    """A stand-in model whose output is known: every pixel 0.5, whatever the input (and the DAE's noise level)."""

    def forward(self, images, level=None):
        return torch.full_like(images, 0.5)


class Unchanged(torch.nn.Module):
    """A stand-in denoiser that hands its input back, whatever the noise level it is told."""

    def forward(self, images, level=None):
        return images


def epoch_args(**extra):
    """The few flags run_epoch reads, for batches of 4 on the CPU."""
    return SimpleNamespace(batch_size=4, device=torch.device("cpu"), bf16=False, **extra)


def per_image_mean(values_of_image, images):
    """The mean over images of a value computed one image at a time: what run_epoch must return."""
    return sum(values_of_image(images[i:i + 1]) for i in range(len(images))) / len(images)


@contextmanager
def ctrl_c_in_epoch(script, epoch, monkeypatch):
    """Within the block, `script`'s runs get a Ctrl-C (a KeyboardInterrupt, where Python raises it) as
    the training pass of `epoch` starts: run_epoch is called twice an epoch, to train and to test."""
    calls, run_epoch = [], script.run_epoch

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * epoch - 1:
            raise KeyboardInterrupt
        return run_epoch(*args, **kwargs)

    monkeypatch.setattr(script, "run_epoch", interrupted)
    try:
        yield
    finally:
        monkeypatch.setattr(script, "run_epoch", run_epoch)


def held(folder):
    """Whether a run holds `folder` now: its run.lock is locked (the file itself may stay behind)."""
    if not (folder / "run.lock").exists():
        return False
    lock = filelock.FileLock(folder / "run.lock", timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        return True
    lock.release()
    return False
