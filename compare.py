"""The three autoencoders and two baselines on the same axes, on the same test photos.

After `python ae.py`, `python dae.py` and `python vae.py`, this loads the three models and puts
them next to two baselines that need no training (the raw pixels, and PCA with as many components
as the AE's code) on four axes:

    reconstruction   test PSNR from clean photos, and from photos with gaussian noise 0.1
    representation   code size; precision@5 by ProductType and Colour (cosine of codes, the test
                     products as queries against the training products); a linear probe's test
                     accuracy for ProductType and Category
    generation       1,000 codes drawn as the scripts draw them (a mixture of one Gaussian per
                     ProductType, fitted to the training codes), from one Gaussian fitted to them
                     all, and for the VAE from its prior N(0, I); decoded, and scored by two Frechet
                     distances to the training photos: in the features of a small classifier that
                     this script trains on the training photos' ProductType ("classifier FD", the
                     idea of FID), and on the principal components of 16x16 thumbnails ("pixel FD");
                     and samples of one type (TYPES, drawn as the scripts' one_kind draws them), how
                     often the classifier calls them that type
                     (and its reconstructions of the test photos of that type: what blur alone costs);
                     and the samples' sharpness: their edge energy over the training photos' (1: as sharp)
    cost             seconds per training epoch (median) and parameters, from each checkpoint

Run:    python compare.py                        (after the default runs; a model not trained is left out)
Writes: out/compare/ - table.md (the table it prints), summary.json, same_products.png (the same
        8 test products from each model: model outputs only), classifier.pt (cached, seeded)
"""

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import ImageFilter
from torch import nn

import ae
import classical
import dae
import shop
import vae
from bookkeeping import ends_cleanly, load_weights, one_cycle, read_checkpoint, written_whole
from common import REPO, load_catalogue, product_kinds, select_device
from figures import save_grid

SCRIPTS = {"ae": ae.Autoencoder, "dae": dae.DenoisingAutoencoder, "vae": vae.VAE}  # name: its model
TYPES = ("Tshirts", "Sports Shoes")  # the product types whose samples are checked by the classifier


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name in SCRIPTS:
        parser.add_argument(f"--{name}", type=Path, default=None, help=f"the checkpoint {name}.py wrote; if not "
                            f"given, out/{name}/model.pt, and the table leaves {name} out when there is none")
    parser.add_argument("--data", default=None, help="folder of photos, or 'synthetic' for the drawn catalogue; "
                                                        "if not given, the repo's data/")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "compare", help="where the table and figure go")
    parser.add_argument("--samples", type=int, default=1000, help="generated images per model")
    parser.add_argument("--noise", type=float, default=0.1, help="standard deviation of the gaussian noise")
    parser.add_argument("--classifier-epochs", type=int, default=15, help="training of the FD classifier")
    parser.add_argument("--seed", type=int, default=0, help="seeds the noise, the samples and the classifier")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps; if not given, the best available")
    args = parser.parse_args(argv)
    if args.samples < 2 or args.classifier_epochs < 1:
        parser.error("--samples must be at least 2 and --classifier-epochs at least 1")
    return args


# ----------------------------------------------------------------------------- the models, each as three functions
def load_model(name, path, device):
    """The model a script saved, rebuilt from the flags in its checkpoint."""
    state = read_checkpoint(path, f"{name}.py", f"--{name}")
    model = SCRIPTS[name](state["args"]["image_size"], state["args"]["latent_dim"])
    load_weights(model, state, path)
    return model.to(device).eval(), state


def in_batches(function, images, device, size=256):
    with torch.no_grad():
        return torch.cat([function(batch.to(device)).float().cpu() for batch in images.split(size)])


def model_functions(name, model, device):
    """encode: photos -> codes (N, D); reconstruct: photos -> photos; decode: codes -> photos, or
    None where a code alone cannot be decoded (the DAE's decoder needs a photo's skip features)."""
    if name == "ae":
        encode, reconstruct = model.encode, model
    elif name == "vae":
        encode, reconstruct = (lambda x: model.encode(x)[0]), (lambda x: model(x)[0])
    else:  # the DAE's code is a grid of S/4 x S/4; averaged to 4x4 it says what is in a photo more than where.
        # It is told each photo's noise level as a user's photo would be: estimated from the photo alone.
        encode = (lambda x: nn.functional.adaptive_avg_pool2d(model.encode(x, classical.estimate_noise_level(x)), 4)
                  .flatten(1))
        reconstruct = (lambda x: model(x, classical.estimate_noise_level(x)))
    decode = None if name == "dae" else model.decode
    return ({"encode": lambda images: in_batches(encode, images, device),
             "reconstruct": lambda images: in_batches(reconstruct, images, device).clamp(0, 1),
             "decode": decode and (lambda codes: in_batches(decode, codes, device))})


