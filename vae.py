"""A convolutional variational autoencoder (VAE) for product photos, from scratch.

An autoencoder squeezes a photo through a small code and rebuilds it. A VAE makes that code a
*distribution*, so that the space of codes can be sampled to draw products nobody photographed:

    encoder:          image x  ->  mu(x), logvar(x)          (q(z|x) = N(mu, s^2): a Gaussian per image)
    reparameterize:   z = mu + s * eps,  eps ~ N(0, I),  s = exp(logvar / 2)
    decoder:          z  ->  x_hat in [0, 1]                 (p(x|z) = N(x_hat, Sigma) over all D = 3 x 64 x 64 values)
    loss:             reconstruction + beta * KL             (at beta = 1, the negative ELBO)
        reconstruction = -log p(x|z), with e = x - x_hat and g its differences between neighbouring pixels,
                       = (sum e^2 + lambda sum g^2) / (2 sigma^2) + D/2 log(2 pi sigma^2) - 1/2 log det(I + lambda L)
        KL             = KL( q(z|x) || N(0, I) ), in closed form
    new products:     z ~ N(0, I), decoded

Writing z as mu plus scaled noise moves the randomness into eps, so gradients flow into mu and s.
The KL term pulls every image's Gaussian towards the standard normal: codes of similar products
overlap instead of sitting far apart, and the space between them decodes to plausible products.
beta weighs that pull: a small beta lets the code say more about each photo, a large one makes its
space smoother, and numbers the decoder has little use for fall back to the prior.

Why a VAE blurs: with lambda = 0 (the textbook's decoder) each pixel's error is noise of its own.
Detail the code cannot pin down (where a stripe falls) is then cheapest drawn as the average of
where it might be, a blur: its error is small and spread thin, while a sharp stripe a little off
costs twice, a missing edge and an extra one. A correlated Gaussian says that errors come in
shapes: here the error's differences between neighbouring pixels cost lambda times again, so a
missing edge costs more than a wrong shade, and the finest patterns up to 1 + 8 lambda times as
much (log_det_edges; after Bredell et al. 2023, "Explicitly Minimizing the Blur Error of VAEs").
It is still a normalised Gaussian, so the ELBO keeps its meaning.

The decoder's variance sigma^2, one number for all D values, is a hidden beta: the textbook sum of
squared errors fixes it at 1/2, which weighs the KL ~100x too much on these photos. Here it is set
to its best value, the batch's mean of the first sum a value (at lambda = 0 the mean squared error,
MSE): then the first term is D/2, and at lambda = 0 reconstruction = D/2 log(2 pi e MSE), below
zero once MSE < 1/(2 pi e) = 0.059 (the log-determinant lowers it further). So the printed
losses are negative, and lower is still better. The KL rises for the first epochs, then settles: at
first the decoder draws a blurred average and detail in the code buys little; as it learns to draw
detail, and sigma^2 falls with its error, each nat the code spends buys more.

Sampling, in the textbook's order (below): z ~ N(0, I) draws smudges here. Most code numbers alone
are close to N(0, 1) (in a default run their variances run from 0.6 to about 4, median 0.89), but they
are correlated: along their main directions the codes spread from 11 times the prior's variance to
a fiftieth of it (codes_vs_prior.png), so most draws land where no photo's code is. A Gaussian
fitted to the codes draws products (Ghosh et al. 2019), one per product type draws each as often
as the catalogue has it, and one_kind sets a type apart against the blur.

Run:    python vae.py --epochs 50    (model.pt, metrics.csv, search.csv and the figures in out/vae/)
Blur:   python vae.py --edge-weight 0 --out out/vae-independent    (the textbook's independent Gaussian)
Again:  python vae.py --figures-only --num-samples 16 --product-type Tshirts   (16 new T-shirts in samples/)
Tools:  python vae.py --query PHOTO_OR_PRODUCTID ...    python vae.py --duplicates    (more like this; copies)
"""

import argparse
import math
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from common import REPO, average_colour, load_catalogue, product_kinds  # the photos
# The run's books and its figures, written once for the three scripts: none of them is the lesson.
from bookkeeping import (add_run_flags, check_epoch, check_flags, divergence_limit, end_epoch, ends_cleanly,
                         log_epoch, one_cycle, prepare_out, restore, resume_training, start_run, stop_cleanly)
from figures import draw_code_space, plot_curves, save_grid, save_images
import shop


