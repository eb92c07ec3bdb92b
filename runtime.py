"""
The plumbing of a training run that newgpt.py uses but a learner need not read first: one-line user
errors, atomic file writes, finding checkpoint files and saying what is wrong with a damaged one, the
release model's file, data-parallel processes (torchrun), Ctrl-C, the progress bar and the loss plot.
Nothing here knows the model: newgpt.py imports this module, never the other way round.
"""

import argparse
import contextlib
import ctypes
import errno
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm


class UserError(Exception):
    """A problem with the user's input: reported as one line and a non-zero exit, never a traceback."""


def temp_path(path):
    """Where a file is written before it is renamed into place: hidden, and named so that no pattern of
    real files (gpt_step*.pt, *.pt, *.json) matches it; the writer's pid says whether it is stale."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path, write):
    """Call write(tmp_path), then rename the temp file over `path`: a kill mid-write never leaves a
    half-written file under the real name, and never damages the previous version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # the folder may have become unwritable: the first error tells why
            tmp.unlink(missing_ok=True)


# A temp file of atomic_write: ".NAME.PID.tmp", or "NAME.tmpPID.SUFFIX" as earlier versions wrote it.
TEMP_NAMES = (re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp"),
              re.compile(r"(?P<name>.+)\.tmp(?P<pid>\d+)(\.\w+)?"))


def is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    except OverflowError:  # not a pid at all
        return False
    return True


def remove_stale_temp_files(folder, of=None):
    """Delete the temp files that a killed writer left in folder and below it, or only those of the file
    named `of` in folder itself; returns their names."""
    stale = []
    for path in Path(folder).glob(f"*{of}*tmp*") if of else Path(folder).rglob("*tmp*"):
        match = next((m for m in (p.fullmatch(path.name) for p in TEMP_NAMES) if m), None)
        if match and of in (None, match["name"]) and path.is_file() and not is_running(int(match["pid"])):
            path.unlink(missing_ok=True)
            stale.append(path.name)
    return stale


def why_unwritable(folder, error):
    """Why a file could not be written into folder, in words a user can act on. torch.save's own errors
    carry no errno, so the folder, the disk and the file size limit are looked at."""
    reasons = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EFBIG: "the file size limit is reached (ulimit -f)",
               errno.EROFS: "the file system is read-only",
               errno.EACCES: f"{folder} is not writable", errno.EPERM: f"{folder} is not writable",
               errno.ENOENT: f"{folder} no longer exists"}
    if getattr(error, "errno", None) in reasons:
        return reasons[error.errno]
    if not os.access(folder, os.W_OK):
        return f"{folder} is not writable"
    if shutil.disk_usage(folder).free < 2 ** 20:
        return "the disk is full"
    try:
        import resource
        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            return "the file size limit is reached (ulimit -f)"
    except ImportError:  # Windows
        pass
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def write_failure(error):
    """An OSError met while writing data or logs, in one line."""
    where = Path(error.filename or ".")
    return f"could not write {where}: {why_unwritable(where.parent, error)}; the checkpoints saved before are intact"


def keep_freed_memory():
    """Tell glibc to keep freed memory in the process's heap. By default it serves big blocks (the 64 MB
    logits, their gradient) with fresh mmap pages and unmaps them on free, so every training step
    page-faults them in again: a (4096, 256) @ (256, 8192) bf16 matmul then takes 26 ms instead of 7. This
    changes the allocator of the whole process, so only a training run started from the command line calls
    it (newgpt.py's __main__), never an import of this module into a chat, a server or a notebook."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator behaves differently
        pass


def non_negative(kind):
    """An argparse type: a number of this kind, at least 0."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number: {text}")
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative: {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


# -----------------------------------------------------------------------------
# Checkpoint files (what is inside them, and load_checkpoint, are in newgpt.py)

# The release model, trained by this repo and committed with it (bench/RESULTS.md, "The release model"), so
# that chat works right after a clone; python newgpt.py --release RUN_DIR replaces it.
RELEASE_DIR = Path(__file__).resolve().parent / "ckpt" / "release"
RELEASE_FILE = "tinygpt.pt"


CHECKPOINT_NAME = re.compile(r"gpt_step(\d+)\.pt")


def checkpoint_paths(out_dir):
    """A run's checkpoints, oldest first. Only the exact name counts: a temp file or a copy never does."""
    found = [p for p in Path(out_dir).glob("gpt_step*.pt") if CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name)[1]))


