"""Ablations at equal wall-clock time on the real data: each variant of newgpt.py trains for the same
budget, and the table compares final validation bits per byte.

    python -m bench.experiments --minutes 3                 # every variant below, one after another
    python -m bench.experiments --minutes 3 --only default muon
    python -m bench.experiments --minutes 8 --steps 1400 --only default "warmup 300"   # equal steps
    python -m bench.experiments --minutes 10 --budgeted --only default "before the speedrun"   # as a user runs it
    python -m bench.experiments --tiny --only default --data a.jsonl --val_data v.jsonl --runs /tmp/runs  # smoke

For a fair budget each run's cosine schedule must end when its time does, so the script first measures
the variant's training throughput (bench/train_speed.py's worker, a few steps) and sets --max_steps to
what fits; --max_minutes ends a run that is slower than measured (with --decay_fraction 1, the cosine
schedule of these measurements, which predate the budgeted schedule). Compilation time counts against the
budget, as it does for a user. --budgeted runs each as a user does instead: `--max_minutes M`, its
warmup-stable-decay schedule following its own clock. Runs go to runs/experiments/NAME; results are
appended to runs/experiments/results.jsonl and printed as a table.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="wall-clock budget per variant")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run only these variants")
    parser.add_argument("--steps", type=int, default=0, help="train every variant for this many steps (equal "
                        "steps instead of equal time, for variants that only change a schedule); --minutes "
                        "still stops a run")
    parser.add_argument("--budgeted", action="store_true", help="run each with --max_minutes, as a user does")
    add_run_arguments(parser)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
