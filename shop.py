"""What a shop does with a trained model: "more like this", duplicate listings, attribute edits,
cleaning its own photos.

None of this is how an autoencoder works; it is what its code is good for. ae.py and vae.py call
these on their own codes, and compare.py measures every model's codes with the same search:

    codes = encode_all(model, catalogue.images, args)     # (N, latent), one row per product
    search(codes[queries], unit(codes[catalogue]), k=5)   # the 5 products nearest to each query
"""

import csv
import hashlib
import io
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import (NEAR_COPY_PSNR, Unreadable, connected_groups, frame_product, ink, opened_image, product_box,
                    shown_products, thumbnails, to_rgb)
from bookkeeping import written_whole
from figures import save_grid


# ----------------------------------------------------------------------------- the figures every model draws
def sample_rows(draw, code_distribution, one_kind, rows=4):
    """Rows of new products, `draw(mixture)`: from one Gaussian fitted to all codes, from the mixture
    of one per kind, and from each of the `rows` commonest kinds alone (one_kind)."""
    kinds = code_distribution["kinds"]
    common_kinds = sorted(kinds, key=lambda kind: -kinds[kind]["weight"])[:rows]
    mixtures = [code_distribution["all"], kinds, *(one_kind(code_distribution, kind) for kind in common_kinds)]
    return [draw(mixture) for mixture in mixtures], ["one Gaussian", "one per type",
                                                     *(f"{kind},\nset apart" for kind in common_kinds)]


def chosen_mixture(code_distribution, product_type, one_kind):
    """The Gaussians --num-samples draws from: --product-type's (`one_kind` picks it), or every type's."""
    if code_distribution is None or "kinds" not in code_distribution:
        raise SystemExit("error: --num-samples: the checkpoint is a run stopped before its last epoch, or saved "
                         "before sampling by type; finish it with --resume, or drop --figures-only to train anew")
    kinds = code_distribution["kinds"]
    if product_type is not None and product_type not in kinds:
        raise SystemExit(f"error: --product-type {product_type}: no training photo is of that type; the types are "
                         f"{', '.join(kinds)}")
    return one_kind(code_distribution, product_type) if product_type else kinds


def draw_figures(samples_by_epoch, name, encode, decode_codes, codes, catalogue, tag, args):
    """What ae.py and vae.py both show of a trained model. `encode` takes photos to codes (N, latent),
    `decode_codes` codes to images; `codes` are every product's."""
    images, metadata, out = catalogue.images, catalogue.metadata, args.out
    if samples_by_epoch:  # only training can draw this one: --figures-only redraws it from the checkpoint
        save_grid([s for _, s in samples_by_epoch], [f"epoch {e}" for e, _ in samples_by_epoch],
                  "The same 10 draws from the Gaussians fitted to the codes, as training goes on" + tag,
                  out / "samples_by_epoch.png")
    shown = shown_products(catalogue, 10)
    save_grid([images[shown], decode_codes(codes[shown])], ["original", name],
              "Test products and their reconstructions" + tag, out / "reconstructions.png")
    # "More like this": the encoder as a search engine, tested with the test products as queries.
    neighbours = evaluate_search(encode, codes, catalogue, args)
    search_figures(catalogue, neighbours, lambda batch: decode_codes(encode(batch)), name, tag, out)
    rows, labels = interpolation_rows(encode, decode_codes, catalogue)
    save_grid(rows, labels, "Interpolating between two test products in latent space" + tag, out / "interpolations.png")
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
        save_grid([edit(edited, s) for s in strengths], [f"+{s} x black" for s in strengths],
                  'Attribute edit: adding the "Black" direction' + tag, out / "attribute_edit.png")
        # Does it darken without a colour cast? Measured on the test products that are not black (at
        # most 1,000 of them, spread over the test set: a larger catalogue's figures stay cheap).
        measured = shown_products(catalogue, min(1000, len(catalogue.test_index))).tolist()
        others = [i for i in measured if metadata.at[i, "Colour"] != "Black"]
        (light, cast), (dark, dark_cast) = (colour_of_products(edit(others, s), images[others].float() / 255)
                                            for s in (0, 1.5))
        black = [i for i in measured if metadata.at[i, "Colour"] == "Black"]
        real = f"the black test products' photos: {casts[black].mean():+.3f}" if black else "no black test product"
        print(f"attribute edit, +1.5 x black on the {len(others)} test products of other colours: luminance "
              f"{light.mean():.2f} -> {dark.mean():.2f}, (G + B) / 2 - R {cast.mean():+.3f} -> "
              f"{dark_cast.mean():+.3f}, a shift of {(dark_cast - cast).mean():+.3f} ({real})")
    # Catalogue QA: the test products the model finds most unusual, as --query judges a photo.
    test = images[catalogue.test_index]
    variance = ((decode_codes(codes[catalogue.test_index]) - test.float() / 255) ** 2).mean().item()
    scores = unusualness(test, lambda photos: decode_codes(encode(photos)), variance)
    order = catalogue.test_index[scores.argsort(descending=True)].tolist()
    worst = torch.tensor(first_of_each_group(order, catalogue.groups, 8))  # one photo listed twice shows once
    save_grid([images[worst], decode_codes(codes[worst])], ["photo", name], f"Catalogue QA: the 8 test products "
              f"the {name} finds most unusual for their complexity (unusualness)" + tag, out / "catalogue_qa.png")


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
    with written_whole(args.out / "search.csv") as temporary, open(temporary, "w", newline="") as handle:
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
    save_grid([catalogue.images[r] for r in rows], labels, "More like this: nearest products by latent code" + tag,
              out / "search.png", titles)
    save_grid([reconstruct(catalogue.images[r]) for r in rows], labels,
              f"More like this (shown as the {name}'s reconstructions)" + tag, out / "search_outputs.png", titles)