def pca_functions(train_images, components):
    """PCA by hand on the training pixels: the best linear code of `components` numbers."""
    centred = train_images.flatten(1).double()
    mean = centred.mean(0)
    centred -= mean
    # The principal directions from the N x N matrix of the photos' dot products (an eigen-decomposition
    # of 2,615 x 2,615, not an SVD of 2,615 x 12,288): direction = centred^T u / sqrt(eigenvalue).
    values, vectors = torch.linalg.eigh(centred @ centred.T)
    values, vectors = values.flip(0)[:components], vectors.flip(1)[:, :components]
    directions = ((centred.T @ vectors) / values.clamp_min(1e-12).sqrt()).T  # (components, pixels)
    shape = train_images.shape[1:]

    def decode(codes):
        return (codes.double() @ directions + mean).float().view(-1, *shape).clamp(0, 1)

    def encode(images):
        return ((images.flatten(1).double() - mean) @ directions.T).float()

    return {"encode": encode, "reconstruct": lambda images: decode(encode(images)), "decode": decode}


# ----------------------------------------------------------------------------- measures
def psnr(outputs, images):
    mse = ((outputs - images) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()


def precision_at_5(codes, catalogue, column):
    """Share of the 5 training products nearest to each test product (cosine of codes, distinct
    products: a photo listed twice counts once) with its label."""
    train, test = catalogue.train_index, catalogue.test_index
    groups = catalogue.groups[train]
    neighbours = train[shop.search(codes[test], shop.unit(codes[train]), min(5, len(groups.unique())), groups)]
    labels = catalogue.metadata[column].tolist()
    return shop.precision_at_k([labels[i] for i in test.tolist()], labels, neighbours)


def linear_probe(train_codes, train_labels, test_codes, test_labels, steps=300):
    """Test accuracy of a logistic regression trained on the training codes: how much of a label a
    straight line can read off the code. Codes are standardised so every dimension counts alike."""
    classes = sorted(set(train_labels))
    mean, scale = train_codes.mean(0), train_codes.std(0).clamp_min(1e-6)
    layer = nn.Linear(train_codes.shape[1], len(classes))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.01, weight_decay=1e-4)
    targets = torch.tensor([classes.index(label) for label in train_labels])
    for _ in range(steps):
        loss = nn.functional.cross_entropy(layer((train_codes - mean) / scale), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = layer((test_codes - mean) / scale).argmax(1).tolist()
    return sum(classes[p] == label for p, label in zip(predicted, test_labels)) / len(test_labels)


def frechet(a, b):
    """Frechet distance between Gaussians fitted to two sets of feature rows:
    ||m_a - m_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)."""
    a, b = a.double(), b.double()
    covariance_a, covariance_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(covariance_a)
    root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T  # S_a^1/2
    cross = torch.linalg.eigvalsh(root @ covariance_b @ root).clamp_min(0).sqrt().sum()
    return (((a.mean(0) - b.mean(0)) ** 2).sum() + covariance_a.trace() + covariance_b.trace() - 2 * cross).item()


def edge_energy(images):
    """The mean squared difference between neighbouring pixels (across and down): what blur removes."""
    return ((images.diff(dim=-1) ** 2).mean() + (images.diff(dim=-2) ** 2).mean()).item() / 2


def pixel_features(photos, components=32):
    """Images -> their coordinates on the photos' first principal components of 16x16 thumbnails."""
    reference = nn.functional.adaptive_avg_pool2d(photos, 16).flatten(1).double()
    centre = reference.mean(0)
    directions = torch.linalg.svd(reference - centre, full_matrices=False)[2][:components]
    return lambda images: (nn.functional.adaptive_avg_pool2d(images, 16).flatten(1).double() - centre) @ directions.T


class Classifier(nn.Module):
    """A small CNN that tells ProductTypes apart; its 128 pooled features are what the FD compares."""

    def __init__(self, classes):
        super().__init__()
        layers, previous = [], 3
        for width in (32, 64, 128):
            layers += [nn.Conv2d(previous, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU()]
            previous = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 128)
        self.head = nn.Linear(128, classes)

    def forward(self, images):
        return self.head(self.features(images))


def train_classifier(catalogue, args):
    """The FD's classifier, trained on the training photos' ProductType (mirrored at random), seeded,
    and cached in OUT/classifier.pt for these photos; prints its test accuracy."""
    labels = catalogue.metadata["ProductType"].tolist()
    classes = sorted(set(labels[i] for i in catalogue.train_index.tolist()))
    recipe = f"{classes} seed {args.seed}, {args.classifier_epochs} epochs, one cycle to 2e-3"  # a new one retrains
    key = hashlib.sha256(catalogue.images.numpy().tobytes() + recipe.encode()).hexdigest()
    torch.manual_seed(args.seed)  # its starting weights
    cache, model = args.out / "classifier.pt", Classifier(len(classes))
    if cache.is_file() and (saved := torch.load(cache, weights_only=True))["key"] == key:
        model.load_state_dict(saved["state_dict"])
        return model.to(args.device).eval(), classes
    model.to(args.device)
    images = catalogue.images[catalogue.train_index]
    targets = torch.tensor([classes.index(labels[i]) for i in catalogue.train_index.tolist()])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    # Annealed to zero, as the scripts' models are: at a constant rate the last step's weights are a
    # random draw among good and bad ones, and the measures would change with the starting weights.
    schedule = one_cycle(optimizer, 2e-3, args.classifier_epochs * math.ceil(len(images) / 64), 0.2)
    generator, tick = torch.Generator().manual_seed(args.seed), time.time()
    for _ in range(args.classifier_epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            batch, target = images[order[start:start + 64]], targets[order[start:start + 64]]
            mirrored = torch.rand(len(batch), generator=generator) < 0.5
            batch = torch.where(mirrored.view(-1, 1, 1, 1), batch.flip(3), batch)
            loss = nn.functional.cross_entropy(model(batch.to(args.device)), target.to(args.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    test_labels = [labels[i] for i in catalogue.test_index.tolist()]
    predicted = in_batches(model, catalogue.images[catalogue.test_index], args.device).argmax(1).tolist()
    accuracy = np.mean([classes[p] == label for p, label in zip(predicted, test_labels)])
    print(f"FD classifier: {len(classes)} ProductTypes, test accuracy {accuracy:.3f} ({time.time() - tick:.0f} s)")
    with written_whole(cache) as temporary:
        torch.save({"key": key, "state_dict": model.state_dict()}, temporary)
    print(f"wrote {cache} (used again while the photos and its recipe stay the same)")
    return model, classes


# ----------------------------------------------------------------------------- the table
def measure(name, functions, catalogue, features, classify, args):
    """One row of the table: every measure of one model or baseline."""
    torch.manual_seed(args.seed)  # the probes' starting weights: the same whether the classifier was cached or not
    images, metadata, train, test = catalogue.images, catalogue.metadata, catalogue.train_index, catalogue.test_index
    noisy = dae.add_noise(images[test], "gaussian", args.noise, torch.Generator().manual_seed(args.seed))
    codes = functions["encode"](images)
    row = {"model": name, "code_size": codes.shape[1]}
    # The probe reads the raw pixels as 16x16 thumbnails: 12,288 inputs for 2,615 photos only overfit, slowly.
    probe_codes = codes if functions["reconstruct"] else nn.functional.adaptive_avg_pool2d(images, 16).flatten(1)
    if functions["reconstruct"] is None:  # the raw pixels are their own reconstruction
        row.update(psnr_clean=None, psnr_noisy=psnr(noisy, images[test]))
    else:
        row.update(psnr_clean=psnr(functions["reconstruct"](images[test]), images[test]),
                   psnr_noisy=psnr(functions["reconstruct"](noisy), images[test]))
    for column in ("ProductType", "Colour"):
        labelled = (metadata[column] != "").any()
        row[f"precision@5_{column}"] = precision_at_5(codes, catalogue, column) if labelled else None
    for column in ("ProductType", "Category"):
        labels, labelled = metadata[column].tolist(), (metadata[column] != "").any()
        train_labels, test_labels = [labels[i] for i in train.tolist()], [labels[i] for i in test.tolist()]
        row[f"probe_{column}"] = None if not labelled else linear_probe(probe_codes[train], train_labels,
                                                                        probe_codes[test], test_labels)
    if functions["decode"] is None:
        return row
    kinds = product_kinds(catalogue)
    fitted = ae.fit_code_distribution(codes[train], [kinds[i] for i in train.tolist()])  # as the scripts fit
    mixtures = {"mixture": fitted["kinds"], "one": fitted["all"]}
    draws = {kind: ae.sample_codes(mixture, args.samples, torch.Generator().manual_seed(args.seed))
             for kind, mixture in mixtures.items()}
    if name.startswith("vae"):
        draws["prior"] = torch.randn(args.samples, codes.shape[1], generator=torch.Generator().manual_seed(args.seed))
    for kind, z in draws.items():
        samples = functions["decode"](z)
        row[f"classifier_fd_{kind}"] = frechet(features["classifier"](samples), features["classifier_train"])
        row[f"pixel_fd_{kind}"] = frechet(features["pixels"](samples), features["pixels_train"])
        row[f"sharpness_{kind}"] = edge_energy(samples) / edge_energy(images[train])
    for kind in TYPES:  # new products of one type: does the classifier see that type?
        if kind in fitted["kinds"]:
            z = ae.sample_codes(ae.one_kind(fitted, kind), 200, torch.Generator().manual_seed(args.seed))
            row[f"recognised_{kind}"] = sum(label == kind for label in classify(functions["decode"](z))) / 200
            # The same question of its reconstructions of real test photos of that type: what blur alone costs.
            real = [i for i in test.tolist() if metadata.at[i, "ProductType"] == kind]
            row[f"recognised_{kind}_reconstructed"] = None if not real else float(np.mean(
                [label == kind for label in classify(functions["reconstruct"](images[real]))]))
    return row


def cell(value, digits=3):
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def markdown_table(rows):
    lines = ["| | clean PSNR (dB) | PSNR, noise 0.1 in | code size | precision@5 type / colour | "
             "probe type / category | classifier FD: mixture / one Gaussian | pixel FD: mixture / one | "
             "sharpness: mixture | s/epoch | parameters |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        classifier_fd, pixel_fd = (" / ".join(cell(row.get(f"{measure}_{kind}"), digits) for kind in ("mixture", "one"))
                                   + (f" (prior {row[f'{measure}_prior']:,.{digits}f})" if f"{measure}_prior" in row
                                      else "") for measure, digits in (("classifier_fd", 1), ("pixel_fd", 2)))
        lines.append(f"| {row['model']} | {cell(row['psnr_clean'], 2)} | {cell(row['psnr_noisy'], 2)} | "
                     f"{cell(row['code_size'])} | {cell(row['precision@5_ProductType'])} / "
                     f"{cell(row['precision@5_Colour'])} | {cell(row['probe_ProductType'])} / "
                     f"{cell(row['probe_Category'])} | {classifier_fd} | {pixel_fd} | "
                     f"{cell(row.get('sharpness_mixture'), 2)} | "
                     f"{cell(row.get('seconds_per_epoch'), 2)} | {cell(row.get('parameters'))} |")
    return "\n".join(lines)


@ends_cleanly  # Ctrl-C anywhere ends in one line, every file it wrote whole
def main(argv=None):
    args = parse_args(argv)
    args.device = select_device(args.device)
    torch.set_flush_denormal(True)
    paths = {name: getattr(args, name) or REPO / "out" / name / "model.pt" for name in SCRIPTS}
    missing = [name for name, path in paths.items() if getattr(args, name) is None and not path.is_file()]
    if len(missing) == len(SCRIPTS):
        raise SystemExit(f"error: no model to compare in {REPO / 'out'}/ae, dae or vae: train one (python vae.py), "
                         f"or name one with --ae, --dae or --vae")
    for name in missing:
        print(f"note: {paths[name]} does not exist, so {name} is left out (python {name}.py trains it)")
    loaded = {name: load_model(name, path, args.device) for name, path in paths.items() if name not in missing}
    sizes = {name: state["args"]["image_size"] for name, (_, state) in loaded.items()}
    if len(set(sizes.values())) > 1:
        raise SystemExit("error: the models were trained at different --image-size: " +
                         ", ".join(f"{name} {size}" for name, size in sizes.items()))
    catalogue = load_catalogue(args.data, next(iter(sizes.values())))
    catalogue.images = catalogue.images.float() / 255  # every measure here works on floats in [0, 1]
    args.out.mkdir(parents=True, exist_ok=True)
    train_images = catalogue.images[catalogue.train_index]
    classifier, classes = train_classifier(catalogue, args)
    to_pixels = pixel_features(train_images)
    features = {"classifier": lambda images: in_batches(classifier.features, images, args.device),
                "pixels": to_pixels, "pixels_train": to_pixels(train_images)}
    features["classifier_train"] = features["classifier"](train_images)

    def classify(images):
        return [classes[i] for i in in_batches(classifier, images, args.device).argmax(1).tolist()]

    candidates = {f"{name}.py": model_functions(name, model, args.device) for name, (model, _) in loaded.items()}
    candidates["raw pixels"] = {"encode": lambda images: (1 - images).flatten(1), "reconstruct": None, "decode": None}
    # PCA with as many numbers as the AE's code (else the VAE's): the best linear code of that size.
    sized_by = next(name for name in ("ae", "vae", "dae") if name in loaded)
    components = loaded[sized_by][1]["args"]["latent_dim"]
    candidates[f"PCA, {components} components"] = pca_functions(train_images, components)
    rows, outputs = [], {}
    for name, functions in candidates.items():
        row = measure(name, functions, catalogue, features, classify, args)
        script = name.split(".")[0]
        if script in loaded:  # what training cost, read from the checkpoint
            model, state = loaded[script]
            row["seconds_per_epoch"] = float(np.median([h["seconds"] for h in state["history"]]))
            row["parameters"] = sum(p.numel() for p in model.parameters())
        if functions["reconstruct"] is not None:
            shown = catalogue.test_index[torch.linspace(0, len(catalogue.test_index) - 1, 8).long()]
            outputs[name] = functions["reconstruct"](catalogue.images[shown])
        rows.append(row)
        print(f"measured {name}", flush=True)
    # Two yardsticks for the distances: the test photos (as good as samples can be), and the training
    # photos themselves blurred by one pixel (what a distance says of sharpness alone).
    test_photos = catalogue.images[catalogue.test_index]
    blurred = classical.pillow_filter(train_images, ImageFilter.GaussianBlur(1))
    floor = {"classifier_fd": frechet(features["classifier"](test_photos), features["classifier_train"]),
             "pixel_fd": frechet(to_pixels(test_photos), features["pixels_train"]),
             "classifier_fd_blurred": frechet(features["classifier"](blurred), features["classifier_train"]),
             "pixel_fd_blurred": frechet(to_pixels(blurred), features["pixels_train"]),
             "sharpness": edge_energy(test_photos) / edge_energy(train_images),
             "sharpness_blurred": edge_energy(blurred) / edge_energy(train_images)}
    table = markdown_table(rows)
    recognised = "; ".join(f"{row['model']} " + ", ".join(f"{kind} {row[f'recognised_{kind}']:.2f} (reconstructions "
                                                          f"{cell(row[f'recognised_{kind}_reconstructed'], 2)})"
                                                          for kind in TYPES if f"recognised_{kind}" in row)
                           for row in rows if any(f"recognised_{kind}" in row for kind in TYPES))
    note = (f"FD of the {len(test_photos)} test photos against the training photos: classifier "
            f"{floor['classifier_fd']:.1f}, pixel {floor['pixel_fd']:.2f}; of the training photos blurred by 1 px: "
            f"{floor['classifier_fd_blurred']:.1f}, {floor['pixel_fd_blurred']:.2f}. Sharpness of the test photos "
            f"{floor['sharpness']:.2f}, of the blurred ones {floor['sharpness_blurred']:.2f}. "
            f"Samples of one type that the classifier calls that type (and reconstructions of the test photos of "
            f"that type): {recognised}")
    print(table + "\n" + note)
    summary = json.dumps({"rows": rows, "floor": floor}, indent=1)
    for name, text in (("table.md", table + "\n\n" + note + "\n"), ("summary.json", summary)):
        with written_whole(args.out / name) as temporary:
            Path(temporary).write_text(text)
    tag = " [SYNTHETIC catalogue]" if catalogue.synthetic else ""
    save_grid(list(outputs.values()), [name.replace(".py", "").upper() if ".py" in name else "PCA" for name in outputs],
              "The same 8 test products, reconstructed from clean photos" + tag, args.out / "same_products.png")
    for name in ("table.md", "summary.json", "same_products.png"):
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
