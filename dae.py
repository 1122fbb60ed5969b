"""A denoising autoencoder (DAE) for product photos, from scratch: cleaning up noisy photos.

Corrupt the input, ask for the clean image back:

    noisy   = add_noise(x)              gaussian, salt-and-pepper, occlusion or jpeg, fresh every batch
    level   = sqrt(mean over pixels of (noisy - x)^2)      how noisy it is: one number per image
    encoder:  noisy, level  ->  code    (a grid of --latent-dim channels, a quarter of the photo's size)
    decoder:  code (+ a skip)  ->  r    (the noise it sees)
    output:   x_hat = noisy - r, clamped to [0, 1]
    loss:     sum over pixels of (x_hat - x)^2, against the CLEAN image x, averaged over the batch

A plain autoencoder could learn to copy pixels; a DAE cannot, because the pixels it sees are
wrong. To undo the noise it must know what products look like: edges are straight, a shirt is one
colour, backgrounds are white.

The lesson of this script is where the detail goes. ae.py squeezes the photo into one dense
vector: good for search, but the detail is gone, and a denoiser built that way redraws the photo
from a description. Three choices let the detail through instead: the net predicts the noise and
subtracts it (Zhang et al. 2017, DnCNN), so a clean photo only has to pass unchanged; a skip
connection hands the fine detail straight to the output (Mao et al. 2016, RED-Net), while the
coarse code decides what is noise; and it works on a pixel-unshuffled copy (FFDNet): 2x2 blocks of
pixels become 12 channels, nothing is lost and no layer runs at full resolution, where a CPU
spends its time.

A fourth choice tells it how much to take away. Without it, one network must guess each photo's
noise, and it hedges: it smooths detail away from a lightly noisy photo and leaves noise in a
heavy one. FFDNet (Zhang et al. 2018) hands it the noise level as one more input channel. Training
knows the level exactly (the clean photo is at hand); the table hands it the true level, as BM3D
is handed its sigma; a user's photo gets an estimate (estimate_noise_level).

Why it beats a classical denoiser such as BM3D: BM3D knows one thing about photos, that a small
patch has similar patches nearby, and averages them. This network has seen 2,615 product photos:
it knows that the background is flat white, that a shirt's fabric is one colour with a few seams,
where a shoe's sole ends, and it removes what does not fit that, even where a patch has no twin.

Run:    python dae.py --epochs 40     (--noise jpeg, ...: each kind has a test strength of its own)
Writes: out/dae/ - model.pt, metrics.csv, denoising.csv, loss_curves.png,
        denoising_<kind>.png (photos), denoised_<kind>.png (the DAE's outputs alone)
Again:  python dae.py --figures-only   (the table and figures from the saved model, no training)
Clean:  python dae.py --clean PHOTO [PHOTO ...]   (your own photos, at their own size)
"""

import argparse
import csv
import io
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

from common import REPO, average_colour, load_catalogue, shown_products  # the photos
# The run's books and its figures, written once for the three scripts: none of them is the lesson.
from bookkeeping import (add_run_flags, check_epoch, check_flags, divergence_limit, end_epoch, ends_cleanly,
                         log_epoch, one_cycle, prepare_out, restore, resume_training, start_run, stop_cleanly,
                         written_whole)
from classical import estimate_noise_level, nlm_filter, pillow_filter  # what needs no training, to beat
from figures import plot_curves, save_grid
import shop