# ----------------------------------------------------------------------------- tools on the whole catalogue
def catalogue_codes(encode, catalogue, checkpoint, out):
    """The code of every catalogue product, cached beside the model (OUT/catalogue_codes.pt) and rebuilt
    when the model file or the catalogue's photos change."""
    key = hashlib.sha256(checkpoint.read_bytes() + catalogue.images.numpy().tobytes()).hexdigest()
    cache = out / "catalogue_codes.pt"
    try:
        saved = torch.load(cache, weights_only=True) if cache.is_file() else {}
    except Exception:  # a cache that cannot be read is rebuilt
        saved = {}
    if saved.get("key") == key:
        return saved["codes"]
    codes = encode(catalogue.images)
    out.mkdir(parents=True, exist_ok=True)
    with written_whole(cache) as temporary:
        torch.save({"key": key, "codes": codes}, temporary)
    print(f"wrote {cache} (every product's code, kept for the next --query or --duplicates)")
    return codes


def run_tools(encode, decode_codes, catalogue, checkpoint, args):
    """--query and --duplicates: both search the whole catalogue, with codes computed once and cached."""
    codes = catalogue_codes(encode, catalogue, checkpoint, args.out)
    if args.query is not None:
        more_like_this(encode, decode_codes, catalogue, codes, args)
    if args.duplicates is not None:
        find_duplicates(catalogue, codes, args)


def describe(metadata, row, *columns):
    return [str(metadata.at[row, column]) if column in metadata else "" for column in columns]


def pick(metadata, index, column, value, otherwise=0):
    """The first of the given products whose metadata column equals value; if none does (a folder
    without fashion.csv, say), the product at position `otherwise`, spread over the index."""
    matches = np.flatnonzero(metadata[column].to_numpy()[index.numpy()] == value)  # positions within index
    return index[matches[0] if len(matches) else otherwise * len(index) // 8 % len(index)].item()


def read_query(query, catalogue, image_size):
    """A --query: a photo file, framed as the catalogue's photos are, or a catalogue ProductId. Returns
    the photo (3, S, S) as bytes, its name, the share of its edge that is not white, and whether the
    loader found a product in it at all; raises Unreadable for a file that cannot or must not be read."""
    metadata, path = catalogue.metadata, Path(query)
    if not path.is_file() and (metadata["ProductId"] == query).any():
        row = int((metadata["ProductId"] == query).values.argmax())
        path = catalogue.folder / metadata.at[row, "path"]  # for its edge; the synthetic catalogue has no files
        return catalogue.images[row], query, edge_of(path) if path.is_file() else 0.0, True
    if not path.exists():
        raise Unreadable("no such file, and no product with this ProductId")
    with opened_image(path, (2 * image_size, 2 * image_size)) as image:
        image = to_rgb(image)
        pixels = frame_product(image, image_size)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1), path.stem, edge_ink(image), bool(product_box(image))


def edge_ink(image):
    """The share of a photo's outermost pixels that count as product (ink): ~0 for a product on white."""
    weight = ink(image)[0]
    return float(np.concatenate([weight[0], weight[-1], weight[:, 0], weight[:, -1]]).mean())


def edge_of(path):
    with opened_image(path, (256, 256)) as image:
        return edge_ink(to_rgb(image))


