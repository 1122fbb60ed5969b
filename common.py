"""What the three scripts share and what teaches nothing about any one model: the product-photo
loader, the device selector, and a run's bookkeeping (checkpoints, metrics rows, figure grids).

    catalogue = load_catalogue("data", image_size=64)
    catalogue.images        # (N, 3, 64, 64) uint8 photos, one product per row: batch.float() / 255
    catalogue.metadata      # pandas DataFrame, row i describes image i (fashion.csv columns + path)
    catalogue.train_index   # indices of the training products (90 %)
    catalogue.test_index    # indices of the test products (10 %), the same for every script and size
    catalogue.groups        # (N,) group id: photos that are near-identical copies share one

Each photo is decoded, its white margin cropped, padded to a white square (never stretched) and
resized. The result is cached in data/processed/, so only the first run pays for decoding. The
photos stay bytes (0-255), a quarter of the memory of floats: a catalogue of 44,000 photos at
128 px is 2.2 GB as bytes, 8.7 GB as float32. A model makes each batch floats when it reads it.

The dataset lists some photos under several ProductIds (byte-identical files, or the same photo
re-encoded). A copy of a test photo in the training set would make the test score a memory test,
so near-identical photos are grouped and every group stays on one side of the split.
"""

import csv
import hashlib
import math
import os
import random
import shlex
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageChops, ImageDraw, ImageFont
from torch.nn import functional as F

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
REPO = Path(__file__).resolve().parent
DEFAULT_DATA = REPO / "data"  # the repo's own data/, wherever the scripts are started from
CACHE_DIR = REPO / "data" / "processed"
# The metadata every catalogue has, empty where a photo's is unknown (see read_metadata).
COLUMNS = ["Gender", "Category", "SubCategory", "ProductType", "Colour", "Usage", "ProductTitle"]
MIN_TRAIN, MIN_TEST = 2, 1  # products a run needs on each side of the split
PREPROCESS_VERSION = 2  # bump when the pixels a file turns into change, so old caches are rebuilt
TEST_FRACTION = 0.1
# Two photos whose 16x16 thumbnails are closer than this are copies of one photo. Measured on the
# dataset: byte-identical files score over 60 dB, re-encoded copies 42-60 dB, and only 6 pairs of
# other photos score over 36 dB (none between 39 and 42).
NEAR_COPY_PSNR = 40


@dataclass
class Catalogue:
    images: torch.Tensor  # (N, 3, S, S) uint8, stored channels-last (each pixel's 3 colours side by side)
    metadata: pd.DataFrame  # N rows, aligned with images
    train_index: torch.Tensor  # (N_train,) int64
    test_index: torch.Tensor  # (N_test,) int64
    groups: torch.Tensor  # (N,) int64, near-identical photos share a group id
    folder: Path  # where the photos were looked for
    synthetic: bool = False


# ----------------------------------------------------------------------------- one photo
def to_rgb(image):
    """Any Pillow mode (L, P, RGBA, CMYK, 16-bit) to RGB, with transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale 0..65535 to 0..255
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB photo


def ink(image, faint=12, solid=36):
    """How much each pixel counts as product, judged on a copy shrunk to 128 px, whose averaging wipes
    out JPEG noise (so a 2400 px original and its 240 px copy agree): (h, w) in [0, 1], and the copy's
    size. A pixel counts in proportion to how much darker than white it is: not at all below `faint`
    levels (shadows, noise), fully past `solid`."""
    small = image.copy()
    small.thumbnail((128, 128), Image.Resampling.BOX)
    red, green, blue = small.split()
    darkest = ImageChops.darker(ImageChops.darker(red, green), blue)  # min(R, G, B) per pixel, in C: fast
    darkness = 255 - np.asarray(darkest, dtype=np.float32)  # (h, w), 0 = white
    return np.clip((darkness - faint) / (solid - faint), 0, 1), small.size


def product_box(image, mass_trim=0.01):
    """The box (x0, y0, x1, y1), in float pixels, around the product in a photo on white; None if blank.
    It leaves out the outer `mass_trim` of the ink on each side, so a stray speck cannot widen it, and
    it is placed to a fraction of a pixel: at 64 px a one-pixel shift of a sharp edge would make the
    same photo look different."""
    weight, (width, height) = ink(image)
    if weight.sum() < 4:
        return None
    box = []
    for axis, scale in ((0, image.width / width), (1, image.height / height)):
        profile = weight.sum(axis=axis)  # axis 0 sums over rows: weight per column, then per row
        cumulative = np.concatenate([[0], np.cumsum(profile)]) / profile.sum()  # at pixel edges
        edges = np.arange(len(cumulative))
        box.append(np.interp([mass_trim, 1 - mass_trim], cumulative, edges) * scale)
    (x0, x1), (y0, y1) = box
    return x0, y0, x1, y1


def edge_ink(image):
    """The share of a photo's outermost pixels that count as product (ink): ~0 for a product on white."""
    weight = ink(image)[0]
    return float(np.concatenate([weight[0], weight[-1], weight[:, 0], weight[:, -1]]).mean())


def frame_product(image, size, margin=0.04):
    """Crop the white margin, pad to a white square, resize: a (size, size, 3) uint8 array."""
    image = to_rgb(image)
    x0, y0, x1, y1 = product_box(image) or (0, 0, image.width, image.height)
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)  # a square around the product, never stretched
    left, top = (x0 + x1 - side) / 2, (y0 + y1 - side) / 2
    # Where the square reaches past the photo, the photo is padded with white first.
    pad = math.ceil(max(0, -left, -top, left + side - image.width, top + side - image.height))
    if pad:
        padded = Image.new("RGB", (image.width + 2 * pad, image.height + 2 * pad), "white")
        padded.paste(image, (pad, pad))
        image, left, top = padded, left + pad, top + pad
    # resize() with a float box crops and scales in one antialiased step, to a fraction of a pixel.
    square = image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
    return np.asarray(square)


class Unreadable(Exception):
    """A file that is not an image Pillow can read safely; the message says why."""


