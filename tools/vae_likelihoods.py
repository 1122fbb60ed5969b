"""Two VAEs' new products side by side: one trained with the independent Gaussian likelihood
(`--edge-weight 0`), one with the default that makes edges cost (`--edge-weight 1`). Each pair of
rows draws one type of product as vae.py draws it (one_kind), with the same seed, from each model's
own fitted Gaussians; only the checkpoints are read, no photos.

    python vae.py --edge-weight 0 --out out/vae-independent
    python tools/vae_likelihoods.py                    (out/vae-independent against out/vae)
Writes: out/vae-likelihoods.png (model outputs only), or --to
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vae  # noqa: E402  (the repo's root, put on the path above)
from bookkeeping import load_weights, read_checkpoint, written_whole  # noqa: E402
from common import REPO  # noqa: E402
from figures import save_grid  # noqa: E402


def load(path, flag):
    """A vae.py checkpoint: {"model" (on the CPU), "codes" (its fitted code distribution), "flags"}."""
    state = read_checkpoint(path, vae.SCRIPT, flag)
    flags = state["args"]
    model = vae.VAE(flags["image_size"], flags["latent_dim"])
    load_weights(model, state, path)
    if not (state.get("code_distribution") or {}).get("kinds"):
        raise SystemExit(f"error: {flag} {path}: a run stopped before its last epoch; finish it with --resume")
    return {"model": model.eval(), "codes": state["code_distribution"],
            "flags": {**flags, "edge_weight": flags.get("edge_weight", 0.0)}}  # a run from before the flag: 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--left", type=Path, default=REPO / "out" / "vae-independent" / "model.pt",
                        help="the first model.pt: its rows come first")
    parser.add_argument("--right", type=Path, default=REPO / "out" / "vae" / "model.pt", help="the second model.pt")
    parser.add_argument("--kinds", nargs="+", default=["Tshirts", "Sports Shoes", "Casual Shoes", "Heels"],
                        help="the product types drawn, a row pair each")
    parser.add_argument("--columns", type=int, default=8, help="products a row")
    parser.add_argument("--seed", type=int, default=0, help="seeds the draws: the same for both models")
    parser.add_argument("--to", type=Path, default=REPO / "out" / "vae-likelihoods.png", help="the figure")
    args = parser.parse_args(argv)
    if args.columns < 1:
        parser.error("--columns must be at least 1")
    models = [load(args.left, "--left"), load(args.right, "--right")]
    if models[0]["flags"]["image_size"] != models[1]["flags"]["image_size"]:
        raise SystemExit("error: --left and --right were trained at different --image-size; a grid needs one")
    for kind in args.kinds:
        missing = [str(path) for path, run in zip((args.left, args.right), models) if kind not in run["codes"]["kinds"]]
        if missing:
            raise SystemExit(f"error: --kinds {kind}: no training photo of that type in {', '.join(missing)}")
    rows, labels = [], []
    with torch.no_grad():
        for kind in args.kinds:
            for run in models:
                mixture = vae.one_kind(run["codes"], kind)
                z = vae.sample_codes(mixture, args.columns, torch.Generator().manual_seed(args.seed))
                rows.append(run["model"].decode(z))
                labels.append(f"{kind},\nedge weight {run['flags']['edge_weight']:g}")
    title = ("New products of one type, set apart, from two VAEs: trained with the independent Gaussian "
             "(edge weight 0) and with edges that cost (edge weight > 0); each drawn from its own codes' Gaussian")
    args.to.parent.mkdir(parents=True, exist_ok=True)
    save_grid(rows, labels, title, args.to)
    print(f"wrote {args.to}")


if __name__ == "__main__":
    main()