# ----------------------------------------------------------------------------- hyperparameters
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # training and model
    parser.add_argument("--epochs", type=int, default=50, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=48, help="images per optimisation step")
    parser.add_argument("--lr", type=float, default=4e-3, help="Adam's peak learning rate (one cycle)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, the batches and the figures")
    parser.add_argument("--latent-dim", type=int, default=128, help="size of the code z")
    parser.add_argument("--image-size", type=int, default=64, help="photos are resized to this (multiple of 16)")
    parser.add_argument("--beta", type=float, default=1.0, help="weight of the KL term in the loss")
    parser.add_argument("--edge-weight", type=float, default=1.0, help="lambda: what an error's differences "
                        "between neighbouring pixels cost, again (0: the independent Gaussian, which blurs)")
    # data, device, outputs, a saved run and the shop's tools: the same in every script
    add_run_flags(parser, REPO / "out" / "vae", tools=True)
    return check_flags(parser, parser.parse_args(argv))


ADAM_BETAS = (0.95, 0.99)  # momentum: one cycle moves it 0.95 -> 0.85 -> 0.95; 0.99 < the usual 0.999: faster steps
WARMUP = 0.2  # the share of the steps over which the learning rate climbs to --lr
SNAPSHOTS = (1, 2, 5, 10, 20)  # the epochs (and the last) after which samples_by_epoch.png draws samples
LOGVAR_LIMIT = 8  # the encoder's log s^2 stays within (-8, 8): its spread s from 0.02 to 55
ACTIVE = 0.01  # a code dimension whose mean varies more than this across photos is active (active_units)
RIDGE = 1e-3  # added to a fitted covariance of the codes, so that it stays positive definite (square_root)
GUIDANCE = 1.0  # how much further from the average product one kind's new products are drawn (one_kind)
SCRIPT = Path(__file__).name  # saved in the checkpoint, so that another script's model is refused
MODEL_FLAGS = ("latent_dim", "image_size", "beta", "edge_weight")  # what the model is: taken from a checkpoint