def more_like_this(encode, decode_codes, catalogue, codes, args):
    """Print and draw the --top catalogue products most like each --query photo: distinct products
    (a photo listed under several ProductIds is one answer, its other listings named on its line),
    never the query itself or a copy of it. A photo unlike the catalogue is said to be so, and one
    that cannot be read, or holds no product, is named and skipped."""
    images, metadata = catalogue.images, catalogue.metadata
    queries = []
    for asked in args.query:  # all read before any answer
        try:
            queries.append((asked, *read_query(asked, catalogue, args.image_size)))
        except Unreadable as error:
            print(f"error: --query {asked}: {error}; skipped")
    def reconstruct(photos):
        return decode_codes(encode(photos))

    limits = unusual_limits(reconstruct, images[catalogue.test_index], codes[catalogue.test_index],
                            codes[catalogue.train_index])
    for asked, query, name, edge, found in queries:
        if not found:
            print(f"note: --query {asked}: the loader finds no product in it (nothing darker than white); skipped")
            continue
        # Catalogue photos near-identical to the query, and every photo of their groups, are left out.
        error = ((thumbnails(query[None]) - thumbnails(images)) ** 2).mean(1)  # (N,)
        copies = torch.isin(catalogue.groups, catalogue.groups[error < 10 ** (-NEAR_COPY_PSNR / 10)])
        code = encode(query[None])
        similarity = cosine_similarity(code, codes)[0]
        similarity[copies] = -math.inf
        order = similarity.argsort(descending=True)[:int((~copies).sum())].tolist()
        best = first_of_each_group(order, catalogue.groups, args.top)
        print(f"products most like {asked} "
              f"({int(copies.sum())} catalogue photos left out: the photo itself or its copies):")
        reasons = why_unusual(unusualness(query[None], reconstruct, limits["variance"]).item(),
                              nearest_distance(code, codes[~copies]).item(), edge, limits)
        if reasons:
            print(f"note: {asked} is unlike the catalogue ({'; '.join(reasons)}): these are the nearest codes, "
                  f"not sure matches")
        for rank, row in enumerate(best, 1):
            product_id, product_type, colour, title = describe(metadata, row, "ProductId", "ProductType", "Colour",
                                                               "ProductTitle")
            others = [metadata.at[i, "ProductId"] for i in (catalogue.groups == catalogue.groups[row]).nonzero()
                      .flatten().tolist() if i != row]
            also = f"  (also listed as {', '.join(others)})" if others else ""
            print(f"  {rank:2d}. {product_id:>8s}  {product_type:14s} {colour:10s} {title[:50]:50s} "
                  f"{similarity[row]:.3f}{also}")
        save_grid([torch.cat([query[None], images[best]])], [name], f"More like {name}",
                  args.out / f"query_{name}.png", ["query"] + [f"{similarity[row]:.3f}" for row in best])
        print(f"wrote {args.out / f'query_{name}.png'}")
    if len(queries) < len(args.query):
        raise SystemExit(f"error: --query: {len(args.query) - len(queries)} of {len(args.query)} could not be read "
                         f"(named above)" + ("; the others were answered" if queries else ""))


# ----------------------------------------------------------------------------- what is unlike the catalogue
UNUSUAL = 0.99  # past this share of the test photos on either measure, a photo is unlike the catalogue
EDGE = 0.5  # a photo with more of its edge than this not white is not a product on white


def complexity_bits(photos):
    """Each photo's size as a PNG file, in bits (N,): how complex it is to a general lossless compressor."""
    sizes = []
    for photo in photos:
        buffer = io.BytesIO()
        Image.fromarray(photo.permute(1, 2, 0).contiguous().numpy()).save(buffer, "PNG")
        sizes.append(8 * buffer.tell())
    return torch.tensor(sizes, dtype=torch.float)


def unusualness(photos, reconstruct, variance):
    """How many more bits the model needs for each photo (N, 3, S, S, bytes) than a general compressor
    does (Serrà et al. 2020, "Input complexity and out-of-distribution detection"): -log2 p(x) under a
    decoder that is a Gaussian of `variance` around the reconstruction, less the photo's PNG size.
    The error alone misses simple inputs: a logo on white comes back nearly perfect because it is
    simple. Weighed against its own complexity, it does not. The terms the same for every photo of
    one size (D/2 log2(2 pi variance), and 8 bits a value for the bins of 8-bit pixels) are left out."""
    squared_error = ((reconstruct(photos) - photos.float() / 255) ** 2).flatten(1).sum(1)
    return squared_error / (2 * variance * math.log(2)) - complexity_bits(photos)


def nearest_distance(codes, catalogue_codes):
    """Each code's distance to the nearest of `catalogue_codes` (N,): does it lie where theirs lie?"""
    return torch.cat([torch.cdist(part, catalogue_codes).min(1).values for part in codes.split(256)])


