"""ae.py: shapes, the loss, search and precision@k, training, end to end."""

import csv
import re
import math

import pytest
import torch

import ae
import common
import shop
from conftest import Constant, epoch_args, losses_over_steps, per_image_mean


@pytest.mark.parametrize("image_size, latent_dim", [(32, 8), (64, 128), (128, 16)])
def test_encode_decode_forward_shapes(image_size, latent_dim):
    model = ae.Autoencoder(image_size, latent_dim)
    images = torch.rand(3, 3, image_size, image_size)
    assert model.encode(images).shape == (3, latent_dim)
    recon = model(images)
    assert recon.shape == images.shape and 0 <= recon.min() and recon.max() <= 1


@pytest.mark.parametrize("image_size, grid, levels", [(32, 4, 3), (64, 8, 3), (96, 6, 4), (128, 8, 4), (256, 8, 5)])
def test_a_larger_photo_gets_more_levels_and_never_a_grid_larger_than_8x8(image_size, grid, levels):
    model = ae.Autoencoder(image_size, 8)
    assert model.feature_shape == (64, grid, grid)
    assert sum(isinstance(layer, torch.nn.Conv2d) for layer in model.encoder) == levels
    assert model.decode(torch.zeros(2, 8)).shape == (2, 3, image_size, image_size)


def test_bad_image_size_is_a_clear_error():
    with pytest.raises(SystemExit, match="--image-size 50"):
        ae.Autoencoder(50)


def test_loss_is_zero_for_a_perfect_reconstruction_and_a_direct_sum_otherwise():
    torch.manual_seed(0)
    recon, images = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    assert ae.ae_loss(images, images)["loss"].item() == 0
    direct = sum(((recon[i] - images[i]) ** 2).sum() for i in range(4)) / 4
    assert torch.allclose(ae.ae_loss(recon, images)["loss"], direct)


def test_psnr_of_a_known_error():
    images = torch.full((2, 3, 4, 4), 0.5)
    assert torch.allclose(ae.psnr(images + 0.1, images), torch.tensor([20.0, 20.0]), atol=1e-4)  # MSE 0.01


def test_a_few_steps_on_one_batch_lower_the_loss():
    losses = losses_over_steps(lambda: ae.Autoencoder(32, 8),
                               lambda model, images: ae.ae_loss(model(images), images)["loss"])
    assert losses[-1] < 0.9 * losses[0]


def test_run_epoch_returns_per_image_means_also_when_the_last_batch_is_smaller():
    torch.manual_seed(0)
    photos = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)  # batches of 4, 4 and 2
    result = ae.run_epoch(Constant(), photos, epoch_args())
    images = photos.float() / 255  # what the model is shown
    assert result["loss"] == pytest.approx(per_image_mean(lambda x: ((x - 0.5) ** 2).sum().item(), images))
    assert result["psnr"] == pytest.approx(per_image_mean(lambda x: -10 * math.log10(((x - 0.5) ** 2).mean()), images))


def test_augment_mirrors_about_half_the_photos_and_moves_each_by_at_most_two_pixels():
    images = torch.rand(200, 3, 8, 8)
    seen = ae.augment(images.clone(), torch.Generator().manual_seed(0))
    assert seen.shape == images.shape
    moves = set()
    mirrored = 0
    for photo, out in zip(images, seen):
        # the middle 4x4 of what the model sees is a window of the photo, or of its mirror image
        matches = [(flip, dy, dx) for flip, source in ((False, photo), (True, photo.flip(2)))
                   for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(out[:, 2:6, 2:6], source[:, 2 + dy:6 + dy, 2 + dx:6 + dx])]
        assert len(matches) == 1  # random pixels: one window, and only one, fits
        assert bool(torch.isin(out, photo).all())  # the gap is filled with the photo's own edge pixels, not zeros
        mirrored += matches[0][0]
        moves.add(matches[0][1:])
    assert 70 < mirrored < 130  # about half (binomial(200, 1/2): 30 is 4 sd)
    assert moves == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}  # all 25 moves, none beyond


