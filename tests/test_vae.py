"""vae.py: shapes, the loss against references, reparameterization, training, end to end."""

import math
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.distributions import MultivariateNormal, Normal, kl_divergence

import ae
import vae
from conftest import Constant, epoch_args, losses_over_steps, per_image_mean

FIGURES = ["reconstructions.png", "samples.png", "samples_by_epoch.png", "interpolations.png", "code_plane.png",
           "codes_vs_prior.png", "traversals.png", "loss_curves.png", "attribute_edit.png", "catalogue_qa.png"]


@pytest.mark.parametrize("image_size, latent_dim", [(32, 8), (64, 128), (128, 16)])
def test_encode_decode_forward_shapes(image_size, latent_dim):
    model = vae.VAE(image_size, latent_dim)
    images = torch.rand(3, 3, image_size, image_size)
    mu, logvar = model.encode(images)
    assert mu.shape == logvar.shape == (3, latent_dim)
    recon, mu, logvar = model(images)
    assert recon.shape == images.shape and 0 <= recon.min() and recon.max() <= 1
    assert model.decode(torch.randn(5, latent_dim)).shape == (5, 3, image_size, image_size)


@pytest.mark.parametrize("image_size", [50, 16, 72])
def test_bad_image_size_is_a_clear_error(image_size):
    with pytest.raises(SystemExit, match=f"--image-size {image_size}"):
        vae.VAE(image_size)


def test_kl_is_zero_for_standard_normal_and_positive_otherwise():
    images = torch.rand(4, 3, 8, 8)
    zeros = torch.zeros(4, 6)
    assert vae.vae_loss(images, images, zeros, zeros)["kl"].item() == 0
    assert vae.vae_loss(images, images, zeros + 0.1, zeros)["kl"] > 0
    assert vae.vae_loss(images, images, zeros, zeros - 0.5)["kl"] > 0


def test_loss_terms_match_references():
    torch.manual_seed(0)
    recon, images = torch.rand(5, 3, 8, 8), torch.rand(5, 3, 8, 8)
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7)
    losses = vae.vae_loss(recon, images, mu, logvar, beta=0.7, edge_weight=0)
    reference_kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0, 1)).sum(1).mean()
    assert torch.allclose(losses["kl"], reference_kl, rtol=1e-5)
    # The decoder is N(x_hat, sigma^2) per pixel, with sigma^2 the batch's mean squared error.
    variance = ((recon - images) ** 2).mean()
    reference = -Normal(recon, variance.sqrt()).log_prob(images).flatten(1).sum(1).mean()
    assert torch.allclose(losses["variance"], variance) and torch.allclose(losses["reconstruction"], reference)
    assert torch.allclose(losses["loss"], losses["reconstruction"] + 0.7 * losses["kl"])
    assert vae.vae_loss(recon, images, mu, logvar, beta=0, edge_weight=0)["loss"] == losses["reconstruction"]


def wrap_round_differences(height, width, down):
    """The matrix that takes one channel's H x W values (flattened) to their differences with the
    pixel above (down) or on the left, the grid wrapping round at its borders: built pixel by pixel."""
    matrix = torch.zeros(height * width, height * width, dtype=torch.float64)
    for y in range(height):
        for x in range(width):
            neighbour = ((y - 1) % height) * width + x if down else y * width + (x - 1) % width
            matrix[y * width + x, y * width + x] += 1
            matrix[y * width + x, neighbour] -= 1
    return matrix


def test_the_edge_likelihood_is_the_multivariate_normal_it_implies():
    torch.manual_seed(0)
    recon, images, zeros = torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5), torch.zeros(2, 3)  # H != W: no axis swapped
    losses = vae.vae_loss(recon, images, zeros, zeros, edge_weight=0.7)
    across, down = wrap_round_differences(4, 5, down=False), wrap_round_differences(4, 5, down=True)
    precision = torch.eye(20, dtype=torch.float64) + 0.7 * (across.T @ across + down.T @ down)  # I + lambda L
    covariance = losses["variance"].double() * torch.block_diag(*[torch.linalg.inv(precision)] * 3)
    reference = -MultivariateNormal(recon.flatten(1).double(), covariance).log_prob(images.flatten(1).double())
    # Dropping the log-determinant would move the term by 1/2 log det(I + 0.7 L) = 37.5 nats an image.
    assert torch.allclose(losses["reconstruction"].double(), reference.mean(), rtol=0, atol=1e-3)
    assert torch.isclose(vae.log_det_edges((3, 4, 5), 0.7), 3 * torch.linalg.slogdet(precision)[1].float())


