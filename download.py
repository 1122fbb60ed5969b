"""The first run's download: the Kaggle dataset into the repo's data/, by Kaggle's own client.

    fetch_dataset(Path("data"))   # True once data/fashion-images/ holds the photos and fashion.csv

kagglehub.dataset_download fetches a public dataset without an account, shows its progress, and
raises an OSError (requests' errors are OSErrors) when it cannot: no network, Kaggle refusing,
busy or rate-limiting, a full disk. Each becomes one line that says why and what to do, and the
run goes on with the drawn catalogue (common.load_catalogue). Two first runs at once do not both
download: the second waits for the first, and finds the photos. Not here: reading the photos
(common.py, which imports this module; this one imports nothing of the project's).
"""

import errno
import os
import shutil
from pathlib import Path

import filelock  # comes with torch

KAGGLE_DATASET = "vikashrajluhaniwal/fashion-images"
DATASET_PHOTOS = 2906  # how many photos it holds; a download with under 90 % of them is not the dataset
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def dataset_in(folder):
    """(the fashion.csv at the top of folder or up to two folders down, or None; how many photos lie under it)."""
    found = sorted(Path(folder).glob("fashion.csv")) + sorted(Path(folder).glob("*/fashion.csv")) + \
        sorted(Path(folder).glob("*/*/fashion.csv"))
    photos = sum(1 for path in Path(folder).rglob("*") if path.suffix.lower() in PHOTO_EXTENSIONS)
    return (found[0] if found else None), photos


def fetch_dataset(root):
    """The Kaggle dataset into root/fashion-images, once: root is held (an OS lock on
    root/.download.lock) while it downloads, and a second run waits, then finds the photos there.
    True once the photos are there; False, after one line that says why and what to do, when they
    could not be fetched."""
    root.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(root / ".download.lock", timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        print(f"waiting for another run, which is downloading the dataset into {root}/ ...", flush=True)
        lock.acquire(timeout=-1)
    try:
        if dataset_in(root / "fashion-images")[1]:  # the run this one waited for has fetched it
            return True
        return download(root)
    finally:
        lock.release()


def download(root):
    """The Kaggle dataset into root/fashion-images. It lands in a hidden folder, which find_images
    skips, and moves in only once it is whole and is the dataset (a fashion.csv, at least 90 % of the
    photos): an interrupted or wrong download is never read as photos, and the next run starts it
    again. True once the photos are there; False, after one line that says why and what to do, when
    they could not be fetched."""
    staging, target = root / ".download", root / "fashion-images"
    by_hand = (f"download it by hand from https://www.kaggle.com/datasets/{KAGGLE_DATASET} and unzip it into "
               f"{root}/ (--data synthetic skips this step)")
    if target.is_dir() and any(target.iterdir()):  # the download would have to land where this is
        print(f"note: not downloading the dataset: {target}/ is there but holds no photos (a half-finished unzip?); "
              f"finish unzipping the photos into it, or move it away and run again for the download")
        return False
    print(f"downloading the Fashion Images dataset ({DATASET_PHOTOS:,} photos, about 380 MB) from "
          f"kaggle.com/datasets/{KAGGLE_DATASET} into {target}/, once ...", flush=True)
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted download left
    try:
        import kagglehub

        kagglehub.dataset_download(KAGGLE_DATASET, output_dir=str(staging))
        csv_path, photos = dataset_in(staging)
        if csv_path is None or photos < 0.9 * DATASET_PHOTOS:
            print(f"error: the download holds {photos:,} photos and {'a' if csv_path else 'no'} fashion.csv, not the "
                  f"{DATASET_PHOTOS:,} photos of {KAGGLE_DATASET}, so it is not used: {by_hand}")
            return False
        os.replace(csv_path.parent, target)
    except ImportError:
        print(f"note: could not download the dataset: kagglehub is not installed (pip install -r requirements.txt), "
              f"or {by_hand}")
        return False
    except OSError as error:  # no network, Kaggle's refusals (requests' errors are OSErrors), a full disk
        print(f"note: could not download the dataset: {download_failure(error)}, or {by_hand}")
        return False
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"downloaded {photos:,} photos and {target / 'fashion.csv'}")
    return True


def download_failure(error):
    """Why a download failed and what to do, in a few words: from Kaggle's answer, or from the error."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return (f"Kaggle refused it ({status}): the dataset now asks you to sign in or to accept its terms; do that "
                f"on kaggle.com, put your API token in ~/.kaggle/kaggle.json and run again")
    if status is not None:
        return {429: "Kaggle's rate limit (429): run again in a while", 404: "Kaggle has no such dataset now (404)"}.get(
            status, f"Kaggle answered {status}{': it is down or busy, run again later' if status >= 500 else ''}")
    if error.errno == errno.ENOSPC:
        return f"the disk is full ({error.strerror}): free about 400 MB and run again"
    if type(error).__name__ in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout"):
        return f"no connection to Kaggle ({type(error).__name__}): connect and run again"
    return f"{type(error).__name__}: {error}"
