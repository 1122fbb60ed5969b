"""A convolutional variational autoencoder (VAE) for product photos, from scratch.

An autoencoder squeezes a photo through a small code and rebuilds it. A VAE makes that code a
*distribution*, so that the space of codes can be sampled to draw products nobody photographed:

    encoder:          image x  ->  mu(x), logvar(x)          (a Gaussian q(z|x) per image)
    reparameterize:   z = mu + sigma * eps,  eps ~ N(0, I),  sigma = exp(logvar / 2)
    decoder:          z  ->  x_hat in [0, 1]                 (p(x|z) = N(x_hat, sigma^2) per pixel)
    loss:             negative ELBO = reconstruction + beta * KL
        reconstruction = -log p(x|z) = sum over pixels of (x_hat - x)^2 / (2 sigma^2) + D/2 log(2 pi sigma^2)
        KL             = KL( q(z|x) || N(0, I) ), in closed form

Writing z as mu plus scaled noise moves the randomness into eps, so gradients flow into mu and
sigma. The KL term pulls every image's Gaussian towards the standard normal: codes of similar
products overlap instead of sitting far apart, and the space between them decodes to plausible
products. beta trades sharp reconstructions (small beta) for a smoother latent space (large beta).

Two choices make the difference between smudges and products. The decoder's variance sigma^2 is
a hidden beta: the textbook sum of squared errors fixes it at 1/2, which on these photos weighs
the KL ~100x too much; here it is set to its best value, the batch's mean squared error. And new
products are sampled where the training codes really are (a Gaussian fitted to them), not from
N(0, I), which the sharper model's codes no longer fill.

Run:    python vae.py --epochs 50
Writes: out/vae/ - model.pt, metrics.csv, reconstructions.png, samples.png, samples_by_epoch.png,
        interpolations.png, latent_map.png, loss_curves.png, attribute_edit.png, catalogue_qa.png,
        same_products.png, summary.json
Again:  python vae.py --figures-only --num-samples 16   (figures, plus 16 new products in samples/)
Resume: python vae.py --resume                          (an interrupted run goes on where it stopped)
"""

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import REPO, data_folder, load_catalogue, select_device