def test_an_edge_weight_makes_a_blur_cost_more_than_an_even_error_of_the_same_size():
    torch.manual_seed(0)
    images, zeros = torch.rand(4, 3, 8, 8), torch.zeros(4, 2)
    blurred = (images + images.roll(1, -1) + images.roll(-1, -1)) / 3
    shifted = images + ((blurred - images) ** 2).mean().sqrt()  # an even error with the blur's squared error
    assert torch.isclose(((blurred - images) ** 2).mean(), ((shifted - images) ** 2).mean())
    cost = {weight: [vae.vae_loss(output, images, zeros, zeros, edge_weight=weight)["reconstruction"].item()
                     for output in (blurred, shifted)] for weight in (0, 1)}
    assert cost[0][0] == pytest.approx(cost[0][1], abs=1e-2)  # the independent Gaussian cannot tell them apart
    assert cost[1][0] > cost[1][1] + 100  # blur's error has edges: 192 values x log(6) / 2 here, not a rounding


def test_a_sharper_reconstruction_is_more_likely():
    torch.manual_seed(0)
    images, zeros = torch.rand(4, 3, 8, 8), torch.zeros(4, 2)
    blurry, sharp = images + 0.1 * torch.randn_like(images), images + 0.01 * torch.randn_like(images)
    assert vae.vae_loss(sharp, images, zeros, zeros)["reconstruction"] < vae.vae_loss(blurry, images, zeros, zeros)[
        "reconstruction"] - 100  # 192 pixels x log(10): the better fit wins by far, not by a rounding


def test_reparameterize_has_the_exact_gradients_and_the_right_moments():
    model = vae.VAE(32, 4)
    mu = torch.tensor([1.0, -2.0, 0.0, 3.0]).expand(20000, 4).clone().requires_grad_()
    logvar = torch.tensor([0.0, 1.0, -1.0, 2.0]).expand(20000, 4).clone().requires_grad_()
    torch.manual_seed(0)
    z = model.reparameterize(mu, logvar)
    z.sum().backward()
    # z = mu + exp(logvar / 2) * eps:  dz/dmu = 1,  dz/dlogvar = exp(logvar / 2) * eps / 2 = (z - mu) / 2
    assert torch.equal(mu.grad, torch.ones_like(mu))
    assert torch.allclose(logvar.grad, (z - mu).detach() / 2, atol=1e-6)
    assert torch.allclose(z.mean(0), mu[0].detach(), atol=0.05)
    assert torch.allclose(z.var(0), logvar[0].detach().exp(), rtol=0.05)


class ConstantVAE(torch.nn.Module):
    """Reconstructs every image as 0.5 grey, with mu = 1 and sigma = 1 for each of 3 latent dimensions."""

    def forward(self, images):
        ones = torch.ones(len(images), 3)
        return Constant()(images), ones, torch.zeros_like(ones)


