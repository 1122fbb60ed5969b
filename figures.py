"""The figures, written once for the three scripts: titled grids of images, loss curves, and the
pictures of the code space (its plane, its numbers against the prior, its main directions).

Each function draws what it is handed and computes nothing a model learns. Not here: the photos
(common.py), a run's flags, checkpoints and metrics (bookkeeping.py), the shop's figures (shop.py).
"""

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from bookkeeping import written_whole
from common import product_kinds


# ----------------------------------------------------------------------------- grids and curves
def text_font(size):
    """DejaVu Sans, which matplotlib ships, at `size` pixels: the figures' lettering."""
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)


def save_grid(rows, labels, title, path, columns_titles=None):
    """Save a titled grid of images: rows is a list of (n, 3, S, S) tensors, one per labelled row,
    with `columns_titles` over the columns. Pasted and lettered with Pillow: a grid of images needs
    no plotting library, and takes a hundredth of the time. Small images are enlarged by whole
    pixels, so every pixel the model drew stays one sharp square."""
    rows = [row.float() / 255 if row.dtype == torch.uint8 else row for row in rows]  # photos are bytes
    size, columns = rows[0].shape[-1], max(len(row) for row in rows)
    grid = paste_grid(torch.cat([torch.cat([row.cpu(), torch.ones(columns - len(row), *row.shape[1:])])
                                 for row in rows]), columns)  # short rows end in white
    zoom = max(1, math.ceil(96 / size))  # at least 96 px an image
    picture = Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())
    picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.Resampling.NEAREST)
    font, small = text_font(13), text_font(11)
    step = (size + 2) * zoom
    label_lines = [str(label).split("\n") for label in labels]
    left = 12 + max(font.getlength(line) for lines in label_lines for line in lines)
    width = max(int(left) + picture.width + 12, 300)
    title_lines = wrap_text(title, font, width - 24)
    top = 12 + 18 * len(title_lines) + (18 if columns_titles else 4)
    figure = Image.new("RGB", (width, top + picture.height + 10), "white")
    draw = ImageDraw.Draw(figure)
    for number, line in enumerate(title_lines):
        draw.text((width / 2, 10 + 18 * number), line, fill="black", font=font, anchor="ma")
    figure.paste(picture, (int(left), top))
    for row, lines in enumerate(label_lines):  # each label centred on its row, right-aligned against it
        middle = top + row * step + size * zoom / 2 - 8 * (len(lines) - 1)
        for number, line in enumerate(lines):
            draw.text((left - 6, middle + 16 * number), line, fill="black", font=font, anchor="rm")
    for column, name in enumerate((columns_titles or [])[:columns]):
        draw.text((left + column * step + size * zoom / 2, top - 4), str(name), fill="black", font=small, anchor="md")
    with written_whole(path) as temporary:
        figure.save(temporary, format="PNG")


def paste_grid(images, columns, gap=2):
    """(N, 3, S, S) images in [0, 1] pasted into one (3, H, W) picture, `columns` to a row, white between."""
    size, rows = images.shape[-1], math.ceil(len(images) / columns)
    step = size + gap
    picture = torch.ones(3, rows * step - gap, columns * step - gap)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        picture[:, row * step:row * step + size, column * step:column * step + size] = image.clamp(0, 1).cpu()
    return picture


