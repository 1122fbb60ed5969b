"""The photo loader and the device selector: what every script reads its photos through.

    catalogue = load_catalogue("data", image_size=64)
    catalogue.images        # (N, 3, 64, 64) uint8 photos, one product per row: batch.float() / 255
    catalogue.metadata      # pandas DataFrame, row i describes image i (fashion.csv columns + path)
    catalogue.train_index   # indices of the training products (90 %)
    catalogue.test_index    # indices of the test products (10 %), the same for every script and size
    catalogue.groups        # (N,) group id: photos that are near-identical copies share one

The first run downloads the dataset into data/ (download.py). Each photo is decoded, its white
margin cropped, padded to a white square (never stretched) and resized. The result is cached in
data/processed/, so only the first run pays for decoding. The photos stay bytes (0-255), a quarter
of the memory of floats: a shop's catalogue fifteen times this dataset's (44,000 photos, the size
docs/experiments.md measures with tools/redraw.py's stand-ins) is 2.2 GB at 128 px as bytes, 8.7
GB as float32. A model makes each batch floats when it reads it.

The dataset lists some photos under several ProductIds (byte-identical files, or the same photo
re-encoded). A copy of a test photo in the training set would make the test score a memory test,
so near-identical photos are grouped and every group stays on one side of the split.

Not here: a run's flags, checkpoints and metrics (bookkeeping.py), the figures (figures.py), and
anything a model learns (ae.py, dae.py, vae.py).
"""

import hashlib
import math
import os
import random
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageChops, ImageDraw
from torch.nn import functional as F
from tqdm import tqdm  # comes with kagglehub

from download import fetch_dataset

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
REPO = Path(__file__).resolve().parent
DEFAULT_DATA = REPO / "data"  # the repo's own data/, wherever the scripts are started from
CACHE_DIR = REPO / "data" / "processed"
SYNTHETIC = "synthetic"  # --data synthetic: the drawn catalogue, on purpose
# The metadata every catalogue has, empty where a photo's is unknown (see read_metadata).
COLUMNS = ["Gender", "Category", "SubCategory", "ProductType", "Colour", "Usage", "ProductTitle"]
MIN_TRAIN, MIN_TEST = 2, 1  # products a run needs on each side of the split
PREPROCESS_VERSION = 3  # bump when the pixels a file turns into change, so old caches are rebuilt
TEST_FRACTION = 0.1
# Two photos whose 16x16 thumbnails are closer than this are copies of one photo. Measured on the
# dataset: byte-identical files score over 60 dB, re-encoded copies 42-60 dB, and only 6 pairs of
# other photos score over 36 dB (none between 39 and 42).
NEAR_COPY_PSNR = 40
# Copies are judged on the photo framed at this size whatever --image-size is, so that every size
# finds the same groups (at other sizes a pair near the threshold could join or leave a group).
GROUPING_SIZE = 64


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


def copy_thumbnail(framed):
    """A framed (GROUPING_SIZE, GROUPING_SIZE, 3) photo -> its 16x16 averages (768,) float32 in [0, 1],
    channel by channel: what near_copy_groups compares. NumPy, not torch: it runs in the decoding
    processes, where torch's threads, started before the fork, would hang."""
    block = framed.shape[0] // 16
    averages = framed.reshape(16, block, 16, block, 3).mean(axis=(1, 3), dtype=np.float64)  # (16, 16, 3)
    return (averages.transpose(2, 0, 1).reshape(-1) / 255).astype(np.float32)


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
    """One file to (a framed (size, size, 3) array, its copy's thumbnail (768,) at GROUPING_SIZE), or None
    when it cannot be read (corrupt, truncated, not an image)."""
    try:
        # Draft mode lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding: a 2400 px
        # original is decoded straight to ~300 px, which is most of the speed of a cold load.
        framed = {}
        for wanted in sorted({size, GROUPING_SIZE}):
            with opened_image(path, (2 * wanted, 2 * wanted)) as image:
                framed[wanted] = frame_product(image, wanted)
        return framed[size], copy_thumbnail(framed[GROUPING_SIZE])
    except Unreadable:
        return None


# ----------------------------------------------------------------------------- a folder
def find_images(root):
    """Every image file under root, at any depth but in hidden folders, in a fixed (sorted) order."""
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=True):  # a linked-in dataset counts too
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]  # a download still under way
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