def test_run_epoch_returns_per_image_means_also_when_the_last_batch_is_smaller():
    torch.manual_seed(0)
    photos = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)  # batches of 4, 4 and 2, each its own variance
    result = vae.run_epoch(ConstantVAE(), photos, epoch_args(beta=2.0, edge_weight=0))  # the edges: their own test
    images = photos.float() / 255  # what the model is shown
    by_hand = {"reconstruction": 0, "variance": 0}
    for batch in images.split(4):
        variance = ((batch - 0.5) ** 2).mean().item()
        squared_errors = ((batch - 0.5) ** 2).flatten(1).sum(1)
        by_hand["variance"] += variance * len(batch) / 10
        by_hand["reconstruction"] += (squared_errors / (2 * variance) + 96 * math.log(2 * math.pi * variance)).sum() / 10
    assert result["kl"] == pytest.approx(3 * 0.5)  # -1/2 (1 + 0 - 1 - 1) per dimension
    assert result["variance"] == pytest.approx(by_hand["variance"])
    assert result["reconstruction"] == pytest.approx(by_hand["reconstruction"].item())
    assert result["loss"] == pytest.approx(result["reconstruction"] + 2.0 * result["kl"])
    assert result["psnr"] == pytest.approx(per_image_mean(lambda x: -10 * math.log10(((x - 0.5) ** 2).mean()), images))


def test_evaluation_decodes_the_mean_and_training_samples():
    torch.manual_seed(0)
    model, images = vae.VAE(32, 4), torch.rand(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(images)[0], model(images)[0])  # no randomness: z = mu
    model.train()
    assert not torch.equal(model(images)[0], model(images)[0])


def test_the_fitted_sampler_draws_codes_with_the_fitted_mean_and_covariance():
    torch.manual_seed(0)
    codes = torch.randn(500, 3) @ torch.tensor([[2.0, 0, 0], [1.0, 0.5, 0], [0, 0, 0.1]]) + torch.tensor([1.0, -2, 0])
    distribution = vae.fit_gaussian(codes)
    assert torch.allclose(distribution["mean"], codes.mean(0))
    assert torch.allclose(distribution["covariance"], torch.cov(codes.T) + 1e-3 * torch.eye(3))
    samples = vae.sample_codes({"all": distribution}, 50000, torch.Generator().manual_seed(1))
    assert torch.allclose(samples.mean(0), distribution["mean"], atol=0.03)
    assert torch.allclose(torch.cov(samples.T), distribution["covariance"], atol=0.05)


def test_a_few_steps_on_one_batch_lower_the_loss():
    def negative_elbo(model, images):
        recon, mu, logvar = model(images)
        return vae.vae_loss(recon, images, mu, logvar)["loss"]

    losses = losses_over_steps(lambda: vae.VAE(32, 8), negative_elbo)
    assert losses[-1] < 0.9 * losses[0]


def test_main_trains_writes_every_output_and_reloads_for_figures_only(smoke_flags, tiny_catalogue, tmp_path):
    out, flags = tmp_path / "out", smoke_flags
    vae.main([*flags, "--epochs", "1", "--num-samples", "2"])
    for name in [*FIGURES, "metrics.csv", "model.pt", "samples/sample_0001.png"]:
        assert (out / name).is_file(), name
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # a header and one epoch
    before, sample = (out / "model.pt").read_bytes(), (out / "samples" / "sample_0001.png").read_bytes()
    shutil.rmtree(out / "samples")
    for name in ["samples.png", "samples_by_epoch.png"]:
        (out / name).unlink()
    vae.main([*flags, "--figures-only", "--num-samples", "2"])  # the samples alone: no figure is redrawn
    assert len(list((out / "samples").glob("*.png"))) == 2 and not (out / "samples.png").exists()
    assert (out / "samples" / "sample_0001.png").read_bytes() == sample  # the same fitted distribution, same seed
    vae.main([*flags, "--figures-only"])
    assert (out / "samples.png").is_file() and (out / "samples_by_epoch.png").is_file()  # again from the checkpoint
    assert (out / "model.pt").read_bytes() == before  # figures only: the model is not retrained
    with pytest.raises(SystemExit, match="--latent-dim 8"):
        vae.main([*flags[:6], "--latent-dim", "16", "--device", "cpu", "--figures-only"])
    # Sampling needs the checkpoint only: with the photos gone, the samples are still written.
    shutil.rmtree(out / "samples")
    shutil.rmtree(tiny_catalogue)
    vae.main([*flags, "--figures-only", "--num-samples", "2"])
    assert (out / "samples" / "sample_0001.png").read_bytes() == sample


