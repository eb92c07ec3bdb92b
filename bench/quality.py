"""Time to the original's result: how short a budget our default needs, run as a user runs it
(`python newgpt.py --max_minutes B`), to end at or below the validation bits per byte that the original
project's recipe (`--recipe seed`) reaches in 8 minutes.

    python -m bench.quality                          # the seed recipe's 8 minutes, then bisect B
    python -m bench.quality --target 2.2003          # bisect against a result measured before
    python -m bench.quality --curves --minutes 10    # both recipes at one budget, side by side, plotted
    python -m bench.quality --tiny --data a.jsonl --val_data v.jsonl --runs /tmp/runs --png /tmp/q.png  # smoke

B is the smallest budget whose run ends at or below the target. Each probe is a whole run: a budgeted
run warms up, holds its rate and decays as its own clock runs out, so reading the middle of a longer run's
curve would flatter or wrong it. Compilation and evaluations count against the budget, as for a user.
Probes start at --first_guess minutes, double until one reaches the target, then halve the interval
until it is narrower than --resolution. Runs go to runs/experiments/; results are appended to
bench/results/quality.jsonl.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from bench import experiments

SEED = ["--recipe", "seed"]
SEED_MINUTES = 8.0
RESULTS = experiments.REPO / "bench" / "results" / "quality.jsonl"


def curve(metrics_path):
    return [(r["elapsed_s"], r["val_bpb"]) for r in experiments.read_metrics(metrics_path) if "val_bpb" in r]


def time_to_reach(points, target):
    """Seconds until the curve first reaches `target`, interpolating linearly between evaluations."""
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if b1 <= target:
            return t0 + (t1 - t0) * (b0 - target) / (b0 - b1) if b0 > target else t0
    return None


def probe(minutes, target, setup, log):
    """One run of the default with a budget of `minutes`; whether it ended at or below the target."""
    row = experiments.run_budgeted(f"default {minutes:g} min", [], minutes, setup)
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
    rows = {name: experiments.run_budgeted(name, flags, args.minutes, args, eval_interval=args.eval_interval)
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
        seed_row = experiments.run_budgeted("seed recipe", SEED, args.seed_minutes, args)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, help="val bpb to reach (default: run the seed recipe first)")
    parser.add_argument("--seed_minutes", type=float, default=SEED_MINUTES, help="the seed recipe's budget")
    parser.add_argument("--first_guess", type=float, default=2.0, help="the first budget tried, minutes")
    parser.add_argument("--resolution", type=float, default=0.25, help="stop when B is known this closely")
    parser.add_argument("--ceiling", type=float, default=16.0, help="the largest budget tried, minutes")
    parser.add_argument("--curves", action="store_true", help="instead: both recipes at --minutes, plotted")
    parser.add_argument("--minutes", type=float, default=8.0, help="with --curves: the budget of each")
    parser.add_argument("--eval_interval", type=int, default=50, help="with --curves: steps between evaluations")
    parser.add_argument("--png", default=str(experiments.REPO / "bench" / "results" / "quality.png"))
    parser.add_argument("--results", default=str(RESULTS), help="JSONL file the results are appended to")
    experiments.add_run_arguments(parser)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each probe's line as it ends, also into a log file
    result = side_by_side(args) if args.curves else time_to_target(args)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(result | {"date": time.strftime("%Y-%m-%d"), "tiny": args.tiny}) + "\n")


if __name__ == "__main__":
    main()