@contextmanager
def opened_image(path, draft_size=None):
    """The image in a file, decoded, for a `with` block; a JPEG may be decoded straight to about
    `draft_size`. A file that cannot or must not be read raises Unreadable, which says why: missing,
    not an image, truncated, or more pixels than Pillow's limit, as a decompression bomb has (a few
    KB that unpack to gigabytes). Every file a user hands the scripts is read through this."""
    try:
        with warnings.catch_warnings():  # Pillow only warns past its limit, and refuses past twice it
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Unreadable(f"more pixels than Pillow's limit of {Image.MAX_IMAGE_PIXELS:,}, refused as a possible "
                         f"decompression bomb") from None
    except FileNotFoundError:
        raise Unreadable("no such file") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise Unreadable(f"not a readable image ({error.__class__.__name__})") from None
    with image:
        try:
            if draft_size:
                image.draft("RGB", draft_size)
            image.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise Unreadable(f"not a readable image ({error.__class__.__name__})") from None
        yield image


def decode(path, size):
    """One file to a framed array, or None when it cannot be read (corrupt, truncated, not an image)."""
    try:
        # Draft mode lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding: a 2400 px
        # original is decoded straight to ~300 px, which is most of the speed of a cold load.
        with opened_image(path, (2 * size, 2 * size)) as image:
            return frame_product(image, size)
    except Unreadable:
        return None


