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
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageChops, ImageDraw
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
    red, green, blue = small.split()
    darkest = ImageChops.darker(ImageChops.darker(red, green), blue)  # min(R, G, B) per pixel, in C: fast
    ink = 255 - np.asarray(darkest, dtype=np.float32)  # (h, w), 0 = white
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

    print(script, *[flag_name(k) + ("" if v is True else f" {value(v)}") for k, v in vars(args).items()
                    if v != defaults[k] and k != "data"], "--data", shlex.quote(str(data_folder(args.data))))
    checkpoint = args.checkpoint or args.out / "model.pt"
    flags = model_flags + (training_flags if args.resume else ())
    state = load_checkpoint(checkpoint, script, args, defaults, flags) if load else None
    torch.manual_seed(args.seed)
    # Numbers below ~1e-38 ("denormals") take a slow path in x86 CPUs, and a well-trained model's
    # gradients hold many of them; flushed to zero they change nothing visible.
    torch.set_flush_denormal(True)
    args.device = select_device(args.device)
    return checkpoint, state


def read_checkpoint(path, script, flag="--checkpoint"):
    """The contents of a model.pt that `script` saved; anything else is a one-line error naming `flag`."""
    if not path.is_file():
        raise SystemExit(f"error: {flag} {path}: no such file (train first: python {script})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"error: {flag} {path}: not a readable checkpoint ({error.__class__.__name__})")
    if not isinstance(state, dict) or state.get("script") != script:
        found = state.get("script", "an unknown script") if isinstance(state, dict) else "an unknown script"
        raise SystemExit(f"error: {flag} {path}: saved by {found}, not by {script}")
    return state


def load_checkpoint(path, script, args, defaults, flags):
    """A saved run. The flags that define it (`flags`) are taken from it, and said so; a flag that
    the command line sets to another value than the saved one is an error naming it."""
    state, restored = read_checkpoint(path, script), []
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


def epoch_row(epoch, train, test, seconds, count, args):
    """One row of metrics.csv: the epoch, every train_ and test_ number, the time it took. A loss
    that is no longer finite stops the run here, with the last good model kept."""
    row = {"epoch": epoch, **{f"train_{k}": v for k, v in train.items()}, **{f"test_{k}": v for k, v in test.items()},
           "seconds": seconds, "images_per_second": count / seconds}
    if not all(math.isfinite(value) for value in row.values()):
        raise SystemExit(f"error: the loss became non-finite in epoch {epoch} (try a smaller --lr); "
                         f"{args.out / 'model.pt'} still holds the model of epoch {epoch - 1}")
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


def save_images(images, folder):
    """(N, 3, S, S) images in [0, 1] as PNG files image_0000.png, ... in `folder`."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"sample_{i:04d}.png")


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
def show_rows(rows, labels, title, path, columns_titles=None):
    """Save a titled grid of images: rows is a list of (n, 3, S, S) tensors, one per labelled row.
    The images are pasted into one picture, drawn once: much faster than one plot per image."""
    import matplotlib.pyplot as plt  # imported here: only figure code needs it

    rows = [row.float() / 255 if row.dtype == torch.uint8 else row for row in rows]  # photos are bytes
    size, gap, columns = rows[0].shape[-1], 2, max(len(row) for row in rows)
    step = size + gap
    grid = torch.ones(3, len(rows) * step - gap, columns * step - gap)  # white between the images
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid[:, r * step:r * step + size, c * step:c * step + size] = image.clamp(0, 1).cpu()
    labels_width = max(1.2, 0.07 * max(len(line) for label in labels for line in str(label).split("\n")))
    width = max(1.1 * columns + labels_width, 0.075 * len(title))  # the images, the labels left of them, the title
    # As tall as the images at that width, plus the title: no empty band above or below the grid.
    height = (width - labels_width) * grid.shape[1] / grid.shape[2] + 0.6 + (0.2 if columns_titles else 0)
    figure, axis = plt.subplots(figsize=(width, height))
    axis.imshow(grid.permute(1, 2, 0).numpy())
    axis.set_yticks([r * step + size / 2 for r in range(len(rows))], labels, fontsize=8)
    if columns_titles:
        axis.set_xticks([c * step + size / 2 for c in range(columns)], columns_titles[:columns], fontsize=7)
    else:
        axis.set_xticks([])
    axis.xaxis.tick_top()
    axis.tick_params(length=0)
    for spine in axis.spines.values():
        spine.set_visible(False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


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


def plot_latent_map(codes, catalogue, title, path):
    """The test products on the two principal directions of all codes, coloured by Category and Gender."""
    import matplotlib.pyplot as plt

    metadata, test = catalogue.metadata, catalogue.test_index
    centred = codes - codes.mean(0)
    directions = torch.linalg.svd(centred, full_matrices=False)[2]  # PCA by hand
    xy = centred[test] @ directions[:2].T  # (N_test, 2)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for axis, column in zip(axes, ["Category", "Gender"]):
        values = metadata[column].iloc[test.tolist()]
        for value in sorted(values.unique()):
            mask = torch.tensor((values == value).values)
            axis.scatter(xy[mask, 0], xy[mask, 1], s=8, label=value or "(none)")
        axis.set(title=f"{title}, by {column}", xlabel="PC 1", ylabel="PC 2")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


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
