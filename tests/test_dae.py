"""dae.py: the noise, PSNR, shapes, training, end to end."""

import math

import numpy as np
import pytest
import torch

import classical
import common
import dae
from conftest import Constant, Unchanged, epoch_args, losses_over_steps, per_image_mean

GREY = torch.full((4, 3, 32, 32), 0.5)


@pytest.mark.parametrize("kind", dae.NOISE_KINDS)
def test_noise_keeps_shape_and_range_and_leaves_the_input_alone(kind):
    images = torch.rand(4, 3, 32, 32)
    before = images.clone()
    noisy = dae.add_noise(images, kind, 0.3, torch.Generator().manual_seed(0))
    assert noisy.shape == images.shape and 0 <= noisy.min() and noisy.max() <= 1
    assert torch.equal(images, before) and not torch.equal(noisy, images)


@pytest.mark.parametrize("kind", [kind for kind in dae.NOISE_KINDS if kind != "jpeg"])  # jpeg draws nothing
def test_the_same_seed_gives_the_same_noise(kind):
    first = dae.add_noise(GREY, kind, 0.2, torch.Generator().manual_seed(3))
    assert torch.equal(first, dae.add_noise(GREY, kind, 0.2, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, dae.add_noise(GREY, kind, 0.2, torch.Generator().manual_seed(4)))


def test_gaussian_noise_has_the_asked_standard_deviation():
    residual = dae.add_noise(GREY, "gaussian", 0.1, torch.Generator().manual_seed(0)) - GREY
    assert abs(residual.std().item() - 0.1) < 0.005 and abs(residual.mean().item()) < 0.005


def test_gaussian_noise_on_white_can_only_darken_so_it_is_weaker_than_its_strength():
    white = torch.ones(4, 3, 32, 32)
    residual = dae.add_noise(white, "gaussian", 0.1, torch.Generator().manual_seed(0)) - white
    assert abs((residual == 0).float().mean().item() - 0.5) < 0.02  # the brightening half is clamped away
    # E[min(0, n)] for n ~ N(0, 0.1^2) is -0.1 / sqrt(2 pi) = -0.0399
    assert abs(residual.mean().item() + 0.1 / math.sqrt(2 * math.pi)) < 0.002 and residual.max() == 0


def test_salt_and_pepper_hits_the_asked_fraction_with_black_and_white():
    noisy = dae.add_noise(GREY, "salt-and-pepper", 0.2, torch.Generator().manual_seed(0))
    hit = noisy != 0.5
    assert abs(hit.float().mean().item() - 0.2) < 0.02
    assert set(noisy[hit].unique().tolist()) == {0.0, 1.0}


def test_occlusion_covers_about_the_asked_fraction():
    noisy = dae.add_noise(torch.ones(4, 3, 64, 64), "occlusion", 0.25, torch.Generator().manual_seed(0))
    covered = (noisy != 1).any(dim=1).float().mean(dim=(1, 2))  # per image
    assert ((covered > 0.2) & (covered < 0.5)).all()


def test_psnr_on_known_values():
    assert dae.psnr(GREY, GREY).tolist() == [100.0] * 4  # identical: MSE capped at 1e-10
    assert torch.allclose(dae.psnr(GREY + 0.1, GREY), torch.full((4,), 20.0), atol=1e-4)  # MSE 0.01
    assert math.isclose(dae.psnr(GREY + 0.01, GREY)[0].item(), 40.0, abs_tol=1e-3)  # MSE 1e-4


@pytest.mark.parametrize("height, width", [(64, 64), (80, 80), (240, 180)])
def test_any_size_that_divides_by_4_keeps_its_shape_and_a_spatial_code(height, width):
    model = dae.DenoisingAutoencoder(64, 16).eval()
    images = torch.rand(2, 3, height, width)
    assert model.encode(images, 0.1).shape == (2, 16, height // 4, width // 4)
    out = model(images, torch.tensor([0.1, 0.2]))
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1


def test_the_model_predicts_the_noise_and_subtracts_it():
    model = dae.DenoisingAutoencoder(32, 8).eval()
    torch.nn.init.zeros_(model.to_noise[-2].weight)
    torch.nn.init.zeros_(model.to_noise[-2].bias)  # a noise estimate of 0: the photo passes unchanged
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(images, 0.1), images)


def test_jpeg_noise_is_a_real_jpeg_and_a_lower_quality_does_more_damage():
    torch.manual_seed(0)
    images = dae.add_noise(torch.ones(3, 3, 64, 64), "occlusion", 0.3, torch.Generator().manual_seed(0))
    images = torch.nn.functional.avg_pool2d(images, 3, 1, 1)  # soft edges and flat areas, like a photo
    errors = [((dae.add_noise(images, "jpeg", strength) - images) ** 2).mean().item() for strength in (0.1, 0.5, 0.9)]
    assert 0 < errors[0] < errors[1] < errors[2]
    assert torch.equal(dae.add_noise(images, "jpeg", 0.5)[0], dae.jpeg_roundtrip(images[0], quality=50))
    per_image = dae.add_noise(images, "jpeg", torch.tensor([0.1, 0.5, 0.9]))
    assert torch.equal(per_image[2], dae.jpeg_roundtrip(images[2], quality=10))


def test_run_epoch_compares_the_output_with_the_clean_images():
    torch.manual_seed(0)
    photos = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)  # batches of 4, 4 and 2
    images = photos.float() / 255  # what the model is shown (before the noise)
    args = epoch_args(noise="gaussian", noise_strength=0.2)
    result = dae.run_epoch(Constant(), photos, args)
    assert result["loss"] == pytest.approx(per_image_mean(lambda x: ((x - 0.5) ** 2).sum().item(), images))
    assert result["psnr"] == pytest.approx(per_image_mean(lambda x: -10 * math.log10(((x - 0.5) ** 2).mean()), images))
    copy = dae.run_epoch(Unchanged(), photos, args)  # returns the noisy input: loss is the noise, not 0
    assert copy["loss"] > 3 and copy["psnr"] == pytest.approx(copy["psnr_noisy"])