@pytest.mark.parametrize("flags, message", [(["--epochs", "0"], "--epochs"), (["--lr", "-1"], "--lr"),
                                            (["--edge-weight", "-0.5"], "--edge-weight"),
                                            (["--edge-weight", "nan"], "--edge-weight"), (["--beta", "inf"], "--beta")])
def test_bad_flags_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        vae.parse_args(flags)
    assert message in capsys.readouterr().err


def test_a_128_px_model_keeps_an_8x8_grid_and_a_bounded_kl_under_big_steps():
    torch.manual_seed(0)
    model, images = vae.VAE(128, 16), torch.rand(8, 3, 128, 128)
    assert model.feature_shape == (64, 8, 8)  # the code's linear layers see as many inputs as at 64 px
    optimizer = torch.optim.Adam(model.parameters(), lr=4e-3)  # the peak learning rate, from the first step
    kls = []
    for _ in range(10):
        recon, mu, logvar = model(images)
        losses = vae.vae_loss(recon, images, mu, logvar)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        kls.append(losses["kl"].item())
        assert logvar.abs().max() < vae.LOGVAR_LIMIT
    # A 16x16 grid and an unbounded log-variance gave a KL of 3e13 in the second step.
    assert all(math.isfinite(kl) for kl in kls) and max(kls) < 5000


def test_samples_of_a_chosen_type_come_from_that_types_gaussian(smoke_flags, tmp_path):
    out = tmp_path / "out"
    vae.main([*smoke_flags, "--epochs", "1"])
    state = torch.load(out / "model.pt", weights_only=True)
    kinds = state["code_distribution"]["kinds"]
    assert sorted(kinds) == ["Dresses", "Heels", "Sports Shoes", "Tshirts"]  # the tiny catalogue's types
    assert sum(kind["weight"] for kind in kinds.values()) == pytest.approx(1)
    vae.main([*smoke_flags, "--figures-only", "--num-samples", "3", "--product-type", "Heels"])
    model = vae.VAE(32, 8)
    model.load_state_dict(state["state_dict"])
    args = vae.parse_args(smoke_flags)
    args.device = torch.device("cpu")
    expected = vae.decode_samples(model, vae.one_kind(state["code_distribution"], "Heels"), 3, args.seed + 2, args)
    written = torch.stack([torch.from_numpy(np.asarray(Image.open(out / "samples" / f"sample_{i:04d}.png")).copy())
                           .permute(2, 0, 1).float() / 255 for i in range(3)])
    assert torch.allclose(written, expected, atol=1 / 255)
    with pytest.raises(SystemExit, match="--product-type Sandals: no training photo is of that type; the types are "
                                         "Dresses, Heels, Sports Shoes, Tshirts"):
        vae.main([*smoke_flags, "--figures-only", "--num-samples", "3", "--product-type", "Sandals"])


def test_a_mixture_draws_each_kind_by_its_weight_and_a_rare_kind_borrows_the_spread_within_kinds():
    torch.manual_seed(0)
    codes = torch.cat([torch.randn(300, 2) * 0.1 + torch.tensor([5.0, 0]), torch.randn(100, 2) * 0.1 - 5,
                       torch.tensor([[0.0, 3.0]])])
    kinds = ["shoe"] * 300 + ["shirt"] * 100 + ["hat"]
    fitted = vae.fit_code_distribution(codes, kinds)
    assert fitted["kinds"]["shoe"]["weight"] == pytest.approx(300 / 401)
    z = vae.sample_codes(fitted["kinds"], 20000, torch.Generator().manual_seed(1))
    assert (z[:, 0] > 2.5).float().mean() == pytest.approx(300 / 401, abs=0.02)  # the shoes' cluster
    assert (z[:, 0] < -2.5).float().mean() == pytest.approx(100 / 401, abs=0.02)  # the shirts'
    # Kinds with at least as many photos as the code has numbers (2) keep their own covariance.
    assert torch.allclose(fitted["kinds"]["shoe"]["covariance"], torch.cov(codes[:300].T) + 1e-3 * torch.eye(2))
    # One hat: its own covariance is nothing, so it is 1/2 its own and 1/2 the spread around each kind's mean.
    within = (torch.cov(codes[:300].T) * 299 + torch.cov(codes[300:400].T) * 99) / (401 - 3)
    expected = 0.5 * 1e-3 * torch.eye(2) + 0.5 * (within + 1e-3 * torch.eye(2))
    assert torch.allclose(fitted["kinds"]["hat"]["covariance"], expected, atol=1e-6)
    hats = vae.sample_codes({"hat": fitted["kinds"]["hat"]}, 1000, torch.Generator().manual_seed(3))
    assert ((hats - torch.tensor([0.0, 3.0])).norm(dim=1) < 0.5).all()  # a hat, not a shoe or a shirt
    shirts = vae.sample_codes({"shirt": fitted["kinds"]["shirt"]}, 1000, torch.Generator().manual_seed(2))
    assert (shirts[:, 0] < -2.5).all()


