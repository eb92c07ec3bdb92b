"""Training comparisons on the real data, one mode per question, every run a real newgpt.py run:

    python -m bench.training variants --minutes 3                 # each variant's flags at equal wall-clock time
    python -m bench.training variants --minutes 8 --steps 1400 --only default "warmup 300"   # at equal steps
    python -m bench.training variants --minutes 10 --budgeted --only default "before the speedrun"  # as a user runs it
    python -m bench.training tricks                               # the speedrun's tricks, patched in, at equal steps
    python -m bench.training tricks --only default "zero-init projections" --steps 300
    python -m bench.training budget                               # the time budget and the size dial, 10 and 30 min
    python -m bench.training budget --minutes 10 --only auto --flags "--decay_fraction 1"
    python -m bench.training to-target                            # how short a budget reaches the original's result
    python -m bench.training to-target --curves --minutes 10      # both recipes at one budget, plotted
    python -m bench.training MODE --tiny --data a.jsonl --val_data v.jsonl --runs /tmp/runs   # a smoke run

variants: for a fair budget each run's cosine schedule must end when its time does, so the variant's
throughput is measured first (bench/train_speed.py's worker, a few steps) and --max_steps set to what fits;
--max_minutes ends a run that is slower than measured (with --decay_fraction 1, the cosine schedule of these
measurements, which predate the budgeted schedule). Compilation counts against the budget, as for a user.
--budgeted runs each as a user does: `--max_minutes M`, its warmup-stable-decay schedule following its own
clock. Rows go to runs/experiments/results.jsonl.

tricks (modded-nanogpt's record history): a patch applied to a copy of the source, trained for the steps the
default takes in an 8-minute budget on a 2-core CPU, with the budgeted schedule. Equal steps rather than
equal time: on the same seed and data order the comparison does not move with the machine's speed, which
varies by more than 10% between runs here; a trick that changes a step's cost shows it in the tok/s column,
and one that wins there is then checked at equal wall-clock (variants --budgeted). A patch is a list of
(text in newgpt.py, its replacement) and fails loudly once newgpt.py no longer holds that text. Kept tricks
become newgpt.py's code, and their rows here become patches that take them out again.
Rows go to bench/results/tricks.jsonl.

budget: for each budget, the step schedule cut by the clock ("cut": the 6,800-step cosine schedule at the
automatic size with its curriculum, stopped by Ctrl-C when the budget runs out), then `newgpt.py
--max_minutes N --depth D` at the automatic size and the next size down and up. Every run's clock starts
at newgpt.py's "training on" line, after the data is prepared. Rows go to bench/results/budget.jsonl.

to-target: the smallest budget B for which our default, run as a user runs it (`newgpt.py --max_minutes
B`), ends at or below the validation bits per byte the original recipe (`--recipe seed`) reaches in 8
minutes. Each probe is a whole run (a budgeted run decays as its own clock runs out, so the middle of a
longer run's curve would flatter or wrong it). Probes start at --first_guess minutes, double until one
reaches the target, then halve the interval until it is narrower than --resolution. Rows go to
bench/results/quality.jsonl.

The runs go one after another on this machine, alone, under --runs.
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import newgpt
from bench import train_speed

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
TRAIN_DATA = [DATA / "oasst/oasst1_en_train.texts.jsonl.gz", DATA / "oasst/oasst_en_100.trees.jsonl.gz",
              DATA / "oasst/guanaco_llama2_1k.train.jsonl.gz", DATA / "extra/dolly15k_en.jsonl.gz"]
VAL_DATA = [DATA / "oasst/oasst1_en_validation.messages.jsonl.gz"]
BATCH_SIZE = 8  # rows of 512 tokens per step, grad_accum 1 (the default geometry) unless a variant sets it
TINY_FLAGS = ["--n_layer", "1", "--n_head", "1", "--n_embd", "32", "--block_size", "32", "--vocab_size", "320",
              "--batch_size", "2", "--eval_tokens", "64", "--log_interval", "1", "--no-compile"]
TINY_STEPS = 3

# -----------------------------------------------------------------------------
# What every mode shares: a run of newgpt.py and its row


def read_metrics(metrics_path):
    """The lines newgpt.py appended to a run's metrics.jsonl: training-loss records and evaluations."""
    return [json.loads(line) for line in open(metrics_path)]


