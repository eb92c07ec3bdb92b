"""The time budget and the size dial, measured on the real data: for each budget, the step schedule cut
by the clock, then the budgeted schedule at the automatic size and at the next size down and up. The runs
go one after another on this machine, alone.

    python -m bench.budget                        # 10 and 30 minutes
    python -m bench.budget --minutes 2 5          # on a GPU
    python -m bench.budget --minutes 10 --only cut auto
    python -m bench.budget --minutes 10 --only auto --flags "--decay_fraction 1"   # a schedule variant
    python -m bench.budget --tiny --minutes 0.05 --data a.jsonl --val_data v.jsonl --runs /tmp/runs  # smoke

"cut" is what --max_minutes did before it shaped the schedule: the 6,800-step cosine schedule at the
automatic size, with its curriculum (all tokens for the first 30% of the steps), stopped by Ctrl-C when
the budget runs out (it then evaluates and saves, which this script does not count against it). The
others run `newgpt.py --max_minutes N --depth D`. Every run starts its clock at newgpt.py's "training on"
line, after the data is prepared. Runs go to runs/budget/; results are appended to
bench/results/budget.jsonl and printed as a table.
"""

import argparse
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import newgpt
from bench import experiments

REPO = experiments.REPO

RESULTS = REPO / "bench" / "results" / "budget.jsonl"
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


def run(name, flags, minutes, setup, cut=False):
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
    records = experiments.read_metrics(out_dir / "metrics.jsonl")
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 30.0], help="budgets to measure")
    parser.add_argument("--only", nargs="+", choices=["cut", "auto", "down", "up"], help="run only these")
    parser.add_argument("--device", default="auto", help="as newgpt.py's --device")
    parser.add_argument("--flags", default="", help='more newgpt.py flags for every run, e.g. "--decay_fraction 1"')
    experiments.add_run_arguments(parser)
    args = parser.parse_args()
    results = Path(args.runs) / "budget.jsonl" if args.tiny else RESULTS
    extra = shlex.split(args.flags) + (experiments.TINY_FLAGS if args.tiny else [])
    device_type = newgpt.pick_device(args.device).split(":")[0]
    rows = []
    for minutes in args.minutes:
        for name, flags, cut in plan(minutes, device_type):
            if args.only and name.split()[0] not in args.only:
                continue
            row = run(name, [*flags, "--device", args.device, *extra], minutes, args, cut)
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


if __name__ == "__main__":
    main()
