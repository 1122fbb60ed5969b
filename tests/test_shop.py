"""shop.py: search, precision@k, the attribute direction: what a shop does with a model's codes."""

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import common
import shop


def test_search_ranks_an_exact_duplicate_first():
    torch.manual_seed(0)
    catalogue = torch.randn(50, 16)
    queries = torch.cat([catalogue[[7]] * 3, catalogue[[30]]])  # scale does not matter to cosine
    neighbours = shop.search(queries, shop.unit(catalogue), k=5)
    assert neighbours.shape == (2, 5) and neighbours[:, 0].tolist() == [7, 30]


def test_precision_at_k_on_a_hand_made_example():
    neighbours = torch.tensor([[0, 1, 2], [2, 3, 0]])
    catalogue_labels = ["shoe", "shoe", "shirt", "shirt"]
    # query 0 (shoe): shoe, shoe, shirt -> 2 of 3; query 1 (shirt): shirt, shirt, shoe -> 2 of 3
    assert shop.precision_at_k(["shoe", "shirt"], catalogue_labels, neighbours) == pytest.approx(4 / 6)
    assert shop.precision_at_k(["dress", "dress"], catalogue_labels, neighbours) == 0


def test_the_search_index_holds_training_products_only(tiny_catalogue, tmp_path):
    catalogue = common.load_catalogue(tiny_catalogue, image_size=32)
    # Pixels as codes: a test product in the index would be its own first neighbour.
    pixels = catalogue.images.flatten(1).float()
    neighbours = shop.evaluate_search(lambda images: images.flatten(1).float(), pixels, catalogue,
                                      SimpleNamespace(out=tmp_path))
    assert neighbours.shape == (len(catalogue.test_index), 5)
    assert set(neighbours.flatten().tolist()) <= set(catalogue.train_index.tolist())
    assert "precision@5_ProductType" in (tmp_path / "search.csv").read_text()


def test_the_attribute_direction_uses_training_products_only():
    metadata = pd.DataFrame({"Category": ["Apparel"] * 6 + ["Footwear"] * 2,
                             "Colour": ["Black", "Black", "Red", "Blue", "Black", "Red", "Black", "Red"]})
    casts = torch.tensor([0.0, 0.1, -0.1, 0.2, 0.0, 0.0, 0.0, 0.0])
    black = torch.tensor((metadata["Colour"] == "Black").values).float()
    codes = torch.stack([3 * black + 10 * casts, torch.ones(8)], 1)
    train = torch.tensor([0, 1, 2, 3, 6, 7])  # products 4 and 5 are test products
    codes[4:6] = 1000.0  # if a test product counted, the direction would be huge
    direction = shop.attribute_direction(codes, metadata, train, "Colour", "Black", casts, "Apparel")
    assert direction.tolist() == pytest.approx([3.0, 0.0], abs=1e-4)
    assert torch.equal(shop.attribute_direction(codes, metadata, train, "Colour", "Green", casts, "Apparel"),
                       torch.zeros(2))
    assert torch.equal(shop.attribute_direction(codes, metadata, train, "Colour", "Black", casts, "Bags"),
                       torch.zeros(2))


def test_search_with_groups_lists_each_product_once():
    index = shop.unit(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.9, 0.3], [0.5, 0.5], [0.0, 1.0]]))
    groups = torch.tensor([0, 0, 1, 2, 3])  # rows 0 and 1: one photo listed twice
    query = torch.tensor([[1.0, 0.0]])
    assert shop.search(query, index, k=3).tolist() == [[0, 1, 2]]
    assert shop.search(query, index, k=3, groups=groups).tolist() == [[0, 2, 3]]
    assert shop.first_of_each_group([1, 0, 4, 2], groups, 2) == [1, 4]


def test_search_in_blocks_of_queries_answers_as_all_at_once():
    generator = torch.Generator().manual_seed(0)
    queries, index = torch.randn(50, 8, generator=generator), shop.unit(torch.randn(40, 8, generator=generator))
    groups = torch.arange(40) // 2  # pairs of copies
    for grouped in (None, groups):
        whole = shop.search(queries, index, k=5, groups=grouped, block=1000)
        assert whole.shape == (50, 5)
        assert torch.equal(shop.search(queries, index, k=5, groups=grouped, block=7), whole)  # 7 blocks, the last short


def test_the_black_direction_leaves_out_the_colour_cast_black_products_also_differ_in():
    # Codes of darkness and warmth: black products are dark and neutral (cast 0), the others warm (cast < 0).
    metadata = pd.DataFrame({"Category": ["Apparel"] * 6, "Colour": ["Black", "Black", "White", "Brown", "Red", "Pink"]})
    casts = torch.tensor([0.0, -0.02, 0.0, -0.10, -0.08, -0.05])
    darkness = torch.tensor([5.0, 5, 1, 1, 1, 1])
    codes = torch.stack([darkness, 20 * casts], 1)
    direction = shop.attribute_direction(codes, metadata, torch.arange(6), "Colour", "Black", casts, "Apparel")
    plain = codes[:2].mean(0) - codes[2:].mean(0)  # the difference of means: darker, and colder (+0.95)
    assert plain[1] > 0.5
    assert direction.tolist() == pytest.approx([4.0, 0.0], abs=1e-4)  # darker only: the warmth stays out of it


def test_the_colour_of_a_product_is_read_on_its_own_pixels():
    photos = torch.ones(1, 3, 8, 8)  # a white photo with a grey product in its top left quarter
    photos[:, :, :4, :4] = 0.5
    images = torch.zeros(1, 3, 8, 8)  # the background, black here, must not count
    images[0, :, :4, :4] = torch.tensor([0.3, 0.5, 0.5]).view(3, 1, 1)  # the product turned blue-green
    luminance, cast = shop.colour_of_products(images, photos)
    assert luminance.item() == pytest.approx(0.299 * 0.3 + 0.587 * 0.5 + 0.114 * 0.5)
    assert cast.item() == pytest.approx(0.2)
