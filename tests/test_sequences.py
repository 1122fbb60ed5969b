"""No command destroys a finished model, and two runs never mix their files: a seeded draw of sequences
of two to four commands into two shared folders, A and B. Each command is a training run (with or
without --overwrite), --resume (of its own folder, or with --checkpoint from the other), --figures-only,
a tool, or a run stopped by Ctrl-C after its first epoch: in this process (a KeyboardInterrupt where
Python raises it), or in a process of its own, sent SIGINT. After
every command:
  - a finished model changed only under --overwrite;
  - every model.pt loads, and metrics.csv has one row per epoch of the model beside it;
  - the command ended normally or with one line, and let go of the folder it held.

    SEQUENCES=40 python -m pytest tests/test_sequences.py     (more than CI draws: 8)
"""

import csv
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch

import ae
import vae
from conftest import ctrl_c_in_epoch, held

SCRIPTS = {"ae": ae, "vae": vae}
SEQUENCES = int(os.environ.get("SEQUENCES", 8))
REPO = Path(__file__).resolve().parents[1]


def state_of(folder):
    """(the bytes of model.pt, whether its run is finished), or None without one."""
    path = folder / "model.pt"
    if not path.exists():
        return None
    saved = torch.load(path, weights_only=True)  # every model.pt loads
    return path.read_bytes(), len(saved["history"]) >= saved["args"]["epochs"], len(saved["history"])


def metrics_rows(folder):
    with open(folder / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def draw_command(rng, folders, script):
    """A command as (kind, script, flags, the folder it writes or reads, whether it says --overwrite)."""
    script = script if rng.random() < 0.85 else rng.choice(sorted(SCRIPTS))  # now and then the other script
    out = rng.choice(folders)
    other = folders[1 - folders.index(out)]
    kind = rng.choices(["train", "stopped", "resume", "figures", "tool", "ctrl-c"], weights=[3, 2, 4, 1, 1, 0.7])[0]
    flags, overwrite = [], rng.random() < 0.25
    if kind in ("train", "stopped", "ctrl-c"):
        flags = ["--epochs", str(rng.randint(1, 3) if kind == "train" else 40)]
    elif kind == "resume":
        flags = ["--resume", *(["--checkpoint", str(other / "model.pt")] if rng.random() < 0.6 else [])]
    elif kind == "figures":
        flags = ["--figures-only", *(["--checkpoint", str(other / "model.pt")] if rng.random() < 0.5 else [])]
    else:
        flags, overwrite = rng.choice([["--duplicates", "0.9"], ["--query", "101"]]), False
    return kind, script, [*flags, *(["--overwrite"] if overwrite else []), "--out", str(out)], out, overwrite


def run_stopped(script, argv, monkeypatch):
    """The command, with a Ctrl-C in its second epoch (a KeyboardInterrupt, where Python raises it)."""
    with ctrl_c_in_epoch(SCRIPTS[script], 2, monkeypatch):
        return run_in_process(script, argv)


def ended_with_one_line(text):
    last = text.strip().splitlines()[-1]
    assert "Traceback" not in text and (last.startswith(("error:", "interrupted:")) or "figures in" in last), text
    return last


def run_in_process(script, argv):
    try:
        SCRIPTS[script].main(argv)
    except SystemExit as stop:
        message = str(stop.code)
        assert "\n" not in message and message.startswith(("error:", "interrupted:")), message
        return message
    return None


def run_and_interrupt(script, argv):
    """The command in a process of its own, sent SIGINT once its first epoch is done (as Ctrl-C does)."""
    process = subprocess.Popen([sys.executable, f"{script}.py", *argv], cwd=REPO, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    printed = []
    for line in process.stdout:  # a run that refuses to start ends by itself
        printed.append(line)
        if line.startswith("epoch   1/"):
            process.send_signal(signal.SIGINT)
            break
    printed.append(process.communicate(timeout=120)[0])
    return ended_with_one_line("".join(printed))


def draw_sequence(rng):
    """The folders' start (each empty, a finished run, or a run stopped after its first epoch) and 2-4 commands."""
    script = rng.choice(sorted(SCRIPTS))
    starts = [rng.choices(["empty", "finished", "stopped"], weights=[1, 2, 2])[0] for _ in range(2)]
    return script, starts, [draw_command(rng, [Path("A"), Path("B")], script) for _ in range(rng.randint(2, 4))]


def test_drawn_sequences_of_commands_lose_no_finished_model_and_mix_no_files(tiny_catalogue, tmp_path, monkeypatch):
    rng = random.Random(4000)
    sequences, reached = [draw_sequence(rng) for _ in range(SEQUENCES)], []
    common_flags = ["--data", str(tiny_catalogue), "--image-size", "32", "--latent-dim", "8", "--batch-size", "8",
                    "--device", "cpu"]
    for number, (script, starts, commands) in enumerate(sequences):
        folders = [tmp_path / str(number) / "A", tmp_path / str(number) / "B"]
        for folder, start in zip(folders, starts):
            if start == "finished":
                run_in_process(script, [*common_flags, "--epochs", "2", "--out", str(folder)])
            elif start == "stopped":
                run_stopped(script, [*common_flags, "--epochs", "4", "--out", str(folder)], monkeypatch)
        done = [(script, starts)]
        for kind, command_script, flags, out, overwrite in commands:
            out = folders[["A", "B"].index(out.name)]
            flags = [str(folders[["A", "B"].index(Path(flag).parent.name)] / "model.pt") if flag.endswith("model.pt")
                     else str(out) if flag in ("A", "B") else flag for flag in flags]
            before = {folder: state_of(folder) for folder in folders}
            if kind == "resume" and "--checkpoint" in flags and not overwrite and before[out] and before[out][1]:
                reached.append(flags)  # another checkpoint resumed into a folder that holds a finished model
            argv = [*common_flags, *flags]
            if kind == "ctrl-c":
                message = run_and_interrupt(command_script, argv)
            elif kind == "stopped":
                message = run_stopped(command_script, argv, monkeypatch)
            else:
                message = run_in_process(command_script, argv)
            done.append((kind, command_script, flags, message))
            for folder in folders:
                after = state_of(folder)
                if before[folder] and before[folder][1] and after[0] != before[folder][0]:  # a finished model changed
                    assert overwrite and folder == out, done
                if after:
                    assert len(metrics_rows(folder)) == after[2], done  # one row per epoch of the model beside it
                assert not held(folder), done
    # The draw reaches the command that once replaced a finished model, and a Ctrl-C to a process of its own.
    assert reached and any(kind == "ctrl-c" for _, _, commands in sequences for kind, *_ in commands)
