"""A run's bookkeeping, written once for ae.py, dae.py and vae.py: the flags that say where a run
reads and writes, the command line that reruns it, the checkpoint (saved atomically, loaded with the
flags that define the model), metrics.csv and the epoch's line, the guards on --out, the learning-rate
schedule, and the judgement that a run has diverged.

None of it is a lesson: a first reading of a script may skip every name imported from here. Not
here: the photos (common.py), the figures (figures.py), the model, loss, training loop and sampling
(each script's own).
"""

import csv
import functools
import math
import os
import shlex
import secrets
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import filelock
import torch

from common import SYNTHETIC, data_folder, select_device


# ----------------------------------------------------------------------------- flags and checkpoints
def flag_name(key):
    return "--" + key.replace("_", "-")


def add_run_flags(parser, out, tools):
    """The flags that say where a run reads and writes, and what it does with a saved model."""
    parser.add_argument("--data", default=None, help="folder of photos, or 'synthetic' for the drawn catalogue; if "
                        "not given, the repo's data/, where the first run downloads the dataset")
    parser.add_argument("--out", type=Path, default=out, help="where figures and model.pt go")
    parser.add_argument("--overwrite", action="store_true", help="train over a model already in --out")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps; if not given, the best available")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (for GPUs, CPUs with AMX)")
    parser.add_argument("--figures-only", action="store_true", help="load the checkpoint, redraw, no training")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint "
                        "(OUT/model.pt, or --checkpoint's, left as it is) into --out, which holds no model or that run")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="the model --figures-only, --resume or a tool loads; if not given, OUT/model.pt")
    if tools:  # ae.py and vae.py: sampling, and search on the model's codes
        parser.add_argument("--num-samples", type=int, default=0,
                            help="also write N new products to OUT/samples/, in place of an earlier call's")
        parser.add_argument("--query", nargs="+", default=None, metavar="PHOTO_OR_PRODUCTID",
                            help="photo files or ProductIds: print the products most like each")
        parser.add_argument("--product-type", default=None, help="--num-samples draws products of this type only "
                                                                 "(a folder without fashion.csv: a first-level folder)")
        parser.add_argument("--top", type=int, default=5, help="how many products --query lists")
        parser.add_argument("--duplicates", type=float, nargs="?", const=0.99, default=None, metavar="SIMILARITY",
                            help="list groups of products whose codes have at least this cosine similarity")


def check_flags(parser, args):
    """The checks every script's flags need; a bad one is a one-line error naming it."""
    for flag in ("epochs", "batch_size", "latent_dim", "top"):
        if getattr(args, flag, 1) < 1:
            parser.error(f"{flag_name(flag)} must be at least 1")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    size = getattr(args, "image_size", 64)  # each model halves it four times, and needs 2 pixels at the end
    if size < 32 or size % 16:
        parser.error(f"--image-size {size}: must be a multiple of 16, at least 32")
    samples_only = args.figures_only and getattr(args, "num_samples", 0)  # needs the checkpoint, no photos
    if args.data not in (None, SYNTHETIC) and not Path(args.data).is_dir() and not samples_only:
        parser.error(f"--data {args.data}: no such folder")
    tools = [getattr(args, flag, None) for flag in ("query", "duplicates", "clean")]
    if args.checkpoint and not (args.figures_only or args.resume or any(tool is not None for tool in tools)):
        parser.error("--checkpoint names the model to load with --figures-only or --resume; "
                     "training writes OUT/model.pt")
    if getattr(args, "duplicates", None) is not None and not -1 <= args.duplicates <= 1:
        parser.error("--duplicates must be a cosine similarity between -1 and 1")
    if getattr(args, "num_samples", 0) < 0:
        parser.error("--num-samples cannot be negative")
    for flag in ("beta", "edge_weight"):  # vae.py's weights in its loss
        if not 0 <= getattr(args, flag, 0) < math.inf:
            parser.error(f"{flag_name(flag)} must be a number, at least 0")
    return args


TRAINING_FLAGS = ("epochs", "batch_size", "lr", "seed", "data")  # how a run was trained: --resume takes them from it