# ----------------------------------------------------------------------------- model
class VAE(nn.Module):
    """Three stride-2 convolutions take the photo to an 8x8 grid of 64 features, a linear layer
    makes the code; the decoder mirrors them. Its transposed convolutions have kernel 4 and stride 2:
    a kernel the stride divides covers every output pixel equally often, while a 3x3 kernel with
    stride 2 covers alternate pixels once and twice and paints a checkerboard over every image
    (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts"). Kept small for a 2-core CPU:
    16 to 64 channels, and an 8x8 grid (not 4x4) so the linear layer sees where things are.
    """

    def __init__(self, image_size=64, latent_dim=128, channels=(16, 32, 64)):
        super().__init__()
        if image_size < 32 or image_size % 16:
            raise SystemExit(f"error: --image-size {image_size}: must be a multiple of 16, at least 32")
        self.feature_shape = (channels[-1], image_size // 8, image_size // 8)  # (64, S/8, S/8)
        encoder, previous = [], 3
        for width in channels:  # each block: (B, previous, s, s) -> (B, width, s/2, s/2)
            encoder += [nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2)]
            previous = width
        self.encoder = nn.Sequential(*encoder, nn.Flatten())
        features = math.prod(self.feature_shape)
        self.to_mu = nn.Linear(features, latent_dim)
        self.to_logvar = nn.Linear(features, latent_dim)
        self.from_latent = nn.Linear(latent_dim, features)
        decoder = []
        for width in reversed(channels[:-1]):  # each block: (B, previous, s, s) -> (B, width, 2s, 2s)
            decoder += [nn.ConvTranspose2d(previous, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU()]
            previous = width
        self.decoder = nn.Sequential(*decoder, nn.ConvTranspose2d(previous, 3, 4, 2, 1), nn.Sigmoid())

    def encode(self, images):  # (B, 3, S, S)
        features = self.encoder(images)  # (B, 64 * S/8 * S/8)
        return self.to_mu(features), self.to_logvar(features)  # (B, latent), (B, latent)

    def reparameterize(self, mu, logvar):
        eps = torch.randn_like(mu)
        return mu + torch.exp(0.5 * logvar) * eps  # (B, latent)

    def decode(self, z):  # (B, latent)
        features = self.from_latent(z).view(-1, *self.feature_shape)  # (B, 64, S/8, S/8)
        return self.decoder(features)  # (B, 3, S, S), in [0, 1]

    def forward(self, images):
        # Training decodes a sampled z, as the ELBO asks; evaluation decodes the mean mu, the
        # model's best guess, so test PSNR compares like for like with ae.py's deterministic code.
        mu, logvar = self.encode(images)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return self.decode(z), mu, logvar


# ----------------------------------------------------------------------------- loss
def vae_loss(recon, images, mu, logvar, beta=1.0):
    """Negative ELBO per image, averaged over the batch: {"loss", "reconstruction", "kl", "variance"}.

    Both terms are sums per image (over its pixels, over its latent dimensions), so they are on
    the same scale and beta means what it says; then each is averaged over the batch.
    """
    # The decoder says how likely the photo is: p(x|z) = N(x; x_hat, sigma^2) for each of its D
    # pixel values. sigma^2 is a modelling choice and a hidden beta: the plain sum of squared
    # errors is this likelihood with sigma^2 = 1/2, while real errors are ~100x smaller, so it
    # weighs the KL ~100x too much and draws blurry images. We use the sigma^2 that makes the
    # photos most likely: the batch's mean squared error (Rybkin et al. 2021, "Simple and
    # Effective VAE Training with Calibrated Decoders"), a constant for the gradient step.
    # reconstruction = -log p(x|z) = sum_pixels (x - x_hat)^2 / (2 sigma^2) + D/2 * log(2 pi sigma^2)
    squared_error = ((recon - images) ** 2).flatten(1).sum(dim=1)  # (B,)
    pixels = images[0].numel()  # D
    variance = (squared_error.mean() / pixels).detach().clamp_min(1e-6)
    reconstruction = (squared_error / (2 * variance) + pixels / 2 * torch.log(2 * math.pi * variance)).mean()
    # KL(N(mu, sigma^2) || N(0, 1)) = -1/2 * sum_latent (1 + log sigma^2 - mu^2 - sigma^2)
    # (Kingma & Welling 2014, appendix B); it is >= 0 and 0 only when mu = 0 and sigma = 1.
    kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(dim=1)).mean()
    return {"loss": reconstruction + beta * kl, "reconstruction": reconstruction, "kl": kl, "variance": variance}


