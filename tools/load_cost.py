"""What loading a folder costs, part by part, beside what Pillow alone needs to read the files.

    python tools/load_cost.py ../shared/fashion-images --image-size 64

Prints: Pillow's draft decode of every file (the floor), over the cores with threads and with
processes (the loader's way); the loader's decode + framing; the near-copy grouping; a cold
load_catalogue (fresh cache) and a warm one (from that cache).
"""

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402


def draft_decode(path, size):
    with Image.open(path) as image:
        image.draft("RGB", (2 * size, 2 * size))
        image.load()


def timed(label, function, *args):
    tick = time.perf_counter()
    result = function(*args)
    print(f"{label:<32} {time.perf_counter() - tick:7.2f} s", flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    paths = common.find_images(args.data)
    print(f"{len(paths)} files, {args.image_size} px, {os.cpu_count()} cores")
    size = args.image_size
    workers = min(os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(workers) as pool:
        timed("Pillow draft decode, threads", lambda: list(pool.map(draft_decode, paths, [size] * len(paths))))
    with ProcessPoolExecutor(workers) as pool:
        timed("Pillow draft decode, processes",
              lambda: list(pool.map(draft_decode, paths, [size] * len(paths), chunksize=64)))
    pixels, *_ = timed("decode + framing", common.decode_files, paths, size)
    timed("near-copy grouping", common.near_copy_groups, pixels)
    del pixels
    with tempfile.TemporaryDirectory() as cache:
        timed("cold load_catalogue", common.load_catalogue, args.data, size, cache)
        timed("warm load_catalogue", common.load_catalogue, args.data, size, cache)


if __name__ == "__main__":
    main()
