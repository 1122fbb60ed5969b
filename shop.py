"""What a shop does with a trained model: "more like this", duplicate listings, attribute edits,
cleaning its own photos.

None of this is how an autoencoder works; it is what its code is good for. ae.py and vae.py call
these on their own codes, and compare.py measures every model's codes with the same search:

    codes = encode_all(model, catalogue.images, args)     # (N, latent), one row per product
    search(codes[queries], unit(codes[catalogue]), k=5)   # the 5 products nearest to each query
"""

import csv
import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import (NEAR_COPY_PSNR, connected_groups, decode, pick, plot_latent_map, show_rows, shown_products,
                    thumbnails, to_rgb)


# ----------------------------------------------------------------------------- the figures every model draws
def sample_rows(draw, code_distribution, one_kind, rows=4):
    """Rows of new products: `draw(mixture)` from the mixture of every kind, and from each of the
    `rows` most common kinds alone (`one_kind(code_distribution, kind)`)."""
    kinds = code_distribution["kinds"]
    common_kinds = sorted(kinds, key=lambda kind: -kinds[kind]["weight"])[:rows]
    samples = [draw(mixture) for mixture in [kinds, *(one_kind(code_distribution, kind) for kind in common_kinds)]]
    return samples, ["mixture", *common_kinds]


def figures(samples_by_epoch, name, encode, decode_codes, codes, losses, catalogue, tag, args):
    """What ae.py and vae.py both show of a trained model. `encode` takes photos to codes (N, latent),
    `decode_codes` codes to images; `codes` are every product's, `losses` each test product's own."""
    images, metadata, out = catalogue.images, catalogue.metadata, args.out
    if samples_by_epoch:  # only training can draw this one: --figures-only redraws it from the checkpoint
        show_rows([s for _, s in samples_by_epoch], [f"epoch {e}" for e, _ in samples_by_epoch],
                  "The same 10 draws from the Gaussians fitted to the codes, as training goes on" + tag,
                  out / "samples_by_epoch.png")
    shown = shown_products(catalogue, 10)
    show_rows([images[shown], decode_codes(codes[shown])], ["original", name],
              "Test products and their reconstructions" + tag, out / "reconstructions.png")
    plot_latent_map(codes, catalogue, f"Test codes of the {name} (PCA)", out / "latent_map.png")
    # "More like this": the encoder as a search engine, tested with the test products as queries.
    neighbours = evaluate_search(encode, codes, catalogue, args)
    search_figures(catalogue, neighbours, lambda batch: decode_codes(encode(batch)), name, tag, out)
    rows, labels = interpolation_rows(encode, decode_codes, catalogue)
    show_rows(rows, labels, "Interpolating between two test products in latent space" + tag, out / "interpolations.png")
    # Attribute edits: add the "Black" direction to the codes of products of other colours.
    edited = [i for i in shown.tolist() if metadata.at[i, "Colour"] != "Black"][:6]
    if (metadata["Colour"] == "Black").any() and edited:
        casts = torch.cat([colour_of_products(photos, photos)[1]  # each photo's, in blocks: no float copy of all
                           for photos in (images[i:i + 1024].float() / 255 for i in range(0, len(images), 1024))])
        directions = {category: attribute_direction(codes, metadata, catalogue.train_index, "Colour", "Black", casts,
                                                    category) for category in set(metadata["Category"])}

        def edit(products, strength):  # each product's code moved along its own category's direction
            along = torch.stack([directions[metadata.at[i, "Category"]] for i in products])
            return decode_codes(codes[products] + strength * along)

        strengths = [0, 0.5, 1, 1.5]
        show_rows([edit(edited, s) for s in strengths], [f"+{s} x black" for s in strengths],
                  'Attribute edit: adding the "Black" direction' + tag, out / "attribute_edit.png")
        # Does it darken without a colour cast? Measured on the test products that are not black (at
        # most 1,000 of them, spread over the test set: a larger catalogue's figures stay cheap).
        measured = shown_products(catalogue, min(1000, len(catalogue.test_index))).tolist()
        others = [i for i in measured if metadata.at[i, "Colour"] != "Black"]
        (light, cast), (dark, dark_cast) = (colour_of_products(edit(others, s), images[others].float() / 255)
                                            for s in (0, 1.5))
        black = [i for i in measured if metadata.at[i, "Colour"] == "Black"]
        print(f"attribute edit, +1.5 x black on the {len(others)} test products of other colours: luminance "
              f"{light.mean():.2f} -> {dark.mean():.2f}, (G + B) / 2 - R {cast.mean():+.3f} -> {dark_cast.mean():+.3f}, "
              f"a shift of {(dark_cast - cast).mean():+.3f} (the black test products' photos: {casts[black].mean():+.3f})")
    # Catalogue QA: the test products the model finds hardest, by their own loss.
    order = catalogue.test_index[losses.argsort(descending=True)].tolist()
    worst = torch.tensor(first_of_each_group(order, catalogue.groups, 8))  # one photo listed twice shows once
    show_rows([images[worst], decode_codes(codes[worst])], ["photo", name],
              f"Catalogue QA: the 8 test products with the highest {name} loss" + tag, out / "catalogue_qa.png")


