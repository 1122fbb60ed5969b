"""Images that are not product photos, and how many of them `--query` says are unlike the catalogue.

Builds 40 images from what the six packages hold offline: rendered ones (a blank page, flat colours,
gradients, noise, text, logos, patterns, shapes, a chart, a drawn landscape and flower) and the
sample photos matplotlib ships (a portrait, a wrapped present, a logo, terrain, a scan), cropped,
turned and recoloured. Then, for each trained model given, it scores them as `--query` does and
prints the share flagged, against the share of the real test photos flagged:

    python tools/non_products.py out/non_products                        # the images only
    python tools/non_products.py out/non_products --ae out/ae/model.pt --vae out/vae/model.pt --data DATA

The test photos are scored fairly: the threshold a photo is judged by is set on the other half of
the test photos (two halves, each judged by the other's threshold), never on the photo itself.
"""

import argparse
import math
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib import cbook
from PIL import Image, ImageDraw, ImageFont, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402  (the repo's modules, found from tools/)
import compare  # noqa: E402
import shop  # noqa: E402


def font(size):
    """A TrueType font of `size` px: matplotlib ships DejaVu Sans."""
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"), size)


def canvas(colour="white", size=(400, 300)):
    image = Image.new("RGB", size, colour)
    return image, ImageDraw.Draw(image)


def rendered():
    """{name: image} of things that are not products, drawn here."""
    rng = np.random.default_rng(0)
    images = {"blank_page": canvas()[0], "flat_red": canvas((200, 30, 40))[0], "flat_grey": canvas((180, 180, 180))[0],
              "flat_black": canvas("black")[0]}
    paper = np.clip(245 + rng.normal(0, 4, (300, 400, 1)), 0, 255).repeat(3, 2)
    images["paper"] = Image.fromarray(paper.astype(np.uint8))
    x = np.linspace(0, 1, 400)[None, :, None]
    images["gradient"] = Image.fromarray((255 * (x * [1, 0.9, 0] + (1 - x) * [0, 0.3, 1])).repeat(300, 0)
                                         .astype(np.uint8))
    yy, xx = np.mgrid[-1:1:300j, -1:1:400j]
    radius = np.sqrt(xx**2 + yy**2)[..., None] / 1.4
    images["radial_gradient"] = Image.fromarray((255 * (radius * [0.1, 0.1, 0.4] + (1 - radius) * [1, 0.8, 0.2]))
                                                .astype(np.uint8))
    images["noise_small"] = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    images["noise_large"] = Image.fromarray(rng.integers(0, 256, (900, 900, 3), dtype=np.uint8))
    image, draw = canvas()
    draw.text((30, 100), "SALE", fill=(220, 20, 30), font=font(90))
    draw.text((60, 200), "50% OFF", fill=(220, 20, 30), font=font(50))
    images["sale_banner"] = image
    image, draw = canvas()
    for line in range(9):
        draw.text((20, 20 + 30 * line), "Lorem ipsum dolor sit amet, consectetur"[:20 + 2 * line], fill="black",
                  font=font(18))
    images["text_page"] = image
    image, draw = canvas(size=(300, 300))
    draw.ellipse((40, 40, 260, 260), fill=(30, 90, 200))
    draw.text((78, 115), "ACME", fill="white", font=font(48))
    images["round_logo"] = image
    image, draw = canvas(size=(300, 300))
    for row in range(21):
        for column in range(21):
            if rng.random() < 0.5 or (row < 7 and column < 7):
                draw.rectangle((10 + 13 * column, 10 + 13 * row, 22 + 13 * column, 22 + 13 * row), fill="black")
    images["qr_like_blocks"] = image
    checker = ((np.indices((300, 300)) // 30).sum(0) % 2 * 255).astype(np.uint8)
    images["checkerboard"] = Image.fromarray(checker).convert("RGB")
    stripes = (((np.indices((300, 300)).sum(0) // 20) % 2)[..., None] * [[[230, 40, 40]]] +
               (1 - ((np.indices((300, 300)).sum(0) // 20) % 2))[..., None] * [[[250, 240, 200]]])
    images["stripes"] = Image.fromarray(stripes.astype(np.uint8))
    image, draw = canvas((250, 240, 230), (300, 300))
    for row in range(6):
        for column in range(6):
            draw.ellipse((10 + 50 * column, 10 + 50 * row, 40 + 50 * column, 40 + 50 * row), fill=(20, 120, 60))
    images["polka_dots"] = image
    image, draw = canvas(size=(300, 300))
    draw.polygon([(150, 30), (270, 250), (30, 250)], fill=(240, 180, 0))
    images["yellow_triangle"] = image
    image, draw = canvas(size=(300, 300))
    draw.ellipse((60, 60, 240, 240), outline=(0, 0, 0), width=10)
    draw.ellipse((105, 110, 130, 135), fill="black")
    draw.ellipse((170, 110, 195, 135), fill="black")
    draw.arc((100, 120, 200, 200), 20, 160, fill="black", width=10)
    images["smiley"] = image
    image, draw = canvas(size=(400, 200))
    for bar in range(60):
        if rng.random() < 0.55:
            draw.rectangle((20 + 6 * bar, 20, 23 + 6 * bar, 160), fill="black")
    draw.text((140, 165), "4 006381 333931", fill="black", font=font(16))
    images["barcode"] = image
    image, draw = canvas(size=(400, 300))
    for index, height in enumerate([120, 200, 80, 240, 160]):
        draw.rectangle((40 + 70 * index, 270 - height, 90 + 70 * index, 270), fill=(40, 110, 190))
    draw.line((30, 270, 390, 270), fill="black", width=3)
    draw.line((30, 20, 30, 270), fill="black", width=3)
    images["bar_chart"] = image
    sky = np.linspace([90, 150, 230], [200, 225, 250], 300)[:, None, :].repeat(400, 1)
    landscape = Image.fromarray(sky.astype(np.uint8))
    draw = ImageDraw.Draw(landscape)
    draw.ellipse((300, 30, 360, 90), fill=(255, 220, 80))
    draw.polygon([(0, 200), (120, 120), (250, 190), (400, 110), (400, 300), (0, 300)], fill=(60, 130, 60))
    draw.polygon([(0, 260), (200, 210), (400, 250), (400, 300), (0, 300)], fill=(40, 100, 40))
    images["drawn_landscape"] = landscape
    image, draw = canvas((60, 140, 50), (300, 300))
    for petal in range(8):
        angle = petal * math.pi / 4
        x, y = 150 + 70 * math.cos(angle), 150 + 70 * math.sin(angle)
        draw.ellipse((x - 45, y - 45, x + 45, y + 45), fill=(230, 90, 160))
    draw.ellipse((115, 115, 185, 185), fill=(250, 210, 40))
    images["drawn_flower"] = image
    return images


def sample_photos():
    """{name: image} from the photos matplotlib ships, and crops, turns and recolours of them."""
    hopper = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    present = Image.open(cbook.get_sample_data("Minduka_Present_Blue_Pack.png"))
    logo = Image.open(cbook.get_sample_data("logo2.png"))
    icon = Image.open(Path(matplotlib.get_data_path()) / "images" / "matplotlib_large.png")
    terrain = cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"]
    topography = cbook.get_sample_data("topobathy.npz")["topo"]
    scan = np.frombuffer(cbook.get_sample_data("s1045.ima.gz").read(), np.uint16).reshape(256, 256)

    def coloured(values, colormap):  # an array of heights as a map's colours
        scaled = (values - values.min()) / (values.max() - values.min())
        return Image.fromarray((255 * matplotlib.colormaps[colormap](scaled)[..., :3]).astype(np.uint8))

    relief = np.gradient(terrain.astype(float))[0]

    def on_a_page(image):  # a photo printed on a white page: its edge is white, as a product photo's is
        page = Image.new("RGB", (image.width + 160, image.height + 120), "white")
        page.paste(image.convert("RGB"), (80, 60))
        return page

    return {"portrait": hopper, "portrait_face": hopper.crop((150, 60, 400, 330)),
            "portrait_turned": hopper.rotate(90, expand=True), "portrait_grey": ImageOps.grayscale(hopper),
            "portrait_blue": Image.merge("RGB", hopper.split()[::-1]), "present": present,
            "present_turned": present.rotate(30, expand=True, fillcolor=(255, 255, 255, 0)),
            "logo": logo, "logo_crop": logo.crop((0, 0, 140, 130)), "icon": icon,
            "terrain": coloured(terrain, "terrain"), "terrain_crop": coloured(terrain[100:250, 150:350], "gist_earth"),
            "relief": coloured(relief, "gray"), "coast": coloured(topography, "viridis"),
            "scan": Image.fromarray((255 * scan / scan.max()).astype(np.uint8)).convert("RGB"),
            "portrait_on_a_page": on_a_page(hopper.crop((150, 60, 400, 330))),
            "terrain_on_a_page": on_a_page(coloured(terrain, "terrain")), "scan_on_a_page": on_a_page(
                Image.fromarray((255 * scan / scan.max()).astype(np.uint8)))}


def build(folder):
    """Writes the images into `folder` as PNG files; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in {**rendered(), **sample_photos()}.items():
        paths.append(folder / f"{name}.png")
        image.save(paths[-1])
    return paths


def judge(encode, reconstruct, photos, edges, found, reference, train_codes):
    """Which photos --query calls unlike the catalogue, with its limits set on the `reference` photos:
    no product found in it, or any of shop.why_unusual's reasons."""
    limits = shop.unusual_limits(reconstruct, reference, encode(reference), train_codes)
    bits = shop.unusualness(photos, reconstruct, limits["variance"]).tolist()
    distances = shop.nearest_distance(encode(photos), train_codes).tolist()
    return [not product or bool(shop.why_unusual(*measures, limits))
            for *measures, product in zip(bits, distances, edges, found)]


def measure(name, checkpoint, paths, data):
    """Prints the share of `paths` that --query flags with the model in `checkpoint`, and the share of
    the test photos it flags, each half judged by limits set on the other; and the same for the
    model's error alone (squared error past the 99th percentile of the test photos', the old note)."""
    model, state = compare.load_model(name, checkpoint, common.select_device(None))
    size = state["args"]["image_size"]
    catalogue = common.load_catalogue(data, size)
    functions = compare.model_functions(name, model, next(model.parameters()).device)

    def encode(photos):
        return functions["encode"](photos.float() / 255)

    def reconstruct(photos):
        return functions["reconstruct"](photos.float() / 255)

    images, test = catalogue.images, catalogue.test_index
    train_codes = encode(images[catalogue.train_index])
    read = [shop.read_query(str(path), catalogue, size) for path in paths]  # (photo, name, edge, found)
    photos = torch.stack([photo for photo, *_ in read])
    flagged = judge(encode, reconstruct, photos, [edge for _, _, edge, _ in read], [found for *_, found in read],
                    images[test], train_codes)
    files = [catalogue.folder / catalogue.metadata.at[i, "path"] for i in test.tolist()]
    edges = [shop.edge_of(file) if file.is_file() else 0.0 for file in files]  # the synthetic catalogue has none
    halves = [torch.arange(len(test))[start::2] for start in (0, 1)]
    false_alarms = sum(sum(judge(encode, reconstruct, images[test[half]], [edges[i] for i in half.tolist()],
                                 [True] * len(half), images[test[other]], train_codes))
                       for half, other in zip(halves, halves[::-1]))

    def squared_error(photos):
        return ((reconstruct(photos) - photos.float() / 255) ** 2).flatten(1).sum(1)

    alone = squared_error(photos) > squared_error(images[test]).quantile(0.99)
    alone_tests = sum(int((squared_error(images[test[half]]) > squared_error(images[test[other]]).quantile(0.99)).sum())
                      for half, other in zip(halves, halves[::-1]))
    print(f"{name}.py ({checkpoint}): --query flags {sum(flagged)} of {len(paths)} non-products "
          f"({sum(flagged) / len(paths):.0%}) and {false_alarms} of {len(test)} test photos "
          f"({false_alarms / len(test):.1%}); the error alone flags {int(alone.sum())} ({alone.float().mean():.0%}) "
          f"and {alone_tests} ({alone_tests / len(test):.1%})")
    print("  not flagged: " + (", ".join(path.stem for path, hit in zip(paths, flagged) if not hit) or "none"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="where the images are written")
    parser.add_argument("--ae", type=Path, help="an ae.py checkpoint to measure")
    parser.add_argument("--vae", type=Path, help="a vae.py checkpoint to measure")
    parser.add_argument("--data", default=None, help="the photos the models were trained on")
    args = parser.parse_args(argv)
    paths = build(args.folder)
    print(f"wrote {len(paths)} images that are not products to {args.folder}/")
    for name in ("ae", "vae"):
        if getattr(args, name):
            measure(name, getattr(args, name), paths, args.data)


if __name__ == "__main__":
    main()
