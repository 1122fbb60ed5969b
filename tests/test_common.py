"""The loader and the device selector, on tiny catalogues drawn in tmp_path."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from PIL import Image, ImageDraw, ImageFilter

import common
from conftest import CSV_HEADER

# The real dataset: unzipped into data/, or (for this repo's own CI) the copy beside the repo.
CANDIDATES = [common.DEFAULT_DATA, Path(__file__).resolve().parents[2] / "shared" / "fashion-images"]
DATASET = next((folder for folder in CANDIDATES if next(folder.rglob("*.jpg"), None)), None)


def product_photo(width=180, height=240, colour=(200, 30, 30), box=(0.25, 0.3, 0.75, 0.7), shadow=True):
    """A product on a white background: a coloured block, a faint grey shadow under it."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    if shadow:  # 7 levels below white: a shadow, not product
        draw.ellipse((x0 - 0.1 * width, y1 - 0.02 * height, x1 + 0.1 * width, y1 + 0.06 * height), fill=(248,) * 3)
    draw.rectangle((x0, y0, x1, y1), fill=colour)
    draw.ellipse((x0, y0, x0 + (x1 - x0) / 2, y0 + (y1 - y0) / 2), fill=(30, 30, 120))
    return image


def make_kaggle_layout(root, ids_per_folder=3, extra_csv_rows=(), images_without_rows=()):
    """The real dataset's layout: <root>/<Category>/<Gender>/Images/images_with_product_ids/<id>.jpg."""
    rows, product_id = [], 1000
    for category, gender in [("Apparel", "Boys"), ("Apparel", "Girls"), ("Footwear", "Men"), ("Footwear", "Women")]:
        folder = root / category / gender / "Images" / "images_with_product_ids"
        folder.mkdir(parents=True)
        for _ in range(ids_per_folder):
            product_id += 1
            colour = ((product_id * 97) % 256, (product_id * 57) % 256, (product_id * 31) % 256)  # far apart
            # Softened like a real photo: the JPEG ringing of razor-sharp edges would shift its frame.
            product_photo(colour=colour).filter(ImageFilter.GaussianBlur(2)).save(folder / f"{product_id}.jpg")
            rows.append(f"{product_id},{gender},{category},Sub,Type{product_id % 2},Red,Casual,Title {product_id},"
                        f"{product_id}.jpg,http://x/{product_id}.jpg\n")
    for name in images_without_rows:  # photos that fashion.csv does not list
        product_photo().save(root / "Apparel" / "Boys" / "Images" / "images_with_product_ids" / name)
    rows += [f"{i},Men,Footwear,Shoes,Heels,Red,Casual,Gone,{i}.jpg,http://x\n" for i in extra_csv_rows]
    (root / "fashion.csv").write_text(CSV_HEADER + "".join(rows))
    return root


def psnr(a, b):
    return 10 * torch.log10(1 / torch.mean((a - b) ** 2)).item()


def load(root, tmp_path, size=32):
    return common.load_catalogue(root, image_size=size, cache_dir=tmp_path / "cache")


def framed(root, tmp_path, size=32):
    """The framed photos of a folder, without the split (which needs a few products)."""
    pixels, metadata, _ = common.load_folder(root, size, tmp_path / "cache")
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255, metadata


def test_kaggle_layout_loads_with_metadata_joined(tmp_path):
    catalogue = load(make_kaggle_layout(tmp_path / "data"), tmp_path)
    assert catalogue.images.shape == (12, 3, 32, 32)
    assert catalogue.images.dtype == torch.uint8  # bytes: a quarter of float32's memory
    assert catalogue.images.is_contiguous(memory_format=torch.channels_last)  # the decoded array, not a copy
    metadata = catalogue.metadata
    assert len(metadata) == 12 and not catalogue.synthetic
    for row in metadata.itertuples():  # every row describes the image in its own position
        assert Path(row.path).stem == row.ProductId
        assert row.ProductTitle == f"Title {row.ProductId}" and row.Gender in row.path