# ----------------------------------------------------------------------------- a folder
def find_images(root):
    """Every image file under root, at any depth, in a fixed (sorted) order."""
    found = []
    for folder, _, names in os.walk(root, followlinks=True):  # a linked-in dataset counts too
        found += [Path(folder, name) for name in names if Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def find_csv(root):
    """fashion.csv at the top of the dataset, or one folder down (some unzips nest it)."""
    candidates = [root / "fashion.csv", *sorted(root.glob("*/fashion.csv"))]
    return next((path for path in candidates if path.is_file()), None)


def read_metadata(paths, root, csv_path):
    """One metadata row per image, joined on file stem = ProductId; rows without image are reported.
    Without a CSV, a photo's first folder (e.g. Apparel/ or Footwear/) is its Category."""
    metadata = pd.DataFrame({"path": [str(p.relative_to(root)) for p in paths],
                             "ProductId": [p.stem for p in paths]})
    if csv_path is None:
        folders = [Path(path).parts[0] if len(Path(path).parts) > 1 else "" for path in metadata["path"]]
        print(f"note: no fashion.csv in {root}; the first folder level is the only label (Category)")
        return metadata.assign(**{column: folders if column == "Category" else "" for column in COLUMNS})
    table = pd.read_csv(csv_path, dtype=str).fillna("").drop_duplicates("ProductId")
    metadata = metadata.merge(table, on="ProductId", how="left").fillna("")
    orphans = (~table["ProductId"].isin(metadata["ProductId"])).sum()
    if orphans:
        print(f"note: {orphans} rows of {csv_path} have no image and are left out")
    return metadata.assign(**{column: "" for column in COLUMNS if column not in metadata})


def cache_key(root, paths, csv_path, size):
    """Changes when any source file is added, removed, resized or touched, or the recipe changes."""
    digest = hashlib.sha256(f"v{PREPROCESS_VERSION} {size}px {root.resolve()}".encode())
    for path in [*paths, *([csv_path] if csv_path else [])]:
        stat = os.stat(path)
        digest.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def decode_all(paths, size):
    """Every file decoded and framed: (pixels (n, size, size, 3) uint8 of the n readable ones, kept (N,) bool).
    Each photo is written into one array as it arrives: no list of arrays stacked into a second copy."""
    # Between Pillow's calls, framing a photo is Python, and threads would take turns at Python's
    # lock (measured: two threads decode barely faster than one). Processes keep every core busy;
    # each is handed the files 64 at a time.
    pixels, kept, count = np.empty((len(paths), size, size, 3), np.uint8), np.zeros(len(paths), bool), 0
    with ProcessPoolExecutor(min(os.cpu_count() or 1, 8, len(paths))) as pool:
        for i, array in enumerate(pool.map(decode, paths, [size] * len(paths), chunksize=64)):
            if array is not None:
                pixels[count], kept[i], count = array, True, count + 1
    return pixels[:count], kept


def load_folder(root, size, cache_dir):
    paths, csv_path = find_images(root), find_csv(root)
    if not paths:
        return None
    key = cache_key(root, paths, csv_path, size)
    # The cache: four .npy arrays one after another, raw, so they are read and written at the disk's
    # speed (a .npz would zip them and checksum every byte).
    cache_file = Path(cache_dir) / f"{root.resolve().name}-{size}px-{key}.npys"
    if cache_file.exists():
        with open(cache_file, "rb") as handle:
            pixels, kept, skipped, groups = (np.load(handle) for _ in range(4))
        skipped = skipped.tolist()
    else:
        print(f"decoding {len(paths)} images under {root} at {size} px (cached for next time) ...")
        pixels, kept = decode_all(paths, size)
        skipped = [str(p) for p, k in zip(paths, kept) if not k]
        groups = near_copy_groups(pixels)
        # Write to a temporary name, then rename: a killed run never leaves a half-written cache.
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(f".tmp{os.getpid()}")
        with open(temporary, "wb") as handle:
            for array in (pixels, kept, np.array(skipped, dtype=str), groups):
                np.save(handle, array)
        os.replace(temporary, cache_file)
    if skipped:
        shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        print(f"warning: skipped {len(skipped)} unreadable image files: {shown}")
    if not kept.any():
        raise SystemExit(f"error: none of the {len(paths)} image files under {root} could be read")
    metadata = read_metadata([p for p, k in zip(paths, kept) if k], root, csv_path)
    return pixels, metadata, groups


def thumbnails(images):
    """(N, 3, S, S) photos as bytes -> (N, 768) float32 in [0, 1]: the 16x16 averages near-copies are
    judged on. float32 is exact enough: the threshold is a squared error of 1e-4, far above its rounding."""
    return F.adaptive_avg_pool2d(images.float(), 16).flatten(1) / 255


def connected_groups(pairs, count):
    """A group id per item (count,) from the pairs (i, j) that belong together; a copy of a copy
    joins the group too. Union-find: each item points towards its group's root."""
    parent = list(range(count))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    return np.unique([root(i) for i in range(count)], return_inverse=True)[1].reshape(-1)


def near_copy_groups(pixels, block=1024):
    """A group id per image (N,): photos whose 16x16 thumbnails are within NEAR_COPY_PSNR dB of each
    other share a group.

    Comparing every pair grows as N^2 (45 s for 29,000 photos). But an average never differs more
    than what it averages: two copies' 4x4 thumbnails are as close as their 16x16 ones, and so are
    their positions along any unit direction. Sorted along the 4x4 thumbnails' main direction, a
    photo's copies lie in a short stretch after it; only those pairs are compared on 4x4
    thumbnails, and only the few that pass on 16x16 ones."""
    if len(pixels) < 2:
        return np.zeros(len(pixels), dtype=np.int64)
    fine = torch.cat([thumbnails(torch.from_numpy(pixels[i:i + block]).permute(0, 3, 1, 2))  # (N, 768)
                      for i in range(0, len(pixels), block)])
    coarse = F.avg_pool2d(fine.view(-1, 3, 16, 16), 4).flatten(1)  # (N, 48)
    max_error = 10 ** (-NEAR_COPY_PSNR / 10)  # PSNR > 40 dB  <=>  mean squared error < 1e-4
    centred = (coarse - coarse.mean(0)).double()
    direction = torch.linalg.eigh(centred.T @ centred)[1][:, -1].float()  # (48,), the main one
    key, order = (coarse @ direction).sort()
    coarse, fine = coarse[order], fine[order]
    # Copies are less than sqrt(48 x max_error) apart along the direction: each photo's stretch ends here.
    ends = torch.searchsorted(key, key + math.sqrt(48 * max_error), right=True)
    pairs = []
    for start in range(0, len(key), block):
        stop, end = min(start + block, len(key)), int(ends[min(start + block, len(key)) - 1])
        # Twice the threshold on 4x4 thumbnails: a float32 distance's rounding never drops a copy here.
        close = (torch.cdist(coarse[start:stop], coarse[start:end]) ** 2 / 48 < 2 * max_error).triu(1)
        first, second = close.nonzero().T + start  # positions in the sorted order, first < second
        copies = ((fine[first] - fine[second]) ** 2).mean(1) < max_error
        pairs += zip(order[first[copies]].tolist(), order[second[copies]].tolist())
    return connected_groups(pairs, len(pixels))


def split(names, groups, test_fraction=TEST_FRACTION):
    """The test set: whole groups of copies, taken in the order of a hash of their smallest file
    name until it holds test_fraction of the products. It depends on file names and pixels only,
    so it is the same for every model, seed and image size, and wherever the folder was unzipped."""
    smallest = {}
    for name, group in zip(names, groups.tolist()):
        smallest[group] = min(name, smallest.get(group, name))
    order = sorted(smallest, key=lambda group: (hashlib.md5(smallest[group].encode()).hexdigest(), smallest[group]))
    size = np.bincount(groups)
    wanted = max(1, round(test_fraction * len(names))) if len(order) > 1 else 0
    test_groups, taken = [], 0
    for group in order[:-1]:  # the last group always stays for training
        if taken >= wanted:
            break
        test_groups.append(group)
        taken += size[group]
    in_test = np.isin(groups, test_groups)
    return torch.from_numpy(np.flatnonzero(~in_test)), torch.from_numpy(np.flatnonzero(in_test))


def data_folder(data=None):
    """The folder a --data flag means: the one given, else the repo's data/."""
    return Path(data) if data is not None else DEFAULT_DATA


def load_catalogue(data=None, image_size=64, cache_dir=None):
    """Load a folder of product photos (default data/); with no folder given and no images in
    data/, fall back to a synthetic catalogue so the scripts still run."""
    root = data_folder(data)
    if data is not None and not root.is_dir():
        raise SystemExit(f"error: --data {root}: no such folder")
    loaded = load_folder(root, image_size, cache_dir or CACHE_DIR) if root.is_dir() else None
    if loaded is None and data is not None:
        raise SystemExit(f"error: --data {root}: no .jpg/.jpeg/.png/.webp images in this folder")
    synthetic = loaded is None
    if synthetic:
        print(f"notice: no images in {root}/, so this run uses a SYNTHETIC catalogue of simple drawn "
              f"products.\n  For real results, download the Kaggle dataset vikashrajluhaniwal/fashion-images "
              f"and unzip it so that {root}/fashion.csv and {root}/Apparel/ exist.")
        loaded = synthetic_catalogue(image_size)
    pixels, metadata, groups = loaded
    copies = np.bincount(groups)[groups] > 1
    if copies.any():
        print(f"note: {copies.sum()} photos have a near-identical copy ({len(np.unique(groups[copies]))} groups); "
              f"each group stays on one side of the split")
    # (N, S, S, 3) -> (N, 3, S, S) without a copy: the same bytes, read channels-last, which is also
    # the layout the CPU's convolutions want, so batches taken from it need no reordering.
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    names = [Path(path).name for path in metadata["path"]]
    train_index, test_index = split(names, groups)
    if len(train_index) < MIN_TRAIN or len(test_index) < MIN_TEST:
        raise SystemExit(f"error: --data {root}: {len(names)} readable photos ({len(np.unique(groups))} after joining "
                         f"copies) split into {len(train_index)} training and {len(test_index)} test products; a run "
                         f"needs at least {MIN_TRAIN} and {MIN_TEST}")
    print(f"{len(train_index)} training and {len(test_index)} test products, {image_size} px")
    return Catalogue(images, metadata, train_index, test_index, torch.from_numpy(groups).long(), root.resolve(),
                     synthetic)


# ----------------------------------------------------------------------------- no dataset
COLOURS = {"Black": (30, 30, 30), "Navy Blue": (30, 40, 110), "Blue": (50, 110, 200), "Red": (200, 40, 40),
           "Pink": (235, 120, 170), "Green": (40, 140, 70), "Yellow": (235, 200, 40), "Brown": (120, 75, 40),
           "Grey": (130, 130, 130), "Purple": (120, 60, 150)}
# ProductType: (Category, SubCategory, genders, outline on a unit square)
SHAPES = {
    "Tshirts": ("Apparel", "Topwear", ("Boys", "Girls"),
                [(.3, .1), (.7, .1), (.95, .3), (.82, .42), (.75, .35), (.75, .9), (.25, .9), (.25, .35), (.18, .42), (.05, .3)]),
    "Dresses": ("Apparel", "Dress", ("Girls",), [(.38, .05), (.62, .05), (.62, .3), (.9, .95), (.1, .95), (.38, .3)]),
    "Trousers": ("Apparel", "Bottomwear", ("Boys", "Girls"),
                 [(.25, .05), (.75, .05), (.8, .95), (.57, .95), (.5, .35), (.43, .95), (.2, .95)]),
    "Casual Shoes": ("Footwear", "Shoes", ("Men", "Women"),
                     [(.05, .45), (.45, .4), (.6, .55), (.95, .62), (.95, .75), (.05, .75)]),
    "Heels": ("Footwear", "Shoes", ("Women",), [(.1, .3), (.25, .3), (.55, .65), (.95, .7), (.95, .78), (.3, .78),
                                                 (.2, .5), (.17, .95), (.12, .95), (.12, .5)]),
}


def synthetic_catalogue(image_size, count=600):
    """`count` drawn products in varied colours, framed like real photos, with matching metadata."""
    rng = random.Random(0)
    pixels, rows = [], []
    for index in range(count):
        product_type = rng.choice(sorted(SHAPES))
        category, sub_category, genders, outline = SHAPES[product_type]
        colour = rng.choice(sorted(COLOURS))
        gender = rng.choice(genders)
        canvas = Image.new("RGB", (160, 160), "white")
        scale, dx, dy = rng.uniform(60, 120), rng.uniform(10, 30), rng.uniform(10, 30)
        shade = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[colour])
        ImageDraw.Draw(canvas).polygon([(dx + x * scale, dy + y * scale) for x, y in outline], fill=shade)
        pixels.append(frame_product(canvas, image_size))
        rows.append({"path": f"synthetic/{index}.png", "ProductId": str(index), "Gender": gender,
                     "Category": category, "SubCategory": sub_category, "ProductType": product_type,
                     "Colour": colour, "Usage": "Casual",
                     "ProductTitle": f"Synthetic {gender} {colour} {product_type}"})
    pixels = np.stack(pixels)
    return pixels, pd.DataFrame(rows), near_copy_groups(pixels)