def start_run(script, args, defaults, model_flags, load):
    """Print the command that reruns this run; pick the device (a flag's own checks come first); hold
    --out (hold_out) unless the run is a tool's; load the checkpoint when `load` (with the photos it
    was trained on, unless --data names others) and make sure training destroys no model (guard_out),
    all before the photos are read, so that a wrong command fails at once; seed. Returns the
    checkpoint's path and its contents (None when nothing was loaded)."""
    def value(v):  # as a shell reads it back: a list as its items, a name with spaces quoted
        return " ".join(shlex.quote(str(item)) for item in (v if isinstance(v, list) else [v]))

    print("python", script, *[flag_name(k) + ("" if v is True else f" {value(v)}") for k, v in vars(args).items()
                              if v != defaults[k] and k != "data"], "--data", shlex.quote(str(data_folder(args.data))))
    args.device = select_device(args.device)
    tool = any(getattr(args, flag, None) is not None for flag in ("query", "duplicates", "clean"))
    if not tool:
        hold_out(args.out)  # every run that writes its model, metrics or figures; the tools write files of their own
    checkpoint = args.checkpoint or args.out / "model.pt"
    flags = model_flags + (TRAINING_FLAGS if args.resume else ("data",))
    given = "--checkpoint" if args.checkpoint else "--out"  # the flag that named the file, for its errors
    state = load_checkpoint(checkpoint, script, args, defaults, flags, given) if load else None
    if not (tool or args.figures_only):
        guard_out(script, args, state)
    torch.manual_seed(args.seed)
    # Numbers below ~1e-38 ("denormals") take a slow path in x86 CPUs, and a well-trained model's
    # gradients hold many of them; flushed to zero they change nothing visible.
    torch.set_flush_denormal(True)
    return checkpoint, state