def final_validation(metrics_path):
    records = read_metrics(metrics_path)
    val = [r for r in records if "val_bpb" in r]
    speed = [r["tok_per_s"] for r in records if "tok_per_s" in r]
    return val[-1], speed[-1] if speed else None


def flag_value(flags, name, default):
    return type(default)(flags[flags.index(name) + 1]) if name in flags else default


def planned_steps(flags, minutes, batch_size, evaluations):
    """How many steps of this variant fit in `minutes`, from a short measurement of its throughput."""
    speed = train_speed.measure(flags, steps=4, batch_size=batch_size)
    # An evaluation takes about 3 s; compilation (in warmup_s) happens again in the real run.
    seconds_for_steps = minutes * 60 - speed["warmup_s"] - 3 * (evaluations + 1)
    return int(seconds_for_steps * speed["tok_s"] / (batch_size * 512))


def add_run_arguments(parser):
    """The flags every training bench shares: its data, where its runs go, and the smoke-test mode."""
    parser.add_argument("--data", nargs="+", default=[str(p) for p in TRAIN_DATA], help="training sources")
    parser.add_argument("--val_data", nargs="+", default=[str(p) for p in VAL_DATA], help="validation sources")
    parser.add_argument("--texts", default=str(REPO / "train_texts.json"), help="prepared texts file to share")
    parser.add_argument("--runs", default=str(REPO / "runs"), help="folder for the runs and their results")
    parser.add_argument("--tiny", action="store_true",
                        help=f"a smoke run: a tiny model ({' '.join(TINY_FLAGS)}) for {TINY_STEPS} steps")