# ----------------------------------------------------------------------------- model
class VAE(nn.Module):
    """Stride-2 convolutions take the photo to an 8x8 grid of 64 features (16 to 64 channels: small
    for a CPU), a linear layer makes the code; the decoder mirrors them, but its first block keeps the
    grid's 64 channels (ae.py halves them): the likelihood asks for detail, and at 16x16 more channels
    draw it for the least time. Its transposed convolutions have kernel 4, which stride 2 divides, so
    every output pixel is covered equally often; 3x3 paints a checkerboard (Odena et al. 2016)."""

    def __init__(self, image_size=64, latent_dim=128, channels=(16, 32, 64)):
        super().__init__()
        if image_size < 32 or image_size % 16:
            raise SystemExit(f"error: --image-size {image_size}: must be a multiple of 16, at least 32")
        # A larger photo gets more levels in front, never a larger grid: Adam moves each weight by ~lr
        # a step, so a linear layer's output moves by ~lr x its inputs, too far with 16x16x64 of them.
        grid, widths = image_size // 8, list(channels)
        while grid > 8 and grid % 2 == 0:
            grid, widths = grid // 2, [widths[0]] + widths
        self.feature_shape = (widths[-1], grid, grid)  # (64, 8, 8) at 64 and 128 px
        encoder, previous = [], 3
        for width in widths:  # each block: (B, previous, s, s) -> (B, width, s/2, s/2)
            encoder += [nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2)]
            previous = width
        self.encoder = nn.Sequential(*encoder, nn.Flatten())
        features = math.prod(self.feature_shape)
        self.to_mu = nn.Linear(features, latent_dim)
        self.to_logvar = nn.Linear(features, latent_dim)
        self.from_latent = nn.Linear(latent_dim, features)
        decoder = []
        for width in [widths[-1], *reversed(widths[:-2])]:  # each block: (B, previous, s, s) -> (B, width, 2s, 2s)
            decoder += [nn.ConvTranspose2d(previous, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU()]
            previous = width
        self.decoder = nn.Sequential(*decoder, nn.ConvTranspose2d(previous, 3, 4, 2, 1), nn.Sigmoid())

    def encode(self, images):  # (B, 3, S, S)
        features = self.encoder(images)  # (B, 64 * 8 * 8)
        # Held softly within (-8, 8): unbounded, one large step could make exp(logvar) and the KL explode.
        logvar = LOGVAR_LIMIT * torch.tanh(self.to_logvar(features) / LOGVAR_LIMIT)
        return self.to_mu(features), logvar  # (B, latent), (B, latent)

    def reparameterize(self, mu, logvar):
        eps = torch.randn_like(mu)
        return mu + torch.exp(0.5 * logvar) * eps  # (B, latent)

    def decode(self, z):  # (B, latent)
        features = self.from_latent(z).view(-1, *self.feature_shape)  # (B, 64, 8, 8)
        return self.decoder(features)  # (B, 3, S, S), in [0, 1]

    def forward(self, images):
        # Training decodes a sampled z, as the ELBO asks; evaluation decodes the mean mu, the
        # model's best guess, so test PSNR compares like for like with ae.py's deterministic code.
        mu, logvar = self.encode(images)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return self.decode(z), mu, logvar


# ----------------------------------------------------------------------------- loss
def vae_loss(recon, images, mu, logvar, beta=1.0, edge_weight=1.0):
    """reconstruction + beta x KL per image (at beta 1 the negative ELBO), averaged over the batch:
    {"loss", "reconstruction", "kl", "variance"}.

    Both terms are sums per image (over its pixels, over its latent dimensions), so they are on
    the same scale and beta means what it says; then each is averaged over the batch.
    """
    # The decoder says how likely the photo is: p(x|z) = N(x; x_hat, Sigma), one Gaussian over its D values.
    # With e = x - x_hat and g = e's differences to the pixel on the left and the one above (each channel;
    # the grid wraps round, so that every pixel has both), e^T Sigma^-1 e = (sum e^2 + lambda sum g^2) / sigma^2:
    # Sigma^-1 = (I + lambda L) / sigma^2, L the grid's Laplacian; log det Sigma = D log sigma^2 - log det(I + lambda L)
    # reconstruction = -log p(x|z) = e^T Sigma^-1 e / 2 + D/2 log(2 pi) + 1/2 log det Sigma
    #                = (sum e^2 + lambda sum g^2) / (2 sigma^2) + D/2 log(2 pi sigma^2) - 1/2 log det(I + lambda L)
    # sigma^2 makes the photos most likely at the batch's mean of the first sum a value (Rybkin et al. 2021,
    # "Simple and Effective VAE Training with Calibrated Decoders"), a constant for the step.
    error = recon - images

    def squares(values):  # (B, 3, S, S) -> (B,): the sum of squares per image
        return values.square().flatten(1).sum(dim=1)

    weighted_error = squares(error) + edge_weight * (squares(error - error.roll(1, dims=-1))
                                                     + squares(error - error.roll(1, dims=-2)))  # (B,)
    pixels = images[0].numel()  # D
    variance = (weighted_error.mean() / pixels).detach().clamp_min(1e-6)
    reconstruction = (weighted_error / (2 * variance) + pixels / 2 * torch.log(2 * math.pi * variance)
                      - log_det_edges(images.shape[1:], edge_weight) / 2).mean()
    # KL(N(mu, s^2) || N(0, 1)) = -1/2 * sum_latent (1 + log s^2 - mu^2 - s^2), with logvar = log s^2
    # (Kingma & Welling 2014, appendix B); it is >= 0 and 0 only when mu = 0 and s = 1.
    kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(dim=1)).mean()
    return {"loss": reconstruction + beta * kl, "reconstruction": reconstruction, "kl": kl, "variance": variance}


def log_det_edges(shape, edge_weight):
    """log det(I + lambda L) for photos of shape (C, H, W). A wrap-round difference is a convolution, so
    the Fourier basis diagonalises L: frequency (f_y, f_x) = (k / H, l / W) has the eigenvalue
    4 sin^2(pi f_y) + 4 sin^2(pi f_x), 0 for an even error, 8 for a checkerboard; the log-determinant
    is C times the sum over the H x W frequencies of log(1 + lambda x that eigenvalue)."""
    channels, height, width = shape
    f_y, f_x = torch.arange(height) / height, torch.arange(width) / width
    eigenvalues = 4 * torch.sin(math.pi * f_y)[:, None] ** 2 + 4 * torch.sin(math.pi * f_x)[None, :] ** 2  # (H, W)
    return channels * torch.log1p(edge_weight * eigenvalues).sum()