def test_training_shows_augmented_photos_and_evaluation_the_photos_as_they_are():
    class Recorder(torch.nn.Module):  # returns its input, and keeps every batch it was shown
        def __init__(self):
            super().__init__()
            self.weight, self.seen = torch.nn.Parameter(torch.zeros(())), []

        def forward(self, images):
            self.seen.append(images.detach().clone())
            return images + self.weight

    photos = torch.randint(0, 256, (200, 3, 8, 8), dtype=torch.uint8)
    catalogue, images = photos.clone(), photos.float() / 255  # bytes kept; the model sees floats in [0, 1]
    model = Recorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # a training pass that changes nothing
    schedule = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    ae.run_epoch(model, photos, epoch_args(), optimizer, torch.Generator().manual_seed(0), schedule)
    assert torch.equal(photos, catalogue)  # the photos are augmented in copies, never in place
    trained, model.seen = torch.cat(model.seen), []
    unchanged = (trained[:, None] == images[None]).flatten(2).all(2).any(1)
    assert int(unchanged.sum()) < 20  # 1 in 50 is neither mirrored nor moved: ~4 of 200
    ae.run_epoch(model, photos, epoch_args())
    assert torch.equal(torch.cat(model.seen), images)  # evaluation: every photo, in order, untouched


def test_main_trains_writes_every_output_and_reloads_for_figures_only(smoke_flags, tmp_path):
    out, flags = tmp_path / "out", smoke_flags
    ae.main([*flags, "--epochs", "1"])
    for name in ["reconstructions.png", "code_plane.png", "codes_vs_prior.png", "traversals.png", "loss_curves.png",
                 "search.png", "search_outputs.png", "search.csv", "metrics.csv", "model.pt"]:
        assert (out / name).is_file(), name
    assert "precision@5_ProductType" in (out / "search.csv").read_text()
    before = (out / "model.pt").read_bytes()
    (out / "search.png").unlink()
    ae.main([*flags, "--figures-only"])
    assert (out / "search.png").is_file() and (out / "model.pt").read_bytes() == before


@pytest.fixture
def trained_with_copies(smoke_flags, tiny_catalogue):
    """The tiny catalogue with two photos listed again under new ProductIds, and a model trained on it."""
    for original, copy in [("101", "901"), ("110", "910")]:
        found = next(tiny_catalogue.rglob(f"{original}.jpg"))
        (found.parent / f"{copy}.jpg").write_bytes(found.read_bytes())
    ae.main([*smoke_flags, "--epochs", "1"])
    return smoke_flags


def test_a_query_never_returns_itself_or_its_copies(trained_with_copies, tiny_catalogue, tmp_path, capsys):
    photo = tmp_path / "my photo.jpg"
    photo.write_bytes(next(tiny_catalogue.rglob("101.jpg")).read_bytes())  # a user's copy of product 101
    ae.main([*trained_with_copies, "--query", str(photo), "--top", "3"])
    from_file = capsys.readouterr().out
    assert "2 catalogue photos left out: the photo itself or its copies" in from_file
    assert (tmp_path / "out" / "query_my photo.png").is_file()
    listed = [line.split()[1] for line in from_file.splitlines() if line.strip()[:3] in ("1. ", "2. ", "3. ")]
    assert len(listed) == 3 and not {"101", "901"} & set(listed)
    ae.main([*trained_with_copies, "--query", "101", "--top", "3"])  # the catalogue's own product: the same answer
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()
            if line.strip()[:3] in ("1. ", "2. ", "3. ")] == listed


def test_a_query_lists_distinct_products_and_names_their_other_listings(trained_with_copies, capsys):
    # 26 photos, 24 products: asked for every product but the query's own, each is listed once.
    ae.main([*trained_with_copies, "--query", "101", "--top", "30"])
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"\s+\d+\. ", line)]
    listed = [line[1] for line in lines]
    assert len(listed) == 23 and len({"110", "910"} & set(listed)) == 1
    also = [" ".join(line) for line in lines if line[1] in ("110", "910")][0]
    assert "also listed as " + ({"110", "910"} - set(listed)).pop() in also


