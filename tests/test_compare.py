"""compare.py: the three models and two baselines on the same axes, and the measures it uses."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import ImageFilter

import ae
import classical
import common
import compare
import dae
import vae


@pytest.fixture
def three_models(tmp_path, monkeypatch):
    """The three scripts trained for one epoch on the synthetic catalogue, at 32 px."""
    monkeypatch.setattr(common, "DEFAULT_DATA", tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    flags = ["--image-size", "32", "--latent-dim", "8", "--batch-size", "64", "--device", "cpu", "--epochs", "1"]
    for script in (ae, dae, vae):
        script.main([*flags, "--out", str(tmp_path / script.__name__)])
    return [f"--{name}={tmp_path / name / 'model.pt'}" for name in ("ae", "dae", "vae")]


def test_every_model_and_baseline_gets_every_column(three_models, tmp_path, capsys):
    compare.main([*three_models, "--out", str(tmp_path / "compare"), "--samples", "60", "--classifier-epochs", "1",
                  "--device", "cpu"])
    rows = json.loads((tmp_path / "compare" / "summary.json").read_text())["rows"]
    assert [row["model"] for row in rows] == ["ae.py", "dae.py", "vae.py", "raw pixels", "PCA, 8 components"]
    for row in rows:
        for key in ("psnr_noisy", "code_size", "precision@5_ProductType", "precision@5_Colour", "probe_ProductType",
                    "probe_Category"):
            assert row[key] is not None, (row["model"], key)
    by_name = {row["model"]: row for row in rows}
    assert by_name["dae.py"]["code_size"] == 8 * 16  # its grid averaged to 4x4
    assert "classifier_fd_mixture" not in by_name["dae.py"]  # a code alone cannot be decoded
    assert {"classifier_fd_mixture", "classifier_fd_one", "classifier_fd_prior", "pixel_fd_mixture",
            "recognised_Tshirts", "sharpness_mixture"} <= set(by_name["vae.py"])
    assert 0 <= by_name["ae.py"]["recognised_Tshirts"] <= 1 and "recognised_Sports Shoes" not in by_name["ae.py"]
    assert 0 <= by_name["ae.py"]["recognised_Tshirts_reconstructed"] <= 1
    assert by_name["ae.py"]["parameters"] > 1000 and by_name["ae.py"]["seconds_per_epoch"] > 0
    assert by_name["raw pixels"]["psnr_clean"] is None and by_name["PCA, 8 components"]["psnr_clean"] > 10
    table = (tmp_path / "compare" / "table.md").read_text()
    assert table.count("\n| ") == 5  # a row for each model and baseline, under the header
    printed = capsys.readouterr().out
    assert all(line in printed for line in table.splitlines())  # the table printed is the table written
    named = [line.split()[1] for line in printed.splitlines() if line.startswith("wrote ")]
    assert {Path(path).name for path in named} == {"classifier.pt", "table.md", "summary.json", "same_products.png"}
    assert all(Path(path).is_file() for path in named)
    assert (tmp_path / "compare" / "same_products.png").is_file()
    # A second run, with the classifier cached, prints the same table to the digit.
    compare.main([*three_models, "--out", str(tmp_path / "compare"), "--samples", "60", "--classifier-epochs", "1",
                  "--device", "cpu"])
    assert (tmp_path / "compare" / "table.md").read_text() == table


def test_a_missing_model_is_a_one_line_error_naming_it(tmp_path):
    with pytest.raises(SystemExit, match=f"--ae {tmp_path / 'none' / 'model.pt'}: no model.pt there \\(train first: "
                                         f"python ae.py --out {tmp_path / 'none'}\\)"):
        compare.main(["--ae", str(tmp_path / "none" / "model.pt")])


def test_the_classifier_distance_is_zero_for_a_set_against_itself_and_grows_with_blur(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DEFAULT_DATA", tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    catalogue = common.load_catalogue(None, image_size=32)
    catalogue.images = catalogue.images.float() / 255  # as compare.main measures
    args = SimpleNamespace(out=tmp_path, seed=0, classifier_epochs=2, device=torch.device("cpu"))
    classifier, classes = compare.train_classifier(catalogue, args)
    assert classes == sorted(set(catalogue.metadata["ProductType"]))
    photos = catalogue.images[catalogue.train_index]
    features = compare.in_batches(classifier.features, photos, args.device)
    assert abs(compare.frechet(features, features)) < 1e-6
    distances = [compare.frechet(compare.in_batches(classifier.features, classical.pillow_filter(
        photos, ImageFilter.GaussianBlur(radius)), args.device), features) for radius in (0.5, 1.5, 3)]
    assert 0 < distances[0] < distances[1] < distances[2]
    assert (tmp_path / "classifier.pt").is_file()  # cached: a second run loads it
    reloaded, _ = compare.train_classifier(catalogue, args)
    assert torch.equal(reloaded.head.weight, classifier.head.weight)


def test_the_linear_probe_reads_separable_labels_and_not_shuffled_ones():
    torch.manual_seed(0)
    labels = ["shoe", "shirt"] * 100
    codes = torch.randn(200, 16)
    codes[:, 3] += torch.tensor([4.0 if label == "shoe" else -4.0 for label in labels])  # one dimension tells
    assert compare.linear_probe(codes[:150], labels[:150], codes[150:], labels[150:]) == 1.0
    shuffled = [labels[i] for i in torch.randperm(200).tolist()]
    assert 0.25 < compare.linear_probe(codes[:150], shuffled[:150], codes[150:], shuffled[150:]) < 0.75


def test_sharpness_is_the_edge_energy_that_blur_removes_and_an_even_shift_keeps():
    torch.manual_seed(0)
    photos = torch.rand(20, 3, 16, 16)
    blurred = (photos + photos.roll(1, -1) + photos.roll(1, -2) + photos.roll((1, 1), (-2, -1))) / 4
    assert compare.edge_energy(photos + 0.2) == pytest.approx(compare.edge_energy(photos))
    assert compare.edge_energy(blurred) < 0.5 * compare.edge_energy(photos)
    stripes = torch.zeros(1, 3, 4, 4)
    stripes[..., ::2] = 1  # across: every difference is 1; down: none
    assert compare.edge_energy(stripes) == pytest.approx(0.5)


def test_the_pixel_frechet_distance_is_zero_for_the_same_set_and_grows_with_the_difference():
    torch.manual_seed(0)
    photos = torch.rand(300, 3, 16, 16)
    to_features = compare.pixel_features(photos)
    reference = to_features(photos)
    assert abs(compare.frechet(reference, reference)) < 1e-6
    assert 0 < compare.frechet(to_features(photos * 0.9), reference) < compare.frechet(to_features(photos * 0.5),
                                                                                       reference)


def test_recognised_reconstructions_are_those_of_the_test_photos_of_that_type(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DEFAULT_DATA", tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    catalogue = common.load_catalogue(None, image_size=32)
    catalogue.images = catalogue.images.float() / 255
    test = set(catalogue.test_index.tolist())
    types = catalogue.metadata["ProductType"].tolist()

    def classify(images):  # knows a test photo by heart and names its type; calls anything else Heels
        matches = [(catalogue.images == image).flatten(1).all(1).nonzero().flatten().tolist() for image in images]
        return [types[found[0]] if found and found[0] in test else "Heels" for found in matches]

    def first_numbers(images):  # a stand-in for both feature maps: the distances are not what is tested
        return images.flatten(1)[:, :8].double()

    reference = first_numbers(catalogue.images[:50])
    features = {"classifier": first_numbers, "pixels": first_numbers, "classifier_train": reference,
                "pixels_train": reference}
    identity = {"encode": lambda images: torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1),
                "reconstruct": lambda images: images, "decode": lambda codes: torch.zeros(len(codes), 3, 32, 32)}
    row = compare.measure("identity", identity, catalogue, features, classify, SimpleNamespace(seed=0, noise=0.1,
                                                                                               samples=20))
    assert row["recognised_Tshirts_reconstructed"] == 1.0  # each test T-shirt, given back as it is
    assert row["recognised_Tshirts"] == 0.0  # the samples (blank here) are no test photo


def test_codes_of_one_and_two_numbers_are_compared_too(smoke_flags, tmp_path):
    for script, latent in ((ae, "1"), (vae, "2"), (dae, "1")):
        script.main([*smoke_flags[:2], "--out", str(tmp_path / script.__name__), *smoke_flags[4:6], "--latent-dim",
                     latent, "--device", "cpu", "--epochs", "1"])
    compare.main([f"--{name}={tmp_path / name / 'model.pt'}" for name in ("ae", "dae", "vae")] +
                 ["--data", smoke_flags[1], "--out", str(tmp_path / "compare"), "--samples", "20",
                  "--classifier-epochs", "1", "--device", "cpu"])
    rows = {row["model"]: row for row in json.loads((tmp_path / "compare" / "summary.json").read_text())["rows"]}
    assert rows["ae.py"]["code_size"] == 1 and rows["vae.py"]["code_size"] == 2
    assert rows["PCA, 1 components"]["psnr_clean"] > 0 and rows["vae.py"]["classifier_fd_prior"] >= 0


def test_with_only_a_vae_trained_the_table_leaves_the_others_out_and_says_so(smoke_flags, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.setattr(compare, "REPO", tmp_path / "a fresh clone")  # its out/ holds no ae or dae model
    vae.main([*smoke_flags, "--epochs", "1"])
    compare.main(["--vae", str(tmp_path / "out" / "model.pt"), "--data", smoke_flags[1], "--out",
                  str(tmp_path / "compare"), "--samples", "20", "--classifier-epochs", "1", "--device", "cpu"])
    rows = json.loads((tmp_path / "compare" / "summary.json").read_text())["rows"]
    assert [row["model"] for row in rows] == ["vae.py", "raw pixels", "PCA, 8 components"]
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert [note for note in notes if "is left out" in note] == [
        f"note: {tmp_path / 'a fresh clone' / 'out' / name / 'model.pt'} does not exist, so {name} is left out "
        f"(python {name}.py trains it)" for name in ("ae", "dae")]
    with pytest.raises(SystemExit, match="error: no model to compare"):
        compare.main(["--data", smoke_flags[1], "--out", str(tmp_path / "compare")])