def psnr(recon, images):
    """Peak signal-to-noise ratio in dB per image, for images in [0, 1]: 10 * log10(1 / MSE)."""
    mse = ((recon - images) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


# ----------------------------------------------------------------------------- training
def run_epoch(model, images, args, optimizer=None, generator=None):
    """One pass over `images` in batches; trains when given an optimizer. Returns the means per
    image: {"loss": (negative ELBO), "reconstruction", "kl", "variance": (the decoder's), "psnr"}."""
    training = optimizer is not None
    model.train(training)
    order = torch.randperm(len(images), generator=generator) if training else torch.arange(len(images))
    sums = torch.zeros(5)
    for start in range(0, len(images), args.batch_size):
        batch = images[order[start:start + args.batch_size]].to(args.device, memory_format=torch.channels_last)
        with torch.set_grad_enabled(training), torch.autocast(args.device.type, torch.bfloat16, enabled=args.bf16):
            recon, mu, logvar = model(batch)
        losses = vae_loss(recon.float(), batch, mu.float(), logvar.float(), args.beta)
        if training:
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
        # Each batch's means are weighted by its size, so a smaller last batch counts for what it holds.
        sums += torch.stack([*losses.values(), psnr(recon.float(), batch).mean()]).detach().cpu() * len(batch)
    return dict(zip([*losses, "psnr"], (sums / len(images)).tolist()))


@torch.no_grad()
def encode_all(model, images, args):
    """Latent means mu of a set of images, in batches: (N, latent)."""
    model.eval()
    batches = (images[start:start + args.batch_size] for start in range(0, len(images), args.batch_size))
    means = [model.encode(batch.to(args.device, memory_format=torch.channels_last))[0] for batch in batches]
    return torch.cat(means).float().cpu()


@torch.no_grad()
def negative_elbo_per_image(model, images, args):
    """Each image's negative ELBO (z = mu), one image at a time, so that products can be ranked: (N,)."""
    model.eval()
    losses = []
    for start in range(0, len(images), args.batch_size):
        batch = images[start:start + args.batch_size].to(args.device, memory_format=torch.channels_last)
        recon, mu, logvar = model(batch)
        for i in range(len(batch)):
            losses.append(vae_loss(recon[[i]], batch[[i]], mu[[i]], logvar[[i]], args.beta)["loss"])
    return torch.stack(losses).cpu()


def fit_code_distribution(codes, ridge=1e-3):
    """A Gaussian with full covariance fitted to the training codes (the latent means mu).

    The KL term pulls codes towards N(0, I) but never all the way: with a sharp decoder the codes
    fill a smaller, tilted region, and z ~ N(0, I) often lands where no product's code is. Sampling
    from a Gaussian fitted to where the codes really are ("ex-post density estimation", Ghosh et
    al. 2019, "From Variational to Deterministic Autoencoders") draws products, not smudges.
    The small ridge keeps the covariance invertible when there are fewer codes than dimensions.
    """
    covariance = torch.cov(codes.T) + ridge * torch.eye(codes.shape[1])  # (latent, latent)
    return {"mean": codes.mean(0), "covariance": covariance}


def sample_codes(distribution, count, generator):
    """z = mean + L eps, eps ~ N(0, I), with L L^T = covariance (Cholesky): z has that mean and covariance."""
    eps = torch.randn(count, len(distribution["mean"]), generator=generator)
    return distribution["mean"] + eps @ torch.linalg.cholesky(distribution["covariance"]).T


def save_checkpoint(path, model, optimizer, schedule, generator, history, args, **extra):
    """All that --resume needs to go on and --figures-only to redraw, random states included.
    Written to a temporary file, then renamed: a crash never leaves a broken model.pt."""
    state = {"script": "vae.py", "state_dict": model.state_dict(), "history": history,
             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "batch_rng": generator.get_state(), "torch_rng": torch.get_rng_state(),
             "args": {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()},
             **extra}
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path, args, flags):
    """A saved run. The flags that define it (`flags`) are taken from it, and said so; a flag that
    the command line sets to another value than the saved one is an error naming it."""
    if not path.is_file():
        raise SystemExit(f"error: --checkpoint {path}: no such file (train first: python vae.py)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"error: --checkpoint {path}: not a readable checkpoint ({error.__class__.__name__})")
    if not isinstance(state, dict) or state.get("script") != "vae.py":
        found = state.get("script", "an unknown script") if isinstance(state, dict) else "an unknown script"
        raise SystemExit(f"error: --checkpoint {path}: saved by {found}, not by vae.py")
    defaults, restored = vars(parse_args([])), []
    for flag in flags:
        saved, given, name = state["args"][flag], getattr(args, flag), "--" + flag.replace("_", "-")
        if given != saved and given != defaults[flag]:
            raise SystemExit(f"error: --checkpoint {path} was trained with {name} {saved}, but this run asks for "
                             f"{given}; leave {name} out or pass {saved}")
        if given != saved:
            setattr(args, flag, saved)
            restored.append(f"{name} {saved}")
    print(f"loaded {path} (epoch {len(state['history'])})" + (f", with {' '.join(restored)}" if restored else ""))
    return state


def save_metrics(path, rows, append):
    """metrics.csv, one row per epoch, appended as each epoch ends so an interrupted run keeps its rows."""
    with open(path, "a" if append else "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if not append:
            writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------- figures and applications
def show_rows(rows, labels, title, path, columns_titles=None):
    """Save a titled grid of images: rows is a list of (n, 3, S, S) tensors, one per labelled row.
    The images are pasted into one picture, drawn once: much faster than one plot per image."""
    import matplotlib.pyplot as plt  # imported here: only figure code needs it

    size, gap, columns = rows[0].shape[-1], 2, max(len(row) for row in rows)
    step = size + gap
    grid = torch.ones(3, len(rows) * step - gap, columns * step - gap)  # white between the images
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid[:, r * step:r * step + size, c * step:c * step + size] = image.clamp(0, 1).cpu()
    width = max(1.1 * columns + 1.2, 0.075 * len(title))  # the images, the labels left of them, the title
    # As tall as the images at that width, plus the title: no empty band above or below the grid.
    height = (width - 1.2) * grid.shape[1] / grid.shape[2] + 0.6 + (0.2 if columns_titles else 0)
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


def pick(metadata, index, column, value, otherwise=0):
    """The first of the given products whose metadata column equals value; if none does (a folder
    without fashion.csv, say), the product at position `otherwise`, spread over the index."""
    matches = [i for i in index.tolist() if metadata.at[i, column] == value]
    return matches[0] if matches else index[otherwise * len(index) // 8 % len(index)].item()


def attribute_direction(codes, metadata, train_index, column, value, category):
    """The mean code of the training products with `value` in `column` minus the mean code of the
    other training products, within one Category: most black products are shoes, so across
    categories the "black" direction would also turn a T-shirt into a shoe. Test products never
    count. Zero when either side is empty."""
    train = torch.zeros(len(codes), dtype=torch.bool)
    train[train_index] = True
    same = train & torch.tensor((metadata["Category"] == category).values)
    has = torch.tensor((metadata[column] == value).values)
    inside, outside = same & has, same & ~has
    if not (inside.any() and outside.any()):
        return torch.zeros(codes.shape[1])
    return codes[inside].mean(0) - codes[outside].mean(0)


def write_samples(model, code_distribution, count, args):
    """`count` new products, sampled where the training codes are, as PNG files in OUT/samples/."""
    from PIL import Image

    (args.out / "samples").mkdir(parents=True, exist_ok=True)
    z = sample_codes(code_distribution, count, torch.Generator().manual_seed(args.seed + 2))
    with torch.no_grad():
        new = model.eval().decode(z.to(args.device)).cpu()
    for i, image in enumerate(new):
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(
            args.out / "samples" / f"sample_{i:04d}.png")


@torch.no_grad()
def make_figures(model, catalogue, codes, history, samples_by_epoch, code_distribution, args):
    import matplotlib.pyplot as plt

    tag = " [SYNTHETIC catalogue]" if catalogue.synthetic else ""  # so no one mistakes it for real results

    model.eval()
    out, images, metadata, test = args.out, catalogue.images, catalogue.metadata, catalogue.test_index

    def decode(z):
        return model.decode(z.to(args.device)).cpu()

    # Fixed test products, spread over the (sorted) test set: the same ones every run.
    shown = test[torch.linspace(0, len(test) - 1, 10).long()]
    recon = decode(model.encode(images[shown].to(args.device))[0])
    show_rows([images[shown], recon], ["original", "VAE"], "Test products and their reconstructions" + tag,
              out / "reconstructions.png")
    # Application 1, new product ideas: 20 codes from the prior N(0, I) and 20 from the Gaussian
    # fitted to the training codes; the same seed draws the same eps for both, so they pair up.
    prior = torch.randn(20, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    fitted = sample_codes(code_distribution, 20, torch.Generator().manual_seed(args.seed))
    show_rows([*decode(prior).split(10), *decode(fitted).split(10)], ["prior", "prior", "fitted", "fitted"],
              "New products: z ~ N(0, I) (prior) and z ~ Gaussian fitted to the codes (fitted)" + tag,
              out / "samples.png")
    if samples_by_epoch:  # only training can draw this one: --figures-only redraws it from the checkpoint
        show_rows([s for _, s in samples_by_epoch], [f"epoch {e}" for e, _ in samples_by_epoch],
                  "The same 10 latent codes z ~ N(0, I) decoded as training goes on" + tag,
                  out / "samples_by_epoch.png")
    # Interpolations: walk in a straight line between the codes of two real test products.
    pairs = [("ProductType", "Sports Shoes", "Heels"), ("ProductType", "Tshirts", "Dresses"),
             ("ProductType", "Casual Shoes", "Flip Flops"), ("ProductType", "Shorts", "Tops")]
    steps = torch.linspace(0, 1, 8).view(-1, 1)
    rows, labels = [], []
    for number, (column, start, end) in enumerate(pairs):
        ends = [pick(metadata, test, column, start, 2 * number), pick(metadata, test, column, end, 2 * number + 1)]
        mu = model.encode(images[ends].to(args.device))[0].cpu()
        rows.append(decode(mu[0] + steps * (mu[1] - mu[0])))
        labels.append(f"{metadata.at[ends[0], column]}\n-> {metadata.at[ends[1], column]}"[:40])
    show_rows(rows, labels, "Interpolating between two test products in latent space" + tag, out / "interpolations.png")
    # A 2-D map of the test set: the two principal directions of the latent means of all products.
    centred = codes - codes.mean(0)
    _, _, directions = torch.linalg.svd(centred, full_matrices=False)  # PCA by hand
    xy = centred[test] @ directions[:2].T  # (N_test, 2)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for axis, column in zip(axes, ["Category", "Gender"]):
        for value in sorted(metadata[column].iloc[test.tolist()].unique()):
            mask = torch.tensor((metadata[column].iloc[test.tolist()] == value).values)
            axis.scatter(xy[mask, 0], xy[mask, 1], s=8, label=value or "(none)")
        axis.set(title=f"Test latent means (PCA), by {column}", xlabel="PC 1", ylabel="PC 2")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "latent_map.png", dpi=100)
    plt.close(figure)
    # Loss curves, with reconstruction and KL apart, and the decoder's variance sigma^2.
    if history:
        figure, axes = plt.subplots(1, 4, figsize=(15, 3.5))
        for axis, key in zip(axes, ["loss", "reconstruction", "kl", "variance"]):
            axis.plot([h["epoch"] for h in history], [h[f"train_{key}"] for h in history], label="train")
            axis.plot([h["epoch"] for h in history], [h[f"test_{key}"] for h in history], label="test")
            axis.set(title=f"{key} per image" if key != "variance" else "decoder variance sigma^2", xlabel="epoch")
            axis.legend()
        axes[3].set_yscale("log")
        figure.tight_layout()
        figure.savefig(out / "loss_curves.png", dpi=100)
        plt.close(figure)
    # Application 2, attribute edits: add the "Black" direction to the codes of products of other colours.
    if not (metadata["Colour"] == "Black").any():
        print('note: no product has Colour "Black" (no fashion.csv?), so there is no attribute edit')
    else:
        edited = [i for i in shown.tolist() if metadata.at[i, "Colour"] != "Black"][:6] or shown[:6].tolist()
        directions = torch.stack([attribute_direction(codes, metadata, catalogue.train_index, "Colour", "Black",
                                                      metadata.at[i, "Category"]) for i in edited])
        strengths = [0, 0.5, 1, 1.5]
        rows = [decode(codes[edited] + s * directions) for s in strengths]
        show_rows(rows, [f"+{s} x black" for s in strengths], 'Attribute edit: adding the "Black" direction' + tag,
                  out / "attribute_edit.png")
    # Application 3, catalogue QA: the test products the model finds least likely.
    worst = test[negative_elbo_per_image(model, images[test], args).argsort(descending=True)[:8]]
    show_rows([images[worst], decode(codes[worst])], ["photo", "VAE"],
              "Catalogue QA: the 8 least likely test products (highest negative ELBO)" + tag, out / "catalogue_qa.png")


# ----------------------------------------------------------------------------- the three models on the same axes
# ae.py, dae.py and vae.py each write the same OUT/summary.json, so that the README can compare them.
def precision_at_5(codes, catalogue, column):
    """Share of the 5 training products nearest to each test product (cosine of codes) with its label."""
    train, test = catalogue.train_index, catalogue.test_index
    unit = codes / codes.norm(dim=1, keepdim=True).clamp_min(1e-8)
    neighbours = train[(unit[test] @ unit[train].T).topk(min(5, len(train)), dim=1).indices]  # (N_test, 5)
    labels = catalogue.metadata[column].to_numpy()
    return float((labels[neighbours.numpy()] == labels[test.numpy(), None]).mean())


def linear_probe(train_codes, train_labels, test_codes, test_labels, steps=300):
    """Test accuracy of a logistic regression trained on the training codes: how much of a label a
    straight line can read off the code. Codes are standardised so every dimension counts alike."""
    classes = sorted(set(train_labels))
    mean, scale = train_codes.mean(0), train_codes.std(0).clamp_min(1e-6)
    layer = nn.Linear(train_codes.shape[1], len(classes))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.01, weight_decay=1e-4)
    targets = torch.tensor([classes.index(label) for label in train_labels])
    with torch.enable_grad():
        for _ in range(steps):
            loss = nn.functional.cross_entropy(layer((train_codes - mean) / scale), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    predicted = layer((test_codes - mean) / scale).argmax(1).tolist()
    return sum(classes[p] == label for p, label in zip(predicted, test_labels)) / len(test_labels)


def frechet_distance(samples, photos, components=32):
    """How far a set of generated images lies from the photos, as distributions: both are projected
    on the photos' first principal components (of 16x16 thumbnails), and the two Gaussians compared,
    as FID does with a classifier's features: ||m1 - m2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)."""
    def thumbnails(images):
        return nn.functional.adaptive_avg_pool2d(images, 16).flatten(1).double()

    reference = thumbnails(photos)
    centre = reference.mean(0)
    directions = torch.linalg.svd(reference - centre, full_matrices=False)[2][:components]
    a, b = (thumbnails(samples) - centre) @ directions.T, (reference - centre) @ directions.T
    covariance_a, covariance_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(covariance_a)
    root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T  # S1^1/2
    cross = torch.linalg.eigvalsh(root @ covariance_b @ root).clamp_min(0).sqrt().sum()
    return (((a.mean(0) - b.mean(0)) ** 2).sum() + covariance_a.trace() + covariance_b.trace() - 2 * cross).item()


@torch.no_grad()
def write_summary(model, catalogue, history, codes, samples, args):
    """OUT/summary.json: the same numbers for every model, and the same 8 test products reconstructed."""
    tag = " [SYNTHETIC catalogue]" if catalogue.synthetic else ""
    images, metadata, train, test = catalogue.images, catalogue.metadata, catalogue.train_index, catalogue.test_index
    summary = {"model": Path(__file__).name, "test_psnr_clean": run_epoch(model, images[test], args)["psnr"],
               "code_size": codes.shape[1]}
    for column in ("ProductType", "Colour", "Category"):  # None where the photos have no such label
        labelled = (metadata[column] != "").any()
        labels = metadata[column].tolist()
        if column != "Category":
            summary[f"precision@5_{column}"] = precision_at_5(codes, catalogue, column) if labelled else None
        if column != "Colour":
            summary[f"probe_{column}"] = linear_probe(codes[train], [labels[i] for i in train.tolist()], codes[test],
                                                      [labels[i] for i in test.tolist()]) if labelled else None
    summary["sample_frechet_distance"] = frechet_distance(samples, images[train]) if samples is not None else None
    summary["seconds_per_epoch"] = float(np.median([h["seconds"] for h in history])) if history else None
    summary["parameters"] = sum(p.numel() for p in model.parameters())
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("summary:", ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    shown = test[torch.linspace(0, len(test) - 1, 8).long()]  # the same 8 test products in all three scripts
    show_rows([model(images[shown].to(args.device))[0].float().cpu()], ["VAE"],
              "The same 8 test products, reconstructed from clean photos" + tag, args.out / "same_products.png")


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # training
    parser.add_argument("--epochs", type=int, default=50, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=64, help="images per optimisation step")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (cosine decay to 0)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, the batches and the figures")
    # model
    parser.add_argument("--latent-dim", type=int, default=128, help="size of the latent code z")
    parser.add_argument("--image-size", type=int, default=64, help="photos are resized to this (multiple of 16)")
    parser.add_argument("--beta", type=float, default=1.0, help="weight of the KL term in the loss")
    # data, device and outputs
    parser.add_argument("--data", default=None, help="folder of photos; if not given, the repo's data/ "
                                                        "(a synthetic catalogue if it holds none)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "vae", help="where figures and model.pt go")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps; if not given, the best available")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (for GPUs, CPUs with AMX)")
    # a saved run
    parser.add_argument("--figures-only", action="store_true", help="load the checkpoint, redraw, no training")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from the checkpoint")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="the model --figures-only or --resume loads; if not given, OUT/model.pt")
    parser.add_argument("--num-samples", type=int, default=0, help="also write N new products to OUT/samples/")
    args = parser.parse_args(argv)
    for flag in ("epochs", "batch_size", "latent_dim"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    if args.checkpoint and not (args.figures_only or args.resume):
        parser.error("--checkpoint names the model to load with --figures-only or --resume; "
                     "training writes OUT/model.pt")
    if args.beta < 0 or args.num_samples < 0:
        parser.error("--beta and --num-samples cannot be negative")
    return args


MODEL_FLAGS = ("latent_dim", "image_size", "beta")  # what the model is: always taken from a checkpoint
TRAINING_FLAGS = ("epochs", "batch_size", "lr", "seed")  # how it was trained: taken from it by --resume


def main(argv=None):
    args = parse_args(argv)
    defaults = vars(parse_args([]))  # the command that reruns this: the flags that differ from the defaults
    print("vae.py", *[f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                        for k, v in vars(args).items() if v != defaults[k] and k != "data"],
          "--data", data_folder(args.data))
    checkpoint, state = args.checkpoint or args.out / "model.pt", None
    if args.figures_only or args.resume:  # checked before the photos are loaded, so a wrong file fails at once
        state = load_checkpoint(checkpoint, args, MODEL_FLAGS + (TRAINING_FLAGS if args.resume else ()))
    torch.manual_seed(args.seed)
    # Numbers below ~1e-38 ("denormals") take a slow path in x86 CPUs, and a well-trained model's
    # gradients hold many of them; flushed to zero they change nothing visible (here: ~15 % of an epoch).
    torch.set_flush_denormal(True)
    args.device = select_device(args.device)
    model = VAE(args.image_size, args.latent_dim).to(args.device, memory_format=torch.channels_last)
    if state:
        model.load_state_dict(state["state_dict"])
    history = state["history"] if state else []
    # The same 10 codes decoded after some epochs show training at work; kept in the checkpoint.
    fixed_z = torch.randn(10, args.latent_dim, generator=torch.Generator().manual_seed(args.seed + 1))
    samples_by_epoch = state["samples_by_epoch"] if state else []
    code_distribution = state.get("code_distribution") if state else None
    if args.figures_only and args.num_samples:  # the checkpoint is all that sampling needs: no photos
        if code_distribution is None:
            raise SystemExit(f"error: --num-samples: {checkpoint} is a run stopped at epoch {len(history)} of "
                             f"{state['args']['epochs']}, with no code distribution yet; finish it with --resume first")
        write_samples(model, code_distribution, args.num_samples, args)
    catalogue = load_catalogue(args.data, args.image_size)
    # channels_last: each pixel's 3 colours side by side in memory, as the CPU's convolutions read them
    train_images, test_images = (catalogue.images[index].contiguous(memory_format=torch.channels_last)
                                 for index in (catalogue.train_index, catalogue.test_index))
    print(f"{len(train_images)} training and {len(test_images)} test products, {args.image_size} px")
    # What the model is trained on is saved with it, so that a model and photos that do not belong together show.
    args.catalogue = {"folder": str(catalogue.folder), "synthetic": catalogue.synthetic,
                      "photos": len(catalogue.images)}
    trained_on = state["args"].get("catalogue") if state else None
    if trained_on and trained_on["synthetic"] != catalogue.synthetic:
        kind = {True: "the synthetic catalogue", False: "real photos"}
        print(f"note: this model was trained on {kind[trained_on['synthetic']]} ({trained_on['folder']}); "
              f"this run shows it {kind[catalogue.synthetic]}")
    if not (args.figures_only or args.resume) and (args.out / "model.pt").is_file():
        found = torch.load(args.out / "model.pt", map_location="cpu", weights_only=True).get("script")
        if found != "vae.py":
            raise SystemExit(f"error: --out {args.out} holds a model of {found}; train vae.py into another --out "
                             f"(or delete {args.out / 'model.pt'} first)")
    args.out.mkdir(parents=True, exist_ok=True)

    if not args.figures_only:
        # fused: one kernel updates every weight at once, ~10 % less time per epoch on a 2-core CPU.
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
        # Cosine decay of the learning rate: big steps early, small ones to settle at the end.
        # No KL warm-up (beta growing from 0): it exists to stop the KL term from collapsing the
        # code early, and here the KL holds steady from the second epoch on.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
        generator = torch.Generator().manual_seed(args.seed)
        if args.resume:  # everything the next epoch depends on, so it continues as if never stopped
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            generator.set_state(state["batch_rng"])
            torch.set_rng_state(state["torch_rng"])
            save_metrics(args.out / "metrics.csv", history, append=False)
        started, first = time.time(), len(history) + 1
        try:
            for epoch in range(first, args.epochs + 1):
                tick = time.time()
                train = run_epoch(model, train_images, args, optimizer, generator)
                test = run_epoch(model, test_images, args)
                schedule.step()
                seconds = time.time() - tick
                if not all(math.isfinite(value) for value in [*train.values(), *test.values()]):
                    raise SystemExit(f"error: the loss became non-finite in epoch {epoch} (try a smaller --lr or --beta); "
                                     f"{args.out / 'model.pt'} still holds the model of epoch {epoch - 1}")
                history.append({"epoch": epoch, **{f"train_{k}": v for k, v in train.items()},
                                **{f"test_{k}": v for k, v in test.items()},
                                "seconds": seconds, "images_per_second": len(train_images) / seconds})
                if epoch in (1, 2, 5, 10, 20) or epoch == args.epochs:
                    with torch.no_grad():
                        samples_by_epoch.append((epoch, model.eval().decode(fixed_z.to(args.device)).cpu()))
                if epoch == args.epochs:  # the model is final: fit where its codes are, for sampling
                    code_distribution = fit_code_distribution(encode_all(model, train_images, args))
                save_checkpoint(args.out / "model.pt", model, optimizer, schedule, generator, history, args,
                                samples_by_epoch=samples_by_epoch, code_distribution=code_distribution)
                save_metrics(args.out / "metrics.csv", history[-1:], append=epoch > 1)
                eta = (time.time() - started) / (epoch - first + 1) * (args.epochs - epoch)
                print(f"epoch {epoch:3d}/{args.epochs} | train {train['loss']:7.1f} (rec {train['reconstruction']:7.1f}"
                      f" + kl {train['kl']:5.1f}) | test {test['loss']:7.1f} (rec {test['reconstruction']:7.1f} + kl "
                      f"{test['kl']:5.1f}) | test PSNR {test['psnr']:5.2f} dB | {seconds:4.1f} s, "
                      f"{len(train_images) / seconds:5.0f} img/s | ETA {eta:3.0f} s", flush=True)
        except KeyboardInterrupt:
            raise SystemExit(f"interrupted: {args.out / 'model.pt'} holds the last finished epoch; "
                             f"add --resume to continue") from None
    if code_distribution is None:  # a run stopped before its last epoch: fit to the codes it has now
        code_distribution = fit_code_distribution(encode_all(model, train_images, args))
    codes = encode_all(model, catalogue.images, args)  # every product's mu: (N, latent)
    make_figures(model, catalogue, codes, history, samples_by_epoch, code_distribution, args)
    with torch.no_grad():
        z = sample_codes(code_distribution, 1000, torch.Generator().manual_seed(args.seed))
        samples = model.eval().decode(z.to(args.device))
    write_summary(model, catalogue, history, codes, samples.float().cpu(), args)
    if args.num_samples and not args.figures_only:
        write_samples(model, code_distribution, args.num_samples, args)
    final = run_epoch(model, test_images, args)
    print(f"test (z = mu): negative ELBO {final['loss']:.1f} = reconstruction {final['reconstruction']:.1f} + "
          f"{args.beta} x KL {final['kl']:.1f}, PSNR {final['psnr']:.2f} dB; figures in {args.out}/"
          + (" (a SYNTHETIC catalogue: not real results)" if catalogue.synthetic else ""))


if __name__ == "__main__":
    main()