def test_the_denoising_table_scores_at_most_table_products_spread_over_the_test_set(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DEFAULT_DATA", tmp_path / "empty")
    catalogue = common.load_catalogue(None, image_size=32)  # the synthetic catalogue: 60 test products
    monkeypatch.setattr(dae, "TABLE_PRODUCTS", 3)
    torch.manual_seed(0)
    model = dae.DenoisingAutoencoder(32, 8).eval()
    args = epoch_args(noise="gaussian", noise_strength=0.1, seed=0, out=tmp_path)
    rows, _ = dae.evaluate_denoising(model, catalogue, args)
    test = catalogue.test_index
    clean = catalogue.images[test[[0, (len(test) - 1) // 2, len(test) - 1]]].float() / 255  # first, middle, last
    with torch.no_grad():  # strength 0: the DAE is handed the clean photos themselves, at a noise level of 0
        assert rows[0]["DAE"] == pytest.approx(dae.psnr(model(clean, 0.0), clean).mean().item(), abs=1e-4)
        everything = catalogue.images[test].float() / 255
        assert rows[0]["DAE"] != pytest.approx(dae.psnr(model(everything, 0.0), everything).mean().item(), abs=1e-2)
        # OpenCV's NLM has its column, scored on the same noisy photos, told their true noise level
        noisy = dae.add_noise(clean, "gaussian", 0.1, torch.Generator().manual_seed(0))
        nlm = dae.psnr(classical.nlm_filter(noisy, dae.noise_level(noisy, clean)), clean).mean().item()
        assert rows[2]["strength"] == 0.1 and rows[2]["OpenCV NLM"] == pytest.approx(nlm, abs=1e-4)


def test_a_few_steps_on_one_batch_lower_the_loss():
    def denoising_loss(model, images):
        noisy = dae.add_noise(images, "gaussian", 0.1)
        return dae.reconstruction_loss(model(noisy, dae.noise_level(noisy, images)), images)

    losses = losses_over_steps(lambda: dae.DenoisingAutoencoder(32, 8), denoising_loss)
    assert losses[-1] < 0.9 * losses[0]


def test_main_trains_writes_every_output_and_reloads_for_figures_only(smoke_flags, tmp_path):
    out, flags = tmp_path / "out", smoke_flags
    dae.main([*flags, "--epochs", "1", "--noise", "salt-and-pepper"])
    expected = ["loss_curves.png", "metrics.csv", "denoising.csv", "model.pt"]
    expected += [f"{prefix}_{kind}.png" for kind in dae.NOISE_KINDS for prefix in ("denoising", "denoised")]
    for name in expected:
        assert (out / name).is_file(), name
    table = (out / "denoising.csv").read_text()
    assert "salt-and-pepper (trained on),0.1," in table and "median filter (3)" in table
    assert len(table.splitlines()) == 1 + 5 + 3  # header, the trained kind at 5 strengths, 3 other kinds
    before = (out / "model.pt").read_bytes()
    (out / "denoising.csv").unlink()
    dae.main([*flags, "--figures-only"])  # the noise it was trained on comes from the checkpoint
    assert "salt-and-pepper (trained on),0.1," in (out / "denoising.csv").read_text()
    assert (out / "model.pt").read_bytes() == before
    with pytest.raises(SystemExit, match="--noise salt-and-pepper, but this run asks for occlusion"):
        dae.main([*flags, "--figures-only", "--noise", "occlusion"])


def test_bad_noise_strength_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        dae.parse_args(["--noise-strength", "1.5"])
    assert "--noise-strength" in capsys.readouterr().err


def test_clean_denoises_photos_of_any_size_and_reports_the_ones_it_cannot_read(smoke_flags, tmp_path, capsys):
    from PIL import Image

    dae.main([*smoke_flags, "--epochs", "10", "--noise-strength", "0.2"])
    clean = torch.ones(3, 150, 110)  # a product like the catalogue's: a red block on white, at another size
    clean[:, 30:120, 20:90] = torch.tensor([0.8, 0.1, 0.1]).view(3, 1, 1)
    noisy = dae.add_noise(clean[None], "gaussian", 0.2, torch.Generator().manual_seed(1))[0]
    photo = tmp_path / "noisy.png"
    Image.fromarray((noisy.permute(1, 2, 0) * 255).round().byte().numpy()).save(photo)
    before = photo.read_bytes()
    (tmp_path / "broken.jpg").write_bytes(b"not a photo")
    with pytest.raises(SystemExit, match=r"^error: --clean: 2 of 3 files could not be read \(named above\)"):
        dae.main([*smoke_flags, "--clean", str(tmp_path / "broken.jpg"), str(photo), str(tmp_path / "gone.png")])
    printed = capsys.readouterr().out
    assert "broken.jpg: not a readable image" in printed and "gone.png: no such file" in printed
    cleaned = torch.from_numpy(np.asarray(Image.open(tmp_path / "out" / "noisy_clean.png")).copy())
    cleaned = cleaned.permute(2, 0, 1).float() / 255
    assert cleaned.shape == (3, 150, 110) and photo.read_bytes() == before  # its own size; the input untouched
    assert dae.psnr(cleaned[None], clean[None]) > dae.psnr(noisy[None], clean[None]) + 1


def test_training_draws_each_images_noise_strength_and_the_test_uses_the_flag(monkeypatch):
    strengths = []

    def recorded(images, kind, strength, generator=None):
        strengths.append(torch.as_tensor(strength, dtype=torch.float32).expand(len(images)).clone())
        return images

    monkeypatch.setattr(dae, "add_noise", recorded)
    photos = torch.randint(0, 256, (400, 3, 8, 8), dtype=torch.uint8)
    model = dae.DenoisingAutoencoder(32, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    args = epoch_args(noise="gaussian", noise_strength=0.3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    dae.run_epoch(model, photos, args, optimizer, torch.Generator().manual_seed(0), schedule)
    trained = torch.cat(strengths)  # one strength per image, uniform on [0, 2 x 0.3]: "blind" denoising
    assert len(trained) == 400 and len(trained.unique()) == 400
    assert 0 <= trained.min() < 0.03 and 0.57 < trained.max() <= 0.6 and abs(trained.mean() - 0.3) < 0.03
    strengths.clear()
    dae.run_epoch(model, photos, args)
    assert torch.equal(torch.cat(strengths), torch.full((400,), 0.3))  # the test: --noise-strength itself


def test_occlusion_over_more_than_the_whole_photo_covers_it_and_ends():
    covered = dae.add_noise(torch.ones(2, 3, 32, 32), "occlusion", torch.tensor([1.0, 1.8]),
                            torch.Generator().manual_seed(0))  # training draws up to twice --noise-strength
    assert (covered.flatten(1).std(1) == 0).all() and (covered < 1).all()  # each photo one flat grey


def decompression_bomb(path, side=20_000):
    """A real PNG of side x side black-and-white pixels, all zeros: ~50 KB that unpack to 400 million pixels."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(bytes(side * (1 + side // 8)), 9)  # each row: a filter byte, then side bits
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit per pixel, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def test_clean_names_a_decompression_bomb_in_one_line_and_cleans_the_photos_around_it(smoke_flags, tmp_path, capsys):
    from PIL import Image

    dae.main([*smoke_flags, "--epochs", "1"])
    photos = [tmp_path / "a.png", decompression_bomb(tmp_path / "bomb.png"), tmp_path / "b.png"]
    assert photos[1].stat().st_size < 100_000
    for photo in photos[::2]:
        Image.new("RGB", (40, 36), (200, 30, 30)).save(photo)
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"^error: --clean: 1 of 3 files could not be read \(named above\)"):
        dae.main([*smoke_flags, "--clean", *map(str, photos)])
    printed = capsys.readouterr().out.splitlines()
    assert (tmp_path / "out" / "a_clean.png").is_file() and (tmp_path / "out" / "b_clean.png").is_file()
    named = [line for line in printed[1:] if "bomb.png" in line]  # after the line that reruns the command
    assert len(named) == 1 and "decompression bomb" in named[0] and named[0].startswith("error: --clean")


def test_the_model_is_told_each_images_noise_level_as_a_channel_of_its_own():
    clean = torch.rand(3, 3, 16, 16)
    noisy = clean + torch.tensor([0.0, 0.1, 0.3]).view(3, 1, 1, 1) * torch.randn(3, 3, 16, 16)
    level = dae.noise_level(noisy, clean)
    assert level[0] == 0 and 0.09 < level[1] < 0.11 and 0.27 < level[2] < 0.33  # the noise's root mean square
    inputs = dae.DenoisingAutoencoder(32, 8).with_level(noisy, level)
    assert inputs.shape == (3, 13, 8, 8) and torch.equal(inputs[:, :12], torch.nn.PixelUnshuffle(2)(noisy))
    assert torch.equal(inputs[:, 12], level.view(3, 1, 1).expand(3, 8, 8))
    model = dae.DenoisingAutoencoder(32, 8).eval()  # an untrained model's output depends on the level too
    assert not torch.equal(model(noisy, 0.0), model(noisy, 0.3))


def test_the_noise_level_of_a_users_photo_is_estimated_from_the_photo_alone():
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0.2, 0.8, 96).view(1, 1, 1, 96).expand(2, 3, 96, 96)  # a smooth photo: only noise is left
    for sigma in (0.02, 0.05, 0.1):
        estimate = classical.estimate_noise_level(ramp + sigma * torch.randn(ramp.shape, generator=generator))
        assert estimate.shape == (2,) and torch.allclose(estimate, torch.full((2,), sigma), rtol=0.05)
    assert classical.estimate_noise_level(ramp).max() < 1e-5


def test_nlm_denoises_each_photo_from_its_own_noisy_pixels():
    generator = torch.Generator().manual_seed(0)
    clean = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 32, 32, generator=generator), 5, 1, 2)
    noisy = dae.add_noise(clean, "gaussian", 0.1, generator)
    level = dae.noise_level(noisy, clean)
    filtered = classical.nlm_filter(noisy, level)
    assert filtered.shape == noisy.shape and (dae.psnr(filtered, clean) > dae.psnr(noisy, clean) + 1).all()
    swapped = classical.nlm_filter(noisy.flip(0), level.flip(0))  # another input, another output: photo by photo
    assert torch.equal(swapped, filtered.flip(0)) and not torch.equal(swapped, filtered)
    other = classical.nlm_filter(dae.add_noise(clean, "gaussian", 0.1, generator), level)
    assert not torch.equal(other, filtered)


def test_the_classical_denoisers_tool_without_bm3d_says_so_in_one_line(monkeypatch):
    import sys
    sys.path.insert(0, str(common.REPO / "tools"))
    import classical_denoisers

    monkeypatch.setitem(sys.modules, "bm3d", None)  # an import of bm3d now fails, as where it is not installed
    with pytest.raises(SystemExit) as stop:
        classical_denoisers.main(["--checkpoint", "no/such/model.pt"])
    message = str(stop.value.code)
    assert "\n" not in message and message.startswith("error: the bm3d package is not installed (pip install bm3d")