# ----------------------------------------------------------------------------- search by cosine similarity
def unit(vectors):
    """Rows scaled to length 1, so that a matrix product of two sets gives their cosine similarities."""
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-8)


def cosine_similarity(queries, catalogue):
    """(N_queries, N_catalogue): the cosine of the angle between each query row and each catalogue row."""
    return unit(queries) @ unit(catalogue).T


def search(queries, index, k=5, groups=None, block=256):
    """Indices (into index) of the k most similar rows for each query row, best first. The index is
    built once, with unit(), so a query costs one matrix product. With `groups` (a near-copy group
    id per index row) the k rows are k distinct products: one photo listed twice counts once.
    Queries are taken `block` at a time: all against all would be 300 MB at 29,000 products."""
    if len(queries) > block:
        return torch.cat([search(part, index, k, groups, block) for part in queries.split(block)])
    similarity = unit(queries) @ index.T  # (N_queries, N_index)
    if groups is None:
        return similarity.topk(k, dim=1).indices  # (N_queries, k)
    # Among the k x (largest group) best rows there are always k groups; keep each group's first.
    largest = int(torch.bincount(groups).max())
    candidates = similarity.topk(min(len(index), k * largest), dim=1).indices.tolist()
    return torch.tensor([first_of_each_group(row, groups, k) for row in candidates])


def first_of_each_group(rows, groups, k):
    """The first k of `rows` whose groups have not been seen before them."""
    seen, kept = set(), []
    for row in rows:
        if len(kept) < k and int(groups[row]) not in seen:
            seen.add(int(groups[row]))
            kept.append(row)
    return kept


def precision_at_k(query_labels, catalogue_labels, neighbours):
    """Fraction of the k neighbours that share the query's label, averaged over the queries."""
    hits = [[catalogue_labels[j] == query_labels[i] for j in row] for i, row in enumerate(neighbours.tolist())]
    return sum(map(sum, hits)) / max(1, sum(map(len, hits)))