# ----------------------------------------------------------------------------- hyperparameters
NOISE_KINDS = ("gaussian", "salt-and-pepper", "occlusion", "jpeg")  # what --noise may name
STRENGTHS = {"gaussian": 0.1, "salt-and-pepper": 0.1, "occlusion": 0.1, "jpeg": 0.4}  # each kind's test, by default


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # training
    parser.add_argument("--epochs", type=int, default=40, help="passes over the training set (fewer than ae.py's "
                        "50: a wider net for the same time)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per optimisation step")
    parser.add_argument("--lr", type=float, default=4e-3, help="Adam's peak learning rate (one cycle)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, the batches and the figures")
    # model
    parser.add_argument("--latent-dim", type=int, default=64, help="channels of the code, a grid of S/4 x S/4")
    parser.add_argument("--image-size", type=int, default=64, help="photos are resized to this (multiple of 16)")
    # noise
    parser.add_argument("--noise", choices=NOISE_KINDS, default="gaussian", help="the corruption to train on")
    parser.add_argument("--noise-strength", type=float, default=None,
                        help="the test's strength, training's drawn from [0, twice it]; if not given, the kind's own: "
                             "gaussian 0.1 (std), salt-and-pepper 0.1 (pixels hit), occlusion 0.1 (area covered), "
                             "jpeg 0.4 (1 - quality/100: at 0.1 the damage is too slight to undo)")
    # data, device, outputs, a saved run: the same in every script
    add_run_flags(parser, REPO / "out" / "dae", tools=False)
    parser.add_argument("--clean", nargs="+", default=None, metavar="PHOTO",
                        help="a tool for a shop: denoise these photo files at their own size into OUT/<name>_clean.png")
    args = check_flags(parser, parser.parse_args(argv))
    if args.noise_strength is not None and not 0 < args.noise_strength < 1:
        parser.error("--noise-strength must be between 0 and 1")
    return args


ADAM_BETAS = (0.95, 0.99)  # momentum: one cycle moves it 0.95 -> 0.85 -> 0.95; 0.99 < the usual 0.999: faster steps
WARMUP = 0.2  # the share of the steps over which the learning rate climbs to --lr
SCRIPT = Path(__file__).name  # saved in the checkpoint, so that another script's model is refused
MODEL_FLAGS = ("latent_dim", "image_size", "noise", "noise_strength")  # what the model is: taken from a checkpoint
# The denoising table scores 4 contenders at 7 noise levels on at most this many test products, spread
# over the test set: enough for its two decimals, and it stays in proportion to an epoch on a large catalogue.
TABLE_PRODUCTS = 1000


# ----------------------------------------------------------------------------- noise
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
            while covered.float().mean() < min(strength[i], 1):  # training draws up to twice --noise-strength
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


