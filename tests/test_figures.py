"""figures.py: the code space the AE and VAE figures draw (the plane, its grid, the traversals)."""

import torch

import figures


def test_the_vae_grid_stands_at_standard_normal_quantiles_and_the_ae_grid_spans_the_box_of_its_codes():
    codes = torch.randn(500, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([3.0, 0.5]) + 1
    quantiles = torch.distributions.Normal(0, 1).icdf(torch.linspace(0.05, 0.95, 8))
    plane = figures.compute_code_plane(codes, prior=True)
    assert plane["grid"].shape == (64, 2)
    assert {tuple(point) for point in plane["grid"].tolist()} == {(x, y) for x in quantiles.tolist()
                                                                 for y in quantiles.tolist()}
    assert plane["grid"][0].tolist() == [quantiles[0].item(), quantiles[-1].item()]  # read as a plot: top left first
    box = figures.compute_code_plane(codes, prior=False)["grid"]
    assert torch.allclose(box.min(0).values, codes.min(0).values) and torch.allclose(box.max(0).values,
                                                                                     codes.max(0).values)


def test_a_longer_code_is_drawn_on_its_two_main_directions():
    generator = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(6, 6, generator=generator))[0].T  # 6 orthonormal rows
    codes = (torch.randn(2000, 6, generator=generator) * torch.tensor([5.0, 2, 0.3, 0.2, 0.1, 0.1])) @ directions
    plane = figures.compute_code_plane(codes, prior=True)
    assert torch.allclose(plane["axes"].abs(), directions[:2].abs(), atol=0.02)  # up to their sign
    assert plane["names"][0].startswith("main direction 1 (8")  # 25 of 29.15: 86 % of the variance


def test_a_traversal_moves_the_mean_code_along_its_own_direction_only():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randn(3000, 4, generator=generator) * torch.tensor([4.0, 2, 1, 0.5]) + torch.tensor([1.0, 2, 3, 4])
    moved, shares = figures.traversal_codes(codes, rows=3, steps=5)
    assert moved.shape == (3, 5, 4) and torch.all(shares[:-1] >= shares[1:])
    directions = figures.main_directions(codes)[0]
    for row in range(3):
        offsets = moved[row] - codes.mean(0)  # (steps, latent)
        along = offsets @ directions[row]
        assert torch.allclose(offsets, along[:, None] * directions[row], atol=1e-4)  # nothing off its direction
        spread = ((codes - codes.mean(0)) @ directions[row]).std()
        assert torch.allclose(along, torch.linspace(-2, 2, 5) * spread, atol=1e-3)  # -2 to +2 standard deviations