# ----------------------------------------------------------------------------- device
def select_device(name=None):
    """cuda, then mps, then cpu, unless `name` (the --device flag) picks one; printed once."""
    if name is None:
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name}: unknown device (use cpu, cuda, cuda:N or mps)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device.type not in available or not available[device.type]:
        raise SystemExit(f"error: --device {name}: not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    print(f"device: {device}")
    return device


# ----------------------------------------------------------------------------- numerics the lessons share
def one_cycle(optimizer, peak, steps, warmup):
    """PyTorch's one-cycle learning rate over `steps` steps, climbing to `peak` over the first `warmup`
    of them. It measures a phase in steps less one, so a climb of exactly one step would divide by zero
    (5 steps in all at a warm-up of 0.2); such a run climbs over two."""
    if warmup * steps == 1:
        warmup = 2 / steps
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, peak, total_steps=steps, pct_start=warmup)


def square_root(covariance):
    """L with L L^T = covariance, to draw z = mean + L eps: Cholesky's, or where rounding has left the
    covariance not quite positive definite (codes of a run that blew up spread over 1e8, and a ridge
    of 1e-3 is lost in their rounding), the symmetric root, negative eigenvalues set to 0."""
    root, failed = torch.linalg.cholesky_ex(covariance)
    if not failed:
        return root
    values, vectors = torch.linalg.eigh(covariance.double())
    return (vectors * values.clamp_min(0).sqrt()).to(covariance.dtype)


def average_colour(photos, block=1024):
    """The mean colour (3,) in [0, 1] of photos (N, 3, S, S) as bytes, summed in blocks: no float copy of all."""
    return sum(batch.float().sum((0, 2, 3)) for batch in photos.split(block)) / 255 / photos[:, 0].numel()


def divergence_limit(loss, colour, photos, corrupt=None, block=256):
    """The test loss past which a run has diverged (epoch_row stops it there): that of what the model
    starts from, with its squared error doubled (3 dB worse). An autoencoder's decoder starts from a
    flat picture in the training photos' average colour `colour` (3,); a denoiser from handing back
    its input, `corrupt(images)`, or that flat picture, whichever is worse. `loss(recon, images)` is
    the script's loss; photos (N, 3, S, S) are bytes."""
    totals = [0.0, 0.0]
    for batch in photos.split(block):
        images = batch.float() / 255
        starts = [colour.view(1, 3, 1, 1).expand_as(images), *([corrupt(images)] if corrupt else [])]
        for i, start in enumerate(starts):
            totals[i] += loss(images + math.sqrt(2) * (start - images), images).item() * len(batch)
    return max(totals[:1 + (corrupt is not None)]) / len(photos)


# ============================================================================= a run's bookkeeping
# The same in all three scripts and none of their lesson: the command line that reruns a run, the
# checkpoint (saved atomically, loaded with the flags that define the model), metrics.csv, the
# guards on --out, and the figure grids.
def flag_name(key):
    return "--" + key.replace("_", "-")


def add_run_flags(parser, out, tools):
    """The flags that say where a run reads and writes, and what it does with a saved model."""
    parser.add_argument("--data", default=None, help="folder of photos; if not given, the repo's data/ "
                                                        "(a synthetic catalogue if it holds none)")
    parser.add_argument("--out", type=Path, default=out, help="where figures and model.pt go")
    parser.add_argument("--overwrite", action="store_true", help="train over a model already in --out")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps; if not given, the best available")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (for GPUs, CPUs with AMX)")
    parser.add_argument("--figures-only", action="store_true", help="load the checkpoint, redraw, no training")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from the checkpoint")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="the model --figures-only, --resume or a tool loads; if not given, OUT/model.pt")
    if tools:  # ae.py and vae.py: sampling, and search on the model's codes
        parser.add_argument("--num-samples", type=int, default=0, help="also write N new products to OUT/samples/")
        parser.add_argument("--query", nargs="+", default=None, metavar="PHOTO_OR_PRODUCTID",
                            help="photo files or ProductIds: print the products most like each")
        parser.add_argument("--product-type", default=None, help="--num-samples draws products of this type only "
                                                                 "(a folder without fashion.csv: a first-level folder)")
        parser.add_argument("--top", type=int, default=5, help="how many products --query lists")
        parser.add_argument("--duplicates", type=float, nargs="?", const=0.99, default=None, metavar="SIMILARITY",
                            help="list groups of products whose codes have at least this cosine similarity")