def noise_level(noisy, images):
    """How noisy each image is, (B,): the root mean square of what the noise changed. The same unit
    for every kind of noise, so one model can be told the level of any of them."""
    return ((noisy - images) ** 2).flatten(1).mean(dim=1).sqrt()


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
    """A small U-Net that predicts the noise and subtracts it, working on a pixel-unshuffled copy,
    told the noise level as one more channel.

        noisy (B, 3, S, S) -> unshuffle -> (B, 12, S/2, S/2)
            + the level map (B, 1, S/2, S/2) -> features (B, C, S/2, S/2)  ------------------- skip ---+
            -> stride-2 convolutions -> code (B, latent, S/4, S/4) -> upsample -> (B, C, S/2, S/2) -+-> concat
            -> convolutions -> (B, 12, S/2, S/2) -> shuffle -> noise estimate r (B, 3, S, S)
        clean estimate = noisy - r

    Unshuffling moves each 2x2 block of pixels into 12 channels: nothing is lost, and no layer runs
    at full resolution, where a CPU spends its time. Any height and width that divide by 4 work.
    """

    def __init__(self, image_size=64, latent_dim=64, channels=32):
        super().__init__()
        if image_size < 32 or image_size % 16:
            raise SystemExit(f"error: --image-size {image_size}: must be a multiple of 16, at least 32")
        self.unshuffle = nn.PixelUnshuffle(2)  # (B, 3, S, S) -> (B, 12, S/2, S/2)
        self.features = nn.Sequential(*conv_block(12 + 1, channels))  # the 12 channels and the level map
        self.encoder = nn.Sequential(*conv_block(channels, latent_dim, stride=2), *conv_block(latent_dim, latent_dim))
        self.decoder = nn.Sequential(nn.ConvTranspose2d(latent_dim, channels, 4, 2, 1), nn.BatchNorm2d(channels),
                                     nn.ReLU())  # kernel 4, stride 2: every output pixel gets the same overlap
        self.to_noise = nn.Sequential(*conv_block(2 * channels, channels), nn.Conv2d(channels, 12, 3, 1, 1),
                                      nn.PixelShuffle(2))  # (B, 3, S, S)

    def encode(self, images, level):  # (B, 3, S, S), (B,)
        return self.encoder(self.features(self.with_level(images, level)))  # (B, latent, S/4, S/4)

    def with_level(self, images, level):
        """The unshuffled images with the noise level of each as a constant channel: (B, 13, S/2, S/2)."""
        unshuffled = self.unshuffle(images)  # (B, 12, S/2, S/2)
        level = torch.as_tensor(level, dtype=unshuffled.dtype, device=unshuffled.device).expand(len(images))
        level_map = level.view(-1, 1, 1, 1).expand(-1, 1, *unshuffled.shape[2:])  # (B, 1, S/2, S/2)
        return torch.cat([unshuffled, level_map], dim=1)

    def forward(self, noisy, level):
        features = self.features(self.with_level(noisy, level))  # (B, C, S/2, S/2)
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
def run_epoch(model, images, args, optimizer=None, generator=None, schedule=None):
    """One pass over `images` in batches, noisy in and clean out; trains when given an optimizer (and
    steps its learning-rate schedule after each batch). Returns the means per image:
    {"loss": ..., "psnr_noisy": (of the input), "psnr": (of the output)}."""
    training = optimizer is not None
    model.train(training)
    order = torch.randperm(len(images), generator=generator) if training else torch.arange(len(images))
    sums = torch.zeros(3)
    for start in range(0, len(images), args.batch_size):
        # The photos are kept as bytes, a quarter of float32's memory: a batch becomes floats in [0, 1] here.
        batch = images[order[start:start + args.batch_size]].float() / 255
        batch = batch.to(args.device, memory_format=torch.channels_last)
        # Fresh noise every batch. A user does not know how noisy a photo is, so training draws each
        # image's strength from [0, 2 x --noise-strength] and the model learns to clean every level
        # ("blind" denoising); the test uses --noise-strength itself.
        strength = torch.rand(len(batch), generator=generator) * 2 * args.noise_strength if training \
            else args.noise_strength
        noisy = add_noise(batch, args.noise, strength, generator)
        with torch.set_grad_enabled(training), torch.autocast(args.device.type, torch.bfloat16, enabled=args.bf16):
            recon = model(noisy, noise_level(noisy, batch)).float()
        loss = reconstruction_loss(recon, batch)
        if training:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        # Each batch's means are weighted by its size, so a smaller last batch counts for what it holds.
        sums += torch.stack([loss, psnr(noisy, batch).mean(), psnr(recon, batch).mean()]).detach().cpu() * len(batch)
    return dict(zip(["loss", "psnr_noisy", "psnr"], (sums / len(images)).tolist()))