@pytest.fixture
def unlike_the_catalogue(tmp_path):
    """A blank page, a logo on white (a ring, a word) and a photo of noise: none of them a product."""
    from PIL import Image, ImageDraw

    blank, logo, noise = tmp_path / "blank.png", tmp_path / "logo.png", tmp_path / "noise.png"
    Image.new("RGB", (80, 60), "white").save(blank)
    image = Image.new("RGB", (80, 60), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 5, 60, 55), outline=(30, 90, 200), width=6)
    draw.text((20, 22), "ACME", fill=(200, 30, 30))
    image.save(logo)
    Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(0))
                    .byte().numpy()).save(noise)
    return blank, logo, noise


def test_what_is_not_a_product_is_flagged_and_the_models_own_photos_are_not(tmp_path, monkeypatch,
                                                                            unlike_the_catalogue, capsys):
    monkeypatch.setattr(common, "DEFAULT_DATA", tmp_path / "empty")  # the 600 drawn products: 60 test photos
    flags = ["--image-size", "32", "--latent-dim", "8", "--device", "cpu", "--out", str(tmp_path / "out")]
    ae.main([*flags, "--epochs", "8"])
    capsys.readouterr()
    blank, logo, noise = unlike_the_catalogue
    ae.main([*flags, "--query", str(blank), str(logo), str(noise)])  # several queries in one run
    printed = capsys.readouterr().out
    assert f"note: --query {blank}: the loader finds no product in it" in printed
    assert re.search(f"note: {logo} is unlike the catalogue .*the model needs more bits for it", printed)
    assert re.search(f"note: {noise} is unlike the catalogue .*of its edge is not white", printed)
    # The measure that flags the logo leaves the photos it was trained on alone, as it leaves 99 % of the test photos.
    catalogue = common.load_catalogue(None, 32)
    model = ae.Autoencoder(32, 8)
    model.load_state_dict(torch.load(tmp_path / "out" / "model.pt", weights_only=True)["state_dict"])
    args = ae.parse_args(flags)
    args.device = torch.device("cpu")
    codes = ae.encode_all(model, catalogue.images, args)
    train, test = catalogue.train_index, catalogue.test_index

    def reconstruct(photos):
        return ae.decode_all(model, ae.encode_all(model, photos, args), args)

    limits = shop.unusual_limits(reconstruct, catalogue.images[test], codes[test], codes[train])
    bits = shop.unusualness(catalogue.images[train], reconstruct, limits["variance"])
    assert (bits > limits["bits"]).float().mean() <= 0.05


@pytest.mark.parametrize("query", ["nowhere.jpg", "12345"])
def test_a_query_of_a_missing_file_or_unknown_product_is_named_and_the_others_answered(trained_with_copies, query,
                                                                                      capsys):
    with pytest.raises(SystemExit, match=r"^error: --query: 1 of 2 could not be read \(named above\); the others"):
        ae.main([*trained_with_copies, "--query", query, "101"])
    printed = capsys.readouterr().out
    assert f"error: --query {query}: no such file, and no product with this ProductId; skipped" in printed
    assert "products most like 101" in printed


def test_the_duplicate_finder_finds_the_planted_copies(trained_with_copies, tmp_path, capsys):
    # Identical photos get identical codes (cosine 1); a model trained for one epoch puts some
    # different drawings above 0.9999, so the threshold asks for five nines.
    ae.main([*trained_with_copies, "--duplicates", "0.99999"])
    with open(tmp_path / "out" / "duplicates.csv") as handle:
        rows = list(csv.DictReader(handle))
    groups = {}
    for row in rows:
        groups.setdefault(row["group"], set()).add(row["ProductId"])
    assert sorted(groups.values(), key=sorted) == [{"101", "901"}, {"110", "910"}]
    assert "of the catalogue's 2 pairs of byte-identical files, 2 are among them" in capsys.readouterr().out
    assert (tmp_path / "out" / "catalogue_codes.pt").is_file()  # cached for the next tool run
