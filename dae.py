"""A denoising autoencoder (DAE) for product photos, from scratch: cleaning up noisy photos.

Corrupt the input, ask for the clean image back:

    noisy   = add_noise(x)              gaussian, salt-and-pepper, occlusion or jpeg, fresh every batch
    encoder:  noisy  ->  code           (a grid of --latent-dim channels, a quarter of the photo's size)
    decoder:  code (+ a skip)  ->  r    (the noise it sees)
    output:   x_hat = noisy - r, clamped to [0, 1]
    loss:     sum over pixels of (x_hat - x)^2, against the CLEAN image x, averaged over the batch

A plain autoencoder could learn to copy pixels; a DAE cannot, because the pixels it sees are
wrong. To undo the noise it must know what products look like: edges are straight, a shirt is one
colour, backgrounds are white.

The lesson of this script is where the detail goes. ae.py squeezes the photo into one dense
vector: good for search, but the detail is gone, and a denoiser built that way redraws the photo
from a description. The first version of this script kept an 8x8x32 grid as its only path and
reached 26.1 dB at gaussian noise 0.1, 1.4 dB above Pillow's median filter. Three changes let
the detail through instead of redrawing it: the net predicts the noise and subtracts it (Zhang et
al. 2017, DnCNN), so a clean photo only has to pass unchanged; a skip connection hands the fine
detail straight to the output (Mao et al. 2016, RED-Net), while the coarse code decides what is
noise; and it works on a pixel-unshuffled copy (FFDNet): 2x2 blocks of pixels become 12 channels,
nothing is lost and no layer runs at full resolution, where a CPU spends its time. The README's
table has what that reached.

Run:    python dae.py --epochs 50                     (--noise jpeg --noise-strength 0.4, ...)
Writes: out/dae/ - model.pt, metrics.csv, denoising.csv, loss_curves.png, same_products.png,
        summary.json, denoising_<kind>.png (photos), denoised_<kind>.png (the DAE's outputs alone)
Again:  python dae.py --figures-only   (the table and figures from the saved model, no training)
Clean:  python dae.py --clean PHOTO [PHOTO ...]   (your own photos, at their own size)
"""

import argparse
import csv
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

from common import REPO, data_folder, load_catalogue, select_device, to_rgb


# ----------------------------------------------------------------------------- noise
NOISE_KINDS = ("gaussian", "salt-and-pepper", "occlusion", "jpeg")


def add_noise(images, kind, strength, generator=None):
    """A corrupted copy of images (B, 3, S, S) in [0, 1]; the input is left untouched. `strength` is
    one number, or one per image (B,): training draws it per image, so the model learns every level."""
    batch, _, size, _ = images.shape
    strength = torch.as_tensor(strength, dtype=torch.float32).expand(batch)  # (B,)
    if kind == "gaussian":
        # N(0, strength^2) is added to every pixel, then clamped to [0, 1]. The clamp matters on
        # product photos: a white background pixel can only get darker, so half its noise is cut
        # off, and the noisy photo scores a higher PSNR than the textbook 20 dB at strength 0.1.
        noise = torch.randn(images.shape, generator=generator) * strength.view(-1, 1, 1, 1)
        return (images + noise.to(images.device)).clamp(0, 1)
    if kind == "salt-and-pepper":  # a fraction `strength` of pixels turns black or white
        hit = torch.rand(batch, 1, size, size, generator=generator) < strength.view(-1, 1, 1, 1)
        salt = (torch.rand(batch, 1, size, size, generator=generator) < 0.5).float()
        return torch.where(hit.to(images.device), salt.to(images.device), images)
    noisy = images.clone()
    for i in range(batch):
        if kind == "occlusion":  # grey rectangles, like stickers or watermarks, over about `strength` of the image
            covered = torch.zeros(size, size, dtype=torch.bool)
            while covered.float().mean() < strength[i]:
                height, width = (torch.randint(size // 8, size // 3 + 1, (2,), generator=generator)).tolist()
                top, left = (torch.randint(0, size - height + 1, (1,), generator=generator).item(),
                             torch.randint(0, size - width + 1, (1,), generator=generator).item())
                covered[top:top + height, left:left + width] = True
            noisy[i][:, covered.to(images.device)] = torch.rand(1, generator=generator).item()
        elif kind == "jpeg":  # saved as a JPEG of quality 100 * (1 - strength): blocks, ringing, colour bleeding
            noisy[i] = jpeg_roundtrip(images[i], quality=max(1, round(100 * (1 - strength[i].item()))))
        else:
            raise ValueError(f"unknown noise kind {kind!r}; choose from {', '.join(NOISE_KINDS)}")
    return noisy


def jpeg_roundtrip(image, quality):
    """One (3, S, S) image through Pillow's JPEG encoder and back."""
    buffer = io.BytesIO()
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().cpu().numpy()).save(buffer, "JPEG", quality=quality)
    decoded = np.asarray(Image.open(buffer).convert("RGB"))
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1).to(image.device).float() / 255