@pytest.mark.parametrize("script", [ae, vae])
def test_one_kinds_products_have_its_spread_and_a_mean_set_apart_from_the_average_product(script):
    torch.manual_seed(0)
    codes = torch.cat([torch.randn(300, 2) * torch.tensor([0.3, 0.1]) + torch.tensor([5.0, 1]),
                       torch.randn(100, 2) * 0.2 - 5])
    kinds = ["shoe"] * 300 + ["shirt"] * 100
    fitted = script.fit_code_distribution(codes, kinds)
    shoes = codes[:300]
    assert torch.equal(fitted["kinds"]["shoe"]["mean"], shoes.mean(0))  # the mixture keeps the fitted means
    z = script.sample_codes(script.one_kind(fitted, "shoe"), 50000, torch.Generator().manual_seed(1))
    assert script.GUIDANCE > 0
    set_apart = shoes.mean(0) + script.GUIDANCE * (shoes.mean(0) - codes.mean(0))  # away from (2.5, 0.75)
    assert torch.allclose(z.mean(0), set_apart, atol=0.01)
    assert torch.allclose(torch.cov(z.T), torch.cov(shoes.T) + script.RIDGE * torch.eye(2), atol=0.003)



@pytest.mark.parametrize("script", [ae, vae])
def test_a_code_of_one_number_draws_every_figure_and_runs_every_tool(script, smoke_flags, tmp_path, capsys):
    flags = [*smoke_flags[:6], "--latent-dim", "1", "--device", "cpu", "--batch-size", "8"]
    script.main([*flags, "--epochs", "3", "--num-samples", "2"])
    for name in FIGURES:
        assert (tmp_path / "out" / name).is_file(), name
    script.main([*flags, "--query", "101", "--top", "2"])
    script.main([*flags, "--duplicates", "0.999"])
    script.main([*flags, "--figures-only", "--num-samples", "3", "--product-type", "Heels"])
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 3


def test_sampling_never_fails_on_a_covariance_that_rounding_left_not_positive_definite():
    torch.manual_seed(0)
    codes = 1e4 * torch.randn(60, 2) @ torch.randn(2, 6)  # codes of a run that blew up: 6 numbers, 2 directions
    gaussian = vae.fit_gaussian(codes)  # the ridge of 1e-3 is lost in the rounding of a spread of 1e8
    assert torch.linalg.cholesky_ex(gaussian["covariance"])[1] > 0  # Cholesky's factorization fails here
    z = vae.sample_codes({"all": gaussian}, 20000, torch.Generator().manual_seed(1))
    assert torch.isfinite(z).all()
    spread = torch.cov(z.T.double())
    assert torch.allclose(spread, gaussian["covariance"].double(), rtol=0.05, atol=0.05 * spread.abs().max().item())


@pytest.mark.parametrize("script", [ae, vae])
def test_active_units_counts_the_dimensions_whose_codes_vary_across_photos(script):
    generator = torch.Generator().manual_seed(0)
    spread = torch.tensor([3.0, 1.0, 0.2, 0.05, 0.02, 0.0])  # variances 9, 1, 0.04: active; 0.0025, 0.0004, 0: not
    codes = torch.randn(20000, 6, generator=generator) * spread + torch.arange(6.0)  # a mean of its own does not count
    assert script.active_units(codes) == 3
    assert script.active_units(codes[:1]) == 0  # one photo varies in nothing


