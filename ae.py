"""A convolutional autoencoder for product photos, from scratch, and "more like this" search.

An autoencoder learns to copy its input through a bottleneck. The encoder squeezes a 64x64x3
photo (12,288 numbers) into a code of 128; the decoder rebuilds the photo from the code alone:

    encoder:   image x  ->  z           (a deterministic code, --latent-dim numbers)
    decoder:   z  ->  x_hat in [0, 1]
    loss:      reconstruction = sum over pixels of (x_hat - x)^2, averaged over the batch

The code is 96x smaller than the photo, so the network cannot copy pixels: it has to learn what
products have in common (a shoe's outline, a shirt's collar, a colour) and keep only what tells
one from another. That is what makes the code useful for search: similar products get similar
codes. What limits it: a dense code is a description, not a copy. 128 numbers can say "a white
sneaker with a red sole, facing left", never where each stitch is, so the reconstruction is as
sharp as the description, and a linear projection (PCA with 128 components) is the floor it must
beat. Codes of real photos fill a small, irregular part of the space: vae.py makes that space
something to sample from.

Run:    python ae.py --epochs 50
Writes: out/ae/ - model.pt, metrics.csv, reconstructions.png, latent_map.png, loss_curves.png,
        search.png (photos), search_outputs.png (the same, as reconstructions), search.csv,
        samples.png, same_products.png, summary.json
Again:  python ae.py --figures-only   (figures and search from the saved model, no training)
Tools:  python ae.py --query PHOTO_OR_PRODUCTID   (the products most like it)
        python ae.py --duplicates                 (groups of listings that show the same product)
"""

import argparse
import csv
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import (NEAR_COPY_PSNR, REPO, connected_groups, data_folder, decode, load_catalogue, select_device,
                    thumbnails)