def train_model(model, train_images, test_images, history, state, args):
    """The training loop: --epochs passes over the training photos, each followed by a test pass,
    the model saved after each. Goes on from `state` with --resume."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=ADAM_BETAS, fused=True)
    # One cycle, as in ae.py and vae.py, stepped after each batch: the learning rate climbs from lr/25
    # to --lr over the first WARMUP of the steps, then falls to ~0 along a cosine. A cosine from a
    # fixed rate left the test PSNR jumping by half a dB between late epochs.
    schedule = one_cycle(optimizer, args.lr, args.epochs * math.ceil(len(train_images) / args.batch_size), WARMUP)
    generator = torch.Generator().manual_seed(args.seed)
    if args.resume:
        resume_training(state, optimizer, schedule, generator, args)
    # Past this test loss the run has diverged (check_epoch stops it): twice the error of what the DAE
    # starts from, its noisy input handed back, or a flat picture of the photos' average colour.
    limit = divergence_limit(reconstruction_loss, average_colour(train_images), test_images, lambda images: add_noise(
        images, args.noise, args.noise_strength, torch.Generator().manual_seed(args.seed)))
    started, first = time.time(), len(history) + 1
    with stop_cleanly(args):
        for epoch in range(first, args.epochs + 1):
            tick = time.time()
            train = run_epoch(model, train_images, args, optimizer, generator, schedule)
            test = run_epoch(model, test_images, args)
            row = check_epoch(epoch, train, test, time.time() - tick, len(train_images), args, limit)
            end_epoch(SCRIPT, model, history, row, args, optimizer, schedule, generator)
            log_epoch(row, args, started, first)


@torch.no_grad()
def denoise_all(model, noisy, level, args):
    """The model's output for a set of noisy images (N, 3, S, S) of noise levels (N,), in batches."""
    model.eval()
    return torch.cat([model(noisy[start:start + args.batch_size].to(args.device),
                            level[start:start + args.batch_size]).float().cpu()
                      for start in range(0, len(noisy), args.batch_size)])