def pointed_checkpoint(out_dir):
    """The checkpoint file that out_dir/latest names, or None where it is missing, damaged or stale."""
    try:
        name = (Path(out_dir) / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    named = Path(out_dir) / name
    is_ours = CHECKPOINT_NAME.fullmatch(name) or name == RELEASE_FILE
    return named if is_ours and named.is_file() else None


def checkpoint_candidates(out_dir):
    """A folder's checkpoints, newest first: by step, then the file `latest` names (a release's tinygpt.pt)."""
    release = Path(out_dir) / RELEASE_FILE
    found = [*reversed(checkpoint_paths(out_dir)), pointed_checkpoint(out_dir), release]
    return list(dict.fromkeys(p for p in found if p is not None and p.is_file()))


def latest_checkpoint(out_dir):
    """The newest checkpoint in out_dir (see checkpoint_candidates), or None."""
    found = checkpoint_candidates(out_dir)
    return found[0] if found else None


def what_is_intact(out_dir):
    """What a failed save leaves a user, in words: the newest checkpoint that loads (the newest by name may be
    one a crash left damaged)."""
    intact, _, _ = newest_intact(out_dir)
    return f"{intact} is intact: make room and continue with --resume" if intact else "no checkpoint is intact"


def why_unreadable(path, error):
    """What is wrong with a file torch.load could not read, in words a user can act on."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    if not is_zip:
        return "is not a PyTorch checkpoint at all"
    if "weights_only" in str(error) or "Unpickl" in type(error).__name__:
        return ("holds Python objects that safe loading (weights_only=True) refuses: it is not a TinyGPT "
                "checkpoint")
    return f"is truncated or damaged ({size:,} bytes; was it copied or saved completely?)"


def try_read_checkpoint(path, device="cpu"):
    """(checkpoint dict, None), or (None, what is wrong with the file). Loads with weights_only=True: no
    pickled code runs."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        return None, why_unreadable(path, e)
    missing = [key for key in ("model", "model_config", "tokenizer", "step")
               if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        return None, f"is a PyTorch file but not a TinyGPT checkpoint (it has no {missing[0]!r})"
    return ckpt, None


def read_checkpoint(path, device="cpu"):
    """A checkpoint file's dict, or a UserError that says what is wrong with the file."""
    ckpt, problem = try_read_checkpoint(path, device)
    if problem:
        raise UserError(f"{path} {problem}; use another checkpoint or train a new one")
    return ckpt


def newest_intact(folder, device="cpu"):
    """(file, checkpoint dict, the newer ones that did not load as "name problem") for the newest checkpoint
    in a run folder that loads; file and dict are None when none does."""
    damaged = []
    for candidate in checkpoint_candidates(folder):
        ckpt, problem = try_read_checkpoint(candidate, device)
        if ckpt is not None:
            return candidate, ckpt, damaged
        damaged.append(f"{candidate.name} {problem}")
    return None, None, damaged


def find_checkpoint(path, device="cpu"):
    """(file, checkpoint dict) for a checkpoint file, or the newest intact checkpoint in a run folder. A
    damaged newer one (a kill mid-copy, a full disk) is passed over with a line on stderr, and left on disk."""
    path = Path(path)
    if path.is_file():
        return path, read_checkpoint(path, device)
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {path}")
    candidate, ckpt, damaged = newest_intact(path, device)
    if ckpt is not None:
        if damaged:
            print(f"passing over {'; '.join(damaged)}: using {candidate.name}, the newest intact checkpoint",
                  file=sys.stderr)
        return candidate, ckpt
    if damaged:
        raise UserError(f"no intact checkpoint in {path}/: {'; '.join(damaged)}")
    raise UserError(f"no checkpoint in {path}/; train one with: python newgpt.py --out_dir {path}")


def default_checkpoint(out_dir="ckpt"):
    """What chat loads when not told: the run trained into out_dir, else the release model (a folder, whose
    newest intact checkpoint load_checkpoint takes)."""
    found = next((folder for folder in (Path(out_dir), RELEASE_DIR) if latest_checkpoint(folder)), None)
    if found:
        return found
    raise UserError(f"no checkpoint in {out_dir}/ and no release model in {RELEASE_DIR}/: python newgpt.py trains one")


def chosen_checkpoint(given, device="cpu"):
    """(file, checkpoint dict, how it was chosen) for --ckpt, or for the default when none is given: a fresh
    run in ckpt/ silently becoming the default is what the note says."""
    path, ckpt = find_checkpoint(given or default_checkpoint(), device)
    how = "" if given else ", the newest in ckpt/ or else the release (--ckpt picks another)"
    return path, ckpt, how


def rng_state():
    """The random generators' state: the CPU's, and each CUDA device's where there are any (dropout)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_checkpoint(out_dir, resume):
    """(path, checkpoint dict) to continue from: the file given, or with 'latest' the newest intact
    checkpoint in out_dir."""
    if resume == "latest" and not checkpoint_candidates(out_dir):
        raise UserError(f"--resume: no checkpoint in {out_dir}/ to resume from")
    path, ckpt = find_checkpoint(out_dir if resume == "latest" else resume)
    if "optimizers" not in ckpt:
        raise UserError(f"--resume: {path} holds weights only (a release model): it cannot be resumed; "
                        f"fine-tune it with --init_from {path} --out_dir NEW_DIR")
    return path, ckpt


def check_out_dir(out_dir, resuming):
    """Fail before any work if out_dir cannot be written, or already holds checkpoints that a new run would
    mix with, without creating it yet: a run that fails later (no network, bad data) leaves nothing behind."""
    path = Path(out_dir).absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot write to checkpoint directory {out_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to checkpoint directory {out_dir}: {existing} is not writable")
    found = checkpoint_paths(out_dir)
    if found and not resuming:
        raise UserError(f"{out_dir}/ already holds checkpoints ({found[-1].name}); pass --resume to "
                        f"continue them or --out_dir DIR to start a new run")


def release_state(ckpt):
    """What a shipped model needs: bf16 weights (half of fp32; the chat runs them in fp32 or bf16 anyway)
    and what chat and export_hf.py read. No optimizer, scaler or RNG state: a release cannot be resumed."""
    weights, converted = {}, {}
    for name, t in ckpt["model"].items():
        key = (t.data_ptr(), t.shape)  # the tied embedding and output layer: converted once, saved once
        if key not in converted:
            converted[key] = t.to(torch.bfloat16) if t.is_floating_point() else t
        weights[name] = converted[key]
    kept = ("model_config", "train_config", "step", "elapsed_s", "val_loss", "val_bpb", "tokenizer",
            "texts_sha256", "chat_start_step", "reads_passages")
    return {"model": weights, **{key: ckpt[key] for key in kept if key in ckpt}}


def write_release(folder, ckpt, out_dir):
    """Replace the release model in out_dir with a checkpoint of `folder` (ckpt: its loaded, checked dict),
    and its tokenizer; returns the new file's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_name = ckpt["tokenizer"]["file"]
    atomic_write(out_dir / tokenizer_name, lambda tmp: shutil.copyfile(Path(folder) / tokenizer_name, tmp))
    release = out_dir / RELEASE_FILE
    atomic_write(release, lambda tmp: torch.save(release_state(ckpt), tmp))
    atomic_write(out_dir / "latest", lambda tmp: tmp.write_text(RELEASE_FILE + "\n"))
    for old in out_dir.glob("tokenizer-*.json"):  # only once the new release is in place
        if old.name != tokenizer_name:
            old.unlink()
    return release


# -----------------------------------------------------------------------------
# Processes: torchrun's ranks and Ctrl-C


class StopRequest:
    """First Ctrl-C (or SIGTERM) asks the loop to save and stop after the current step; a second one
    interrupts at once. Used as a context manager, it puts the previous handlers back on exit."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def setup_distributed(device):
    """torchrun sets RANK/WORLD_SIZE; then one process per rank, gloo on CPU and nccl on CUDA."""
    if "RANK" not in os.environ:
        return 0, 1, device
    import torch.distributed as dist
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return rank, world_size, device


def rank_zero_print(rank):
    """print for rank 0, and a function that prints nothing for the others: each line shows once."""
    return print if rank == 0 else lambda *args, **kwargs: None


def barrier(world_size):
    if world_size > 1:
        torch.distributed.barrier()


def max_over_ranks(values, world_size, device):
    """Each value's maximum over the ranks. All ranks must stop at the same step (or DDP would hang
    waiting for the one that left) and take the same learning rate, though their clocks differ."""
    if world_size == 1:
        return values
    shared = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MAX)
    return shared.tolist()


# -----------------------------------------------------------------------------
# What a run shows: metrics, the loss plot and the progress bar


def write_metrics(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_metrics(metrics_path, png_path):
    """Train and val loss, and val bits per byte, against step, from the metrics log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in open(metrics_path)]
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"], r["val_bpb"]) for r in records if "val_loss" in r]
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot(*zip(*train), label="train loss", alpha=0.7)
    if val:
        steps, losses, bpbs = zip(*val)
        ax_loss.plot(steps, losses, "o-", label="val loss")
        ax_bpb.plot(steps, bpbs, "o-", color="C2")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def format_minutes(seconds):
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


