"""A convolutional variational autoencoder (VAE) for product photos, from scratch.

An autoencoder squeezes a photo through a small code and rebuilds it. A VAE makes that code a
*distribution*, so that the space of codes can be sampled to draw products nobody photographed:

    encoder:          image x  ->  mu(x), logvar(x)          (a Gaussian q(z|x) per image)
    reparameterize:   z = mu + sigma * eps,  eps ~ N(0, I),  sigma = exp(logvar / 2)
    decoder:          z  ->  x_hat in [0, 1]                 (the mean of p(x|z))
    loss:             negative ELBO = reconstruction + beta * KL
        reconstruction = sum over pixels of (x_hat - x)^2
        KL             = KL( q(z|x) || N(0, I) ), in closed form

Writing z as mu plus scaled noise moves the randomness into eps, so gradients flow into mu and
sigma. The KL term pulls every image's Gaussian towards the standard normal: codes of similar
products overlap instead of sitting far apart, the space between them decodes to plausible
products, and z ~ N(0, I) decodes to a new product. beta trades sharp reconstructions (small beta)
for a smoother, better-filled latent space (large beta).

Run:    python vae.py --epochs 50
Writes: out/vae/ - model.pt, metrics.csv, reconstructions.png, samples.png, samples_by_epoch.png,
        interpolations.png, latent_map.png, loss_curves.png, attribute_edit.png, catalogue_qa.png
Again:  python vae.py --figures-only --num-samples 16   (figures, plus 16 new products in samples/)
"""

import argparse
import csv
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from common import load_catalogue, select_device


