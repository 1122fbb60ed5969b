"""Make a larger catalogue from a small one: every photo re-drawn K times, each time with its own
random crop, mirror, hue rotation, tone and small turn, so that no two photos of the result are
near-identical copies. A stand-in for a catalogue ten times the size, to see how the loader and
the scripts grow with it; the re-drawn products keep their metadata rows under new ProductIds.
With --scale 10 the photos are enlarged to the originals' 1800 x 2400 px, whose decoding costs
far more than the 240 px copies' (the loader's framing costs the same on both).

    python tools/redraw.py ../shared/fashion-images /tmp/fashion-x10 --times 10
    python tools/redraw.py ../shared/fashion-images /tmp/fashion-full --times 1 --scale 10
"""

import argparse
import csv
import os
import random
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}


def redraw(job):
    """One source photo -> K re-drawn JPEGs beside each other under the destination folder."""
    source, target_folder, stem, times, scale = job
    with Image.open(source) as opened:
        photo = opened.convert("RGB")
    offset = zlib.crc32(source.name.encode())
    for k in range(times):
        rng = random.Random(offset + k)
        # Each re-drawing of a photo gets its own turn and tone, so that even a grey product (which
        # a hue rotation leaves as it is) is drawn `times` visibly different ways.
        slot = ((k + offset) % times) / max(1, times - 1)  # 0 .. 1
        width, height = photo.size
        keep = rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0)  # the share of each side kept
        left, top = rng.uniform(0, 1 - keep[0]) * width, rng.uniform(0, 1 - keep[1]) * height
        image = photo.crop((round(left), round(top), round(left + keep[0] * width), round(top + keep[1] * height)))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] += np.uint8(rng.randrange(20, 236))  # hue wraps around at 256; white has no hue
        image = Image.fromarray(hsv, "HSV").convert("RGB")
        gamma = rng.uniform(0.7, 1.4)
        image = image.point([round(255 * (level / 255) ** gamma) for level in range(256)] * 3)
        angle = -12 + 24 * slot + rng.uniform(-1, 1)
        image = image.rotate(angle, Image.Resampling.BICUBIC, fillcolor="white")
        if scale != 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        image.save(target_folder / f"{stem}{k:02d}.jpg", quality=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a dataset folder (with fashion.csv, or folders of photos)")
    parser.add_argument("target", type=Path, help="where the larger copy goes (must not exist)")
    parser.add_argument("--times", type=int, default=10, help="how many re-drawn photos per photo")
    parser.add_argument("--scale", type=float, default=1.0, help="enlarge every re-drawn photo this many times")
    args = parser.parse_args()
    if args.target.exists():
        raise SystemExit(f"error: {args.target} already exists")
    jobs = []
    for path in sorted(p for p in args.source.rglob("*") if p.suffix.lower() in EXTENSIONS):
        folder = args.target / path.parent.relative_to(args.source)
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((path, folder, path.stem, args.times, args.scale))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(redraw, jobs, chunksize=16))
    table = args.source / "fashion.csv"
    if table.is_file():
        with open(table, newline="") as source, open(args.target / "fashion.csv", "w", newline="") as target:
            reader = csv.DictReader(source)
            writer = csv.DictWriter(target, reader.fieldnames)
            writer.writeheader()
            for row in reader:
                for k in range(args.times):
                    writer.writerow({**row, "ProductId": f"{row['ProductId']}{k:02d}",
                                     "Image": f"{row['ProductId']}{k:02d}.jpg"})
    print(f"{len(jobs) * args.times} photos in {args.target}")


if __name__ == "__main__":
    main()