class Progress:
    """The progress bar and the run's time estimate. Speed is measured over the last `window` steps
    (the first step, which compiles, and evaluations are left out), and the time left is the sooner of
    the steps' and the budget's end. Once the window is full, one line says when the run will end."""

    def __init__(self, cfg, step, tokens_per_step, budget, enabled, window=20):
        self.max_steps, self.tokens_per_step, self.budget = cfg.max_steps, tokens_per_step, budget
        self.step_seconds = deque(maxlen=window)
        self.skipped_first, self.announced = False, False
        # Redrawn 10 times a second on a terminal, every 30 s into a log file.
        self.bar = tqdm(total=cfg.max_steps or None, initial=step, disable=not enabled, dynamic_ncols=True,
                        unit="step", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                        mininterval=0.1 if sys.stderr.isatty() else 30)

    def update(self, step, seconds, loss, lr):
        """Record one finished step; returns the recent tokens per second (None until it is known)."""
        tok_s = None
        if self.skipped_first:
            self.step_seconds.append(seconds)
            tok_s = self.tokens_per_step * len(self.step_seconds) / sum(self.step_seconds)
            step_s = sum(self.step_seconds) / len(self.step_seconds)
            by_steps = (self.max_steps - step) * step_s if self.max_steps else math.inf
            left = min(by_steps, self.budget.seconds_left())
            self.bar.set_postfix_str(f"loss {loss:.3f}, lr {lr:.2e}, {tok_s:,.0f} tok/s, {format_minutes(left)} left",
                                     refresh=False)  # drawn by update() below, at most every mininterval
            if not self.announced and len(self.step_seconds) == self.step_seconds.maxlen:
                self.announced = True
                end = time.strftime("%H:%M", time.localtime(time.time() + left))
                steps = (f"{self.max_steps:,} steps, plus evaluations" if left == by_steps
                         else f"about {step + left / step_s:,.0f} steps (--max_minutes)")
                self.write(f"speed: {tok_s:,.0f} tok/s; the run will end in about {format_minutes(left)}, at {end}, "
                           f"after {steps}")
        self.skipped_first = True
        self.bar.update(1)
        return tok_s

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):  # also on an error: its line must not be printed on the bar's
        self.close()

    def write(self, line):
        if not self.bar.disable:
            self.bar.write(line)

    def close(self):
        self.bar.close()