def check_flags(parser, args):
    """The checks every script's flags need; a bad one is a one-line error naming it."""
    for flag in ("epochs", "batch_size", "latent_dim", "top"):
        if getattr(args, flag, 1) < 1:
            parser.error(f"{flag_name(flag)} must be at least 1")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    tools = [getattr(args, flag, None) for flag in ("query", "duplicates", "clean")]
    if args.checkpoint and not (args.figures_only or args.resume or any(tool is not None for tool in tools)):
        parser.error("--checkpoint names the model to load with --figures-only or --resume; "
                     "training writes OUT/model.pt")
    if getattr(args, "duplicates", None) is not None and not -1 <= args.duplicates <= 1:
        parser.error("--duplicates must be a cosine similarity between -1 and 1")
    if getattr(args, "num_samples", 0) < 0 or getattr(args, "beta", 0) < 0:
        parser.error("--num-samples and --beta cannot be negative")
    return args


def chosen_mixture(code_distribution, product_type, one_kind):
    """The Gaussians --num-samples draws from: --product-type's (`one_kind` picks it), or every type's."""
    if code_distribution is None or "kinds" not in code_distribution:
        raise SystemExit("error: --num-samples: the checkpoint is a run stopped before its last epoch, or saved "
                         "before sampling by type; finish it with --resume, or drop --figures-only to train anew")
    kinds = code_distribution["kinds"]
    if product_type is not None and product_type not in kinds:
        raise SystemExit(f"error: --product-type {product_type}: no training photo is of that type; the types are "
                         f"{', '.join(kinds)}")
    return one_kind(code_distribution, product_type) if product_type else kinds


def start_run(script, args, defaults, model_flags, training_flags, load):
    """Print the command that reruns this run, load the checkpoint when `load` (checked before the
    photos are read, so a wrong file fails at once), seed, pick the device. Returns the checkpoint's
    path and its contents (None when nothing was loaded)."""
    def value(v):  # as a shell reads it back: a list as its items, a name with spaces quoted
        return " ".join(shlex.quote(str(item)) for item in (v if isinstance(v, list) else [v]))

    print("python", script, *[flag_name(k) + ("" if v is True else f" {value(v)}") for k, v in vars(args).items()
                              if v != defaults[k] and k != "data"], "--data", shlex.quote(str(data_folder(args.data))))
    checkpoint = args.checkpoint or args.out / "model.pt"
    flags = model_flags + (training_flags if args.resume else ())
    given = "--checkpoint" if args.checkpoint else "--out"  # the flag that named the file, for its errors
    state = load_checkpoint(checkpoint, script, args, defaults, flags, given) if load else None
    torch.manual_seed(args.seed)
    # Numbers below ~1e-38 ("denormals") take a slow path in x86 CPUs, and a well-trained model's
    # gradients hold many of them; flushed to zero they change nothing visible.
    torch.set_flush_denormal(True)
    args.device = select_device(args.device)
    return checkpoint, state