def decode_files(paths, size):
    """Every file decoded and framed: (pixels (n, size, size, 3) uint8 of the n readable ones, their
    thumbnails (n, 768) for near_copy_groups, kept (N,) bool). Each photo is written into one array as
    it arrives: no list of arrays stacked into a second copy."""
    # Between Pillow's calls, framing a photo is Python, and threads would take turns at Python's
    # lock (measured: two threads decode barely faster than one). Processes keep every core busy;
    # each is handed the files 64 at a time.
    pixels, kept, count = np.empty((len(paths), size, size, 3), np.uint8), np.zeros(len(paths), bool), 0
    fine = np.empty((len(paths), 3 * 16 * 16), np.float32)
    # tqdm draws a progress bar on a terminal (a shop's 44,000 photos take minutes), and nothing in a log.
    with ProcessPoolExecutor(min(os.cpu_count() or 1, 8, len(paths))) as pool, \
            tqdm(total=len(paths), unit=" photos", disable=None, leave=False) as progress:
        for i, decoded in enumerate(pool.map(decode, paths, [size] * len(paths), chunksize=64)):
            if decoded is not None:
                pixels[count], fine[count] = decoded
                kept[i], count = True, count + 1
            progress.update()
    return pixels[:count], fine[:count], kept


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
        pixels, fine, kept = decode_files(paths, size)
        skipped = [str(p) for p, k in zip(paths, kept) if not k]
        groups = near_copy_groups(fine)
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


def near_copy_groups(fine, block=1024):
    """A group id per image (N,) from their 16x16 thumbnails (N, 768) (copy_thumbnail): photos whose
    thumbnails are within NEAR_COPY_PSNR dB of each other share a group.

    Comparing every pair grows as N^2 (45 s for 29,000 photos). But an average never differs more
    than what it averages: two copies' 4x4 thumbnails are as close as their 16x16 ones, and so are
    their positions along any unit direction. Sorted along the 4x4 thumbnails' main direction, a
    photo's copies lie in a short stretch after it; only those pairs are compared on 4x4
    thumbnails, and only the few that pass on 16x16 ones."""
    if len(fine) < 2:
        return np.zeros(len(fine), dtype=np.int64)
    fine = torch.as_tensor(fine)
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
    return connected_groups(pairs, len(fine))


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
    """Load a folder of product photos: --data, or the repo's data/, where the first run downloads the
    Kaggle dataset (download.py). --data synthetic, or a download that cannot happen, gives the drawn
    catalogue instead, and says so."""
    root = data_folder(data)
    if data not in (None, SYNTHETIC) and not root.is_dir():
        raise SystemExit(f"error: --data {root}: no such folder")
    loaded = load_folder(root, image_size, cache_dir or CACHE_DIR) if data != SYNTHETIC and root.is_dir() else None
    if loaded is None and data is None:  # the repo's data/ holds no photos: the first run downloads them
        if fetch_dataset(root):
            loaded = load_folder(root, image_size, cache_dir or CACHE_DIR)
    if loaded is None and data not in (None, SYNTHETIC):
        raise SystemExit(f"error: --data {root}: no .jpg/.jpeg/.png/.webp images in this folder")
    synthetic = loaded is None
    if synthetic:
        print("notice: this run uses a SYNTHETIC catalogue of 600 simple drawn products"
              + (" (--data synthetic)" if data == SYNTHETIC else f", as {root}/ holds no photos") + "; its "
              "results are not those of real photos")
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
    pixels, grouped, rows = [], [], []
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
        grouped.append(frame_product(canvas, GROUPING_SIZE))
        rows.append({"path": f"synthetic/{index}.png", "ProductId": str(index), "Gender": gender,
                     "Category": category, "SubCategory": sub_category, "ProductType": product_type,
                     "Colour": colour, "Usage": "Casual",
                     "ProductTitle": f"Synthetic {gender} {colour} {product_type}"})
    return np.stack(pixels), pd.DataFrame(rows), near_copy_groups(np.stack([copy_thumbnail(g) for g in grouped]))


# ----------------------------------------------------------------------------- the catalogue's rows
def product_kinds(catalogue, index=None):
    """Each product's kind (of those in `index`, if given): its ProductType, or in a folder without
    fashion.csv its Category (the first folder level)."""
    column = "ProductType" if (catalogue.metadata["ProductType"] != "").any() else "Category"
    kinds = catalogue.metadata[column].tolist()
    return kinds if index is None else [kinds[i] for i in index.tolist()]


def shown_products(catalogue, count):
    """`count` fixed test products spread over the (sorted) test set: the same ones every run."""
    test = catalogue.test_index
    return test[torch.linspace(0, len(test) - 1, count).long()]


def average_colour(photos, block=1024):
    """The mean colour (3,) in [0, 1] of photos (N, 3, S, S) as bytes, summed in blocks: no float copy of all."""
    return sum(batch.float().sum((0, 2, 3)) for batch in photos.split(block)) / 255 / photos[:, 0].numel()


# ----------------------------------------------------------------------------- device
def select_device(name=None):
    """cuda, then mps, then cpu, unless `name` (the --device flag) picks one; printed once."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = name or next(kind for kind, there in available.items() if there)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name}: unknown device (use cpu, cuda, cuda:N or mps)") from None
    if not available.get(device.type):
        raise SystemExit(f"error: --device {name}: not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    print(f"device: {device}")
    return device