# ============================================================================= the lesson ends here
# What follows measures the DAE against what needs no training (classical.py: two filters from
# Pillow and OpenCV's non-local means), draws the figures, cleans a shop's own photos.
@torch.no_grad()
def evaluate_denoising(model, catalogue, args):
    """PSNR on the test set (seeded noise) of the noisy input, three classical denoisers and the DAE,
    and by how much the DAE beats the best of the others: the trained kind from no noise to twice
    --noise-strength, then every other kind at its own default strength. NLM and the DAE are handed
    each photo's true noise level, as BM3D is handed its sigma (tools/classical_denoisers.py).
    Returns the table's rows and, for the figures, 8
    products' images of each kind at the strength named in the figure's title."""
    clean = catalogue.images[shown_products(catalogue, min(TABLE_PRODUCTS, len(catalogue.test_index)))].float() / 255
    shown = torch.linspace(0, len(clean) - 1, 8).long()  # the figures' 8 products: fixed, spread over those scored
    levels = [(args.noise, round(factor * args.noise_strength, 4), factor == 1) for factor in (0, 0.5, 1, 1.5, 2)]
    levels += [(kind, STRENGTHS[kind], True) for kind in NOISE_KINDS if kind != args.noise]

    def candidates(noisy, clean):  # what each contender makes of noisy photos
        level = noise_level(noisy, clean)
        return {"noisy input": noisy, "median filter (3)": pillow_filter(noisy, ImageFilter.MedianFilter(3)),
                "gaussian blur (1)": pillow_filter(noisy, ImageFilter.GaussianBlur(1)),
                "OpenCV NLM": nlm_filter(noisy, level), "DAE": denoise_all(model, noisy, level, args)}

    rows, outputs = [], {}
    for kind, strength, drawn in levels:
        noisy = add_noise(clean, kind, strength, torch.Generator().manual_seed(args.seed))
        # A block of products at a time: four outputs for the whole test set need not be in memory at once.
        scores = [{name: psnr(images, clean[block]) for name, images in candidates(noisy[block], clean[block]).items()}
                  for block in torch.arange(len(clean)).split(1024)]
        row = {name: torch.cat([score[name] for score in scores]).mean().item() for name in scores[0]}
        others = {name: value for name, value in row.items() if name != "DAE"}
        best = max(others, key=others.get)  # the best of those run that need no training, the input as it is too
        row["DAE - best other"], row["best other"] = row["DAE"] - others[best], best
        if strength == 0 and kind != "jpeg":  # the clean photo itself (jpeg's 0 is quality 100): no measure
            row["noisy input"] = row["DAE - best other"] = row["best other"] = ""
        rows.append({"noise": kind + (" (trained on)" if kind == args.noise else ""), "strength": strength, **row})
        if drawn:
            outputs[kind] = {"strength": strength, "clean": clean[shown], **candidates(noisy[shown], clean[shown])}
    print(f"denoising the {len(clean)} test products" + (f" (of {len(catalogue.test_index)}, spread over them)" if
          len(clean) < len(catalogue.test_index) else "") + f" with a DAE trained on {args.noise} noise of strength 0 "
          f"to {2 * args.noise_strength:g}, PSNR in dB (higher is better):")
    print(f"  {'noise':28s}{'strength':>9s}" + "".join(f"{name:>19s}" for name in list(rows[0])[2:-1]))
    for row in rows:
        beaten = row["DAE - best other"] != "" and row["DAE - best other"] < 0
        winner = "the input left as it is" if row["best other"] == "noisy input" else row["best other"]
        print(f"  {row['noise']:28s}{row['strength']:9.3f}" + "".join(f"{row[name]:19.2f}" if row[name] != "" else
                                                                      f"{'-':>19s}" for name in list(row)[2:-1])
              + (f"  <- {winner} does better" if beaten else ""))
    with written_whole(args.out / "denoising.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows, outputs


@torch.no_grad()
def make_figures(catalogue, history, outputs, args):
    tag = " [SYNTHETIC catalogue]" if catalogue.synthetic else ""  # so no one mistakes it for real results
    trained = (f"a DAE trained on {args.noise} noise of strength 0 to {2 * args.noise_strength:g}, told each "
               f"photo's noise level")
    for kind, candidates in outputs.items():
        shown = (f"{kind} noise of strength {candidates['strength']:g}"
                 + (f" (quality {round(100 * (1 - candidates['strength']))})" if kind == "jpeg" else "")
                 + ("" if kind == args.noise else ", which it never saw in training"))
        rows = [candidates[name] for name in ("clean", "noisy input", "median filter (3)", "DAE")]
        save_grid(rows, ["clean", "noisy", "median (3)", "DAE"], f"Denoising {shown}, by {trained}" + tag,
                  args.out / f"denoising_{kind}.png")
        save_grid([candidates["DAE"]], ["DAE"], f"Outputs of {trained}, given {shown}" + tag,
                  args.out / f"denoised_{kind}.png")
    plot_curves(history, {"loss": "loss per image (output vs clean)", "psnr": "test PSNR of the output (dB)"},
                args.out / "loss_curves.png", log=("loss",))


@ends_cleanly  # Ctrl-C anywhere ends in one line, and the --out it held is let go
def main(argv=None):
    args = parse_args(argv)
    checkpoint, state = start_run(SCRIPT, args, vars(parse_args([])), MODEL_FLAGS,
                                  load=args.figures_only or args.resume or args.clean is not None)
    if args.noise_strength is None:  # not given, and not taken from a checkpoint: the kind's own
        args.noise_strength = STRENGTHS[args.noise]
    model = DenoisingAutoencoder(args.image_size, args.latent_dim).to(args.device, memory_format=torch.channels_last)
    history = restore(model, state, checkpoint)[0]  # the loaded run's epochs; [] for a new one
    if args.clean:  # the user's own photos: no catalogue needed
        args.out.mkdir(parents=True, exist_ok=True)
        model.eval()

        def clean(photo):  # at its own size, in tiles, at the noise level estimated in the whole photo
            level = estimate_noise_level(photo[None])
            return shop.in_tiles(lambda tile: model(tile.to(args.device), level).cpu(), photo)

        return shop.clean_photos(clean, args.clean, args.out)
    catalogue = load_catalogue(args.data, args.image_size)
    train_images, test_images = catalogue.images[catalogue.train_index], catalogue.images[catalogue.test_index]
    prepare_out(args, catalogue, state)
    if not args.figures_only:
        train_model(model, train_images, test_images, history, state, args)
    _, outputs = evaluate_denoising(model, catalogue, args)
    make_figures(catalogue, history, outputs, args)
    print(f"figures in {args.out}/" + (" (a SYNTHETIC catalogue: not real results)" if catalogue.synthetic else ""))


if __name__ == "__main__":
    main()