def evaluate_search(encode, codes, catalogue, args):
    """Each test product as a query against the training products (the catalogue), with every
    product's `codes`: precision@5 by ProductType and Colour, the index's size and the time of a
    query as a user makes it (encode one photo, then search), into OUT/search.csv. Returns the
    neighbours (N_test, 5)."""
    images, metadata, train, test = catalogue.images, catalogue.metadata, catalogue.train_index, catalogue.test_index
    index, k = unit(codes[train]), min(5, len(train))
    k = min(k, len(catalogue.groups[train].unique()))
    neighbours = train[search(codes[test], index, k, catalogue.groups[train])]  # (N_test, k) catalogue rows
    tick = time.perf_counter()
    for i in test[:50].tolist():
        search(encode(images[i:i + 1]), index, k, catalogue.groups[train])
    result = {"index_mb": index.numel() * 4 / 1e6, "ms_per_query": 1000 * (time.perf_counter() - tick) / len(test[:50])}
    for column in ("ProductType", "Colour"):
        if (metadata[column] != "").any():  # a folder without fashion.csv has no such labels
            labels = metadata[column].tolist()
            result[f"precision@5_{column}"] = precision_at_k([labels[i] for i in test.tolist()], labels, neighbours)
    print(f"search over {len(train)} catalogue products with {len(test)} test queries: "
          + ", ".join(f"{key} {value:.3f}" for key, value in result.items()))
    with open(args.out / "search.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(result))
        writer.writeheader()
        writer.writerow(result)
    return neighbours


def search_figures(catalogue, neighbours, reconstruct, name, tag, out):
    """Queries of six types, each followed by its 5 nearest catalogue products: search.png shows the
    photos, search_outputs.png the model's reconstructions of them (a figure with no dataset photo)."""
    metadata, test = catalogue.metadata, catalogue.test_index
    types = ["Tshirts", "Heels", "Sports Shoes", "Dresses", "Flip Flops", "Shorts"]
    queries = list(dict.fromkeys(pick(metadata, test, "ProductType", t, n) for n, t in enumerate(types)))
    position = {index: row for row, index in enumerate(test.tolist())}
    rows = [torch.cat([torch.tensor([q]), neighbours[position[q]]]) for q in queries]
    labels = [metadata.at[q, "ProductType"] for q in queries]
    titles = ["query"] + [f"match {i}" for i in range(1, 6)]
    show_rows([catalogue.images[r] for r in rows], labels, "More like this: nearest products by latent code" + tag,
              out / "search.png", titles)
    show_rows([reconstruct(catalogue.images[r]) for r in rows], labels,
              f"More like this (shown as the {name}'s reconstructions)" + tag, out / "search_outputs.png", titles)


# ----------------------------------------------------------------------------- tools on the whole catalogue
def catalogue_codes(encode, catalogue, checkpoint, out):
    """The code of every catalogue product, cached beside the model and rebuilt when the model
    file or the catalogue's photos change."""
    key = hashlib.sha256(checkpoint.read_bytes() + catalogue.images.numpy().tobytes()).hexdigest()
    cache = out / "catalogue_codes.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved["key"] == key:
            return saved["codes"]
    codes = encode(catalogue.images)
    torch.save({"key": key, "codes": codes}, cache.with_suffix(".tmp"))
    os.replace(cache.with_suffix(".tmp"), cache)
    return codes


def run_tools(encode, loss, catalogue, checkpoint, args):
    """--query and --duplicates: both search the whole catalogue, with codes computed once and cached.
    `loss` gives each photo's own loss, the model's measure of how unusual a photo is."""
    codes = catalogue_codes(encode, catalogue, checkpoint, args.out)
    if args.query is not None:
        more_like_this(encode, loss, catalogue, codes, args)
    if args.duplicates is not None:
        find_duplicates(catalogue, codes, args)


def describe(metadata, row, *columns):
    return [str(metadata.at[row, column]) if column in metadata else "" for column in columns]


def read_query(query, catalogue, image_size):
    """A --query: a photo file, framed as the catalogue's photos are, or a catalogue ProductId."""
    metadata = catalogue.metadata
    if Path(query).is_file():
        pixels = decode(Path(query), image_size)
        if pixels is None:
            raise SystemExit(f"error: --query {query}: not a readable image")
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1), Path(query).stem  # bytes, as the catalogue's
    if (metadata["ProductId"] == query).any():
        return catalogue.images[(metadata["ProductId"] == query).values.argmax()], query
    raise SystemExit(f"error: --query {query}: no such file, and no product with this ProductId")