def psnr(recon, images):
    """Peak signal-to-noise ratio in dB per image, for images in [0, 1]: 10 * log10(1 / MSE)."""
    mse = ((recon - images) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


# ----------------------------------------------------------------------------- training
def run_epoch(model, images, args, optimizer=None, generator=None, schedule=None):
    """One pass over `images` in batches; trains when given an optimizer (and steps its learning-rate
    schedule after each batch). Returns the mean per image of each term of the loss, and "psnr"."""
    training = optimizer is not None
    model.train(training)
    order = torch.randperm(len(images), generator=generator) if training else torch.arange(len(images))
    sums = 0
    for start in range(0, len(images), args.batch_size):
        # The photos are kept as bytes, a quarter of float32's memory: a batch becomes floats in [0, 1] here.
        batch = images[order[start:start + args.batch_size]].float() / 255
        # channels_last: each pixel's 3 colours side by side in memory, as the CPU's convolutions read them
        batch = batch.to(args.device, memory_format=torch.channels_last)
        with torch.set_grad_enabled(training), torch.autocast(args.device.type, torch.bfloat16, enabled=args.bf16):
            recon, mu, logvar = model(batch)
        losses = vae_loss(recon.float(), batch, mu.float(), logvar.float(), args.beta, args.edge_weight)
        if training:
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
            schedule.step()
        # Each batch's means are weighted by its size, so a smaller last batch counts for what it holds.
        sums += torch.stack([*losses.values(), psnr(recon.float(), batch).mean()]).detach().cpu() * len(batch)
    return dict(zip([*losses, "psnr"], (sums / len(images)).tolist()))


def train_model(model, train_images, train_kinds, test_images, history, samples_by_epoch, state, args):
    """--epochs passes over the training photos, each followed by a test pass and a checkpoint (goes on
    from `state` with --resume). Returns fit_code_distribution of the final model's codes."""
    # fused: one kernel updates every weight at once, less time per step on a CPU.
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=ADAM_BETAS, fused=True)
    # One cycle, stepped after each batch: the learning rate climbs from lr/25 to --lr over the
    # first WARMUP of the steps, then falls to ~0 along a cosine, while Adam's momentum goes
    # 0.95 -> 0.85 -> 0.95. The climb lets the peak be twice what a plain cosine tolerates.
    schedule = one_cycle(optimizer, args.lr, args.epochs * math.ceil(len(train_images) / args.batch_size), WARMUP)
    generator = torch.Generator().manual_seed(args.seed)
    colour = average_colour(train_images)  # (3,)
    if args.resume:
        resume_training(state, optimizer, schedule, generator, args)
    else:  # The decoder starts out drawing the photos' average colour, not the sigmoid's grey 0.5: most
        # pixels are white background, which would take the first steps alone (clamped: white's logit is inf).
        with torch.no_grad():
            model.decoder[-2].bias.copy_(torch.logit(colour).clamp(-5, 5))
    # Past this test loss the run has diverged (check_epoch stops it): a flat picture of that colour with
    # twice its error, and a code that says nothing (mu = 0, log s^2 = 0: a KL of 0).
    zero = torch.zeros(1, args.latent_dim)
    limit = divergence_limit(lambda recon, photos: vae_loss(recon, photos, zero, zero,
                                                            edge_weight=args.edge_weight)["loss"], colour, test_images)
    started, first, code_distribution = time.time(), len(history) + 1, None
    with stop_cleanly(args):
        for epoch in range(first, args.epochs + 1):
            tick = time.time()
            train = run_epoch(model, train_images, args, optimizer, generator, schedule)
            test = run_epoch(model, test_images, args)
            row = check_epoch(epoch, train, test, time.time() - tick, len(train_images), args, limit)
            if epoch in SNAPSHOTS or epoch == args.epochs:  # training at work: where the codes are now
                fitted = fit_code_distribution(encode_all(model, train_images, args), train_kinds)
                samples_by_epoch.append((epoch, decode_samples(model, fitted["kinds"], 10, args.seed + 1, args)))
            if epoch == args.epochs:  # the model is final: keep the fit, for sampling
                code_distribution = fitted
            end_epoch(SCRIPT, model, history, row, args, optimizer, schedule, generator,
                      code_distribution=code_distribution, samples_by_epoch=samples_by_epoch)
            log_epoch(row, args, started, first)
    return code_distribution


@torch.no_grad()
def encode_all(model, images, args):
    """Latent codes of a set of photos (uint8), in batches: (N, latent). A VAE's code is its mean mu."""
    batches = (batch.to(args.device, memory_format=torch.channels_last) for batch in images.split(args.batch_size))
    return torch.cat([model.eval().encode(batch.float() / 255)[0] for batch in batches]).float().cpu()


@torch.no_grad()
def decode_all(model, z, args):
    """Images (N, 3, S, S) in [0, 1] decoded from codes (N, latent), on the CPU."""
    return model.eval().decode(z.to(args.device)).float().cpu()


