"""The only code the three scripts share: the product-photo loader and the device selector.

    catalogue = load_catalogue("data", image_size=64)
    catalogue.images        # (N, 3, 64, 64) float32 in [0, 1], one product per row
    catalogue.metadata      # pandas DataFrame, row i describes image i (fashion.csv columns + path)
    catalogue.train_index   # indices of the training products (90 %)
    catalogue.test_index    # indices of the test products (10 %), the same for every script and size
    catalogue.groups        # (N,) group id: photos that are near-identical copies share one

Each photo is decoded, its white margin cropped, padded to a white square (never stretched) and
resized. The result is cached in data/processed/, so only the first run pays for decoding.

The dataset lists some photos under several ProductIds (byte-identical files, or the same photo
re-encoded). A copy of a test photo in the training set would make the test score a memory test,
so near-identical photos are grouped and every group stays on one side of the split.
"""

import hashlib
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw
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
    images: torch.Tensor  # (N, 3, S, S) float32 in [0, 1]
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
    return image.convert("RGB")


def product_box(image, faint=12, solid=36, mass_trim=0.01):
    """The box (x0, y0, x1, y1), in float pixels, around the product in a photo on white; None if blank.

    It is judged on a copy shrunk to 128 px, whose averaging wipes out JPEG noise, so a 2400 px
    original and its 240 px copy get the same box. A pixel counts as product in proportion to how
    much darker than white it is: not at all below `faint` levels (shadows, noise), fully past
    `solid`. The box then leaves out the outer `mass_trim` of that weight on each side, so a stray
    speck cannot widen it, and it is placed to a fraction of a pixel: at 64 px a one-pixel shift of
    a sharp edge would make the same photo look different.
    """
    small = image.copy()
    small.thumbnail((128, 128), Image.Resampling.BOX)
    ink = 255 - np.asarray(small, dtype=np.float32).min(axis=2)  # (h, w), 0 = white
    weight = np.clip((ink - faint) / (solid - faint), 0, 1)
    if weight.sum() < 4:
        return None
    box = []
    for axis, scale in ((0, image.width / small.width), (1, image.height / small.height)):
        profile = weight.sum(axis=axis)  # axis 0 sums over rows: weight per column, then per row
        cumulative = np.concatenate([[0], np.cumsum(profile)]) / profile.sum()  # at pixel edges
        edges = np.arange(len(cumulative))
        box.append(np.interp([mass_trim, 1 - mass_trim], cumulative, edges) * scale)
    (x0, x1), (y0, y1) = box
    return x0, y0, x1, y1


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


def decode(path, size):
    """One file to a framed array, or None when it cannot be read (corrupt, truncated, not an image)."""
    try:
        with Image.open(path) as image:
            # Draft mode lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding: a 2400 px
            # original is decoded straight to ~300 px, which is most of the speed of a cold load.
            image.draft("RGB", (2 * size, 2 * size))
            image.load()
            return frame_product(image, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
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
    # Pillow releases the GIL while it decodes and resizes, so threads use every core.
    workers = min(os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(decode, paths, [size] * len(paths)))


def load_folder(root, size, cache_dir):
    paths, csv_path = find_images(root), find_csv(root)
    if not paths:
        return None
    key = cache_key(root, paths, csv_path, size)
    cache_file = Path(cache_dir) / f"{root.resolve().name}-{size}px-{key}.npz"
    if cache_file.exists():
        with np.load(cache_file) as cached:
            pixels, kept, skipped, groups = (cached["pixels"], cached["kept"], list(cached["skipped"]),
                                             cached["groups"])
    else:
        print(f"decoding {len(paths)} images under {root} at {size} px (cached for next time) ...")
        arrays = decode_all(paths, size)
        kept = np.array([a is not None for a in arrays])
        skipped = [str(p) for p, a in zip(paths, arrays) if a is None]
        good = [a for a in arrays if a is not None]
        pixels = np.stack(good) if good else np.zeros((0, size, size, 3), np.uint8)
        groups = near_copy_groups(pixels)
        # Write to a temporary name, then rename: a killed run never leaves a half-written cache.
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(f".tmp{os.getpid()}")
        with open(temporary, "wb") as handle:
            np.savez(handle, pixels=pixels, kept=kept, skipped=np.array(skipped, dtype=str), groups=groups)
        os.replace(temporary, cache_file)
    if skipped:
        shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        print(f"warning: skipped {len(skipped)} unreadable image files: {shown}")
    if not kept.any():
        raise SystemExit(f"error: none of the {len(paths)} image files under {root} could be read")
    metadata = read_metadata([p for p, k in zip(paths, kept) if k], root, csv_path)
    return pixels, metadata, groups


def thumbnails(images):
    """(N, 3, S, S) floats in [0, 1] -> (N, 768) float64: the 16x16 averages near-copies are judged on."""
    return F.adaptive_avg_pool2d(images.double(), 16).flatten(1)


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
    other share a group. Pairs are found by a matrix product in blocks of rows, so a catalogue of
    44,000 photos needs no N x N matrix in memory."""
    small = torch.cat([torch.zeros(0, 768, dtype=torch.float64)] +  # (N, 768)
                      [thumbnails(torch.from_numpy(pixels[i:i + block]).permute(0, 3, 1, 2) / 255)
                       for i in range(0, len(pixels), block)])
    squared = (small ** 2).sum(1)
    max_error = 10 ** (-NEAR_COPY_PSNR / 10)  # PSNR > 40 dB  <=>  mean squared error < 1e-4
    pairs = []
    for start in range(0, len(pixels), block):
        # ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b, for every pair (row of this block, any image)
        error = (squared[start:start + block, None] + squared[None] - 2 * small[start:start + block] @ small.T) / 768
        pairs += [(start + i, j) for i, j in (error < max_error).nonzero().tolist()]
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
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float().div_(255)  # (N, 3, S, S)
    names = [Path(path).name for path in metadata["path"]]
    train_index, test_index = split(names, groups)
    if len(train_index) < MIN_TRAIN or len(test_index) < MIN_TEST:
        raise SystemExit(f"error: --data {root}: {len(names)} readable photos ({len(np.unique(groups))} after joining "
                         f"copies) split into {len(train_index)} training and {len(test_index)} test products; a run "
                         f"needs at least {MIN_TRAIN} and {MIN_TEST}")
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