def read_checkpoint(path, script, flag="--checkpoint"):
    """The contents of a model.pt that `script` saved; anything else is a one-line error naming `flag`."""
    if not path.is_file():
        raise SystemExit(f"error: {flag} {path.parent if flag == '--out' else path}: no model.pt there (train first: "
                         f"python {script} --out {shlex.quote(str(path.parent))})" if path.name == "model.pt" else
                         f"error: {flag} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"error: {flag} {path}: not a readable checkpoint ({error.__class__.__name__})")
    if not isinstance(state, dict) or state.get("script") != script:
        found = state.get("script", "an unknown script") if isinstance(state, dict) else "an unknown script"
        raise SystemExit(f"error: {flag} {path}: saved by {found}, not by {script}")
    return state


def load_checkpoint(path, script, args, defaults, flags, given="--checkpoint"):
    """A saved run. The flags that define it (`flags`) are taken from it, and said so; a flag that
    the command line sets to another value than the saved one is an error naming it."""
    state, restored = read_checkpoint(path, script, given), []
    for flag in flags:
        if flag not in state["args"]:  # a model.pt from before the flag: nothing to take (load_weights says if it fits)
            continue
        saved, given = state["args"].get(flag), getattr(args, flag)
        if flag == "data" and given is not None:  # the photos may have moved: a --data given wins
            continue
        if given != saved and given != defaults[flag]:
            why = (" (--resume finishes a run's own schedule, whose learning rate falls to ~0 at its last epoch and "
                   f"cannot be stretched; to train {given} epochs, train anew with --overwrite or another --out)"
                   if flag == "epochs" else "")
            raise SystemExit(f"error: --checkpoint {path} was trained with {flag_name(flag)} {saved}, but this run "
                             f"asks for {given}; leave {flag_name(flag)} out or pass {saved}{why}")
        if given != saved:
            setattr(args, flag, saved)
            restored.append(f"{flag_name(flag)} {saved}")
    print(f"loaded {path} (epoch {len(state['history'])})" + (f", with {' '.join(restored)}" if restored else ""))
    return state


def load_weights(model, state, path):
    """Put a checkpoint's weights into `model`; a model.pt whose weights do not fit it is a one-line error."""
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError:  # shapes or names that differ: an earlier version of the script made another model
        raise SystemExit(f"error: {path}: its weights do not fit {state['script']}'s model as it is now (saved by an "
                         f"earlier version): train it again, into another --out or with --overwrite") from None


def restore(model, state, path):
    """Put a loaded run's weights (from `path`) into `model`; returns its history, the code distribution it
    fitted and its samples_by_epoch [(epoch, images)]: [], None and [] for a new run."""
    if state is None:
        return [], None, []
    load_weights(model, state, path)
    return state["history"], state.get("code_distribution"), state.get("samples_by_epoch", [])


def finished(state):
    return len(state["history"]) >= state["args"]["epochs"]


def same_run(earlier, later):
    """Whether checkpoint `later` is the run of `earlier` at or past its epoch: its history begins with
    every row of earlier's (rows that hold each epoch's time in seconds: no two runs share them)."""
    return later["history"][:len(earlier["history"])] == earlier["history"]


def guard_out(script, args, state):
    """Make sure that training into --out destroys no model: not another script's, and not a run of
    this one unless --overwrite says so. --resume continues the checkpoint's run into --out when --out
    holds no model, or that same run at or before the checkpoint's epoch (the checkpoint itself, say);
    the checkpoint's own file is never written. A finished run has nothing to resume: it is redrawn.
    A model of the drawn catalogue gives way to a run that did not ask for it (--data synthetic): it
    is what a first run made offline, not a user's work."""
    target = args.out / "model.pt"
    try:
        found = torch.load(target, map_location="cpu", weights_only=True) if target.is_file() else {"script": script}
    except Exception as error:
        if not args.overwrite:
            raise SystemExit(f"error: --out {args.out}: its model.pt is not a readable checkpoint "
                             f"({error.__class__.__name__}); pass another --out, or --overwrite to replace it")
        found = {"script": script}
    if found.get("script") != script:
        raise SystemExit(f"error: --out {args.out} holds a model of {found.get('script')}; train {script} into "
                         f"another --out (or delete {target} first)")
    if "history" in found and not args.overwrite:
        done = f"{len(found['history'])} of {found['args']['epochs']} epochs"
        drawn = found["args"].get("catalogue", {}).get("synthetic")  # trained on the drawn catalogue
        if drawn and not args.resume and args.data != SYNTHETIC:  # a stand-in for photos, not a user's work
            print(f"note: --out {args.out} holds a model of {script} trained on the drawn catalogue ({done}); this "
                  f"run replaces it (--data synthetic keeps such a model unless --overwrite is given)")
            return
        if not args.resume:
            raise SystemExit(f"error: --out {args.out} holds a model of {script} ({done}); pass another --out, "
                             f"--resume to continue it, or --overwrite to replace it")
        if not same_run(found, state):
            ahead = same_run(state, found)  # the checkpoint is an earlier state of the run in --out
            raise SystemExit(f"error: --out {args.out} holds " + (f"this run further along ({done}); continue it "
                             f"with --resume --out {args.out}" if ahead else f"another model of {script} ({done}"
                             f"{', finished' if finished(found) else ''}), which resuming {args.checkpoint} there "
                             f"would replace; pass an empty --out, or --overwrite to replace it"))
    if args.resume and finished(state):
        print(f"note: {args.checkpoint or target} has finished all {len(state['history'])} epochs: nothing to "
              f"resume, so this run only redraws its figures (as --figures-only does)")
        args.figures_only = True


def prepare_out(args, catalogue, state):
    """Record what the model is trained on (and say so if it is not what the checkpoint saw), make --out."""
    args.catalogue = {"folder": str(catalogue.folder), "synthetic": catalogue.synthetic,
                      "photos": len(catalogue.images)}
    trained_on = state["args"].get("catalogue") if state else None
    if trained_on and not trained_on["synthetic"] and catalogue.synthetic and args.data != SYNTHETIC:
        raise SystemExit(f"error: the model was trained on real photos ({trained_on['folder']}), and none were found "
                         f"for this run; pass --data with them (or --data synthetic to show it the drawn catalogue)")
    if trained_on and trained_on["synthetic"] != catalogue.synthetic:
        kind = {True: "the synthetic catalogue", False: "real photos"}
        print(f"note: this model was trained on {kind[trained_on['synthetic']]} ({trained_on['folder']}); "
              f"this run shows it {kind[catalogue.synthetic]}")
    args.out.mkdir(parents=True, exist_ok=True)


def resume_training(state, optimizer, schedule, generator, args):
    """Everything the next epoch depends on, so that a resumed run ends as an uninterrupted one."""
    length = "total_steps" if hasattr(schedule, "total_steps") else "T_max"  # one cycle's, or a cosine's
    steps, saved = getattr(schedule, length), state["schedule"][length]
    if steps != saved:  # other photos, so other batches: the schedule cannot go on
        trained_on = state["args"].get("catalogue", {})
        raise SystemExit(f"error: --resume: the checkpoint was trained on {trained_on.get('photos')} photos in "
                         f"{trained_on.get('folder')} ({saved} steps in all), and this run reads others ({steps} "
                         f"steps); pass the --data it was trained on")
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    generator.set_state(state["batch_rng"])
    torch.set_rng_state(state["torch_rng"])


def check_epoch(epoch, train, test, seconds, count, args, limit):
    """One row of metrics.csv: the epoch, every train_ and test_ number, the time it took.

    A run that diverged stops here, before its checkpoint is written, so the last good model is kept:
    a loss that is no longer finite, or a test loss past `limit` (divergence_limit). It is judged on
    the test pass: that is the model about to be saved, in the mode it will be used in, while the
    training loss averages a model that changed over the epoch (on moved photos, sampled codes or
    random noise levels)."""
    row = {"epoch": epoch, **{f"train_{k}": v for k, v in train.items()}, **{f"test_{k}": v for k, v in test.items()},
           "seconds": seconds, "images_per_second": count / seconds}
    kept = (f"{args.out / 'model.pt'} still holds the model of epoch {epoch - 1}" if epoch > 1 else
            "no epoch finished, so no model was saved")
    if not all(math.isfinite(value) for value in row.values()):
        raise SystemExit(f"error: the loss became non-finite in epoch {epoch}; try a smaller --lr than {args.lr:.3g}. "
                         f"{kept}")
    if test["loss"] > limit["loss"]:
        raise SystemExit(f"error: training diverged in epoch {epoch} (test loss {test['loss']:,.1f}, worse than "
                         f"{limit['start']} with twice its error: {limit['loss']:,.1f}); try a smaller --lr than "
                         f"{args.lr:.3g}. {kept}")
    return row


def end_epoch(script, model, history, row, args, optimizer, schedule, generator, **extra):
    """Append the epoch's row to the history; save the checkpoint and metrics.csv, each written whole
    under a temporary name and renamed. A Ctrl-C waits until both are written, so that metrics.csv
    always has one row per epoch of the model.pt beside it."""
    history.append(row)
    with interrupts_deferred():
        save_checkpoint(args.out / "model.pt", script, model, history, args, optimizer=optimizer.state_dict(),
                        schedule=schedule.state_dict(), batch_rng=generator.get_state(),
                        torch_rng=torch.get_rng_state(), **extra)
        save_metrics(args.out / "metrics.csv", history)


def log_epoch(row, args, started, first):
    """The epoch's line: train and test loss (and the VAE's two terms apart, the KL with its weight
    --beta, so that they add up to the loss), test PSNR, time, ETA."""
    weights = {"reconstruction": "", "kl": "" if getattr(args, "beta", 1) == 1 else f"{args.beta:g} x "}

    def losses(split_name):
        parts = [f"{weights[key]}{key[:3]} {row[f'{split_name}_{key}']:7.1f}" for key in ("reconstruction", "kl")
                 if f"{split_name}_{key}" in row]
        return f"{split_name} {row[f'{split_name}_loss']:7.1f}" + (f" ({' + '.join(parts)})" if parts else "")

    epoch, eta = row["epoch"], (time.time() - started) / (row["epoch"] - first + 1) * (args.epochs - row["epoch"])
    noisy = f"noisy {row['test_psnr_noisy']:5.2f} -> " if "test_psnr_noisy" in row else ""  # the DAE's input
    print(f"epoch {epoch:3d}/{args.epochs} | {losses('train')} | {losses('test')} | "
          f"test PSNR {noisy}{row['test_psnr']:5.2f} dB | {row['seconds']:4.1f} s, "
          f"{row['images_per_second']:5.0f} img/s | ETA {eta:3.0f} s", flush=True)


@contextmanager
def stop_cleanly(args):
    """Ctrl-C ends the run with one line: the checkpoint holds the last finished epoch."""
    try:
        yield
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted: {args.out / 'model.pt'} holds the last finished epoch; "
                         f"add --resume to continue") from None