def read_checkpoint(path, script, flag="--checkpoint"):
    """The contents of a model.pt that `script` saved; anything else is a one-line error naming `flag`."""
    if not path.is_file():
        raise SystemExit(f"error: {flag} {path.parent if flag == '--out' else path}: no model.pt there (train first: "
                         f"python {script} --out {shlex.quote(str(path.parent))})" if path.name == "model.pt" else
                         f"error: {flag} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"error: {flag} {path}: not a readable checkpoint ({error.__class__.__name__})")
    if not isinstance(state, dict) or state.get("script") != script:
        found = state.get("script", "an unknown script") if isinstance(state, dict) else "an unknown script"
        raise SystemExit(f"error: {flag} {path}: saved by {found}, not by {script}")
    return state


def load_checkpoint(path, script, args, defaults, flags, given="--checkpoint"):
    """A saved run. The flags that define it (`flags`) are taken from it, and said so; a flag that
    the command line sets to another value than the saved one is an error naming it."""
    state, restored = read_checkpoint(path, script, given), []
    for flag in flags:
        saved, given = state["args"][flag], getattr(args, flag)
        if given != saved and given != defaults[flag]:
            raise SystemExit(f"error: --checkpoint {path} was trained with {flag_name(flag)} {saved}, but this run "
                             f"asks for {given}; leave {flag_name(flag)} out or pass {saved}")
        if given != saved:
            setattr(args, flag, saved)
            restored.append(f"{flag_name(flag)} {saved}")
    print(f"loaded {path} (epoch {len(state['history'])})" + (f", with {' '.join(restored)}" if restored else ""))
    return state


def finished(state):
    return len(state["history"]) >= state["args"]["epochs"]


def prepare_out(script, args, catalogue, state, training):
    """Record what the model is trained on, and make sure that training into --out destroys no
    model: not another script's, and not a run of this one unless --overwrite says so."""
    args.catalogue = {"folder": str(catalogue.folder), "synthetic": catalogue.synthetic,
                      "photos": len(catalogue.images)}
    trained_on = state["args"].get("catalogue") if state else None
    if trained_on and trained_on["synthetic"] != catalogue.synthetic:
        kind = {True: "the synthetic catalogue", False: "real photos"}
        print(f"note: this model was trained on {kind[trained_on['synthetic']]} ({trained_on['folder']}); "
              f"this run shows it {kind[catalogue.synthetic]}")
    target = args.out / "model.pt"
    if training and not args.resume and target.is_file():
        found = torch.load(target, map_location="cpu", weights_only=True)
        if found.get("script") != script:
            raise SystemExit(f"error: --out {args.out} holds a model of {found.get('script')}; train {script} into "
                             f"another --out (or delete {target} first)")
        if not args.overwrite:
            done = f"{len(found['history'])} of {found['args']['epochs']} epochs"
            raise SystemExit(f"error: --out {args.out} holds a model of {script} ({done}); pass another --out, "
                             f"--resume to continue it, or --overwrite to replace it")
    if args.resume and state and finished(state):
        print(f"note: {args.checkpoint or target} has finished all {len(state['history'])} epochs: nothing to "
              f"resume, so this run only redraws its figures (as --figures-only does)")
        args.figures_only = True
    args.out.mkdir(parents=True, exist_ok=True)


def resume_training(state, optimizer, schedule, generator, args):
    """Everything the next epoch depends on, so that a resumed run ends as an uninterrupted one."""
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    generator.set_state(state["batch_rng"])
    torch.set_rng_state(state["torch_rng"])
    save_metrics(args.out / "metrics.csv", state["history"], append=False)


def epoch_row(epoch, train, test, seconds, count, args, limit):
    """One row of metrics.csv: the epoch, every train_ and test_ number, the time it took.

    A run that diverged stops here, before its checkpoint is written, so the last good model is kept:
    a loss that is no longer finite, or a test loss past `limit` (divergence_limit). It is judged on
    the test pass: that is the model about to be saved, in the mode it will be used in, while the
    training loss averages a model that changed over the epoch (on moved photos, sampled codes or
    random noise levels)."""
    row = {"epoch": epoch, **{f"train_{k}": v for k, v in train.items()}, **{f"test_{k}": v for k, v in test.items()},
           "seconds": seconds, "images_per_second": count / seconds}
    kept = (f"{args.out / 'model.pt'} still holds the model of epoch {epoch - 1}" if epoch > 1 else
            "no epoch finished, so no model was saved")
    if not all(math.isfinite(value) for value in row.values()):
        raise SystemExit(f"error: the loss became non-finite in epoch {epoch}; try a smaller --lr than {args.lr:.3g}. "
                         f"{kept}")
    if test["loss"] > limit:
        raise SystemExit(f"error: training diverged in epoch {epoch} (test loss {test['loss']:,.1f}, worse than a flat "
                         f"picture of the photos' average colour with twice its error: {limit:,.1f}); try a smaller "
                         f"--lr than {args.lr:.3g}. {kept}")
    return row


def end_epoch(script, model, history, row, args, optimizer, schedule, generator, **extra):
    """Append the epoch's row to the history and to metrics.csv, and save the checkpoint."""
    history.append(row)
    save_checkpoint(args.out / "model.pt", script, model, history, args, optimizer=optimizer.state_dict(),
                    schedule=schedule.state_dict(), batch_rng=generator.get_state(),
                    torch_rng=torch.get_rng_state(), **extra)
    save_metrics(args.out / "metrics.csv", [row], append=len(history) > 1)


def log_epoch(row, args, started, first):
    """The epoch's line: train and test loss (and the VAE's two terms apart), test PSNR, time, ETA."""
    def losses(split_name):
        parts = [f"{key[:3]} {row[f'{split_name}_{key}']:7.1f}" for key in ("reconstruction", "kl")
                 if f"{split_name}_{key}" in row]
        return f"{split_name} {row[f'{split_name}_loss']:7.1f}" + (f" ({' + '.join(parts)})" if parts else "")

    epoch, eta = row["epoch"], (time.time() - started) / (row["epoch"] - first + 1) * (args.epochs - row["epoch"])
    noisy = f"noisy {row['test_psnr_noisy']:5.2f} -> " if "test_psnr_noisy" in row else ""  # the DAE's input
    print(f"epoch {epoch:3d}/{args.epochs} | {losses('train')} | {losses('test')} | "
          f"test PSNR {noisy}{row['test_psnr']:5.2f} dB | {row['seconds']:4.1f} s, "
          f"{row['images_per_second']:5.0f} img/s | ETA {eta:3.0f} s", flush=True)


def save_images(images, folder, kind=None):
    """(N, 3, S, S) images in [0, 1] as PNG files sample_0000.png, ... in `folder` (new products of
    `kind`, or of every kind), and a line that says so."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"sample_{i:04d}.png")
    print(f"wrote {folder}/ ({len(images)} new products" + (f" of type {kind})" if kind else ")"))


@contextmanager
def stop_cleanly(args):
    """Ctrl-C ends the run with one line: the checkpoint holds the last finished epoch."""
    try:
        yield
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted: {args.out / 'model.pt'} holds the last finished epoch; "
                         f"add --resume to continue") from None


def save_checkpoint(path, script, model, history, args, **extra):
    """All that --resume needs to go on and --figures-only to redraw. Written to a temporary file,
    then renamed: a crash never leaves a broken model.pt."""
    state = {"script": script, "state_dict": model.state_dict(), "history": history,
             "args": {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()},
             **extra}
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def save_metrics(path, rows, append):
    """metrics.csv, one row per epoch, appended as each epoch ends so an interrupted run keeps its rows."""
    with open(path, "a" if append else "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if not append:
            writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------- figures
def text_font(size):
    """DejaVu Sans, which matplotlib ships, at `size` pixels: the figures' lettering."""
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)


def show_rows(rows, labels, title, path, columns_titles=None):
    """Save a titled grid of images: rows is a list of (n, 3, S, S) tensors, one per labelled row,
    with `columns_titles` over the columns. Pasted and lettered with Pillow: a grid of images needs
    no plotting library, and takes a hundredth of the time. Small images are enlarged by whole
    pixels, so every pixel the model drew stays one sharp square."""
    rows = [row.float() / 255 if row.dtype == torch.uint8 else row for row in rows]  # photos are bytes
    size, columns = rows[0].shape[-1], max(len(row) for row in rows)
    grid = image_grid(torch.cat([torch.cat([row.cpu(), torch.ones(columns - len(row), *row.shape[1:])])
                                 for row in rows]), columns)  # short rows end in white
    zoom = max(1, math.ceil(96 / size))  # at least 96 px an image
    picture = Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())
    picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.Resampling.NEAREST)
    font, small = text_font(13), text_font(11)
    step = (size + 2) * zoom
    label_lines = [str(label).split("\n") for label in labels]
    left = 12 + max(font.getlength(line) for lines in label_lines for line in lines)
    width = max(int(left) + picture.width + 12, 300)
    title_lines = wrap_text(title, font, width - 24)
    top = 12 + 18 * len(title_lines) + (18 if columns_titles else 4)
    figure = Image.new("RGB", (width, top + picture.height + 10), "white")
    draw = ImageDraw.Draw(figure)
    for number, line in enumerate(title_lines):
        draw.text((width / 2, 10 + 18 * number), line, fill="black", font=font, anchor="ma")
    figure.paste(picture, (int(left), top))
    for row, lines in enumerate(label_lines):  # each label centred on its row, right-aligned against it
        middle = top + row * step + size * zoom / 2 - 8 * (len(lines) - 1)
        for number, line in enumerate(lines):
            draw.text((left - 6, middle + 16 * number), line, fill="black", font=font, anchor="rm")
    for column, name in enumerate((columns_titles or [])[:columns]):
        draw.text((left + column * step + size * zoom / 2, top - 4), str(name), fill="black", font=small, anchor="md")
    figure.save(path)