def test_prior_sampling_decodes_z_drawn_from_the_standard_normal():
    class Passes(torch.nn.Module):  # "decodes" a code to itself, so what is drawn can be read back
        def decode(self, z):
            return z

    args = SimpleNamespace(latent_dim=3, device=torch.device("cpu"))
    z = vae.decode_prior(Passes(), 20000, 5, args)
    assert torch.equal(z, torch.randn(20000, 3, generator=torch.Generator().manual_seed(5)))  # seeded, from N(0, I)
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=0.03) and torch.allclose(z.var(0), torch.ones(3), atol=0.04)


def test_the_epoch_line_and_the_last_line_add_up_at_a_beta_other_than_one(smoke_flags, capsys):
    vae.main([*smoke_flags, "--epochs", "2", "--beta", "0.5"])
    printed = capsys.readouterr().out.splitlines()
    sums = [re.search(r"(train|test) +(\S+) \(rec +(\S+) \+ 0\.5 x kl +(\S+)\)", part).groups()[1:]
            for line in printed if line.startswith("epoch") for part in line.split("|")[1:3]]
    assert len(sums) == 4  # train and test, two epochs
    for total, reconstruction, kl in sums:  # each printed to 0.1: they agree within the rounding
        assert abs(float(total) - (float(reconstruction) + 0.5 * float(kl))) <= 0.15
    last = re.search(r"negative ELBO (\S+) = reconstruction (\S+) \+ KL (\S+) \(the loss: \S+ \+ 0\.5 x \S+ = "
                     r"(\S+)\)", printed[-1])
    elbo, reconstruction, kl, loss = map(float, last.groups())
    assert abs(elbo - (reconstruction + kl)) <= 0.15 and abs(loss - (reconstruction + 0.5 * kl)) <= 0.15


def test_the_side_by_side_figure_draws_a_pair_of_rows_a_type_and_names_a_missing_type(smoke_flags, tmp_path):
    sys.path.insert(0, str(Path(vae.__file__).parent / "tools"))
    import vae_likelihoods
    vae.main([*smoke_flags, "--epochs", "1", "--edge-weight", "0"])
    model, heights = str(tmp_path / "out" / "model.pt"), []
    for kinds in (["Tshirts"], ["Tshirts", "Heels"]):
        figure = tmp_path / f"{len(kinds)}.png"
        vae_likelihoods.main(["--left", model, "--right", model, "--kinds", *kinds, "--columns", "3",
                              "--to", str(figure)])
        with Image.open(figure) as image:
            heights.append(image.height)
    assert heights[1] - heights[0] == 2 * (32 + 2) * 3  # two rows more for a type more: 32-px images, 2-px gaps, x3
    with pytest.raises(SystemExit, match="--kinds Casual Shoes: no training photo of that type"):
        vae_likelihoods.main(["--left", model, "--right", model, "--kinds", "Casual Shoes"])


def test_a_model_pt_from_before_44_is_a_one_line_error_and_stays_as_it_was(smoke_flags, tmp_path, capsys):
    vae.main([*smoke_flags, "--epochs", "1"])
    checkpoint = tmp_path / "out" / "model.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"]["decoder.0.weight"] = torch.zeros(64, 32, 4, 4)  # the mirrored decoder of before #44
    del state["args"]["edge_weight"]  # and no --edge-weight among its flags
    torch.save(state, checkpoint)
    capsys.readouterr()
    saved = checkpoint.read_bytes()
    for flag in ("--figures-only", "--resume"):
        with pytest.raises(SystemExit, match=f"error: {re.escape(str(checkpoint))}: its weights do not fit vae.py's"):
            vae.main([*smoke_flags, flag])
        assert "edge" not in capsys.readouterr().out  # no flag restored from a key the file lacks
    assert checkpoint.read_bytes() == saved