def test_every_image_mode_loads_as_rgb_with_transparency_on_white(tmp_path):
    root = tmp_path / "modes"
    root.mkdir()
    photo = product_photo(60, 80)
    photo.convert("L").save(root / "grey.jpg")
    photo.convert("L").save(root / "grey.png")
    photo.convert("P").save(root / "palette.png")
    photo.convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257).save(root / "sixteen.png")
    transparent = Image.new("RGBA", (60, 80), (0, 0, 0, 0))  # black but fully transparent ...
    ImageDraw.Draw(transparent).rectangle((20, 20, 40, 60), fill=(0, 0, 255, 255))  # ... around a blue block
    transparent.save(root / "rgba.png")
    images, metadata = framed(root, tmp_path)
    assert images.shape == (6, 3, 32, 32)
    by_name = dict(zip(metadata["path"], images))
    assert torch.allclose(by_name["rgba.png"][:, 0, 0], torch.ones(3))  # the transparent corner is white
    assert by_name["rgba.png"][2].min() > 0.9 and by_name["rgba.png"][0].min() < 0.1  # the block is blue
    grey = by_name["grey.jpg"]
    assert torch.allclose(grey[0], grey[1], atol=0.02)  # grey in, grey RGB out
    assert psnr(by_name["sixteen.png"], by_name["grey.png"]) > 40  # 16-bit scaled to 8 bits, not clipped