def wrap_text(text, font, width):
    """`text` broken into lines of at most `width` pixels in `font`, at spaces."""
    lines = [""]
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}".strip()
        if font.getlength(candidate) <= width or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def plot_curves(history, panels, path, log=()):
    """Train and test curves per epoch: `panels` maps a metrics key (without train_/test_) to a
    title; the keys in `log` get a log scale."""
    import matplotlib.pyplot as plt

    if not history:  # a --figures-only run of a checkpoint without history has nothing to draw
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    epochs = [row["epoch"] for row in history]
    for axis, (key, title) in zip(axes[0], panels.items()):
        for split_name in ("train", "test"):
            if f"{split_name}_{key}" in history[0]:
                axis.plot(epochs, [row[f"{split_name}_{key}"] for row in history], label=split_name)
        axis.set(title=title, xlabel="epoch", yscale="log" if key in log else "linear")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------- the code space, drawn
def main_directions(codes):
    """The codes' principal directions (latent, latent), one unit row each, most spread first, and each
    one's share of their variance (latent,): PCA by hand."""
    _, values, directions = torch.linalg.svd(codes - codes.mean(0), full_matrices=False)
    return directions, values**2 / (values**2).sum()


def code_plane(codes, prior, steps=8):
    """The plane code_plane.png draws: its axes (dims, latent) through `origin`, their names, every
    code's place on them (N, dims), and a grid of steps^dims codes on it with each axis's ticks.

    A code of 1 or 2 numbers is its own plane; a longer one is shown on its two main directions.
    For the VAE (`prior`) the plane passes through 0 and the grid stands at N(0, 1) quantiles: where
    the prior puts its mass (Kingma & Welling 2014, figure 4). An AE has no prior: its plane passes
    through the mean code, and the grid spans the box of its codes, holes and all."""
    latent = codes.shape[1]
    dims = min(2, latent)
    if latent <= 2:
        axes, names = torch.eye(latent), [f"z[{i}]" for i in range(latent)]
    else:
        directions, shares = main_directions(codes)
        axes = directions[:2]  # (2, latent)
        names = [f"main direction {i + 1} ({share:.0%} of the variance)" for i, share in enumerate(shares[:2])]
    origin = torch.zeros(latent) if prior else codes.mean(0)
    places = (codes - origin) @ axes.T  # (N, dims)
    if prior:
        ticks = torch.distributions.Normal(0, 1).icdf(torch.linspace(0.05, 0.95, steps)).repeat(dims, 1)
    else:
        ticks = torch.stack([torch.linspace(low, high, steps) for low, high in zip(places.min(0).values,
                                                                                   places.max(0).values)])
    # The grid in reading order: rows down the second axis from its top, columns along the first.
    corners = torch.cartesian_prod(ticks[1].flip(0), ticks[0]).flip(1) if dims == 2 else ticks[0].view(-1, 1)
    return {"axes": axes, "origin": origin, "names": names, "places": places, "ticks": ticks,
            "grid": origin + corners @ axes}  # grid: (steps^dims, latent)


def image_grid(images, columns, gap=2):
    """(N, 3, S, S) images in [0, 1] pasted into one (3, H, W) picture, `columns` to a row, white between."""
    size, rows = images.shape[-1], math.ceil(len(images) / columns)
    step = size + gap
    picture = torch.ones(3, rows * step - gap, columns * step - gap)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        picture[:, row * step:row * step + size, column * step:column * step + size] = image.clamp(0, 1).cpu()
    return picture