# ----------------------------------------------------------------------------- model
def conv_block(inputs, outputs, stride=1):
    return [nn.Conv2d(inputs, outputs, 3, stride, 1), nn.BatchNorm2d(outputs), nn.ReLU()]


class DenoisingAutoencoder(nn.Module):
    """A small U-Net that predicts the noise and subtracts it, working on a pixel-unshuffled copy.

        noisy (B, 3, S, S) -> unshuffle -> (B, 12, S/2, S/2) -> features (B, C, S/2, S/2)  --- skip ---+
            -> stride-2 convolutions -> code (B, latent, S/4, S/4) -> upsample -> (B, C, S/2, S/2) -+-> concat
            -> convolutions -> (B, 12, S/2, S/2) -> shuffle -> noise estimate r (B, 3, S, S)
        clean estimate = noisy - r

    Unshuffling moves each 2x2 block of pixels into 12 channels: nothing is lost, and no layer runs
    at full resolution, where a CPU spends its time. Any height and width that divide by 4 work.
    """

    def __init__(self, image_size=64, latent_dim=48, channels=24):
        super().__init__()
        if image_size < 32 or image_size % 16:
            raise SystemExit(f"error: --image-size {image_size}: must be a multiple of 16, at least 32")
        self.features = nn.Sequential(nn.PixelUnshuffle(2), *conv_block(12, channels))  # (B, C, S/2, S/2)
        self.encoder = nn.Sequential(*conv_block(channels, latent_dim, stride=2), *conv_block(latent_dim, latent_dim))
        self.decoder = nn.Sequential(nn.ConvTranspose2d(latent_dim, channels, 4, 2, 1), nn.BatchNorm2d(channels),
                                     nn.ReLU())  # kernel 4, stride 2: every output pixel gets the same overlap
        self.to_noise = nn.Sequential(*conv_block(2 * channels, channels), nn.Conv2d(channels, 12, 3, 1, 1),
                                      nn.PixelShuffle(2))  # (B, 3, S, S)

    def encode(self, images):  # (B, 3, S, S)
        return self.encoder(self.features(images))  # (B, latent, S/4, S/4)

    def forward(self, noisy):
        features = self.features(noisy)  # (B, C, S/2, S/2)
        upsampled = self.decoder(self.encoder(features))  # (B, C, S/2, S/2)
        # The skip hands the decoder the fine detail the code has no room for; the code says what is noise.
        noise = self.to_noise(torch.cat([features, upsampled], dim=1))  # (B, 3, S, S)
        return (noisy - noise).clamp(0, 1)


# ----------------------------------------------------------------------------- loss
def reconstruction_loss(recon, images):
    """Squared error summed over the pixels of each image, then averaged over the batch."""
    # reconstruction = sum_pixels (x_hat - x)^2, with x the clean image
    return ((recon - images) ** 2).flatten(1).sum(dim=1).mean()