def more_like_this(encode, loss, catalogue, codes, args):
    """Print and draw the --top catalogue products most like each --query photo: distinct products
    (a photo listed under several ProductIds is one answer, its other listings named on its line),
    never the query itself or a copy of it. A photo unlike the catalogue is said to be so."""
    images, metadata = catalogue.images, catalogue.metadata
    queries = [read_query(query, catalogue, args.image_size) for query in args.query]  # all read before any answer
    # An autoencoder knows what it was trained on: a photo it reconstructs worse than 99 % of the
    # test photos is unlike the catalogue, and its nearest codes need not be similar products.
    usual = loss(images[catalogue.test_index]).quantile(0.99).item()
    for (query, name), asked in zip(queries, args.query):
        # Catalogue photos near-identical to the query, and every photo of their groups, are left out.
        error = ((thumbnails(query[None]) - thumbnails(images)) ** 2).mean(1)  # (N,)
        copies = torch.isin(catalogue.groups, catalogue.groups[error < 10 ** (-NEAR_COPY_PSNR / 10)])
        similarity = cosine_similarity(encode(query[None]), codes)[0]
        similarity[copies] = -math.inf
        order = similarity.argsort(descending=True)[:int((~copies).sum())].tolist()
        best = first_of_each_group(order, catalogue.groups, args.top)
        print(f"products most like {asked} "
              f"({int(copies.sum())} catalogue photos left out: the photo itself or its copies):")
        query_loss = loss(query[None]).item()
        if query_loss > usual:
            print(f"note: {asked} is unlike the catalogue: the model reconstructs it worse (loss {query_loss:.1f}) "
                  f"than 99 % of the test photos ({usual:.1f}), so these are the nearest codes, not sure matches")
        for rank, row in enumerate(best, 1):
            product_id, product_type, colour, title = describe(metadata, row, "ProductId", "ProductType", "Colour",
                                                               "ProductTitle")
            others = [metadata.at[i, "ProductId"] for i in (catalogue.groups == catalogue.groups[row]).nonzero()
                      .flatten().tolist() if i != row]
            also = f"  (also listed as {', '.join(others)})" if others else ""
            print(f"  {rank:2d}. {product_id:>8s}  {product_type:14s} {colour:10s} {title[:50]:50s} "
                  f"{similarity[row]:.3f}{also}")
        show_rows([torch.cat([query[None], images[best]])], [name], f"More like {name}",
                  args.out / f"query_{name}.png", ["query"] + [f"{similarity[row]:.3f}" for row in best])


def identical_file_pairs(catalogue):
    """The pairs (i, j), i < j, of catalogue products whose photo files are byte for byte the same."""
    by_digest = {}
    for row, path in enumerate(catalogue.metadata["path"]):
        file = catalogue.folder / path
        if file.is_file():  # the synthetic catalogue has no files
            by_digest.setdefault(hashlib.md5(file.read_bytes()).hexdigest(), []).append(row)
    return {(i, j) for rows in by_digest.values() for i in rows for j in rows if i < j}


def find_duplicates(catalogue, codes, args):
    """Groups of catalogue products whose codes are nearly identical, most similar first, as
    OUT/duplicates.csv and a figure of the top groups."""
    metadata, pairs, best = catalogue.metadata, [], torch.zeros(len(codes))
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
    print(f"{sum(int((groups == g).sum()) for g in listed)} products in {len(listed)} groups of "
          f"near-identical codes (cosine >= {args.duplicates}); list in {args.out / 'duplicates.csv'}")
    # A check with known answers: files that are byte for byte the same must be found as pairs.
    found, identical = {(i, j) for i, j in pairs if i < j}, identical_file_pairs(catalogue)
    print(f"{len(found)} pairs of products; of the catalogue's {len(identical)} pairs of byte-identical files, "
          f"{len(found & identical)} are among them, and {len(found - identical)} pairs are other photos")
    if members:  # each row labelled with its ProductIds
        labels = [f"group {n}:\n" + "\n".join(metadata.at[i, "ProductId"] for i in m.tolist()) for n, m in
                  enumerate(members, 1)]
        show_rows([catalogue.images[m] for m in members], labels,
                  "Duplicate listings: products whose codes are nearly identical", args.out / "duplicates.png")