def plot_code_plane(plane, decoded, kinds, shown, title, path):
    """code_plane.png: left, the `shown` products' places on the plane, coloured by kind (the eight
    commonest; the rest grey), with the grid's points marked; right, the grid `decoded`."""
    import matplotlib.pyplot as plt

    places, ticks, names = plane["places"][shown], plane["ticks"], plane["names"]
    dims, steps = ticks.shape
    labels = [kinds[i] for i in shown.tolist()]
    commonest = sorted(set(labels), key=lambda kind: (-labels.count(kind), kind))[:8]
    # Two numbers: the plane itself. One: each kind on a row of its own, the grid on a row below.
    heights = places[:, 1] if dims == 2 else torch.tensor([float(commonest.index(k)) if k in commonest
                                                           else len(commonest) for k in labels])
    marks = torch.cartesian_prod(*ticks) if dims == 2 else torch.stack([ticks[0], torch.full((steps,), -1.0)], 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5.8))
    for kind in [*commonest, None]:
        mask = torch.tensor([label == kind if kind else label not in commonest for label in labels])
        if mask.any():
            left.scatter(places[mask, 0], heights[mask], s=10, label=kind or "other types",
                         color=None if kind else "lightgrey", zorder=2 if kind else 1)
    left.scatter(marks[:, 0], marks[:, 1], marker="+", s=40, color="black", label="decoded on the right")
    left.set(xlabel=names[0], ylabel=names[1] if dims == 2 else "", title="the test products' codes")
    if dims == 1:
        left.set_yticks(range(-1, len(commonest) + 1), ["the grid", *commonest, "other types"], fontsize=7)
    left.legend(fontsize=7, framealpha=0.6)
    picture = image_grid(decoded, steps)
    right.imshow(picture.permute(1, 2, 0).numpy())
    size = decoded.shape[-1]
    centres = [i * (size + 2) + size / 2 for i in range(steps)]
    right.set_xticks(centres, [f"{tick:.3g}" for tick in ticks[0]], fontsize=7)
    right.set_yticks(centres[:len(decoded) // steps], [f"{tick:.3g}" for tick in ticks[-1].flip(0)] if dims == 2
                     else [""], fontsize=7)
    right.set(xlabel=names[0], ylabel=names[1] if dims == 2 else "", title="the grid's codes, decoded")
    figure.suptitle(title, fontsize=10)
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.88, wspace=0.25)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_codes_against_prior(codes, active, threshold, title, path, shown=7):
    """codes_vs_prior.png: histograms of `shown` code dimensions, from the most to the least varied,
    with the N(0, 1) density over them; last, every dimension's variance across photos, sorted, and
    the line past which it counts as active."""
    import matplotlib.pyplot as plt

    variances = codes.var(0, correction=0)
    order = variances.argsort(descending=True)
    picked = order[torch.linspace(0, len(order) - 1, min(shown, len(order))).round().long().unique()]
    figure, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    for axis, dimension in zip(axes.flat, picked.tolist()):
        values = codes[:, dimension]
        low, high = min(-4.0, values.min().item()), max(4.0, values.max().item())
        counts = torch.histc(values, bins=40, min=low, max=high)  # one outline, not 40 bars: drawn in a blink
        axis.stairs((counts / counts.sum() / ((high - low) / 40)).numpy(), torch.linspace(low, high, 41).numpy(),
                    fill=True, alpha=0.6, label="codes")
        x = torch.linspace(low, high, 200)
        axis.plot(x, torch.exp(-x**2 / 2) / math.sqrt(2 * math.pi), color="black", label="N(0, 1)")
        state = "active" if variances[dimension] > threshold else "inactive"
        axis.set(title=f"z[{dimension}]: variance {variances[dimension]:.2g}, {state}", xlabel="value",
                 ylabel="density")
        axis.title.set_fontsize(9)
        axis.legend(fontsize=7)
    for axis in axes.flat[len(picked):-1]:
        axis.axis("off")
    # The last panel: each dimension's variance (active above the threshold), and the variance along
    # each main direction: N(0, I) has 1 in every direction, correlated codes do not.
    axis = axes.flat[-1]
    along = torch.linalg.eigvalsh(torch.cov(codes.T.double(), correction=0).reshape(codes.shape[1], -1)).flip(0).float()
    for values, label in ((variances[order], "each dimension"), (along, "each main direction")):
        axis.semilogy(range(1, len(values) + 1), values.clamp_min(threshold / 100).numpy(), marker=".", label=label)
    axis.axhline(1, color="black", label="N(0, I): 1 in every one")
    axis.axhline(threshold, color="red", linestyle="--", label=f"{threshold}: a dimension above is active")
    axis.set_ylim(threshold / 200, max(along.max().item(), variances.max().item(), 1) * 2)
    axis.set(title=f"variances, sorted: {active} dimensions active", xlabel="dimensions / directions, most varied "
             "first", ylabel="variance across photos")
    axis.title.set_fontsize(9)
    axis.legend(fontsize=6)
    figure.suptitle(title, fontsize=10)
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.09, top=0.87, hspace=0.45, wspace=0.3)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def traversal_codes(codes, rows=5, steps=9, reach=2.0):
    """The mean code moved along each of the codes' first `rows` main directions, from -reach to +reach
    standard deviations of the codes along it: (rows, steps, latent), and each direction's share of
    the variance (rows,)."""
    directions, shares = main_directions(codes)
    directions = directions[:rows]  # (rows, latent)
    mean = codes.mean(0)
    spread = ((codes - mean) @ directions.T).std(0)  # (rows,)
    offsets = torch.linspace(-reach, reach, steps).view(1, -1, 1) * spread.view(-1, 1, 1)  # (rows, steps, 1)
    return mean + offsets * directions.unsqueeze(1), shares[:rows]


def draw_code_space(name, codes, decode, kinds, catalogue, active, threshold, prior, tag, out):
    """The three pictures of what the code learned, the same for the AE and the VAE so that they differ
    by what the KL does: code_plane.png, codes_vs_prior.png and traversals.png. `codes` are every
    product's, `decode` takes codes to images, `active` is the count of active units."""
    test, latent = catalogue.test_index, codes.shape[1]
    plane = code_plane(codes, prior)
    where = ("the code's own numbers" if latent <= 2 else "the codes' two main directions")
    grid = "N(0, 1) quantiles, where the prior puts its mass" if prior else "the box of the codes, holes and all"
    plot_code_plane(plane, decode(plane["grid"]), kinds, test, f"The {name}'s code plane ({latent} number"
                    f"{'s' if latent > 1 else ''}), on "
                    f"{where}: the test products' codes, and a grid at {grid}, decoded{tag}", out / "code_plane.png")
    plot_codes_against_prior(codes[test], active, threshold, f"The {name}'s codes of the {len(test)} test photos "
                             f"against the prior N(0, 1): {active} of {latent} dimensions active{tag}",
                             out / "codes_vs_prior.png")
    moved, shares = traversal_codes(codes[catalogue.train_index])
    steps = moved.shape[1]
    show_rows([decode(row) for row in moved], [f"direction {i + 1}\n{share:.0%} of the variance"
                                               for i, share in enumerate(shares)],
              f"The mean training code moved along the {name}'s main directions{tag}", out / "traversals.png",
              [f"{value:+.1f} sd" for value in torch.linspace(-2, 2, steps).tolist()])


def product_kinds(catalogue):
    """Each product's kind: its ProductType, or in a folder without fashion.csv its Category (the
    first folder level)."""
    column = "ProductType" if (catalogue.metadata["ProductType"] != "").any() else "Category"
    return catalogue.metadata[column].tolist()


def shown_products(catalogue, count):
    """`count` fixed test products spread over the (sorted) test set: the same ones every run."""
    test = catalogue.test_index
    return test[torch.linspace(0, len(test) - 1, count).long()]


def pick(metadata, index, column, value, otherwise=0):
    """The first of the given products whose metadata column equals value; if none does (a folder
    without fashion.csv, say), the product at position `otherwise`, spread over the index."""
    matches = np.flatnonzero(metadata[column].to_numpy()[index.numpy()] == value)  # positions within index
    return index[matches[0] if len(matches) else otherwise * len(index) // 8 % len(index)].item()