def save_checkpoint(path, script, model, history, args, **extra):
    """All that --resume needs to go on and --figures-only to redraw, written whole (written_whole)."""
    state = {"script": script, "state_dict": model.state_dict(), "history": history,
             "args": {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()},
             **extra}
    with written_whole(path) as temporary:
        torch.save(state, temporary)


def save_metrics(path, rows):
    """metrics.csv: one row per epoch, written whole (written_whole)."""
    with written_whole(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@contextmanager
def written_whole(path):
    """A temporary file beside `path`, of a name no other process gets, renamed to `path` once the
    block has written it and it is on the disk: a crash of the process or of the machine, or a second
    process, never leaves a broken or mixed file. It is made as any file the user writes (the umask
    says its mode), so a colleague can read a model as they can read the figures beside it."""
    path = Path(path)
    temporary = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())  # its bytes on the disk before its name, which the rename makes
        os.replace(temporary, path)
        if os.name == "posix":  # and the rename itself: the folder's entry
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@contextmanager
def interrupts_deferred():
    """A Ctrl-C inside the block takes effect at its end, so that the files it writes are written together."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------- the schedule and divergence
def one_cycle(optimizer, peak, steps, warmup):
    """PyTorch's one-cycle learning rate over `steps` steps, climbing to `peak` over the first `warmup`
    of them. It measures a phase in steps less one, so a climb of exactly one step would divide by zero
    (5 steps in all at a warm-up of 0.2); such a run climbs over two."""
    if warmup * steps == 1:
        warmup = 2 / steps
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, peak, total_steps=steps, pct_start=warmup)



def divergence_limit(loss, colour, photos, corrupt=None, block=256):
    """The test loss past which a run has diverged (check_epoch stops it there): that of what the model
    starts from, with its squared error doubled (3 dB worse). An autoencoder's decoder starts from a
    flat picture in the training photos' average colour `colour` (3,); a denoiser from handing back
    its input, `corrupt(images)`, or that flat picture, whichever is worse. `loss(recon, images)` is
    the script's loss; photos (N, 3, S, S) are bytes. Returns {"loss": the limit, "start": what set it}."""
    totals = [0.0, 0.0]
    for batch in photos.split(block):
        images = batch.float() / 255
        starts = [colour.view(1, 3, 1, 1).expand_as(images), *([corrupt(images)] if corrupt else [])]
        for i, start in enumerate(starts):
            totals[i] += loss(images + math.sqrt(2) * (start - images), images).item() * len(batch)
    worst = 1 if corrupt is not None and totals[1] > totals[0] else 0
    return {"loss": totals[worst] / len(photos),
            "start": ("a flat picture of the photos' average colour", "the noisy input itself")[worst]}