# ----------------------------------------------------------------------------- model
class Autoencoder(nn.Module):
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
        self.to_latent = nn.Linear(features, latent_dim)
        self.from_latent = nn.Linear(latent_dim, features)
        decoder = []
        for width in reversed(channels[:-1]):  # each block: (B, previous, s, s) -> (B, width, 2s, 2s)
            decoder += [nn.ConvTranspose2d(previous, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU()]
            previous = width
        self.decoder = nn.Sequential(*decoder, nn.ConvTranspose2d(previous, 3, 4, 2, 1), nn.Sigmoid())

    def encode(self, images):  # (B, 3, S, S)
        features = self.encoder(images)  # (B, 64 * S/8 * S/8)
        return self.to_latent(features)  # (B, latent)

    def decode(self, z):  # (B, latent)
        features = self.from_latent(z).view(-1, *self.feature_shape)  # (B, 64, S/8, S/8)
        return self.decoder(features)  # (B, 3, S, S), in [0, 1]

    def forward(self, images):
        return self.decode(self.encode(images))


# ----------------------------------------------------------------------------- loss
def reconstruction_loss(recon, images):
    """Squared error summed over the pixels of each image, then averaged over the batch."""
    # reconstruction = sum_pixels (x_hat - x)^2
    return ((recon - images) ** 2).flatten(1).sum(dim=1).mean()


def psnr(recon, images):
    """Peak signal-to-noise ratio in dB per image, for images in [0, 1]: 10 * log10(1 / MSE)."""
    mse = ((recon - images) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


# ----------------------------------------------------------------------------- training
def augment(batch, generator, shift=2):
    """The training photos as the model sees them, new at each step: each one mirrored left-right
    with probability 1/2 and moved by up to `shift` pixels each way (its edge pixels fill the gap).
    A mirrored or slightly moved product is still a product, and 2,615 photos are few for 1.1M
    weights: mirrored only, 300 epochs give 25.2 dB on the training photos and 22.0 on new ones.
    Returns a new (B, 3, S, S) tensor; `batch` is a copy and gets mirrored in place."""
    mirrored = torch.rand(len(batch), generator=generator) < 0.5
    batch[mirrored] = batch[mirrored].flip(3)
    size = batch.shape[-1]
    padded = nn.functional.pad(batch, (shift, shift, shift, shift), mode="replicate")  # (B, 3, S+2s, S+2s)
    corners = torch.randint(0, 2 * shift + 1, (len(batch), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(corners)])


def run_epoch(model, images, args, optimizer=None, generator=None, schedule=None):
    """One pass over `images` in batches; trains when given an optimizer (and steps its learning-rate
    schedule after each batch). Returns the mean reconstruction loss and PSNR per image:
    {"loss": ..., "psnr": ...}."""
    training = optimizer is not None
    model.train(training)
    order = torch.randperm(len(images), generator=generator) if training else torch.arange(len(images))
    sums = torch.zeros(2)
    for start in range(0, len(images), args.batch_size):
        batch = images[order[start:start + args.batch_size]]
        if training:
            batch = augment(batch, generator)
        # channels_last: each pixel's 3 colours side by side in memory, as the CPU's convolutions read them
        # (set here, per batch, because augment returns new tensors; vae.py stores its photos that way)
        batch = batch.to(args.device, memory_format=torch.channels_last)
        with torch.set_grad_enabled(training), torch.autocast(args.device.type, torch.bfloat16, enabled=args.bf16):
            recon = model(batch).float()
        loss = reconstruction_loss(recon, batch)
        if training:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
        # Each batch's means are weighted by its size, so a smaller last batch counts for what it holds.
        sums += torch.stack([loss, psnr(recon, batch).mean()]).detach().cpu() * len(batch)
    return dict(zip(["loss", "psnr"], (sums / len(images)).tolist()))


@torch.no_grad()
def encode_all(model, images, args):
    """Latent codes of a set of images, in batches: (N, latent)."""
    model.eval()
    batches = (images[start:start + args.batch_size] for start in range(0, len(images), args.batch_size))
    codes = [model.encode(batch.to(args.device, memory_format=torch.channels_last)) for batch in batches]
    return torch.cat(codes).float().cpu()


def save_checkpoint(path, model, optimizer, schedule, generator, history, args):
    """All that --resume needs to go on and --figures-only to redraw, random states included.
    Written to a temporary file, then renamed: a crash never leaves a broken model.pt."""
    state = {"script": "ae.py", "state_dict": model.state_dict(), "history": history,
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
        raise SystemExit(f"error: --checkpoint {path}: no such file (train first: python ae.py)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"error: --checkpoint {path}: not a readable checkpoint ({error.__class__.__name__})")
    if not isinstance(state, dict) or state.get("script") != "ae.py":
        found = state.get("script", "an unknown script") if isinstance(state, dict) else "an unknown script"
        raise SystemExit(f"error: --checkpoint {path}: saved by {found}, not by ae.py")
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


# Application, "more like this": the encoder as a search engine. The catalogue is the training
# set; each test product is a query; neighbours are ranked by cosine similarity of their vectors.
def unit(vectors):
    """Rows scaled to length 1, so that a matrix product of two sets gives their cosine similarities."""
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-8)


def cosine_similarity(queries, catalogue):
    """(N_queries, N_catalogue): the cosine of the angle between each query row and each catalogue row."""
    return unit(queries) @ unit(catalogue).T


def search(queries, index, k=5):
    """Indices (into index) of the k most similar rows for each query row, best first. The index is
    built once, with unit(), so a query costs one matrix product."""
    return (unit(queries) @ index.T).topk(k, dim=1).indices  # (N_queries, k)


def precision_at_k(query_labels, catalogue_labels, neighbours):
    """Fraction of the k neighbours that share the query's label, averaged over the queries."""
    hits = [[catalogue_labels[j] == query_labels[i] for j in row] for i, row in enumerate(neighbours.tolist())]
    return sum(map(sum, hits)) / max(1, sum(map(len, hits)))


@torch.no_grad()
def evaluate_search(model, catalogue, args):
    """Latent search against raw-pixel search: precision@5 by ProductType and Colour, size, speed.
    The index holds the training products only; the test products are the queries."""
    images, metadata = catalogue.images, catalogue.metadata
    train, test = catalogue.train_index, catalogue.test_index
    # Raw pixels count darkness (1 - pixel), so the white background is zero and does not
    # make every pair of products look alike.
    labelled = [column for column in ("ProductType", "Colour") if (metadata[column] != "").any()]
    if not labelled:
        print("note: no ProductType or Colour labels (no fashion.csv?), so no precision@5")
    to_vectors = {"latent": lambda batch: encode_all(model, batch, args),
                  "pixels": lambda batch: (1 - batch).flatten(1)}
    results = {}
    for name, to_vector in to_vectors.items():
        index = unit(to_vector(images[train]))
        k = min(5, len(train))
        neighbours = train[search(to_vector(images[test]), index, k)]  # (N_test, k) catalogue rows
        # A query as a user makes it: one photo to a vector, then the search, timed over 50 queries.
        tick = time.perf_counter()
        for i in test[:50].tolist():
            search(to_vector(images[i:i + 1]), index, k)
        milliseconds = 1000 * (time.perf_counter() - tick) / len(test[:50])
        results[name] = {"neighbours": neighbours, "index_mb": index.numel() * 4 / 1e6, "ms_per_query": milliseconds}
        for column in labelled:
            labels = metadata[column].tolist()
            results[name][f"precision@5_{column}"] = precision_at_k(
                [labels[i] for i in test.tolist()], labels, neighbours)
    ratio = images[0].numel() / args.latent_dim
    print(f"search over {len(train)} catalogue products with {len(test)} test queries "
          f"(codes are {ratio:.0f}x smaller than the pixels):")
    for name, result in results.items():
        precisions = ", ".join(f"by {column} {result[f'precision@5_{column}']:.3f}" for column in labelled)
        print(f"  {name:6s}: precision@5 {precisions or '-'} | index {result['index_mb']:.1f} MB, "
              f"{result['ms_per_query']:.2f} ms per query (encode + search)")
    with open(args.out / "search.csv", "w", newline="") as handle:
        columns = [key for key in results["latent"] if key != "neighbours"]
        writer = csv.DictWriter(handle, fieldnames=["vectors", *columns])
        writer.writeheader()
        writer.writerows({"vectors": name, **{key: result[key] for key in columns}} for name, result in results.items())
    return results


@torch.no_grad()
def make_figures(model, catalogue, history, search_results, args):
    import matplotlib.pyplot as plt

    tag = " [SYNTHETIC catalogue]" if catalogue.synthetic else ""  # so no one mistakes it for real results

    model.eval()
    out, images, metadata, test = args.out, catalogue.images, catalogue.metadata, catalogue.test_index

    def reconstruct(index):
        return model(images[index].to(args.device)).float().cpu()

    # Fixed test products, spread over the (sorted) test set: the same ones every run.
    shown = test[torch.linspace(0, len(test) - 1, 10).long()]
    show_rows([images[shown], reconstruct(shown)], ["original", "AE"], "Test products and their reconstructions" + tag,
              out / "reconstructions.png")
    # A 2-D map of the test set: the two principal directions of the codes of all products.
    codes = encode_all(model, images, args)
    centred = codes - codes.mean(0)
    _, _, directions = torch.linalg.svd(centred, full_matrices=False)  # PCA by hand
    xy = centred[test] @ directions[:2].T  # (N_test, 2)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for axis, column in zip(axes, ["Category", "Gender"]):
        for value in sorted(metadata[column].iloc[test.tolist()].unique()):
            mask = torch.tensor((metadata[column].iloc[test.tolist()] == value).values)
            axis.scatter(xy[mask, 0], xy[mask, 1], s=8, label=value or "(none)")
        axis.set(title=f"Test codes (PCA), by {column}", xlabel="PC 1", ylabel="PC 2")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "latent_map.png", dpi=100)
    plt.close(figure)
    if history:
        figure, axis = plt.subplots(figsize=(5, 3.5))
        axis.plot([h["epoch"] for h in history], [h["train_loss"] for h in history], label="train")
        axis.plot([h["epoch"] for h in history], [h["test_loss"] for h in history], label="test")
        axis.set(title="reconstruction loss per image", xlabel="epoch", yscale="log")
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / "loss_curves.png", dpi=100)
        plt.close(figure)
    # "More like this": queries of different types, each followed by its 5 nearest catalogue products.
    queries = list(dict.fromkeys(pick(metadata, test, "ProductType", t, n) for n, t in
                                 enumerate(["Tshirts", "Heels", "Sports Shoes", "Dresses", "Flip Flops", "Shorts"])))
    position = {index: row for row, index in enumerate(test.tolist())}
    found = [search_results["latent"]["neighbours"][position[q]] for q in queries]
    rows = [torch.cat([torch.tensor([q]), f]) for q, f in zip(queries, found)]
    labels = [metadata.at[q, "ProductType"] for q in queries]
    titles = ["query"] + [f"match {i}" for i in range(1, 6)]
    show_rows([images[r] for r in rows], labels, "More like this: nearest products by latent code" + tag,
              out / "search.png", titles)
    show_rows([reconstruct(r) for r in rows], labels, "More like this (shown as the AE's reconstructions)" + tag,
              out / "search_outputs.png", titles)


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
    show_rows([model(images[shown].to(args.device)).float().cpu()], ["AE"],
              "The same 8 test products, reconstructed from clean photos" + tag, args.out / "same_products.png")


# ----------------------------------------------------------------------------- tools for a shop
# Run on a trained model: "more like this" for any photo (--query) and duplicate listings
# (--duplicates). Both search the whole catalogue, training and test products alike.
def catalogue_codes(model, catalogue, checkpoint, args):
    """The code of every catalogue product, cached beside the model and rebuilt when the model
    file or the catalogue's photos change."""
    key = hashlib.sha256(checkpoint.read_bytes() + catalogue.images.numpy().tobytes()).hexdigest()
    cache = args.out / "catalogue_codes.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved["key"] == key:
            return saved["codes"]
    codes = encode_all(model, catalogue.images, args)
    torch.save({"key": key, "codes": codes}, cache.with_suffix(".tmp"))
    os.replace(cache.with_suffix(".tmp"), cache)
    return codes


def describe(metadata, row, *columns):
    return [str(metadata.at[row, column]) if column in metadata else "" for column in columns]


@torch.no_grad()
def more_like_this(model, catalogue, checkpoint, args):
    """Print and draw the --top catalogue products most like the --query photo (a file or a ProductId)."""
    images, metadata = catalogue.images, catalogue.metadata
    if Path(args.query).is_file():  # a photo of the user's, framed as the catalogue's photos are
        pixels = decode(Path(args.query), args.image_size)
        if pixels is None:
            raise SystemExit(f"error: --query {args.query}: not a readable image")
        query, name = torch.tensor(pixels).permute(2, 0, 1).float() / 255, Path(args.query).stem
    elif (metadata["ProductId"] == args.query).any():
        query, name = images[(metadata["ProductId"] == args.query).values.argmax()], args.query
    else:
        raise SystemExit(f"error: --query {args.query}: no such file, and no product with this ProductId")
    # The answer is never the query itself or a copy of it: catalogue photos near-identical to the
    # query, and every photo of their near-copy groups, are left out.
    error = ((thumbnails(query[None]) - thumbnails(images)) ** 2).mean(1)  # (N,)
    copies = torch.isin(catalogue.groups, catalogue.groups[error < 10 ** (-NEAR_COPY_PSNR / 10)])
    codes = catalogue_codes(model, catalogue, checkpoint, args)
    similarity = cosine_similarity(encode_all(model, query[None], args), codes)[0]
    similarity[copies] = -math.inf
    best = similarity.topk(min(args.top, int((~copies).sum()))).indices
    print(f"products most like {args.query} "
          f"({int(copies.sum())} catalogue photos left out: the photo itself or its copies):")
    for rank, row in enumerate(best.tolist(), 1):
        product_id, product_type, colour, title = describe(metadata, row, "ProductId", "ProductType", "Colour",
                                                           "ProductTitle")
        print(f"  {rank:2d}. {product_id:>8s}  {product_type:14s} {colour:10s} {title[:50]:50s} {similarity[row]:.3f}")
    show_rows([torch.cat([query[None], images[best]])], [name], f"More like {name}", args.out / f"query_{name}.png",
              ["query"] + [f"{similarity[row]:.3f}" for row in best.tolist()])


@torch.no_grad()
def find_duplicates(model, catalogue, checkpoint, args):
    """Groups of catalogue products whose codes are nearly identical, most similar first, as
    OUT/duplicates.csv and a figure of the top groups."""
    codes, metadata = catalogue_codes(model, catalogue, checkpoint, args), catalogue.metadata
    pairs, best = [], torch.zeros(len(codes))
    for start in range(0, len(codes), 1024):  # in blocks of rows: no N x N matrix for a big catalogue
        similarity = cosine_similarity(codes[start:start + 1024], codes)
        similarity[torch.arange(len(similarity)), torch.arange(start, start + len(similarity))] = -1  # not itself
        best[start:start + 1024] = similarity.max(1).values
        pairs += [(start + i, j) for i, j in (similarity >= args.duplicates).nonzero().tolist()]
    groups = torch.from_numpy(connected_groups(pairs, len(codes)))
    listed = [g for g in groups.unique().tolist() if (groups == g).sum() > 1]
    listed.sort(key=lambda g: -best[groups == g].max().item())
    with open(args.out / "duplicates.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "ProductId", "ProductTitle", "similarity"])
        for number, group in enumerate(listed, 1):
            for row in (groups == group).nonzero().flatten().tolist():
                writer.writerow([number, *describe(metadata, row, "ProductId", "ProductTitle"), f"{best[row]:.4f}"])
    members = [(groups == group).nonzero().flatten()[:8] for group in listed[:8]]
    print(f"{sum(map(len, [(groups == g).nonzero() for g in listed]))} products in {len(listed)} groups of "
          f"near-identical codes (cosine >= {args.duplicates}); list in {args.out / 'duplicates.csv'}")
    if members:
        show_rows([catalogue.images[m] for m in members], [f"group {n}" for n in range(1, len(members) + 1)],
                  "Duplicate listings: products whose codes are nearly identical", args.out / "duplicates.png")


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # training
    parser.add_argument("--epochs", type=int, default=50, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=48, help="images per optimisation step")
    parser.add_argument("--lr", type=float, default=4e-3, help="Adam's peak learning rate (one cycle)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, the batches and the figures")
    # model
    parser.add_argument("--latent-dim", type=int, default=128, help="size of the code z")
    parser.add_argument("--image-size", type=int, default=64, help="photos are resized to this (multiple of 16)")
    # data, device and outputs
    parser.add_argument("--data", default=None, help="folder of photos; if not given, the repo's data/ "
                                                        "(a synthetic catalogue if it holds none)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "ae", help="where figures and model.pt go")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps; if not given, the best available")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (for GPUs, CPUs with AMX)")
    # a saved run
    parser.add_argument("--figures-only", action="store_true", help="load the checkpoint, redraw, no training")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from the checkpoint")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="the model --figures-only, --resume or a tool loads; if not given, OUT/model.pt")
    # tools for a shop, on a trained model
    parser.add_argument("--query", default=None, help="a photo file or a ProductId: print the products most like it")
    parser.add_argument("--top", type=int, default=5, help="how many products --query lists")
    parser.add_argument("--duplicates", type=float, nargs="?", const=0.99, default=None, metavar="SIMILARITY",
                        help="list groups of products whose codes have at least this cosine similarity")
    args = parser.parse_args(argv)
    for flag in ("epochs", "batch_size", "latent_dim"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    if args.checkpoint and not (args.figures_only or args.resume or args.query or args.duplicates):
        parser.error("--checkpoint names the model to load with --figures-only or --resume; "
                     "training writes OUT/model.pt")
    if args.top < 1 or (args.duplicates is not None and not -1 <= args.duplicates <= 1):
        parser.error("--top must be at least 1, and --duplicates a cosine similarity between -1 and 1")
    return args


MODEL_FLAGS = ("latent_dim", "image_size")  # what the model is: always taken from a checkpoint
TRAINING_FLAGS = ("epochs", "batch_size", "lr", "seed")  # how it was trained: taken from it by --resume


def main(argv=None):
    args = parse_args(argv)
    defaults = vars(parse_args([]))  # the command that reruns this: the flags that differ from the defaults
    print("ae.py", *[f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                        for k, v in vars(args).items() if v != defaults[k] and k != "data"],
          "--data", data_folder(args.data))
    checkpoint, state = args.checkpoint or args.out / "model.pt", None
    tool = args.query is not None or args.duplicates is not None
    if args.figures_only or args.resume or tool:  # checked before the photos are loaded, so a wrong file fails at once
        state = load_checkpoint(checkpoint, args, MODEL_FLAGS + (TRAINING_FLAGS if args.resume else ()))
    torch.manual_seed(args.seed)
    # Numbers below ~1e-38 ("denormals") take a slow path in x86 CPUs, and a well-trained model's
    # gradients hold many of them; flushed to zero they change nothing visible (vae.py: ~15 % an epoch).
    torch.set_flush_denormal(True)
    args.device = select_device(args.device)
    model = Autoencoder(args.image_size, args.latent_dim).to(args.device, memory_format=torch.channels_last)
    if state:
        model.load_state_dict(state["state_dict"])
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
        if found != "ae.py":
            raise SystemExit(f"error: --out {args.out} holds a model of {found}; train ae.py into another --out "
                             f"(or delete {args.out / 'model.pt'} first)")
    args.out.mkdir(parents=True, exist_ok=True)
    if tool:
        if args.query is not None:
            more_like_this(model, catalogue, checkpoint, args)
        if args.duplicates is not None:
            find_duplicates(model, catalogue, checkpoint, args)
        return

    history = state["history"] if state else []
    if not args.figures_only:
        # Adam with a shorter memory of squared gradients (beta2 0.99, not 0.999) adapts its steps
        # faster: +0.1 to 0.2 dB here (3 seeds each). Its beta1 is set by the schedule below.
        # fused: one kernel updates every weight at once, ~10 % less time per epoch on a 2-core CPU.
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99), fused=True)
        # One cycle, stepped after each batch: the learning rate climbs from lr/25 to --lr in the first
        # 20 % of the steps, then falls to ~0 along a cosine, while Adam's momentum goes 0.95 -> 0.85 -> 0.95.
        # The climb lets the peak be twice a plain cosine's: +0.4 dB in 50 epochs (GPU sweep, 2 seeds).
        steps = math.ceil(len(train_images) / args.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, epochs=args.epochs, steps_per_epoch=steps,
                                                       pct_start=0.2)
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
                train = run_epoch(model, train_images, args, optimizer, generator, schedule)
                test = run_epoch(model, test_images, args)
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
                print(f"epoch {epoch:3d}/{args.epochs} | train {train['loss']:7.1f} | test {test['loss']:7.1f} | "
                      f"test PSNR {test['psnr']:5.2f} dB | {seconds:4.1f} s, {len(train_images) / seconds:5.0f} img/s | "
                      f"ETA {eta:3.0f} s", flush=True)
        except KeyboardInterrupt:
            raise SystemExit(f"interrupted: {args.out / 'model.pt'} holds the last finished epoch; "
                             f"add --resume to continue") from None
    search_results = evaluate_search(model, catalogue, args)
    make_figures(model, catalogue, history, search_results, args)
    # Can an autoencoder invent products? Decode codes drawn from a Gaussian fitted to the training
    # codes, exactly as vae.py samples, so the two are measured alike.
    codes = encode_all(model, catalogue.images, args)
    train_codes = codes[catalogue.train_index]
    covariance = torch.cov(train_codes.T) + 1e-3 * torch.eye(args.latent_dim)
    eps = torch.randn(1000, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        samples = model.eval().decode((train_codes.mean(0) + eps @ torch.linalg.cholesky(covariance).T).to(args.device))
    title = "Codes drawn from a Gaussian fitted to the training codes, decoded"
    show_rows(list(samples[:20].cpu().split(10)), ["fitted", "fitted"],
              title + (" [SYNTHETIC catalogue]" if catalogue.synthetic else ""), args.out / "samples.png")
    write_summary(model, catalogue, history, codes, samples.float().cpu(), args)
    final = run_epoch(model, test_images, args)
    print(f"test: reconstruction {final['loss']:.1f} per image, PSNR {final['psnr']:.2f} dB; figures in {args.out}/"
          + (" (a SYNTHETIC catalogue: not real results)" if catalogue.synthetic else ""))


if __name__ == "__main__":
    main()