# ----------------------------------------------------------------------------- model
class VAE(nn.Module):
    """Four stride-2 convolutions halve the image four times; four transposed ones double it back.

    Kept small on purpose (3x3 kernels, 16 to 128 channels): on a 2-core CPU that is 4x less work
    per image than the textbook 4x4, 32-to-256 net, at a small cost in sharpness.
    """

    def __init__(self, image_size=64, latent_dim=128, channels=(16, 32, 64, 128)):
        super().__init__()
        if image_size < 32 or image_size % 16:
            raise SystemExit(f"error: --image-size {image_size}: must be a multiple of 16, at least 32")
        self.feature_shape = (channels[-1], image_size // 16, image_size // 16)  # (128, S/16, S/16)
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
            decoder += [nn.ConvTranspose2d(previous, width, 3, 2, 1, output_padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            previous = width
        self.decoder = nn.Sequential(*decoder, nn.ConvTranspose2d(previous, 3, 3, 2, 1, output_padding=1), nn.Sigmoid())

    def encode(self, images):  # (B, 3, S, S)
        features = self.encoder(images)  # (B, 128 * S/16 * S/16)
        return self.to_mu(features), self.to_logvar(features)  # (B, latent), (B, latent)

    def reparameterize(self, mu, logvar):
        eps = torch.randn_like(mu)
        return mu + torch.exp(0.5 * logvar) * eps  # (B, latent)

    def decode(self, z):  # (B, latent)
        features = self.from_latent(z).view(-1, *self.feature_shape)  # (B, 128, S/16, S/16)
        return self.decoder(features)  # (B, 3, S, S), in [0, 1]

    def forward(self, images):
        mu, logvar = self.encode(images)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar


# ----------------------------------------------------------------------------- loss
def vae_loss(recon, images, mu, logvar, beta=1.0):
    """Negative ELBO per image, averaged over the batch: returns (total, reconstruction, kl).

    Both terms are sums per image (over its pixels, over its latent dimensions), so they are on
    the same scale and beta means what it says; then each is averaged over the batch.
    """
    # reconstruction = sum_pixels (x_hat - x)^2     (a Gaussian log-likelihood, up to constants)
    reconstruction = ((recon - images) ** 2).flatten(1).sum(dim=1).mean()
    # KL(N(mu, sigma^2) || N(0, 1)) = -1/2 * sum_latent (1 + log sigma^2 - mu^2 - sigma^2)
    # (Kingma & Welling 2014, appendix B); it is >= 0 and 0 only when mu = 0 and sigma = 1.
    kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(dim=1)).mean()
    return reconstruction + beta * kl, reconstruction, kl


def psnr(recon, images):
    """Peak signal-to-noise ratio in dB per image, for images in [0, 1]: 10 * log10(1 / MSE)."""
    mse = ((recon - images) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


# ----------------------------------------------------------------------------- training
def run_epoch(model, images, args, optimizer=None, generator=None):
    """One pass over `images` in batches; trains when given an optimizer. Returns the mean
    total, reconstruction, KL and PSNR over the images."""
    training = optimizer is not None
    model.train(training)
    order = torch.randperm(len(images), generator=generator) if training else torch.arange(len(images))
    sums = torch.zeros(4)
    for start in range(0, len(images), args.batch_size):
        batch = images[order[start:start + args.batch_size]].to(args.device, memory_format=torch.channels_last)
        with torch.set_grad_enabled(training), torch.autocast(args.device.type, torch.bfloat16, enabled=args.bf16):
            recon, mu, logvar = model(batch)
        total, reconstruction, kl = vae_loss(recon.float(), batch, mu.float(), logvar.float(), args.beta)
        if training:
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
        parts = torch.stack([total, reconstruction, kl, psnr(recon.float(), batch).mean()]).detach().cpu()
        sums += parts * len(batch)
    return (sums / len(images)).tolist()


@torch.no_grad()
def encode_all(model, images, args):
    """Latent means and per-image negative ELBO (with z = mu) for a set of images."""
    model.eval()
    means, losses = [], []
    for start in range(0, len(images), args.batch_size):
        batch = images[start:start + args.batch_size].to(args.device)
        mu, logvar = model.encode(batch)
        recon = model.decode(mu)
        for i in range(len(batch)):  # one image at a time, so that the products can be ranked
            one = slice(i, i + 1)
            losses.append(vae_loss(recon[one], batch[one], mu[one], logvar[one], args.beta)[0])
        means.append(mu)
    return torch.cat(means).cpu(), torch.stack(losses).cpu()


def save_checkpoint(model, args, path):
    """Write to a temporary file, then rename: a crash never leaves a broken model.pt."""
    state = {"script": "vae.py", "state_dict": model.state_dict(),
             "args": {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()}}
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(model, args, path):
    if not path.is_file():
        raise SystemExit(f"error: --checkpoint {path}: no such file (train first: python vae.py)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"error: --checkpoint {path}: not a readable checkpoint ({error.__class__.__name__})")
    if not isinstance(state, dict) or state.get("script") != "vae.py":
        found = state.get("script", "an unknown script") if isinstance(state, dict) else "an unknown script"
        raise SystemExit(f"error: --checkpoint {path}: saved by {found}, not by vae.py")
    for flag in ("image_size", "latent_dim"):
        if state["args"][flag] != getattr(args, flag):
            raise SystemExit(f"error: --checkpoint {path} has --{flag.replace('_', '-')} {state['args'][flag]}, "
                             f"but this run has {getattr(args, flag)}; pass the same value")
    model.load_state_dict(state["state_dict"])


# ----------------------------------------------------------------------------- figures and applications
def show_rows(rows, labels, title, path, columns_titles=None):
    """Save a titled grid of images: rows is a list of (n, 3, S, S) tensors, one per labelled row."""
    import matplotlib.pyplot as plt  # imported here: only figure code needs it

    columns = max(len(row) for row in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.1 * columns, 1.15 * len(rows) + 0.4), squeeze=False)
    for r, (row, label) in enumerate(zip(rows, labels)):
        for c, axis in enumerate(axes[r]):
            axis.set_xticks([]), axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_visible(False)
            if c < len(row):
                axis.imshow(row[c].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            if c == 0:
                axis.set_ylabel(label, fontsize=8)
            if r == 0 and columns_titles:
                axis.set_title(columns_titles[c], fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def pick(metadata, index, column, value):
    """The first of the given products whose metadata column equals value, else the first one."""
    matches = [i for i in index.tolist() if metadata.at[i, column] == value]
    return matches[0] if matches else index[0].item()


@torch.no_grad()
def make_figures(model, catalogue, history, samples_by_epoch, args):
    import matplotlib.pyplot as plt

    model.eval()
    out, images, metadata, test = args.out, catalogue.images, catalogue.metadata, catalogue.test_index
    decode = lambda z: model.decode(z.to(args.device)).cpu()
    # Fixed test products, spread over the (sorted) test set: the same ones every run.
    shown = test[torch.linspace(0, len(test) - 1, 10).long()]
    recon = decode(model.encode(images[shown].to(args.device))[0])
    show_rows([images[shown], recon], ["original", "VAE"], "Test products and their reconstructions",
              out / "reconstructions.png")
    # Application 1, new product ideas: decode a fixed batch of z ~ N(0, I).
    z = torch.randn(40, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    samples = decode(z)
    show_rows(list(samples.split(10)), [""] * 4, "New products: decoded samples z ~ N(0, I)", out / "samples.png")
    show_rows([s for _, s in samples_by_epoch], [f"epoch {e}" for e, _ in samples_by_epoch],
              "The same 10 latent codes decoded as training goes on", out / "samples_by_epoch.png")
    # Interpolations: walk in a straight line between the codes of two real test products.
    pairs = [("ProductType", "Sports Shoes", "Heels"), ("ProductType", "Tshirts", "Dresses"),
             ("ProductType", "Casual Shoes", "Flip Flops"), ("ProductType", "Shorts", "Tops")]
    steps = torch.linspace(0, 1, 8).view(-1, 1)
    rows, labels = [], []
    for column, start, end in pairs:
        ends = [pick(metadata, test, column, start), pick(metadata, test, column, end)]
        mu = model.encode(images[ends].to(args.device))[0].cpu()
        rows.append(decode(mu[0] + steps * (mu[1] - mu[0])))
        labels.append(f"{metadata.at[ends[0], column]}\n-> {metadata.at[ends[1], column]}"[:40])
    show_rows(rows, labels, "Interpolating between two test products in latent space", out / "interpolations.png")
    # A 2-D map of the test set: the two principal directions of the latent means.
    mu_test, loss_test = encode_all(model, images[test], args)
    centred = mu_test - mu_test.mean(0)
    _, _, directions = torch.linalg.svd(centred, full_matrices=False)  # PCA by hand
    xy = centred @ directions[:2].T  # (N_test, 2)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for axis, column in zip(axes, ["Category", "Gender"]):
        for value in sorted(metadata[column].iloc[test.tolist()].unique()):
            mask = torch.tensor((metadata[column].iloc[test.tolist()] == value).values)
            axis.scatter(xy[mask, 0], xy[mask, 1], s=8, label=value or "(none)")
        axis.set(title=f"Test latent means (PCA), by {column}", xlabel="PC 1", ylabel="PC 2")
        axis.legend(fontsize=8)
    figure.tight_layout(), figure.savefig(out / "latent_map.png", dpi=100), plt.close(figure)
    # Loss curves, with reconstruction and KL apart.
    if history:
        figure, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for axis, key in zip(axes, ["total", "reconstruction", "kl"]):
            axis.plot([h["epoch"] for h in history], [h[f"train_{key}"] for h in history], label="train")
            axis.plot([h["epoch"] for h in history], [h[f"test_{key}"] for h in history], label="test")
            axis.set(title=f"{key} per image", xlabel="epoch"), axis.legend()
        figure.tight_layout(), figure.savefig(out / "loss_curves.png", dpi=100), plt.close(figure)
    # Application 2, attribute edits: the mean code of black products minus the mean code of the
    # others is a "make it black" direction. Most black products are shoes, so it is taken within
    # the product's own Category; across categories it would also turn a T-shirt into a shoe.
    mu_train, _ = encode_all(model, images[catalogue.train_index], args)
    train_rows = metadata.iloc[catalogue.train_index.tolist()]
    black, category = (train_rows["Colour"] == "Black").values, train_rows["Category"].values
    edited = [i for i in shown.tolist() if metadata.at[i, "Colour"] != "Black"][:6] or shown[:6].tolist()
    directions = []
    for i in edited:
        same = torch.tensor(category == metadata.at[i, "Category"])
        inside, outside = same & torch.tensor(black), same & torch.tensor(~black)
        directions.append(mu_train[inside].mean(0) - mu_train[outside].mean(0) if inside.any() and outside.any()
                          else torch.zeros(args.latent_dim))
    mu = model.encode(images[edited].to(args.device))[0].cpu()
    strengths = [0, 0.5, 1, 1.5]
    rows = [decode(mu + s * torch.stack(directions)) for s in strengths]
    show_rows(rows, [f"+{s} x black" for s in strengths], 'Attribute edit: adding the "Black" direction',
              out / "attribute_edit.png")
    # Application 3, catalogue QA: the test products the model finds least likely.
    worst = test[loss_test.argsort(descending=True)[:8]]
    show_rows([images[worst], decode(model.encode(images[worst].to(args.device))[0])], ["photo", "VAE"],
              "Catalogue QA: the 8 least likely test products (highest negative ELBO)", out / "catalogue_qa.png")


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # training
    parser.add_argument("--epochs", type=int, default=50, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=128, help="images per optimisation step")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (cosine decay to 0)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, the batches and the figures")
    # model
    parser.add_argument("--latent-dim", type=int, default=128, help="size of the latent code z")
    parser.add_argument("--image-size", type=int, default=64, help="photos are resized to this (multiple of 16)")
    parser.add_argument("--beta", type=float, default=1.0, help="weight of the KL term in the loss")
    # data, device and outputs
    parser.add_argument("--data", default=None, help="folder of photos (default: data/, synthetic if empty)")
    parser.add_argument("--out", type=Path, default=Path("out/vae"), help="where figures and model.pt go")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (for GPUs, CPUs with AMX)")
    parser.add_argument("--figures-only", action="store_true", help="load the checkpoint, redraw, no training")
    parser.add_argument("--checkpoint", type=Path, default=None, help="model to load (default: OUT/model.pt)")
    parser.add_argument("--num-samples", type=int, default=0, help="also write N new products to OUT/samples/")
    args = parser.parse_args(argv)
    for flag in ("epochs", "batch_size", "latent_dim"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    if args.beta < 0 or args.num_samples < 0:
        parser.error("--beta and --num-samples cannot be negative")
    return args


def main(argv=None):
    args = parse_args(argv)
    print("vae.py", " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()))
    torch.manual_seed(args.seed)
    args.device = select_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or args.out / "model.pt"
    model = VAE(args.image_size, args.latent_dim).to(args.device, memory_format=torch.channels_last)
    if args.figures_only:  # checked before the photos are loaded, so a wrong file fails at once
        load_checkpoint(model, args, checkpoint)
    catalogue = load_catalogue(args.data, args.image_size)
    train_images, test_images = catalogue.images[catalogue.train_index], catalogue.images[catalogue.test_index]
    print(f"{len(train_images)} training and {len(test_images)} test products, {args.image_size} px")

    history, fixed_z = [], torch.randn(10, args.latent_dim, generator=torch.Generator().manual_seed(args.seed + 1))
    samples_by_epoch = []
    if not args.figures_only:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        # Cosine decay of the learning rate: big steps early, small ones to settle at the end.
        # No KL warm-up (beta growing from 0): it exists to stop the KL term from collapsing the
        # code early, and here the KL holds at ~45 per image from the second epoch on.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
        generator = torch.Generator().manual_seed(args.seed)
        started = time.time()
        for epoch in range(1, args.epochs + 1):
            tick = time.time()
            train = run_epoch(model, train_images, args, optimizer, generator)
            test = run_epoch(model, test_images, args)
            schedule.step()
            seconds = time.time() - tick
            if not all(math.isfinite(value) for value in train + test):
                raise SystemExit(f"error: the loss became non-finite in epoch {epoch} (try a smaller --lr or "
                                 f"--beta); {checkpoint} still holds the model of epoch {epoch - 1}")
            save_checkpoint(model, args, checkpoint)
            names = ["total", "reconstruction", "kl", "psnr"]
            history.append({"epoch": epoch, **{f"train_{n}": v for n, v in zip(names, train)},
                            **{f"test_{n}": v for n, v in zip(names, test)},
                            "seconds": seconds, "images_per_second": len(train_images) / seconds})
            eta = (time.time() - started) / epoch * (args.epochs - epoch)
            print(f"epoch {epoch:3d}/{args.epochs} | train {train[0]:7.1f} (rec {train[1]:7.1f} + kl {train[2]:5.1f})"
                  f" | test {test[0]:7.1f} (rec {test[1]:7.1f} + kl {test[2]:5.1f}) | test PSNR {test[3]:5.2f} dB"
                  f" | {seconds:4.1f} s, {len(train_images) / seconds:5.0f} img/s | ETA {eta:3.0f} s", flush=True)
            if epoch in (1, 2, 5, 10, 20) or epoch == args.epochs:
                model.eval()
                with torch.no_grad():
                    samples_by_epoch.append((epoch, model.decode(fixed_z.to(args.device)).cpu()))
        with open(args.out / "metrics.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(history[0]))
            writer.writeheader(), writer.writerows(history)
    if not samples_by_epoch:
        with torch.no_grad():
            samples_by_epoch = [("final", model.eval().decode(fixed_z.to(args.device)).cpu())]
    make_figures(model, catalogue, history, samples_by_epoch, args)
    if args.num_samples:
        from PIL import Image

        (args.out / "samples").mkdir(exist_ok=True)
        with torch.no_grad():
            z = torch.randn(args.num_samples, args.latent_dim, generator=torch.Generator().manual_seed(args.seed + 2))
            new = model.eval().decode(z.to(args.device)).cpu()
        for i, image in enumerate(new):
            pixels = (image.permute(1, 2, 0) * 255).round().byte().numpy()
            Image.fromarray(pixels).save(args.out / "samples" / f"sample_{i:04d}.png")
    final = run_epoch(model, test_images, args)
    print(f"test: negative ELBO {final[0]:.1f} = reconstruction {final[1]:.1f} + {args.beta} x KL {final[2]:.1f}, "
          f"PSNR {final[3]:.2f} dB; figures in {args.out}/")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: model.pt was last written after a finished epoch, so it is whole
        raise SystemExit("interrupted: model.pt holds the last finished epoch") from None