# -----------------------------------------------------------------------------
# Device and precision, picked once; a time budget's progress


def pick_device(requested):
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {requested}: CUDA is not available on this machine")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps: MPS is not available on this machine")
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", requested):
            raise UserError(f"--device {requested}: use auto, cpu, cuda, cuda:N or mps")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def has_fast_bf16(device):
    """Whether bf16 matmuls run natively: on CUDA from Ampere on, on a CPU with AVX512-BF16 or AMX (about 6x
    its fp32 peak on the AMX machines here). Elsewhere bf16 is emulated, far slower than fp32."""
    device_type = device.split(":")[0]
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device_type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def pick_dtype(requested, device):
    device_type = device.split(":")[0]
    if requested == "auto":
        if device_type == "cuda":
            return "bfloat16" if has_fast_bf16(device) else "float16"
        return "bfloat16" if has_fast_bf16(device) else "float32"
    if requested == "float16" and device_type != "cuda":
        raise UserError("--dtype float16 needs CUDA; use bfloat16 or float32")
    return requested


def autocast_context(device, dtype):
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


class Budget:
    """How far a run is through its schedule, from 0 to 1: the further of its steps (out of --max_steps)
    and its time (out of --max_minutes). Time counts from the start of training, compilation and
    evaluations included, and carries over --resume. The last evaluation and checkpoint must fit in the
    budget too, so the time they last took is kept back."""

    def __init__(self, cfg, spent_s=0.0, clock=time.monotonic):
        self.max_steps, self.seconds = cfg.max_steps, 60 * cfg.max_minutes
        self.clock, self.started, self.spent_s = clock, clock(), spent_s
        self.reserve_s = 0.0

    def elapsed(self):
        return self.spent_s + self.clock() - self.started

    def progress(self, step):
        by_steps = step / self.max_steps if self.max_steps else 0.0
        by_time = self.elapsed() / max(1e-9, self.seconds - self.reserve_s) if self.seconds else 0.0
        return min(1.0, max(by_steps, by_time))

    def seconds_left(self):
        return max(0.0, self.seconds - self.elapsed()) if self.seconds else math.inf