# ----------------------------------------------------------------------------- one run per folder
HELD = []  # (the lock, whether this run made its folder) for each folder this process holds


def hold_out(out):
    """Hold the folder --out for this run with an OS lock on out/run.lock (flock, or Windows' own): a
    second run into it refuses in one line. The system lets go of the lock when its process ends,
    however it ends (Ctrl-C, kill -9, a power loss), so nothing is left to take over; ends_cleanly
    lets go when main() ends. The file itself stays: a second run must lock the same file."""
    created = not out.exists()  # a folder this run made is removed again if the run leaves nothing in it
    out.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(out / "run.lock", timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise SystemExit(f"error: --out {out} is in use by another run; wait for it to end, or pass another "
                         f"--out") from None
    HELD.append((lock, created))


def let_go():
    """Let go of the folders this process holds, and remove the ones it made for nothing."""
    while HELD:
        lock, created = HELD.pop()
        folder = Path(lock.lock_file).parent
        if created and [path.name for path in folder.iterdir()] == ["run.lock"]:
            os.remove(lock.lock_file)  # still held: no other run can lock it in between
            lock.release()
            folder.rmdir()
        else:
            lock.release()


def ends_cleanly(main):
    """A script's main(), made to end in one line on a Ctrl-C wherever it comes, and to let go of the
    --out it held when it ends, however it ends."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except KeyboardInterrupt:
            raise SystemExit("interrupted: every file written so far is whole; a model.pt in --out holds its last "
                             "finished epoch") from None
        finally:
            let_go()

    return run
