"""The DAE against the classical denoisers a photographer would pick instead, on dae.py's own test
photos and seeded gaussian noise: OpenCV's non-local means and BM3D (Dabov et al. 2007).

    python tools/classical_denoisers.py --data ../shared/fashion-images --checkpoint out/dae/model.pt
    python tools/classical_denoisers.py --data ../shared/fashion-images --calibrate-nlm

BM3D's package (`pip install bm3d`) may not be used commercially, so the repo does not depend on it:
this tool imports it only when it is installed, and says so in one line when it is not. BM3D is
handed the noise's true sigma, NLM and the DAE each photo's true noise level, as dae.py's table does.
BM3D takes one to three seconds a photo here (--products 100 is ~10 minutes): its scores are cached
in data/processed/, keyed on the photos, the noise and the sigma, so a second model is measured in
seconds.

--calibrate-nlm measures, on 100 training photos (never the test photos the table scores), which
NLM strength h per unit of noise level does best: the value classical.NLM_STRENGTH holds.
"""

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import classical  # noqa: E402
import dae  # noqa: E402
from bookkeeping import load_weights, read_checkpoint, written_whole  # noqa: E402
from common import CACHE_DIR, load_catalogue, shown_products  # noqa: E402

STRENGTHS = (0.05, 0.1, 0.2)  # the DAE's trained range: light, its test strength, twice it


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=None, help="the photos (if not given, the repo's data/)")
    parser.add_argument("--checkpoint", type=Path, default=dae.REPO / "out" / "dae" / "model.pt",
                        help="the DAE to measure (its --image-size and --seed are used)")
    parser.add_argument("--products", type=int, default=dae.TABLE_PRODUCTS,
                        help="score at most this many test photos, spread over the test set (all four columns alike)")
    parser.add_argument("--calibrate-nlm", action="store_true", help="choose NLM's strength on training photos")
    return parser.parse_args(argv)


def bm3d_scores(clean, noisy, sigma):
    """BM3D's PSNR on each photo (N,), handed the true sigma; from the cache when measured before."""
    key = hashlib.sha256(clean.numpy().tobytes() + noisy.numpy().tobytes() + f"{sigma}".encode()).hexdigest()[:16]
    cache = CACHE_DIR / f"bm3d-{key}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    import bm3d

    tick, denoised = time.time(), []
    for number, image in enumerate(noisy):
        denoised.append(torch.from_numpy(bm3d.bm3d_rgb(image.permute(1, 2, 0).double().numpy(), sigma)).float())
        if number % 50 == 49:
            print(f"  BM3D at sigma {sigma:g}: {number + 1} of {len(noisy)} photos, {time.time() - tick:.0f} s",
                  flush=True)
    scores = dae.psnr(torch.stack(denoised).permute(0, 3, 1, 2).clamp(0, 1), clean)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(cache) as temporary:
        torch.save(scores, temporary)
    return scores


def calibrate_nlm(catalogue, seed):
    """NLM's PSNR at each strength per unit of noise level, on 100 training photos spread over them."""
    chosen = catalogue.train_index[torch.linspace(0, len(catalogue.train_index) - 1, 100).long()]
    clean = catalogue.images[chosen].float() / 255
    factors = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2)
    print(f"NLM on {len(clean)} training photos, PSNR in dB by h / noise level:")
    print(f"  {'sigma':>6s}" + "".join(f"{factor:>8g}" for factor in factors))
    for sigma in STRENGTHS:
        noisy = dae.add_noise(clean, "gaussian", sigma, torch.Generator().manual_seed(seed))
        level = dae.noise_level(noisy, clean)
        scores = []
        for factor in factors:
            classical.NLM_STRENGTH = factor
            scores.append(dae.psnr(classical.nlm_filter(noisy, level), clean).mean().item())
        print(f"  {sigma:6g}" + "".join(f"{score:8.2f}" for score in scores))


def main(argv=None):
    args = parse_args(argv)
    if not args.calibrate_nlm:
        try:
            import bm3d  # noqa: F401
        except ImportError:
            raise SystemExit("error: the bm3d package is not installed (pip install bm3d; its licence forbids "
                             "commercial use, so this repo does not depend on it): no BM3D column to measure")
    state = read_checkpoint(args.checkpoint, "dae.py") if not args.calibrate_nlm else None
    size, seed = (state["args"]["image_size"], state["args"]["seed"]) if state else (64, 0)
    catalogue = load_catalogue(args.data, size)
    if args.calibrate_nlm:
        return calibrate_nlm(catalogue, seed)
    model = dae.DenoisingAutoencoder(size, state["args"]["latent_dim"])
    load_weights(model, state, args.checkpoint)
    clean = catalogue.images[shown_products(catalogue, min(args.products, len(catalogue.test_index)))]
    clean = clean.float() / 255
    settings = argparse.Namespace(batch_size=64, device=torch.device("cpu"))
    print(f"{len(clean)} test photos at {size} px, spread over the {len(catalogue.test_index)}, gaussian noise seeded "
          f"as dae.py's table (seed {seed}), PSNR in dB:")
    print(f"  {'sigma':>6s}{'noisy input':>13s}{'OpenCV NLM':>12s}{'BM3D':>8s}{'DAE':>8s}{'DAE - BM3D':>12s}")
    for sigma in STRENGTHS:
        noisy = dae.add_noise(clean, "gaussian", sigma, torch.Generator().manual_seed(seed))
        level = dae.noise_level(noisy, clean)
        row = [dae.psnr(noisy, clean).mean().item(), dae.psnr(classical.nlm_filter(noisy, level), clean).mean().item(),
               bm3d_scores(clean, noisy, sigma).mean().item(),
               dae.psnr(dae.denoise_all(model, noisy, level, settings), clean).mean().item()]
        print(f"  {sigma:6g}{row[0]:13.2f}{row[1]:12.2f}{row[2]:8.2f}{row[3]:8.2f}{row[3] - row[2]:+12.2f}", flush=True)


if __name__ == "__main__":
    main()