# ----------------------------------------------------------------------------- sampling
def decode_prior(model, count, seed, args):
    """`count` new products the textbook way: z ~ N(0, I), the prior the KL pulls codes towards, decoded."""
    return decode_all(model, torch.randn(count, args.latent_dim, generator=torch.Generator().manual_seed(seed)), args)


def active_units(codes, threshold=ACTIVE):
    """How many of the code's numbers carry anything (Burda et al. 2016): a dimension is active when
    its mean code mu varies across photos, Var_x(mu_u) > 0.01. The KL pulls every dimension to the
    prior; one the decoder has no use for goes all the way, to mu = 0 for every photo."""
    return int((codes.var(0, correction=0) > threshold).sum())


def fit_gaussian(codes, ridge=RIDGE):
    """The mean and full covariance of a set of codes (N, latent); the ridge keeps it positive definite."""
    covariance = torch.cov(codes.T) if len(codes) > 1 else torch.zeros(codes.shape[1], codes.shape[1])
    return {"mean": codes.mean(0), "covariance": covariance + ridge * torch.eye(codes.shape[1]), "weight": 1.0}


def fit_code_distribution(codes, kinds):
    """A Gaussian fitted to all the training codes (Ghosh et al. 2019, "From Variational to Deterministic
    Autoencoders"), and one to the codes of each kind of product: the codes are a cluster per kind,
    not one blob, and a mixture of one Gaussian per kind, weighted by its share, fits them better. A
    full covariance needs as many photos as the code has numbers: a kind of n < latent photos keeps
    n / latent of its own and borrows the rest from how codes spread around their own kind's mean."""
    everything, per_kind = fit_gaussian(codes), {}
    groups = {kind: codes[[i for i, label in enumerate(kinds) if label == kind]] for kind in sorted(set(kinds))}
    spread = sum((m - m.mean(0)).T @ (m - m.mean(0)) for m in groups.values())  # (latent, latent)
    within = spread / max(1, len(codes) - len(groups)) + RIDGE * torch.eye(codes.shape[1])
    for kind, members in groups.items():
        own, share = fit_gaussian(members), min(1.0, len(members) / codes.shape[1])
        per_kind[kind] = {"mean": own["mean"], "weight": len(members) / len(codes),
                          "covariance": share * own["covariance"] + (1 - share) * within}
    return {"all": {"all": everything}, "kinds": per_kind}  # each a mixture {name: Gaussian} for sample_codes


def one_kind(code_distribution, kind):
    """The Gaussian a kind's new products are drawn from (a mixture of one): its own, moved away from
    the mean of all codes by GUIDANCE times its distance from it. The decoder's blur makes products
    look less of their kind than photos (a blurred sports shoe passes for a casual one); as in
    classifier-free guidance, drawing what sets the kind apart more strongly makes up for it."""
    own, centre = code_distribution["kinds"][kind], code_distribution["all"]["all"]["mean"]
    return {kind: {**own, "mean": own["mean"] + GUIDANCE * (own["mean"] - centre)}}


def square_root(covariance):
    """L with L L^T = covariance: Cholesky's, or where rounding left it not quite positive definite (a
    run that blew up, whose codes' spread swallows the ridge), the symmetric root without its negatives."""
    root, failed = torch.linalg.cholesky_ex(covariance)
    if not failed:
        return root
    values, vectors = torch.linalg.eigh(covariance.double())
    return (vectors * values.clamp_min(0).sqrt()).to(covariance.dtype)


def sample_codes(mixture, count, generator):
    """`count` codes from a mixture of Gaussians ({name: {mean, covariance, weight}}): each code's
    Gaussian drawn by weight, then z = mean + L eps, eps ~ N(0, I), with L L^T = covariance."""
    names = list(mixture)
    picks = torch.multinomial(torch.tensor([mixture[name]["weight"] for name in names]), count, True,
                              generator=generator)
    eps = torch.randn(count, len(mixture[names[0]]["mean"]), generator=generator)
    z = torch.empty_like(eps)
    for index, name in enumerate(names):
        chosen = picks == index
        z[chosen] = mixture[name]["mean"] + eps[chosen] @ square_root(mixture[name]["covariance"]).T
    return z


def decode_samples(model, mixture, count, seed, args):
    """`count` new products: codes drawn from `mixture` with a seeded generator, decoded."""
    return decode_all(model, sample_codes(mixture, count, torch.Generator().manual_seed(seed)), args)