def test_corrupt_and_truncated_files_are_skipped_and_reported(tmp_path, capsys):
    root = make_kaggle_layout(tmp_path / "data")
    folder = root / "Footwear" / "Men" / "Images" / "images_with_product_ids"
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    whole = (folder / "1007.jpg").read_bytes()
    (folder / "1007.jpg").write_bytes(whole[: len(whole) // 2])  # a download cut in half
    catalogue = load(root, tmp_path)
    assert len(catalogue.images) == 11
    warning = capsys.readouterr().out
    assert "skipped 2 unreadable" in warning and "broken.jpg" in warning and "1007.jpg" in warning
    load(root, tmp_path)  # from the cache, the skipped files are still reported
    assert "skipped 2 unreadable" in capsys.readouterr().out


def test_csv_rows_without_image_are_reported_and_images_without_row_get_empty_metadata(tmp_path, capsys):
    root = make_kaggle_layout(tmp_path / "data", extra_csv_rows=[7, 8], images_without_rows=["stray.jpg"])
    catalogue = load(root, tmp_path)
    assert "2 rows" in capsys.readouterr().out
    assert len(catalogue.images) == 13
    stray = catalogue.metadata[catalogue.metadata["ProductId"] == "stray"].iloc[0]
    assert stray["Gender"] == "" and stray["ProductTitle"] == ""


def test_csv_one_folder_down_is_found(tmp_path):
    root = make_kaggle_layout(tmp_path / "data")
    (root / "nested").mkdir()
    (root / "fashion.csv").rename(root / "nested" / "fashion.csv")
    assert (load(root, tmp_path).metadata["Gender"] != "").all()


def test_product_on_wide_canvas_fills_the_frame_without_stretching(tmp_path):
    root = tmp_path / "wide"
    root.mkdir()
    canvas = Image.new("RGB", (1000, 1000), "white")
    ImageDraw.Draw(canvas).rectangle((300, 500, 499, 599), fill="black")  # 200 x 100 px, 2:1
    canvas.save(root / "shoe.png")
    dark = framed(root, tmp_path, size=64)[0][0, 0] < 0.5  # (64, 64)
    columns, rows = dark.any(0).sum().item(), dark.any(1).sum().item()
    assert columns >= 56  # cropped: the product spans the frame, not a fifth of it
    assert abs(columns / rows - 2) < 0.15  # padded, not stretched: still twice as wide as high


def test_blank_image_does_not_crash(tmp_path):
    root = tmp_path / "blank"
    root.mkdir()
    Image.new("RGB", (50, 70), "white").save(root / "blank.png")
    assert framed(root, tmp_path)[0].min() == 1.0


def test_full_size_photo_and_its_reduced_copy_are_framed_the_same(tmp_path):
    root = tmp_path / "sizes"
    root.mkdir()
    product_photo(1800, 2400).save(root / "full.jpg", quality=90)
    product_photo(1800, 2400).resize((180, 240), Image.Resampling.LANCZOS).save(root / "reduced.jpg", quality=90)
    full, reduced = framed(root, tmp_path, size=64)[0]
    assert psnr(full, reduced) > 30


@pytest.mark.skipif(DATASET is None, reason="needs the real photos: in data/ (the first run downloads them) or ../shared/fashion-images")
def test_real_photos_upscaled_to_full_size_are_framed_the_same(tmp_path):
    for index, path in enumerate(sorted(DATASET.rglob("*.jpg"))[::600]):
        photo = Image.open(path).convert("RGB")
        photo.save(tmp_path / f"{index}-reduced.jpg", quality=95)
        photo.resize((photo.width * 10, photo.height * 10), Image.Resampling.BICUBIC).save(
            tmp_path / f"{index}-full.jpg", quality=90)
    images = framed(tmp_path, tmp_path, size=64)[0]
    for full, reduced in zip(images[0::2], images[1::2]):
        assert psnr(full, reduced) > 30


def test_second_load_uses_the_cache_and_a_touched_file_rebuilds_it(tmp_path, monkeypatch):
    root = make_kaggle_layout(tmp_path / "data")
    decoded = []
    original_decode_files = common.decode_files
    monkeypatch.setattr(common, "decode_files",
                        lambda paths, size: decoded.extend(paths) or original_decode_files(paths, size))
    first = load(root, tmp_path)
    assert len(decoded) == 12
    second = load(root, tmp_path)
    assert len(decoded) == 12 and torch.equal(first.images, second.images)
    touched = next(root.rglob("*.jpg"))
    product_photo(colour=(0, 200, 0)).save(touched)
    third = load(root, tmp_path)
    assert len(decoded) == 24 and not torch.equal(first.images, third.images)
    assert not list((tmp_path / "cache").glob("*.tmp*"))  # no temporary file left behind


def test_split_is_deterministic_disjoint_and_the_same_at_every_size(tmp_path):
    root = make_kaggle_layout(tmp_path / "data", ids_per_folder=8)
    small, large = load(root, tmp_path, size=32), load(root, tmp_path, size=48)
    train, test = set(small.train_index.tolist()), set(small.test_index.tolist())
    assert not train & test and len(train | test) == 32 and len(test) == 3  # 10 % of 32, rounded
    assert torch.equal(small.test_index, large.test_index)
    assert torch.equal(small.test_index, load(root, tmp_path, size=32).test_index)


def test_copies_of_a_photo_stay_on_one_side_of_the_split(tmp_path, capsys):
    root = make_kaggle_layout(tmp_path / "data", ids_per_folder=8)
    folder = root / "Apparel" / "Girls" / "Images" / "images_with_product_ids"
    photos = sorted(root.rglob("*.jpg"))
    for original in photos[::4]:  # 8 photos listed again: byte-identical, and re-encoded at another quality
        (folder / f"9{original.stem}.jpg").write_bytes(original.read_bytes())
        Image.open(original).save(folder / f"8{original.stem}.jpg", quality=90)
    catalogue = load(root, tmp_path)
    assert "24 photos have a near-identical copy (8 groups)" in capsys.readouterr().out
    side = {name: "test" for name in catalogue.metadata["ProductId"][catalogue.test_index.numpy()]}
    side.update({name: "train" for name in catalogue.metadata["ProductId"][catalogue.train_index.numpy()]})
    for original in photos[::4]:
        assert side[original.stem] == side[f"9{original.stem}"] == side[f"8{original.stem}"]
    assert 0 < len(catalogue.test_index) < 10 and len(set(catalogue.groups.tolist())) == 32
    assert "test" in [side[original.stem] for original in photos[::4]]  # the fixture does test a group in test


def test_a_photos_copy_is_judged_on_the_same_thumbnail_at_every_image_size(tmp_path):
    # Grouped at each run's own size, a pair near the threshold joined at 32 px and not at 64 (the
    # real dataset: 703 photos in 289 groups against 700 in 288).
    path = tmp_path / "photo.jpg"
    product_photo(colour=(180, 40, 90)).save(path, quality=80)
    (small, small_thumbnail), (large, large_thumbnail) = common.decode(path, 32), common.decode(path, 128)
    assert small.shape == (32, 32, 3) and large.shape == (128, 128, 3)
    assert np.array_equal(small_thumbnail, large_thumbnail)
    # and it is the thumbnail of the photo framed at GROUPING_SIZE, not of either size's own pixels
    pixels, thumbnail = common.decode(path, common.GROUPING_SIZE)
    assert np.array_equal(thumbnail, small_thumbnail)
    assert not np.array_equal(common.copy_thumbnail(np.kron(small, np.ones((2, 2, 1), np.uint8))), small_thumbnail)


def test_near_copy_groups_find_every_pair_that_all_pairs_would(tmp_path):
    # Photos that differ mostly in brightness, as product photos on white do, so that the direction
    # the grouping sorts along is brightness; each with copies at errors on both sides of the
    # threshold: brighter all over (along that direction) or with noise (across it).
    generator = torch.Generator().manual_seed(0)
    levels = torch.rand(150, 1, 1, 1, generator=generator) * 0.8 + 0.1
    photos = levels + 0.1 * F.interpolate(torch.rand(150, 3, 4, 4, generator=generator), size=32, mode="bilinear")
    copies = []  # one copy of every second photo, so that no copy joins its photo through another copy
    for n, i in enumerate(range(0, 150, 2)):
        error = (0.5e-4, 0.9e-4, 1.1e-4, 2e-4)[n % 4]  # mean squared error of the 16x16 thumbnails; threshold 1e-4
        noise = F.interpolate(torch.randn(1, 3, 16, 16, generator=generator), size=32)[0]  # constant per 2x2
        copies.append(photos[i] + (1 if n % 8 < 4 else noise) * error ** 0.5)
    pixels = (torch.cat([photos, torch.stack(copies)]).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    groups = common.near_copy_groups(common.thumbnails(torch.from_numpy(pixels).permute(0, 3, 1, 2)), block=2)  # tiny blocks: each compares little beyond its stretch
    small = F.adaptive_avg_pool2d(torch.from_numpy(pixels).permute(0, 3, 1, 2).double() / 255, 16).flatten(1)
    close = torch.cdist(small, small) ** 2 / 768 < 10 ** (-common.NEAR_COPY_PSNR / 10)  # every pair, by hand
    expected = common.connected_groups(close.nonzero().tolist(), len(pixels))
    assert len(set(zip(groups.tolist(), expected.tolist()))) == len(set(expected.tolist())) == len(set(groups.tolist()))
    assert 150 + 20 < len(set(groups.tolist())) < 150 + 55  # some copies joined their photo, some did not


def test_the_split_is_the_same_when_the_folder_is_nested_one_level_deeper(tmp_path):
    flat = make_kaggle_layout(tmp_path / "flat", ids_per_folder=8)
    nested = make_kaggle_layout(tmp_path / "nested" / "fashion-images", ids_per_folder=8).parent
    first, second = load(flat, tmp_path), load(nested, tmp_path)
    assert list(second.metadata["path"])[0].startswith("fashion-images/")
    assert torch.equal(first.test_index, second.test_index) and torch.equal(first.train_index, second.train_index)


def test_without_a_dataset_the_default_folder_falls_back_to_a_synthetic_catalogue(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "DEFAULT_DATA", tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    first = common.load_catalogue(None, image_size=32, cache_dir=tmp_path / "cache")
    assert "SYNTHETIC" in capsys.readouterr().out and first.synthetic
    assert 300 <= len(first.images) <= 1000
    assert set(first.metadata["Category"]) == {"Apparel", "Footwear"}
    second = common.load_catalogue(None, image_size=32, cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, second.images) and first.metadata.equals(second.metadata)


@pytest.mark.parametrize("make", [lambda path: None, lambda path: path.mkdir()], ids=["missing", "empty"])
def test_an_explicit_data_folder_without_images_is_an_error_naming_it(tmp_path, make):
    make(tmp_path / "nope")
    with pytest.raises(SystemExit, match="--data .*nope"):
        common.load_catalogue(tmp_path / "nope", image_size=32, cache_dir=tmp_path / "cache")


def test_device_selector_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert common.select_device().type == "cpu"
    with pytest.raises(SystemExit, match="--device cuda: not available"):
        common.select_device("cuda")
    with pytest.raises(SystemExit, match="--device banana: unknown"):
        common.select_device("banana")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert common.select_device().type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert common.select_device().type == "cuda"
    assert common.select_device("cpu").type == "cpu"


def test_a_folder_of_only_unreadable_files_is_an_error_naming_it(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "photo.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(SystemExit, match="none of the 1 image files under .*bad could be read"):
        load(tmp_path / "bad", tmp_path)