def psnr(recon, images):
    """Peak signal-to-noise ratio in dB per image, for images in [0, 1]: 10 * log10(1 / MSE).
    Identical images have MSE 0; it is capped at 1e-10, so they score 100 dB."""
    mse = ((recon - images) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


# ----------------------------------------------------------------------------- training
def run_epoch(model, images, args, optimizer=None, generator=None):
    """One pass over `images` in batches, noisy in and clean out; trains when given an optimizer.
    Returns the means per image: {"loss": ..., "psnr_noisy": (of the input), "psnr": (of the output)}."""
    training = optimizer is not None
    model.train(training)
    order = torch.randperm(len(images), generator=generator) if training else torch.arange(len(images))
    sums = torch.zeros(3)
    for start in range(0, len(images), args.batch_size):
        batch = images[order[start:start + args.batch_size]].to(args.device, memory_format=torch.channels_last)
        # Fresh noise every batch. A user does not know how noisy a photo is, so training draws each
        # image's strength from [0, 2 x --noise-strength] and the model learns to clean every level
        # ("blind" denoising); the test uses --noise-strength itself.
        strength = torch.rand(len(batch), generator=generator) * 2 * args.noise_strength if training \
            else args.noise_strength
        noisy = add_noise(batch, args.noise, strength, generator)
        with torch.set_grad_enabled(training), torch.autocast(args.device.type, torch.bfloat16, enabled=args.bf16):
            recon = model(noisy).float()
        loss = reconstruction_loss(recon, batch)
        if training:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        # Each batch's means are weighted by its size, so a smaller last batch counts for what it holds.
        sums += torch.stack([loss, psnr(noisy, batch).mean(), psnr(recon, batch).mean()]).detach().cpu() * len(batch)
    return dict(zip(["loss", "psnr_noisy", "psnr"], (sums / len(images)).tolist()))


@torch.no_grad()
def denoise_all(model, images, args):
    """The model's output for a set of (noisy) images, in batches."""
    model.eval()
    return torch.cat([model(images[start:start + args.batch_size].to(args.device)).float().cpu()
                      for start in range(0, len(images), args.batch_size)])


def save_checkpoint(path, model, optimizer, schedule, generator, history, args):
    """All that --resume needs to go on and --figures-only to redraw, random states included.
    Written to a temporary file, then renamed: a crash never leaves a broken model.pt."""
    state = {"script": "dae.py", "state_dict": model.state_dict(), "history": history,
             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "batch_rng": generator.get_state(), "torch_rng": torch.get_rng_state(),
             "args": {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()}}
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path, args, flags):
    """A saved run. The flags that define it (`flags`) are taken from it, and said so; a flag that
    the command line sets to another value than the saved one is an error naming it."""
    if not path.is_file():
        raise SystemExit(f"error: --checkpoint {path}: no such file (train first: python dae.py)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"error: --checkpoint {path}: not a readable checkpoint ({error.__class__.__name__})")
    if not isinstance(state, dict) or state.get("script") != "dae.py":
        found = state.get("script", "an unknown script") if isinstance(state, dict) else "an unknown script"
        raise SystemExit(f"error: --checkpoint {path}: saved by {found}, not by dae.py")
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


# Application: cleaning product photos, measured against two classic filters from Pillow.
def pillow_filter(images, image_filter):
    """Apply a Pillow filter to each image of a (B, 3, S, S) tensor."""
    filtered = []
    for image in images:
        pixels = (image.permute(1, 2, 0) * 255).round().byte().numpy()
        filtered.append(np.asarray(Image.fromarray(pixels).filter(image_filter)))
    return torch.from_numpy(np.stack(filtered)).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def evaluate_denoising(model, catalogue, args):
    """PSNR on the test set (seeded noise) of the noisy input, two filters and the DAE: the trained
    kind from no noise to twice --noise-strength, then every other kind at --noise-strength."""
    clean = catalogue.images[catalogue.test_index]
    levels = [(args.noise, round(factor * args.noise_strength, 4)) for factor in (0, 0.5, 1, 1.5, 2)]
    levels += [(kind, args.noise_strength) for kind in NOISE_KINDS if kind != args.noise]
    rows, outputs = [], {}
    for kind, strength in levels:
        noisy = add_noise(clean, kind, strength, torch.Generator().manual_seed(args.seed))
        candidates = {"noisy input": noisy,
                      "median filter (3)": pillow_filter(noisy, ImageFilter.MedianFilter(3)),
                      "gaussian blur (1)": pillow_filter(noisy, ImageFilter.GaussianBlur(1)),
                      "DAE": denoise_all(model, noisy, args)}
        rows.append({"noise": kind + (" (trained on)" if kind == args.noise else ""), "strength": strength,
                     **{name: psnr(images, clean).mean().item() for name, images in candidates.items()}})
        if strength == args.noise_strength:
            outputs[kind] = candidates
    print(f"denoising the {len(clean)} test products, PSNR in dB (higher is better):")
    print(f"  {'noise':28s}{'strength':>9s}" + "".join(f"{name:>19s}" for name in rows[0] if name in candidates))
    for row in rows:
        print(f"  {row['noise']:28s}{row['strength']:9.3f}" + "".join(f"{row[name]:19.2f}" for name in candidates))
    with open(args.out / "denoising.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows, outputs


def clean_photos(model, paths, args):
    """--clean: denoise each photo file at its own size, in tiles, into OUT/<name>_clean.png."""
    failed = []
    for path in map(Path, paths):
        if not path.is_file():
            print(f"error: --clean {path}: no such file")
            failed.append(path)
            continue
        try:
            with Image.open(path) as opened:
                photo = torch.from_numpy(np.asarray(to_rgb(opened)).copy()).permute(2, 0, 1).float() / 255
        except (OSError, SyntaxError, ValueError) as error:
            print(f"error: --clean {path}: not a readable image ({error.__class__.__name__})")
            failed.append(path)
            continue
        cleaned = denoise_large(model, photo, args)
        target = args.out / f"{path.stem}_clean.png"
        if target.resolve() == path.resolve():  # never write over the photo it came from
            target = args.out / f"{path.stem}_clean_again.png"
        Image.fromarray((cleaned.permute(1, 2, 0) * 255).round().byte().numpy()).save(target)
        print(f"cleaned {path} ({photo.shape[2]}x{photo.shape[1]}) -> {target}")
    if failed:
        raise SystemExit(f"error: {len(failed)} of {len(paths)} photos could not be read: "
                         + ", ".join(map(str, failed)))


@torch.no_grad()
def denoise_large(model, photo, args, tile=256, margin=16):
    """(3, H, W) of any size -> (3, H, W). The net is fully convolutional, so it runs on tiles of
    `tile` pixels, each with a `margin` of context all round that is cut off again: a photo larger
    than memory allows is cleaned a piece at a time, without seams. The last row and column of
    pixels are repeated until every tile's size divides by 4, as the net needs."""
    model.eval()
    _, height, width = photo.shape
    cleaned = torch.empty_like(photo)
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            y0, x0 = max(0, top - margin), max(0, left - margin)
            window = photo[:, y0:min(height, bottom + margin), x0:min(width, right + margin)]
            pad_y, pad_x = -window.shape[1] % 4, -window.shape[2] % 4
            padded = nn.functional.pad(window[None], (0, pad_x, 0, pad_y), mode="replicate")
            out = model(padded.to(args.device)).cpu()[0]
            cleaned[:, top:bottom, left:right] = out[:, top - y0:bottom - y0, left - x0:right - x0]
    return cleaned


@torch.no_grad()
def make_figures(model, catalogue, history, outputs, args):
    import matplotlib.pyplot as plt

    tag = " [SYNTHETIC catalogue]" if catalogue.synthetic else ""  # so no one mistakes it for real results

    out, images, test = args.out, catalogue.images, catalogue.test_index
    # Fixed test products, spread over the (sorted) test set: the same ones every run.
    shown = torch.linspace(0, len(test) - 1, 8).long()  # positions within the test set
    for kind, candidates in outputs.items():
        rows = [images[test[shown]]] + [candidates[name][shown] for name in ("noisy input", "median filter (3)", "DAE")]
        show_rows(rows, ["clean", "noisy", "median (3)", "DAE"], f"Denoising {kind} noise ({args.noise_strength})" + tag,
                  out / f"denoising_{kind}.png")
        show_rows([candidates["DAE"][shown]], ["DAE"], f"DAE outputs, {kind} noise ({args.noise_strength})" + tag,
                  out / f"denoised_{kind}.png")
    if history:
        figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        axes[0].plot([h["epoch"] for h in history], [h["train_loss"] for h in history], label="train")
        axes[0].plot([h["epoch"] for h in history], [h["test_loss"] for h in history], label="test")
        axes[0].set(title="loss per image (output vs clean)", xlabel="epoch", yscale="log")
        axes[0].legend()
        axes[1].plot([h["epoch"] for h in history], [h["test_psnr_noisy"] for h in history], label="noisy input")
        axes[1].plot([h["epoch"] for h in history], [h["test_psnr"] for h in history], label="DAE output")
        axes[1].set(title="test PSNR (dB)", xlabel="epoch")
        axes[1].legend()
        figure.tight_layout()
        figure.savefig(out / "loss_curves.png", dpi=100)
        plt.close(figure)


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
    clean_output = denoise_all(model, images[test], args)  # a clean photo in: how much of it comes back
    summary = {"model": Path(__file__).name, "test_psnr_clean": psnr(clean_output, images[test]).mean().item(),
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
    show_rows([model(images[shown].to(args.device)).float().cpu()], ["DAE"],
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
    parser.add_argument("--latent-dim", type=int, default=48, help="channels of the code, a grid of S/4 x S/4")
    parser.add_argument("--image-size", type=int, default=64, help="photos are resized to this (multiple of 16)")
    # noise
    parser.add_argument("--noise", choices=NOISE_KINDS, default="gaussian", help="the corruption to train on")
    parser.add_argument("--noise-strength", type=float, default=0.1,
                        help="the test's strength; training draws each image's from [0, twice this]. gaussian: std; "
                             "salt-and-pepper: fraction of pixels; occlusion: fraction covered; jpeg: 1 - quality/100")
    # data, device and outputs
    parser.add_argument("--data", default=None, help="folder of photos; if not given, the repo's data/ "
                                                        "(a synthetic catalogue if it holds none)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "dae", help="where figures and model.pt go")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps; if not given, the best available")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (for GPUs, CPUs with AMX)")
    # a saved run
    parser.add_argument("--figures-only", action="store_true", help="load the checkpoint, redraw, no training")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from the checkpoint")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="the model --figures-only, --resume or --clean loads; if not given, OUT/model.pt")
    # a tool for a shop, on a trained model
    parser.add_argument("--clean", nargs="+", default=None, metavar="PHOTO",
                        help="denoise these photo files at their own size into OUT/<name>_clean.png")
    args = parser.parse_args(argv)
    for flag in ("epochs", "batch_size", "latent_dim"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    if args.checkpoint and not (args.figures_only or args.resume or args.clean):
        parser.error("--checkpoint names the model to load with --figures-only or --resume; "
                     "training writes OUT/model.pt")
    if not 0 < args.noise_strength < 1:
        parser.error("--noise-strength must be between 0 and 1")
    return args


# What the model is: always taken from a checkpoint.
MODEL_FLAGS = ("latent_dim", "image_size", "noise", "noise_strength")
TRAINING_FLAGS = ("epochs", "batch_size", "lr", "seed")  # how it was trained: taken from it by --resume


def main(argv=None):
    args = parse_args(argv)
    defaults = vars(parse_args([]))  # the command that reruns this: the flags that differ from the defaults
    print("dae.py", *[f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                        for k, v in vars(args).items() if v != defaults[k] and k != "data"],
          "--data", data_folder(args.data))
    checkpoint, state = args.checkpoint or args.out / "model.pt", None
    if args.figures_only or args.resume or args.clean:  # checked before the photos load: a wrong file fails at once
        state = load_checkpoint(checkpoint, args, MODEL_FLAGS + (TRAINING_FLAGS if args.resume else ()))
    torch.manual_seed(args.seed)
    # Numbers below ~1e-38 ("denormals") take a slow path in x86 CPUs, and a well-trained model's
    # gradients hold many of them; flushed to zero they change nothing visible (vae.py: ~15 % an epoch).
    torch.set_flush_denormal(True)
    args.device = select_device(args.device)
    model = DenoisingAutoencoder(args.image_size, args.latent_dim).to(args.device, memory_format=torch.channels_last)
    if state:
        model.load_state_dict(state["state_dict"])
    if args.clean:  # the user's own photos: no catalogue needed
        args.out.mkdir(parents=True, exist_ok=True)
        return clean_photos(model, args.clean, args)
    catalogue = load_catalogue(args.data, args.image_size)
    train_images, test_images = catalogue.images[catalogue.train_index], catalogue.images[catalogue.test_index]
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
        if found != "dae.py":
            raise SystemExit(f"error: --out {args.out} holds a model of {found}; train dae.py into another --out "
                             f"(or delete {args.out / 'model.pt'} first)")
    args.out.mkdir(parents=True, exist_ok=True)

    history = state["history"] if state else []
    if not args.figures_only:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        # Cosine decay of the learning rate: big steps early, small ones to settle at the end.
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
                    raise SystemExit(f"error: the loss became non-finite in epoch {epoch} (try a smaller --lr); "
                                     f"{args.out / 'model.pt'} still holds the model of epoch {epoch - 1}")
                history.append({"epoch": epoch, **{f"train_{k}": v for k, v in train.items()},
                                **{f"test_{k}": v for k, v in test.items()},
                                "seconds": seconds, "images_per_second": len(train_images) / seconds})
                save_checkpoint(args.out / "model.pt", model, optimizer, schedule, generator, history, args)
                save_metrics(args.out / "metrics.csv", history[-1:], append=epoch > 1)
                eta = (time.time() - started) / (epoch - first + 1) * (args.epochs - epoch)
                print(f"epoch {epoch:3d}/{args.epochs} | train {train['loss']:6.1f} | test {test['loss']:6.1f} | test "
                      f"PSNR noisy {test['psnr_noisy']:5.2f} -> DAE {test['psnr']:5.2f} dB | {seconds:4.1f} s, "
                      f"{len(train_images) / seconds:5.0f} img/s | ETA {eta:3.0f} s", flush=True)
        except KeyboardInterrupt:
            raise SystemExit(f"interrupted: {args.out / 'model.pt'} holds the last finished epoch; "
                             f"add --resume to continue") from None
    _, outputs = evaluate_denoising(model, catalogue, args)
    make_figures(model, catalogue, history, outputs, args)
    # The DAE's code is a grid of S/4 x S/4; averaged to 4x4 it says what is in the photo more than where.
    with torch.no_grad():
        codes = torch.cat([nn.functional.adaptive_avg_pool2d(model.eval().encode(batch.to(args.device)), 4).flatten(1)
                           for batch in catalogue.images.split(256)]).cpu()
    # No samples: its decoder needs the skip features of a real photo, so a code alone cannot be drawn.
    write_summary(model, catalogue, history, codes, None, args)
    print(f"figures in {args.out}/" + (" (a SYNTHETIC catalogue: not real results)" if catalogue.synthetic else ""))


if __name__ == "__main__":
    main()
