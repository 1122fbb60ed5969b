"""vae.py: shapes, the loss against references, reparameterization, training, end to end."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import vae
from conftest import losses_over_steps

FIGURES = ["reconstructions.png", "samples.png", "samples_by_epoch.png", "interpolations.png", "latent_map.png",
           "loss_curves.png", "attribute_edit.png", "catalogue_qa.png"]


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
    assert vae.vae_loss(images, images, zeros, zeros)[2].item() == 0
    assert vae.vae_loss(images, images, zeros + 0.1, zeros)[2] > 0
    assert vae.vae_loss(images, images, zeros, zeros - 0.5)[2] > 0


def test_loss_terms_match_references():
    torch.manual_seed(0)
    recon, images = torch.rand(5, 3, 8, 8), torch.rand(5, 3, 8, 8)
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7)
    total, reconstruction, kl = vae.vae_loss(recon, images, mu, logvar, beta=0.7)
    reference_kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0, 1)).sum(1).mean()
    assert torch.allclose(kl, reference_kl, rtol=1e-5)
    direct = sum(((recon[i] - images[i]) ** 2).sum() for i in range(5)) / 5
    assert torch.allclose(reconstruction, direct, rtol=1e-5)
    assert torch.allclose(total, reconstruction + 0.7 * kl)
    assert vae.vae_loss(recon, images, mu, logvar, beta=0)[0] == reconstruction


def test_reparameterize_passes_gradients_and_has_the_right_moments():
    model = vae.VAE(32, 4)
    mu = torch.tensor([1.0, -2.0, 0.0, 3.0], requires_grad=True)
    logvar = torch.tensor([0.0, 1.0, -1.0, 2.0], requires_grad=True)
    torch.manual_seed(0)
    z = model.reparameterize(mu.expand(20000, 4), logvar.expand(20000, 4))
    z.sum().backward()
    assert mu.grad is not None and logvar.grad is not None and logvar.grad.abs().sum() > 0
    assert torch.allclose(z.mean(0), mu.detach(), atol=0.05)
    assert torch.allclose(z.var(0), logvar.detach().exp(), rtol=0.05)


def test_a_few_steps_on_one_batch_lower_the_loss():
    def negative_elbo(model, images):
        recon, mu, logvar = model(images)
        return vae.vae_loss(recon, images, mu, logvar)[0]

    losses = losses_over_steps(lambda: vae.VAE(32, 8), negative_elbo)
    assert losses[-1] < 0.9 * losses[0]


def test_main_trains_writes_every_output_and_reloads_for_figures_only(smoke_flags, tmp_path):
    out, flags = tmp_path / "out", smoke_flags
    vae.main([*flags, "--epochs", "1"])
    for name in [*FIGURES, "metrics.csv", "model.pt"]:
        assert (out / name).is_file(), name
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # a header and one epoch
    before = (out / "model.pt").read_bytes()
    (out / "samples.png").unlink()
    vae.main([*flags, "--figures-only", "--num-samples", "3"])
    assert (out / "samples.png").is_file() and len(list((out / "samples").glob("*.png"))) == 3
    assert (out / "model.pt").read_bytes() == before  # figures only: the model is not retrained
    with pytest.raises(SystemExit, match="--latent-dim 8"):
        vae.main([*flags[:6], "--latent-dim", "16", "--device", "cpu", "--figures-only"])


def test_a_checkpoint_from_another_script_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"script": "ae.py", "state_dict": {}, "args": {}}, path)
    args = vae.parse_args(["--checkpoint", str(path)])
    with pytest.raises(SystemExit, match="saved by ae.py"):
        vae.load_checkpoint(vae.VAE(64, 128), args, path)


@pytest.mark.parametrize("flags, message", [(["--epochs", "0"], "--epochs"), (["--lr", "-1"], "--lr")])
def test_bad_flags_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        vae.parse_args(flags)
    assert message in capsys.readouterr().err