def wrap_text(text, font, width):
    """`text` broken into lines of at most `width` pixels in `font`, at spaces."""
    lines = [""]
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}".strip()
        if font.getlength(candidate) <= width or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def plot_curves(history, panels, path, log=()):
    """Train and test curves per epoch: `panels` maps a metrics key (without train_/test_) to a
    title; the keys in `log` get a log scale."""
    import matplotlib.pyplot as plt

    if not history:  # a --figures-only run of a checkpoint without history has nothing to draw
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    epochs = [row["epoch"] for row in history]
    for axis, (key, title) in zip(axes[0], panels.items()):
        for split_name in ("train", "test"):
            if f"{split_name}_{key}" in history[0]:
                axis.plot(epochs, [row[f"{split_name}_{key}"] for row in history], label=split_name)
        axis.set(title=title, xlabel="epoch", yscale="log" if key in log else "linear")
        axis.legend()
    figure.tight_layout()
    with written_whole(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


def save_images(images, folder, kind=None):
    """(N, 3, S, S) images in [0, 1] as PNG files sample_0000.png, ... in `folder` (new products of
    `kind`, or of every kind), and a line that says so. The samples of an earlier call are removed
    first, and said so: a folder of 4 new shoes never holds 4 old T-shirts beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    earlier = sorted(folder.glob("sample_*.png"))
    for path in earlier:
        path.unlink()
    for i, image in enumerate(images):
        with written_whole(folder / f"sample_{i:04d}.png") as temporary:
            Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(temporary, format="PNG")
    print(f"wrote {folder}/ ({len(images)} new products" + (f" of type {kind}" if kind else "") +
          (f"; the {len(earlier)} of an earlier call were removed)" if earlier else ")"))


# ----------------------------------------------------------------------------- the code space
def main_directions(codes):
    """The codes' principal directions (latent, latent), one unit row each, most spread first, and each
    one's share of their variance (latent,): PCA by hand."""
    _, values, directions = torch.linalg.svd(codes - codes.mean(0), full_matrices=False)
    return directions, values**2 / (values**2).sum()


def compute_code_plane(codes, *, prior, steps=8):
    """The plane code_plane.png draws: its axes (dims, latent) through `origin`, their names, every
    code's place on them (N, dims), and a grid of steps^dims codes on it with each axis's ticks.

    A code of 1 or 2 numbers is its own plane; a longer one is shown on its two main directions.
    For the VAE (`prior`) the plane passes through 0 and the grid stands at N(0, 1) quantiles: where
    the prior puts its mass (Kingma & Welling 2014, figure 4). An AE has no prior: its plane passes
    through the mean code, and the grid spans the box of its codes, holes and all."""
    latent = codes.shape[1]
    dims = min(2, latent)
    if latent <= 2:
        axes, names = torch.eye(latent), [f"z[{i}]" for i in range(latent)]
    else:
        directions, shares = main_directions(codes)
        axes = directions[:2]  # (2, latent)
        names = [f"main direction {i + 1} ({share:.0%} of the variance)" for i, share in enumerate(shares[:2])]
    origin = torch.zeros(latent) if prior else codes.mean(0)
    places = (codes - origin) @ axes.T  # (N, dims)
    if prior:
        ticks = torch.distributions.Normal(0, 1).icdf(torch.linspace(0.05, 0.95, steps)).repeat(dims, 1)
    else:
        ticks = torch.stack([torch.linspace(low, high, steps) for low, high in zip(places.min(0).values,
                                                                                   places.max(0).values)])
    # The grid in reading order: rows down the second axis from its top, columns along the first.
    corners = torch.cartesian_prod(ticks[1].flip(0), ticks[0]).flip(1) if dims == 2 else ticks[0].view(-1, 1)
    return {"axes": axes, "origin": origin, "names": names, "places": places, "ticks": ticks,
            "grid": origin + corners @ axes}  # grid: (steps^dims, latent)


def draw_code_plane(plane, decoded, kinds, shown, title, path):
    """code_plane.png: left, the `shown` products' places on the plane, coloured by kind (the eight
    commonest; the rest grey), with the grid's points marked; right, the grid `decoded`."""
    import matplotlib.pyplot as plt

    places, ticks, names = plane["places"][shown], plane["ticks"], plane["names"]
    dims, steps = ticks.shape
    labels = [kinds[i] for i in shown.tolist()]
    commonest = sorted(set(labels), key=lambda kind: (-labels.count(kind), kind))[:8]
    # Two numbers: the plane itself. One: each kind on a row of its own, the grid on a row below.
    heights = places[:, 1] if dims == 2 else torch.tensor([float(commonest.index(k)) if k in commonest
                                                           else len(commonest) for k in labels])
    marks = torch.cartesian_prod(*ticks) if dims == 2 else torch.stack([ticks[0], torch.full((steps,), -1.0)], 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5.8))
    for kind in [*commonest, None]:
        mask = torch.tensor([label == kind if kind else label not in commonest for label in labels])
        if mask.any():
            left.scatter(places[mask, 0], heights[mask], s=10, label=kind or "other types",
                         color=None if kind else "lightgrey", zorder=2 if kind else 1)
    left.scatter(marks[:, 0], marks[:, 1], marker="+", s=40, color="black", label="decoded on the right")
    left.set(xlabel=names[0], ylabel=names[1] if dims == 2 else "", title="the test products' codes")
    if dims == 1:
        left.set_yticks(range(-1, len(commonest) + 1), ["the grid", *commonest, "other types"], fontsize=7)
    left.legend(fontsize=7, framealpha=0.6)
    picture = paste_grid(decoded, steps)
    right.imshow(picture.permute(1, 2, 0).numpy())
    size = decoded.shape[-1]
    centres = [i * (size + 2) + size / 2 for i in range(steps)]
    right.set_xticks(centres, [f"{tick:.3g}" for tick in ticks[0]], fontsize=7)
    right.set_yticks(centres[:len(decoded) // steps], [f"{tick:.3g}" for tick in ticks[-1].flip(0)] if dims == 2
                     else [""], fontsize=7)
    right.set(xlabel=names[0], ylabel=names[1] if dims == 2 else "", title="the grid's codes, decoded")
    figure.suptitle(title, fontsize=10)
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.88, wspace=0.25)
    with written_whole(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


def plot_codes_against_prior(codes, active, threshold, title, path, shown=7):
    """codes_vs_prior.png: histograms of `shown` code dimensions, from the most to the least varied,
    with the N(0, 1) density over them; last, every dimension's variance across photos, sorted, and
    the line past which it counts as active."""
    import matplotlib.pyplot as plt

    variances = codes.var(0, correction=0)
    order = variances.argsort(descending=True)
    picked = order[torch.linspace(0, len(order) - 1, min(shown, len(order))).round().long().unique()]
    figure, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    for axis, dimension in zip(axes.flat, picked.tolist()):
        values = codes[:, dimension]
        low, high = min(-4.0, values.min().item()), max(4.0, values.max().item())
        counts = torch.histc(values, bins=40, min=low, max=high)  # one outline, not 40 bars: drawn in a blink
        axis.stairs((counts / counts.sum() / ((high - low) / 40)).numpy(), torch.linspace(low, high, 41).numpy(),
                    fill=True, alpha=0.6, label="codes")
        x = torch.linspace(low, high, 200)
        axis.plot(x, torch.exp(-x**2 / 2) / math.sqrt(2 * math.pi), color="black", label="N(0, 1)")
        state = "active" if variances[dimension] > threshold else "inactive"
        axis.set(title=f"z[{dimension}]: variance {variances[dimension]:.2g}, {state}", xlabel="value",
                 ylabel="density")
        axis.title.set_fontsize(9)
        axis.legend(fontsize=7)
    for axis in axes.flat[len(picked):-1]:
        axis.axis("off")
    # The last panel: each dimension's variance (active above the threshold), and the variance along
    # each main direction: N(0, I) has 1 in every direction, correlated codes do not.
    axis = axes.flat[-1]
    along = torch.linalg.eigvalsh(torch.cov(codes.T.double(), correction=0).reshape(codes.shape[1], -1)).flip(0).float()
    for values, label in ((variances[order], "each dimension"), (along, "each main direction")):
        axis.semilogy(range(1, len(values) + 1), values.clamp_min(threshold / 100).numpy(), marker=".", label=label)
    axis.axhline(1, color="black", label="N(0, I): 1 in every one")
    axis.axhline(threshold, color="red", linestyle="--", label=f"{threshold}: a dimension above is active")
    axis.set_ylim(threshold / 200, max(along.max().item(), variances.max().item(), 1) * 2)
    axis.set(title=f"variances, sorted: {active} dimensions active", xlabel="dimensions / directions, most varied "
             "first", ylabel="variance across photos")
    axis.title.set_fontsize(9)
    axis.legend(fontsize=6)
    figure.suptitle(title, fontsize=10)
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.09, top=0.87, hspace=0.45, wspace=0.3)
    with written_whole(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


def traversal_codes(codes, rows=5, steps=9, reach=2.0):
    """The mean code moved along each of the codes' first `rows` main directions, from -reach to +reach
    standard deviations of the codes along it: (rows, steps, latent), and each direction's share of
    the variance (rows,)."""
    directions, shares = main_directions(codes)
    directions = directions[:rows]  # (rows, latent)
    mean = codes.mean(0)
    spread = ((codes - mean) @ directions.T).std(0)  # (rows,)
    offsets = torch.linspace(-reach, reach, steps).view(1, -1, 1) * spread.view(-1, 1, 1)  # (rows, steps, 1)
    return mean + offsets * directions.unsqueeze(1), shares[:rows]


def draw_code_space(name, codes, decode, catalogue, active, threshold, tag, out, *, prior):
    """The three pictures of what the code learned, the same for the AE and the VAE so that they differ
    by what the KL does: code_plane.png, codes_vs_prior.png and traversals.png. `codes` are every
    product's, `decode` takes codes to images, `active` is the count of active units; `prior` says
    whether the model has one (the VAE's N(0, I)) to set the plane's grid by."""
    test, latent, kinds = catalogue.test_index, codes.shape[1], product_kinds(catalogue)
    plane = compute_code_plane(codes, prior=prior)
    where = ("the code's own numbers" if latent <= 2 else "the codes' two main directions")
    grid = "N(0, 1) quantiles, where the prior puts its mass" if prior else "the box of the codes, holes and all"
    draw_code_plane(plane, decode(plane["grid"]), kinds, test, f"The {name}'s code plane ({latent} number"
                    f"{'s' if latent > 1 else ''}), on "
                    f"{where}: the test products' codes, and a grid at {grid}, decoded{tag}", out / "code_plane.png")
    plot_codes_against_prior(codes[test], active, threshold, f"The {name}'s codes of the {len(test)} test photos "
                             f"against the prior N(0, 1): {active} of {latent} dimensions active{tag}",
                             out / "codes_vs_prior.png")
    moved, shares = traversal_codes(codes[catalogue.train_index])
    steps = moved.shape[1]
    save_grid([decode(row) for row in moved], [f"direction {i + 1}\n{share:.0%} of the variance"
                                               for i, share in enumerate(shares)],
              f"The mean training code moved along the {name}'s main directions{tag}", out / "traversals.png",
              [f"{value:+.1f} sd" for value in torch.linspace(-2, 2, steps).tolist()])