def run_variant(name, flags, minutes, setup, fixed_steps=0, evaluations=4):
    """Train one variant (flags on top of the defaults) as set up by add_run_arguments' flags; its results row."""
    flags = flags + (TINY_FLAGS if setup.tiny else [])
    batch_size = flag_value(flags, "--batch_size", BATCH_SIZE)
    steps = TINY_STEPS if setup.tiny else fixed_steps or planned_steps(flags, minutes, batch_size, evaluations)
    schedule = ["--batch_size", str(batch_size), "--grad_accum", "1", "--max_steps", str(steps),
                "--warmup_steps", str(min(100, steps // 10)), "--eval_interval", str(max(1, steps // evaluations)),
                "--save_interval", str(steps), "--max_minutes", str(minutes * 1.1), "--decay_fraction", "1"]
    return train(name, flags, setup, schedule) | {"planned_steps": steps}


def run_budgeted(name, flags, minutes, setup, eval_interval=None):
    """Train with newgpt.py's own time budget (--max_minutes, its schedule following the clock), as a user
    runs it: no step count planned ahead. Its results row."""
    flags = flags + (TINY_FLAGS + ["--max_steps", str(TINY_STEPS)] if setup.tiny else [])
    evaluations = ["--eval_interval", str(eval_interval)] if eval_interval else []
    return train(name, flags, setup, ["--max_minutes", str(minutes), *evaluations]) | {"minutes": minutes}


def train(name, flags, setup, schedule, repo=REPO, folder="experiments"):
    """repo's newgpt.py on the bench's data with the schedule's flags, then the variant's, in
    runs/FOLDER/NAME (emptied first)."""
    out_dir = Path(setup.runs) / folder / name.replace(" ", "_")
    command = [sys.executable, str(Path(repo) / "newgpt.py"), "--data", *setup.data, "--val_data", *setup.val_data,
               "--texts", setup.texts, "--out_dir", str(out_dir), *schedule, *flags]
    if out_dir.exists():
        subprocess.run(["rm", "-rf", str(out_dir)], check=True)
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed: {result.stderr.strip().splitlines()[-1]}")
    val, train_tok_s = final_validation(out_dir / "metrics.jsonl")
    return {"name": name, "flags": " ".join(flags), "metrics": str(out_dir / "metrics.jsonl"), "steps": val["step"],
            "seconds": round(time.time() - started), "tok_s": train_tok_s,
            "val_bpb": round(val["val_bpb"], 4), "val_loss": round(val["val_loss"], 4)}


def record(row, results_path):
    """Append a run's row to the results file and print it as the run ends."""
    with open(results_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{row['name']:<24} {row['flags']:<45} steps {row['steps']:>5} tok/s {row['tok_s']:>6} "
          f"val bpb {row['val_bpb']:.4f}", flush=True)
    return row


def print_table(rows, first_column):
    """The rows side by side, each against the one named "default" when it ran."""
    base = next((r["val_bpb"] for r in rows if r["name"] == "default"), None)
    print(f"\n{first_column:<24} {'steps':>6} {'tok/s':>7} {'val bpb':>8} {'vs default':>11}")
    for r in rows:
        delta = f"{r['val_bpb'] - base:+.4f}" if base is not None else ""
        print(f"{r['name']:<24} {r['steps']:>6} {r['tok_s']:>7} {r['val_bpb']:>8.4f} {delta:>11}")

# -----------------------------------------------------------------------------
# variants: flags at equal time or steps


# Flags on top of newgpt.py's current defaults. Some rows were measured against earlier defaults (muon and
# relu2 before they won, 2 heads while 4 was the default); bench/RESULTS.md names each round's baseline.
# The QK-norm and sequence-length-curriculum variants lost their ablations and their options were removed.
VARIANTS = {
    "default": [],
    "learned positions": ["--pos_encoding", "learned"],
    "muon": ["--optimizer", "muon"],
    "relu2": ["--mlp_act", "relu2"],
    "biases": ["--bias"],
    "loss on all tokens": ["--loss_on", "all"],
    "vocab 4096": ["--vocab_size", "4096"],
    "vocab 16384": ["--vocab_size", "16384"],
    "6 layers x 384": ["--n_layer", "6", "--n_head", "6", "--n_embd", "384"],
    "lr 2e-3": ["--lr", "2e-3", "--min_lr", "2e-4"],
    "no compile": ["--no-compile"],
    "muon + relu2": ["--optimizer", "muon", "--mlp_act", "relu2"],
    "muon + relu2 + vocab 16384": ["--optimizer", "muon", "--mlp_act", "relu2", "--vocab_size", "16384"],
    "all tokens, then assistant 30%": ["--all_tokens_epochs", "0.88"],  # 30% of 6,800 steps
    "assistant tokens only": ["--all_tokens_epochs", "0"],
    "batch 16": ["--batch_size", "16"],
    "batch 4": ["--batch_size", "4"],
    "2 heads": ["--n_head", "2"],
    "batch 16 + 2 heads": ["--batch_size", "16", "--n_head", "2"],
    "4 heads of 64 dims": ["--n_head", "4"],
    "4 layers x 512": ["--n_embd", "512", "--n_head", "4"],  # heads of 128 dims, as the default's
    "depth 3": ["--depth", "3"],  # 3 layers x 256, the size dial's next size down on a CPU
    "2 layers x 256": ["--n_layer", "2"],  # what auto_depth picks for a CPU budget under 3 minutes
    "warmup 10": ["--warmup_steps", "10"],
    "warmup 25": ["--warmup_steps", "25"],
    "warmup 300": ["--warmup_steps", "300"],
    "before the speedrun": ["--embedding_lr_scale", "1", "--warmup_steps", "100"],  # the default until 08ac099
}


def variants(args):
    results_path = Path(args.runs) / "experiments" / "results.jsonl"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only or VARIANTS:
        if args.budgeted:
            row = run_budgeted(name, VARIANTS[name], args.minutes, args)
        else:
            row = run_variant(name, VARIANTS[name], args.minutes, args, args.steps) | {"minutes": args.minutes}
        rows.append(record(row, results_path))
    print_table(rows, "variant")

# -----------------------------------------------------------------------------
# tricks: patches at equal steps


TRICKS_RESULTS = REPO / "bench" / "results" / "tricks.jsonl"
# What newgpt.py reads from the repo: the modules it imports, and the evaluation prompts it keeps out of training.
SOURCES = ["newgpt.py", "data.py", "retrieval.py", "runtime.py", "bench/knowledge_questions.jsonl",
           "bench/chat_prompts.jsonl"]
TRICK_STEPS = 300  # the default's steps in `--max_minutes 8` here (bench/results/speedrun_8min.jsonl)

SET_LR = '        group["lr"] = lr * (cfg.embedding_lr_scale if group.get("is_embedding") else 1.0)\n'
LOGITS = "        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)\n"
BLOCKS = "        for layer, block in enumerate(self.transformer.h):\n            x = block(x, rope, kv_cache, layer)\n"
HEAD = "        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)\n"

TRICKS = {
    "default": ([], []),
    # Each residual branch starts as the identity (modded-nanogpt; nanochat's init_weights).
    "zero-init projections": ([(
        "nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))", "nn.init.zeros_(p)")], []),
    # The tied embedding at the blocks' learning rate, as before it had its own (modded-nanogpt trains its
    # embeddings far faster than its matrices); and faster still.
    "embedding at the blocks' lr": ([], ["--embedding_lr_scale", "1"]),
    "embedding lr x10": ([], ["--embedding_lr_scale", "10"]),
    # Muon's momentum warms up from 0.85 to 0.95 over the first 300 steps (modded-nanogpt).
    "Muon momentum warmup": ([(SET_LR, SET_LR + '        if "ns_steps" in group:\n'
                               '            group["momentum"] = 0.85 + 0.10 * min(step / 300, 1)\n')], []),
    # Block i's output is added back before block n-1-i, with a learned weight per pair (modded-nanogpt).
    "U-net skips": ([
        (HEAD, HEAD + "        self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2))\n"),
        (BLOCKS, "        skips, half, n = [], self.config.n_layer // 2, self.config.n_layer\n"
                 "        for layer, block in enumerate(self.transformer.h):\n"
                 "            if layer >= n - half:\n"
                 "                x = x + self.skip_weights[n - 1 - layer] * skips.pop()\n"
                 "            x = block(x, rope, kv_cache, layer)\n"
                 "            if layer < half:\n"
                 "                skips.append(x)\n")], []),
    # Logits squashed into (-15, 15) by a tanh (Gemma 2; modded-nanogpt's later records).
    "logit soft-cap 15": ([(LOGITS, LOGITS + "        logits = 15 * torch.tanh(logits / 15)\n")], []),
    "warmup 100 steps (before)": ([], ["--warmup_steps", "100"]),
    # Shorter warmups, and twice the peak learning rate, for the ~100 steps of a budget near the time to target.
    "warmup 10 steps": ([], ["--warmup_steps", "10"]),
    "warmup 5 steps": ([], ["--warmup_steps", "5"]),
    "lr 2e-3": ([], ["--lr", "2e-3", "--min_lr", "2e-4"]),
}


def patched_source(patch, folder):
    """A copy of the repo's training sources in `folder`, with newgpt.py patched."""
    for name in SOURCES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, folder / name)
    source = (folder / "newgpt.py").read_text()
    for old, new in patch:
        if source.count(old) != 1:
            raise SystemExit(f"the patch no longer applies: newgpt.py does not hold exactly one {old.strip()!r}")
        source = source.replace(old, new)
    (folder / "newgpt.py").write_text(source)
    return folder


def tricks(args):
    steps = TINY_STEPS if args.tiny else args.steps
    schedule = ["--max_steps", str(steps), "--decay_fraction", "0.4", "--eval_interval", str(steps),
                "--save_interval", str(steps)]
    rows = []
    for name in args.only or TRICKS:
        patch, flags = TRICKS[name]
        source = patched_source(patch, Path(args.runs) / "tricks" / "src" / name.replace(" ", "_"))
        row = train(name, flags + (TINY_FLAGS if args.tiny else []), args, schedule, repo=source, folder="tricks")
        rows.append(record(row, args.results))
    print_table(rows, "trick")

# -----------------------------------------------------------------------------
# budget: the time budget and the size dial


BUDGET_RESULTS = REPO / "bench" / "results" / "budget.jsonl"
CUT_STEPS = 6800  # the step schedule's default length
# The curriculum the cut schedule had: all tokens for 30% of its steps, 2,040 of 18,488 rows of 8 (this data).
CUT_ALL_TOKENS_EPOCHS = 0.88


def machine():
    """The processor (or GPU) the runs share, for the results file."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{names[0] if names else platform.processor()}, {os.cpu_count()} cores"


def wait_for_training(log_path, process):
    """Block until newgpt.py says it starts training; returns the time it did."""
    while "training on" not in log_path.read_text():
        if process.poll() is not None:
            raise SystemExit(f"the run failed before training: {log_path.read_text().strip().splitlines()[-1]}")
        time.sleep(0.2)
    return time.time()


def budget_run(name, flags, minutes, setup, cut=False):
    """One training run; returns its results row. A cut run gets Ctrl-C once `minutes` have passed."""
    label = re.sub(r"[^\w.]+", "_", f"{minutes:g}min {name} {' '.join(flags)}").strip("_")[:120]
    out_dir = Path(setup.runs) / "budget" / label
    subprocess.run(["rm", "-rf", str(out_dir)], check=True)
    out_dir.mkdir(parents=True)
    log_path = out_dir / "stdout.log"
    command = [sys.executable, "-u", str(REPO / "newgpt.py"), "--data", *setup.data, "--val_data", *setup.val_data,
               "--texts", setup.texts, "--out_dir", str(out_dir), *flags]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.DEVNULL)
        started = wait_for_training(log_path, process)
        if cut:
            while process.poll() is None and time.time() - started < 60 * minutes:
                time.sleep(0.5)
            process.send_signal(signal.SIGINT)
        process.wait()
    wall_s = time.time() - started
    if process.returncode not in (0, 130):
        raise SystemExit(f"{name} failed: {log_path.read_text().strip().splitlines()[-1]}")
    records = read_metrics(out_dir / "metrics.jsonl")
    final = [r for r in records if "val_bpb" in r][-1]
    model_line = next(line for line in log_path.read_text().splitlines() if line.startswith("model: "))
    trained = newgpt.load_checkpoint(out_dir)[2]["train_config"]
    schedule = {key: trained[key] for key in ("max_steps", "decay_fraction", "all_tokens_epochs")}
    tok_s = statistics.median(r["tok_per_s"] for r in records if r.get("tok_per_s"))
    return {"name": name, "minutes": minutes, "flags": " ".join(flags), "model": model_line.split(",")[0][7:],
            "schedule": schedule, "steps": final["step"], "tok_s": round(tok_s), "val_bpb": round(final["val_bpb"], 4),
            "wall_s": round(wall_s), "machine": machine(), "date": time.strftime("%Y-%m-%d")}


def plan(minutes, device_type):
    """(name, flags, cut?) for each run at this budget."""
    depth = newgpt.auto_depth(device_type, minutes)
    budget = ["--max_minutes", f"{minutes:g}"]
    cut = ["--depth", str(depth), "--max_steps", str(CUT_STEPS), "--all_tokens_epochs", str(CUT_ALL_TOKENS_EPOCHS)]
    return [("cut", cut, True),
            (f"auto (depth {depth})", ["--depth", str(depth), *budget], False),
            (f"down (depth {depth - 1})", ["--depth", str(depth - 1), *budget], False),
            (f"up (depth {depth + 1})", ["--depth", str(depth + 1), *budget], False)]


def budget(args):
    results = Path(args.runs) / "budget.jsonl" if args.tiny else BUDGET_RESULTS
    extra = shlex.split(args.flags) + (TINY_FLAGS if args.tiny else [])
    device_type = newgpt.pick_device(args.device).split(":")[0]
    rows = []
    for minutes in args.minutes:
        for name, flags, cut in plan(minutes, device_type):
            if args.only and name.split()[0] not in args.only:
                continue
            row = budget_run(name, [*flags, "--device", args.device, *extra], minutes, args, cut)
            rows.append(row)
            results.parent.mkdir(parents=True, exist_ok=True)
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{minutes:g} min  {name:<16} {row['model']:<28} steps {row['steps']:>6}  "
                  f"tok/s {row['tok_s']:>7,}  val bpb {row['val_bpb']:.4f}  wall {row['wall_s']} s", flush=True)
    print(f"\n{'budget':>6}  {'run':<16} {'model':<28} {'steps':>6} {'tok/s':>8} {'val bpb':>8} {'wall s':>7}")
    for r in rows:
        print(f"{r['minutes']:>4g} m  {r['name']:<16} {r['model']:<28} {r['steps']:>6} {r['tok_s']:>8,} "
              f"{r['val_bpb']:>8.4f} {r['wall_s']:>7}")

# -----------------------------------------------------------------------------
# to-target: the budget that reaches the original's result


SEED = ["--recipe", "seed"]
SEED_MINUTES = 8.0
QUALITY_RESULTS = REPO / "bench" / "results" / "quality.jsonl"


def curve(metrics_path):
    return [(r["elapsed_s"], r["val_bpb"]) for r in read_metrics(metrics_path) if "val_bpb" in r]


def time_to_reach(points, target):
    """Seconds until the curve first reaches `target`, interpolating linearly between evaluations."""
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if b1 <= target:
            return t0 + (t1 - t0) * (b0 - target) / (b0 - b1) if b0 > target else t0
    return None


def probe(minutes, target, setup, log):
    """One run of the default with a budget of `minutes`; whether it ended at or below the target."""
    row = run_budgeted(f"default {minutes:g} min", [], minutes, setup)
    reached = row["val_bpb"] <= target
    log(f"  --max_minutes {minutes:g}: {row['steps']} steps, val bpb {row['val_bpb']:.4f} "
        f"({'reached' if reached else 'not reached'}; {row['seconds']} s with start-up)")
    return row, reached


def bisect_budget(target, first_guess, resolution, ceiling, setup, log=print):
    """(lo, hi, probes): the smallest budget that reaches the target lies in (lo, hi] minutes. hi is None
    when no budget up to `ceiling` reached it."""
    probes, lo, hi, minutes = [], 0.0, None, first_guess
    while hi is None and minutes <= ceiling:
        row, reached = probe(minutes, target, setup, log)
        probes.append(row)
        lo, hi = (lo, minutes) if reached else (minutes, None)
        minutes *= 2
    while hi is not None and hi - lo > resolution:
        middle = round((lo + hi) / 2, 2)
        row, reached = probe(middle, target, setup, log)
        probes.append(row)
        lo, hi = (lo, middle) if reached else (middle, hi)
    return lo, hi, probes


def side_by_side(args):
    """Both recipes with the same budget; their curves plotted, and when the default passed the seed's end."""
    rows = {name: run_budgeted(name, flags, args.minutes, args, eval_interval=args.eval_interval)
            for name, flags in (("seed recipe", SEED), ("default", []))}
    curves = {name: curve(row["metrics"]) for name, row in rows.items()}
    seed_final = curves["seed recipe"][-1][1]
    reached = time_to_reach(curves["default"], seed_final)
    print(f"\n{'recipe':<12} {'steps':>6} {'tok/s':>7} {'final val bpb':>14}")
    for name, row in rows.items():
        print(f"{name:<12} {row['steps']:>6} {row['tok_s']:>7} {row['val_bpb']:>14.4f}")
    print("\ndefault never reached the seed recipe's final value" if reached is None else
          f"\nthe default's curve passed the seed recipe's final {seed_final:.4f} after {reached:.0f} s")
    plot(curves, seed_final, args.minutes, args.png)
    return {"mode": "curves", "minutes": args.minutes, "rows": list(rows.values()), "passed_after_s": reached}


def plot(curves, seed_final, minutes, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        ax.plot(*zip(*points), "o-", label=f"{name} (final {points[-1][1]:.3f})")
    ax.axhline(seed_final, color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="seconds of training (compilation included)", ylabel="validation bits per byte",
           title=f"Same {minutes:g}-minute budget")
    ax.legend()
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    print(f"plot: {png}")


def time_to_target(args):
    """The seed recipe's 8-minute result (unless --target gives it), then the bisection of B."""
    seed_row = None
    if args.target is None:
        seed_row = run_budgeted("seed recipe", SEED, args.seed_minutes, args)
        print(f"seed recipe, --max_minutes {args.seed_minutes:g}: {seed_row['steps']} steps, "
              f"val bpb {seed_row['val_bpb']:.4f}")
    target = args.target if args.target is not None else seed_row["val_bpb"]
    print(f"bisecting the default's budget B against val bpb {target:.4f}:")
    lo, hi, probes = bisect_budget(target, args.first_guess, args.resolution, args.ceiling, args)
    if hi is None:
        print(f"no budget up to {args.ceiling:g} minutes reached {target:.4f}")
    else:
        seed_s = args.seed_minutes * 60
        at_most = f" to {seed_s / (lo * 60):.2f}x" if lo else " or more"
        print(f"B is in ({lo * 60:.0f} s, {hi * 60:.0f} s]: the default reaches the seed recipe's "
              f"{args.seed_minutes:g}-minute result {seed_s / (hi * 60):.2f}x{at_most} faster (the goal: 10x)")
    return {"mode": "bisect", "target": target, "seed": seed_row, "lo_minutes": lo, "hi_minutes": hi,
            "probes": probes}


def to_target(args):
    sys.stdout.reconfigure(line_buffering=True)  # each probe's line as it ends, also into a log file
    result = side_by_side(args) if args.curves else time_to_target(args)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(json.dumps(result | {"date": time.strftime("%Y-%m-%d"), "tiny": args.tiny}) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)

    p = modes.add_parser("variants", help="newgpt.py flags at equal time (or steps)")
    p.add_argument("--minutes", type=float, default=3.0, help="wall-clock budget per variant")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run only these variants")
    p.add_argument("--steps", type=int, default=0, help="train every variant for this many steps (equal steps "
                   "instead of equal time, for variants that only change a schedule); --minutes still stops a run")
    p.add_argument("--budgeted", action="store_true", help="run each with --max_minutes, as a user does")

    p = modes.add_parser("tricks", help="patches to newgpt.py at equal steps")
    p.add_argument("--only", nargs="+", choices=list(TRICKS), help="run only these")
    p.add_argument("--steps", type=int, default=TRICK_STEPS, help="steps per run")
    p.add_argument("--results", default=str(TRICKS_RESULTS), help="file the rows are appended to")

    p = modes.add_parser("budget", help="the time budget and the size dial")
    p.add_argument("--minutes", type=float, nargs="+", default=[10.0, 30.0], help="budgets to measure")
    p.add_argument("--only", nargs="+", choices=["cut", "auto", "down", "up"], help="run only these")
    p.add_argument("--device", default="auto", help="as newgpt.py's --device")
    p.add_argument("--flags", default="", help='more newgpt.py flags for every run, e.g. "--decay_fraction 1"')

    p = modes.add_parser("to-target", help="the budget that reaches the original recipe's result")
    p.add_argument("--target", type=float, help="val bpb to reach (default: run the seed recipe first)")
    p.add_argument("--seed_minutes", type=float, default=SEED_MINUTES, help="the seed recipe's budget")
    p.add_argument("--first_guess", type=float, default=2.0, help="the first budget tried, minutes")
    p.add_argument("--resolution", type=float, default=0.25, help="stop when B is known this closely")
    p.add_argument("--ceiling", type=float, default=16.0, help="the largest budget tried, minutes")
    p.add_argument("--curves", action="store_true", help="instead: both recipes at --minutes, plotted")
    p.add_argument("--minutes", type=float, default=8.0, help="with --curves: the budget of each")
    p.add_argument("--eval_interval", type=int, default=50, help="with --curves: steps between evaluations")
    p.add_argument("--png", default=str(REPO / "bench" / "results" / "quality.png"))
    p.add_argument("--results", default=str(QUALITY_RESULTS), help="JSONL file the results are appended to")

    for p in modes.choices.values():
        add_run_arguments(p)
    args = parser.parse_args()
    {"variants": variants, "tricks": tricks, "budget": budget, "to-target": to_target}[args.mode](args)


if __name__ == "__main__":
    main()