# ----------------------------------------------------------------------------- cleaning a shop's own photos
def clean_photos(denoise, paths, out):
    """dae.py --clean: each photo file through `denoise` at its own size, into OUT/<name>_clean.png;
    a file that cannot be read is named, and the others are still cleaned."""
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
        cleaned = denoise(photo)
        target = out / f"{path.stem}_clean.png"
        if target.resolve() == path.resolve():  # never write over the photo it came from
            target = out / f"{path.stem}_clean_again.png"
        Image.fromarray((cleaned.permute(1, 2, 0) * 255).round().byte().numpy()).save(target)
        print(f"cleaned {path} ({photo.shape[2]}x{photo.shape[1]}) -> {target}")
    if failed:
        raise SystemExit(f"error: {len(failed)} of {len(paths)} photos could not be read: "
                         + ", ".join(map(str, failed)))



# ----------------------------------------------------------------------------- walking the code space
def interpolation_rows(encode, decode_codes, catalogue, steps=8):
    """Straight lines in code space between two real test products of different types, decoded."""
    metadata, test = catalogue.metadata, catalogue.test_index
    pairs = [("Sports Shoes", "Heels"), ("Tshirts", "Dresses"), ("Casual Shoes", "Flip Flops"), ("Shorts", "Tops")]
    fractions = torch.linspace(0, 1, steps).view(-1, 1)
    rows, labels = [], []
    for number, (start, end) in enumerate(pairs):
        ends = [pick(metadata, test, "ProductType", start, 2 * number),
                pick(metadata, test, "ProductType", end, 2 * number + 1)]
        code = encode(catalogue.images[ends])
        rows.append(decode_codes(code[0] + fractions * (code[1] - code[0])))
        labels.append(f"{metadata.at[ends[0], 'ProductType']}\n-> {metadata.at[ends[1], 'ProductType']}"[:40])
    return rows, labels


def attribute_direction(codes, metadata, train_index, column, value, casts, category):
    """What having `value` in `column` adds to a code, between products of one Category whose photos
    have the same colour cast (`casts`: (G + B) / 2 - R of each photo's product, see below).

    Black products differ from the others twice: they are dark, and they have no hue where most
    others are warm (brown, red, pink, beige). A plain difference of mean codes takes both and turns
    a white T-shirt teal. A least-squares fit of the training codes on [1, is black, cast] keeps the
    two apart: its "is black" coefficient is what black adds at an equal cast. Within one Category,
    since most black products are shoes: across categories it would also turn a T-shirt into a shoe.
    Test products never count. Zero when either side is empty."""
    train = torch.zeros(len(codes), dtype=torch.bool)
    train[train_index] = True
    same = train & torch.tensor((metadata["Category"] == category).values)
    inside = torch.tensor((metadata[column] == value).values)[same].float()
    if not 0 < inside.sum() < len(inside):
        return torch.zeros(codes.shape[1])
    fit = torch.linalg.lstsq(torch.stack([torch.ones_like(inside), inside, casts[same]], 1), codes[same])
    return fit.solution[1]


def colour_of_products(images, photos):
    """Mean luminance and (G + B) / 2 - R (above 0: a cold, blue-green cast) of each image (N,),
    over its product's pixels: those where the photo (N, 3, S, S) is darker than near-white."""
    product = (photos.min(1).values < 0.9).float()  # (N, S, S)
    red, green, blue = images.unbind(1)

    def mean_over_product(values):
        return (values * product).sum((1, 2)) / product.sum((1, 2)).clamp_min(1)

    return mean_over_product(0.299 * red + 0.587 * green + 0.114 * blue), mean_over_product((green + blue) / 2 - red)