def unusual_limits(reconstruct, test_photos, test_codes, train_codes):
    """What a photo is judged against, set on the test photos: the decoder's variance (their mean squared
    error), and the UNUSUAL quantile of their unusualness and of their codes' nearest_distance."""
    variance = ((reconstruct(test_photos) - test_photos.float() / 255) ** 2).mean().item()
    return {"variance": variance, "bits": unusualness(test_photos, reconstruct, variance).quantile(UNUSUAL).item(),
            "distance": nearest_distance(test_codes, train_codes).quantile(UNUSUAL).item()}


def why_unusual(bits, distance, edge, limits):
    """Why a photo is unlike the catalogue: a list of reasons, empty when it is like it."""
    share = f"{UNUSUAL:.0%} of the test photos"
    return [reason for reason, holds in [
        (f"{edge:.0%} of its edge is not white, where the catalogue's photos are products on white", edge > EDGE),
        (f"the model needs more bits for it, beyond its own complexity, than for {share}", bits > limits["bits"]),
        (f"its code lies farther from the catalogue's codes than those of {share}", distance > limits["distance"])]
        if holds]


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
    with written_whole(args.out / "duplicates.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "ProductId", "ProductTitle", "similarity"])
        for number, group in enumerate(listed, 1):
            for row in (groups == group).nonzero().flatten().tolist():
                writer.writerow([number, *describe(metadata, row, "ProductId", "ProductTitle"), f"{best[row]:.4f}"])
    members = [(groups == group).nonzero().flatten()[:8] for group in listed[:8]]
    print(f"{sum(int((groups == g).sum()) for g in listed)} products in {len(listed)} groups of "
          f"near-identical codes (cosine >= {args.duplicates})")
    print(f"wrote {args.out / 'duplicates.csv'}")
    # A check with known answers: files that are byte for byte the same must be found as pairs.
    found, identical = {(i, j) for i, j in pairs if i < j}, identical_file_pairs(catalogue)
    print(f"{len(found)} pairs of products; of the catalogue's {len(identical)} pairs of byte-identical files, "
          f"{len(found & identical)} are among them, and {len(found - identical)} pairs are other photos")
    if members:  # each row labelled with its ProductIds
        labels = [f"group {n}:\n" + "\n".join(metadata.at[i, "ProductId"] for i in m.tolist()) for n, m in
                  enumerate(members, 1)]
        save_grid([catalogue.images[m] for m in members], labels,
                  "Duplicate listings: products whose codes are nearly identical", args.out / "duplicates.png")
        print(f"wrote {args.out / 'duplicates.png'}")


# ----------------------------------------------------------------------------- cleaning a shop's own photos
@torch.no_grad()
def in_tiles(denoise, photo, tile=256, margin=16):
    """(3, H, W) of any size -> (3, H, W) through `denoise` ((1, 3, h, w) -> (1, 3, h, w)), a fully
    convolutional net, run on tiles of `tile` pixels, each with a `margin` of context all round that
    is cut off again: a photo larger than memory allows is cleaned a piece at a time, without seams.
    The last row and column of pixels are repeated until every tile's size divides by 4, as the DAE needs."""
    _, height, width = photo.shape
    cleaned = torch.empty_like(photo)
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            y0, x0 = max(0, top - margin), max(0, left - margin)
            window = photo[:, y0:min(height, bottom + margin), x0:min(width, right + margin)]
            pad_y, pad_x = -window.shape[1] % 4, -window.shape[2] % 4
            padded = torch.nn.functional.pad(window[None], (0, pad_x, 0, pad_y), mode="replicate")
            out = denoise(padded)[0]
            cleaned[:, top:bottom, left:right] = out[:, top - y0:bottom - y0, left - x0:right - x0]
    return cleaned


def clean_photos(denoise, paths, out):
    """dae.py --clean: each photo file through `denoise` at its own size, into OUT/<name>_clean.png.
    A file that cannot or must not be read is named on one line, and the others are still cleaned."""
    failed = 0
    for path in map(Path, paths):
        try:
            with opened_image(path) as opened:
                photo = torch.from_numpy(np.asarray(to_rgb(opened)).copy()).permute(2, 0, 1).float() / 255
        except Unreadable as error:
            print(f"error: --clean {path}: {error}; skipped")
            failed += 1
            continue
        cleaned = denoise(photo)
        target = out / f"{path.stem}_clean.png"
        if target.resolve() == path.resolve():  # never write over the photo it came from
            target = out / f"{path.stem}_clean_again.png"
        with written_whole(target) as temporary:
            Image.fromarray((cleaned.permute(1, 2, 0) * 255).round().byte().numpy()).save(temporary, format="PNG")
        print(f"wrote {target} ({path} cleaned at its own size, {photo.shape[2]}x{photo.shape[1]})")
    if failed:
        raise SystemExit(f"error: --clean: {failed} of {len(paths)} files could not be read (named above); "
                         f"the others were cleaned")


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
