"""Quality per second: the original project's recipe against our default, trained on the real data under
the same wall-clock budget, side by side in one run.

    python bench/quality.py                 # 15 minutes each
    python bench/quality.py --minutes 8
    python bench/quality.py --tiny --data a.jsonl --val_data v.jsonl --runs /tmp/runs --png /tmp/q.png  # smoke

It plots validation bits per byte against seconds of training (bench/results/quality.png) and reports each
recipe's final val bpb and how long our default took to reach the seed recipe's final value. Each run's
schedule is sized to its budget as in bench/experiments.py, compilation time included.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import experiments  # noqa: E402

RECIPES = {"seed recipe": ["--recipe", "seed"], "default": []}


def curve(metrics_path):
    return [(r["elapsed_s"], r["val_bpb"]) for r in experiments.read_metrics(metrics_path) if "val_bpb" in r]


def time_to_reach(points, target):
    """Seconds until the curve first reaches `target`, interpolating linearly between evaluations."""
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if b1 <= target:
            return t0 + (t1 - t0) * (b0 - target) / (b0 - b1) if b0 > target else t0
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget per recipe")
    experiments.add_run_arguments(parser)
    parser.add_argument("--png", default=str(experiments.REPO / "bench" / "results" / "quality.png"))
    args = parser.parse_args()
    curves, rows = {}, {}
    for name, flags in RECIPES.items():
        rows[name] = experiments.run_variant(name, flags, args.minutes, args, evaluations=12)
        curves[name] = curve(rows[name]["metrics"])

    seed_final = curves["seed recipe"][-1][1]
    reached = time_to_reach(curves["default"], seed_final)
    budget = args.minutes * 60
    print(f"\n{'recipe':<12} {'steps':>6} {'tok/s':>7} {'final val bpb':>14}")
    for name, row in rows.items():
        print(f"{name:<12} {row['steps']:>6} {row['tok_s']:>7} {row['val_bpb']:>14.4f}")
    if reached is None:
        print(f"\ndefault never reached the seed recipe's final {seed_final:.4f} bits/byte")
    else:
        print(f"\ndefault reached the seed recipe's final {seed_final:.4f} bits/byte after {reached:.0f} s, "
              f"{reached / budget:.2f} of the {budget:.0f} s budget ({budget / reached:.1f}x faster)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        ax.plot(*zip(*points), "o-", label=f"{name} (final {points[-1][1]:.3f})")
    ax.axhline(seed_final, color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="seconds of training (compilation included)", ylabel="validation bits per byte",
           title=f"Same {args.minutes:g}-minute budget on 2 CPU cores")
    ax.legend()
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=100)
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