def write_samples(model, code_distribution, count, args):
    """`count` new products as PNG files in OUT/samples/: of --product-type, or of every type."""
    mixture = shop.chosen_mixture(code_distribution, args.product_type, one_kind)  # {type: its Gaussian}
    save_images(decode_samples(model, mixture, count, args.seed + 2, args), args.out / "samples", args.product_type)


# ============================================================================= the lesson ends here
# What follows draws the figures, runs the shop's tools and keeps the run's books.
@torch.no_grad()
def make_figures(model, catalogue, history, code_distribution, samples_by_epoch, args):
    """Every figure of a trained model. Returns its active units, counted on the test photos' codes."""
    tag = " [SYNTHETIC catalogue]" if catalogue.synthetic else ""  # so no one mistakes it for real results
    encode, decode = partial(encode_all, model, args=args), partial(decode_all, model, args=args)
    codes = encode(catalogue.images)  # (N, latent): every product's mean code mu
    active = active_units(codes[catalogue.test_index])
    rows, labels = shop.sample_rows(lambda mixture: decode_samples(model, mixture, 10, args.seed, args),
                                    code_distribution, one_kind)
    prior = decode_prior(model, 10, args.seed, args)  # the textbook's way first, then the fitted Gaussians
    save_grid([prior, *rows], ["prior N(0, I)", *labels], "New products from the prior, a Gaussian fitted to the "
              "codes, one Gaussian per type, and the commonest types set apart" + tag, args.out / "samples.png")
    plot_curves(history, {"loss": ("negative ELBO" if args.beta == 1 else f"rec + {args.beta:g} x KL") + " per image",
                          "reconstruction": "reconstruction per image", "kl": "KL per image (rises, then settles)",
                          "variance": "decoder sigma^2 (an even error)"}, args.out / "loss_curves.png",
                log=("variance",))
    draw_code_space("VAE", codes, decode, catalogue, active, ACTIVE, tag, args.out, prior=True)
    shop.draw_figures(samples_by_epoch, "VAE", encode, decode, codes, catalogue, tag, args)
    return active


@ends_cleanly  # Ctrl-C anywhere ends in one line, and the --out it held is let go
def main(argv=None):
    args = parse_args(argv)
    tool = args.query is not None or args.duplicates is not None
    checkpoint, state = start_run(SCRIPT, args, vars(parse_args([])), MODEL_FLAGS,
                                  load=args.figures_only or args.resume or tool)
    model = VAE(args.image_size, args.latent_dim).to(args.device, memory_format=torch.channels_last)
    history, code_distribution, samples_by_epoch = restore(model, state, checkpoint)  # from the checkpoint, if any
    if args.figures_only and args.num_samples:  # the checkpoint is all that sampling needs: no photos, no figures
        return write_samples(model, code_distribution, args.num_samples, args)
    catalogue = load_catalogue(args.data, args.image_size)
    train_images, test_images = catalogue.images[catalogue.train_index], catalogue.images[catalogue.test_index]
    train_kinds = product_kinds(catalogue, catalogue.train_index)
    prepare_out(args, catalogue, state)
    if tool:
        return shop.run_tools(partial(encode_all, model, args=args), partial(decode_all, model, args=args), catalogue,
                              checkpoint, args)
    if not args.figures_only:
        code_distribution = train_model(model, train_images, train_kinds, test_images, history, samples_by_epoch,
                                        state, args)
    if code_distribution is None or "kinds" not in code_distribution:  # stopped early, or an older model.pt
        code_distribution = fit_code_distribution(encode_all(model, train_images, args), train_kinds)
    active = make_figures(model, catalogue, history, code_distribution, samples_by_epoch, args)
    if args.num_samples:
        write_samples(model, code_distribution, args.num_samples, args)
    final = run_epoch(model, test_images, args)
    rec, kl = final["reconstruction"], final["kl"]  # the negative ELBO is rec + kl; the loss weighs kl by --beta
    print(f"test (z = mu): negative ELBO {rec + kl:.1f} = reconstruction {rec:.1f} + KL {kl:.1f}"
          + (f" (the loss: {rec:.1f} + {args.beta:g} x {kl:.1f} = {final['loss']:.1f})" if args.beta != 1 else "")
          + f", PSNR {final['psnr']:.2f} dB, {active} of {args.latent_dim} code dimensions active; figures in "
          f"{args.out}/" + (" (a SYNTHETIC catalogue: not real results)" if catalogue.synthetic else ""))


if __name__ == "__main__":
    main()
