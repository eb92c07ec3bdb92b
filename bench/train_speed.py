"""Training throughput, side by side: the original project's recipe against ours, in one run.

    python -m bench.train_speed                  # the recipes below, 10 timed steps of 8 x 512 tokens each
    python -m bench.train_speed --steps 20 --recipes "seed (fp32)" default
    python -m bench.train_speed --rounds 3 --recipes "default, torch.optim.Muon" default
    python -m bench.train_speed --steps 40 --paired "default, torch.optim.Muon"
    python -m bench.train_speed --context 512 1024 2048 --depths 4 8   # what a longer context costs
    python -m bench.train_speed --tiny           # a smoke run: tiny models, 2 steps, small matmul peaks

Each recipe runs in its own subprocess (so peak RSS is its own) and times newgpt.train_step, the real
training step: forward and backward under autocast, gradient clipping, the optimizers.

The machine is shared and its speed moves within seconds, so read the ratios, not the absolute numbers:
- MFU (model FLOPs utilization) is against bf16 matmul speeds measured in the recipe's own process: a few
  matmuls timed between its steps ("bf16 now", the MFU column), and the best of 5 timings right before and
  right after them ("bf16 peak"). The table also gives MFU against the best peak of the whole run.
- --rounds N runs the list of recipes N times, interleaved, and reports each recipe's median round.
- --paired NAME compiles the default and one code change in one process and lets them take turns step by
  step, so that both see the same machine; it prints the median of the per-step ratios.
- --context times the --depth sizes at each context length with the same 4,096 tokens per step (fewer,
  longer rows), so that only attention's share of the work grows.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from runtime import keep_freed_memory
import newgpt

# name -> newgpt.py flags; each row is a recipe plus overrides, built exactly as the training script builds it.
RECIPES = {
    "seed (fp32)": ["--recipe", "seed"],
    "seed +bf16": ["--recipe", "seed", "--dtype", "bfloat16"],
    "seed +bf16 +compile": ["--recipe", "seed", "--dtype", "bfloat16", "--compile"],
    "default -compile": ["--no-compile"],
    "default, plain malloc": [],
    "default, torch.optim.Muon": [],
    "default, Newton-Schulz in bf16": [],
    "default, Newton-Schulz in fp32": [],
    "default, 4 heads of 64": ["--n_head", "4"],
    "default": [],
}
# Rows that change newgpt's code, not its flags: what each one swaps back to the way it was.
CODE_CHANGES = {
    "default, plain malloc": "plain_malloc",  # without keep_freed_memory()
    "default, torch.optim.Muon": "torch_muon",  # torch.optim.Muon instead of newgpt.Muon
    "default, Newton-Schulz in bf16": "ns_bfloat16",  # Muon orthogonalises in bf16 whatever the CPU
    "default, Newton-Schulz in fp32": "ns_float32",  # Muon orthogonalises in fp32 whatever the CPU
}


TINY_FLAGS = ["--n_layer", "1", "--n_head", "1", "--n_embd", "32", "--block_size", "32", "--vocab_size", "320"]
PEAK_SIZE = 2048  # the fastest square matmul size we tried on these cores


def matmul_tflops(dtype, n=PEAK_SIZE, repeats=10, trials=5, warmup=3):
    """The best of `trials` timings of `repeats` square matmuls. The best, not the mean: a neighbour's load can
    only make a trial slower, so this is the honest peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(warmup):
        a @ b
    best = 0.0
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - started) / 1e12)
    return best


def measure_peaks(n=PEAK_SIZE):
    return {"float32": matmul_tflops(torch.float32, n), "bfloat16": matmul_tflops(torch.bfloat16, n)}


def higher_peaks(before, after):
    return {dtype: max(before[dtype], after[dtype]) for dtype in before}


def flops_per_token(config):
    """6 FLOPs per matmul weight per token (forward + backward) plus attention's 6 * 2 * L * T * C
    (the PaLM paper's appendix B). Embedding lookups are free; the tied lm_head matmul is not."""
    C, L, T, V = config.n_embd, config.n_layer, config.block_size, config.vocab_size
    matmul_weights = L * 12 * C * C + V * C
    return 6 * matmul_weights + 12 * L * T * C


def achieved_tflops(result):
    return result["tok_s"] * result["flops_per_token"] / 1e12


def mfu(result):
    """Model FLOPs utilization against the bf16 matmul speed sampled between the timed steps."""
    return achieved_tflops(result) / result["bf16_between_steps"]


def build(flags, batch_size, code_change):
    """The model, optimizers, precision and compilation that newgpt.py's flags select, with a code change."""
    args = newgpt.parse_args(flags + ["--batch_size", str(batch_size), "--grad_accum", "1"])
    model_config, cfg, _ = newgpt.configs_from_args(args)
    torch.manual_seed(0)
    model = newgpt.GPT(model_config)
    optimizers = newgpt.configure_optimizers(model, cfg, "cpu")
    hidden = optimizers[-1].param_groups[0]["params"]
    if code_change == "torch_muon":
        optimizers[-1] = torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          adjust_lr_fn="match_rms_adamw")
    if code_change.startswith("ns_"):
        ns_dtype = getattr(torch, code_change.removeprefix("ns_"))
        optimizers[-1] = newgpt.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, ns_dtype=ns_dtype)
    dtype = newgpt.pick_dtype(cfg.dtype, "cpu")
    trained = torch.compile(model) if cfg.compile else model
    return dict(model_config=model_config, cfg=cfg, model=model, trained=trained, optimizers=optimizers,
                scaler=torch.amp.GradScaler("cpu", enabled=False), dtype=dtype,
                ctx=newgpt.autocast_context("cpu", dtype), code_change=code_change)


def random_rows(model_config, steps, batch_size):
    """Rows of random token ids, every token a target: enough for `steps` steps."""
    n_tokens = steps * batch_size * model_config.block_size + 1
    ids = np.random.default_rng(0).integers(0, model_config.vocab_size, n_tokens).astype(np.uint16)
    return newgpt.PackedRows(ids, np.ones(n_tokens, dtype=np.uint8), model_config.block_size)


def timed_step(setup, rows, step):
    """One newgpt.train_step on the step's rows, as the training loop takes it; returns its seconds."""
    cfg = setup["cfg"]
    batch = rows.get(range(step * cfg.batch_size, (step + 1) * cfg.batch_size))
    started = time.perf_counter()
    newgpt.train_step(setup["trained"], setup["optimizers"], setup["scaler"], [batch], cfg.grad_clip, setup["ctx"])
    return time.perf_counter() - started


def run_worker(flags, steps, batch_size, code_change, with_peaks, peak_size):
    """Time newgpt.train_step itself (forward/backward under autocast, clip, optimizer step) on random
    tokens, with the model, optimizers, precision and compilation that newgpt.py's flags select."""
    if code_change != "plain_malloc":
        keep_freed_memory()  # as newgpt.py's __main__ does
    setup = build(flags, batch_size, code_change)
    model_config = setup["model_config"]
    rows = random_rows(model_config, steps + 3, batch_size)
    warmup_s = sum(timed_step(setup, rows, step) for step in range(3))  # compilation, allocator, kernels
    # The machine is shared and its speed drifts over minutes: the peak that this recipe's MFU is measured
    # against is taken here, in the same process, seconds before and after the timed steps.
    peaks_before = measure_peaks(peak_size) if with_peaks else None
    seconds, bf16_between_steps = 0.0, []
    for step in range(3, 3 + steps):
        seconds += timed_step(setup, rows, step)
        if with_peaks:  # the machine's bf16 matmul speed now, between two timed steps (about 0.1 s)
            bf16_between_steps.append(matmul_tflops(torch.bfloat16, peak_size, repeats=4, trials=2, warmup=3))
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = higher_peaks(peaks_before, measure_peaks(peak_size)) if with_peaks else None
    print(json.dumps({"tok_s": steps * batch_size * model_config.block_size / seconds, "peak_rss_mb": peak_rss_mb,
                      "params_m": setup["model"].num_params() / 1e6,
                      "flops_per_token": flops_per_token(model_config),
                      "dtype": setup["dtype"], "peaks": peaks, "warmup_s": warmup_s,
                      "bf16_between_steps": float(np.mean(bf16_between_steps)) if with_peaks else None,
                      "config": asdict(model_config) | {"compile": setup["cfg"].compile}}))


def run_paired(name, steps, batch_size):
    """The default and one code change, compiled in one process, taking turns step by step (the order
    swapped every step), so that both see the same machine: prints the median of the per-step ratios."""
    keep_freed_memory()
    default = build(RECIPES["default"], batch_size, "")
    changed = build(RECIPES[name], batch_size, CODE_CHANGES[name])
    rows = random_rows(default["model_config"], steps + 3, batch_size)
    for step in range(3):  # warm-up: compilation, allocator, kernels
        timed_step(default, rows, step)
        timed_step(changed, rows, step)
    times = {"default": [], name: []}
    for step in range(3, 3 + steps):
        pair = [("default", default), (name, changed)]
        for key, setup in (pair if step % 2 else pair[::-1]):
            times[key].append(timed_step(setup, rows, step))
    ratios = np.array(times[name]) / np.array(times["default"])
    print(f"{steps} paired steps: default {np.median(times['default']) * 1000:.1f} ms, {name} "
          f"{np.median(times[name]) * 1000:.1f} ms (medians); the default is {np.median(ratios):.3f}x faster "
          f"(median of the per-step ratios), faster in {np.mean(ratios > 1):.0%} of the pairs")


def measure(flags, steps, batch_size, code_change="", with_peaks=False, peak_size=PEAK_SIZE):
    """Throughput of newgpt.py's training step under `flags`, measured in a fresh process; with_peaks adds
    the matmul peaks measured right before and after it (a few seconds more)."""
    out = subprocess.run([sys.executable, "-m", "bench.train_speed", "--worker", json.dumps(flags),
                          "--steps", str(steps),
                          "--batch_size", str(batch_size), "--code_change", code_change,
                          "--peak_size", str(peak_size), *(["--peaks"] if with_peaks else [])],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def context_costs(depths, contexts, steps, tokens_per_step=4096):
    """Tokens per second at each depth and context length, and the ratio to the shortest context."""
    print(f"{'depth':>5} {'context':>7} {'rows':>4} {'tok/s':>8} {'vs ' + str(contexts[0]):>7} {'peak RSS':>9}")
    for depth in depths:
        first = None
        for context in contexts:
            r = measure(["--depth", str(depth), "--block_size", str(context)], steps, tokens_per_step // context)
            first = first or r["tok_s"]
            print(f"{depth:>5} {context:>7} {tokens_per_step // context:>4} {r['tok_s']:>8,.0f} "
                  f"{r['tok_s'] / first:>6.2f}x {r['peak_rss_mb']:>7,.0f}MB", flush=True)


def at_least_one(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--steps", type=at_least_one, default=10, help="timed optimizer steps per recipe")
    parser.add_argument("--batch_size", type=at_least_one, default=8, help="rows of block_size tokens per step")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--rounds", type=at_least_one, default=1,
                        help="measure the recipes this many times, interleaved, and keep each one's median round")
    pairable = [name for name, change in CODE_CHANGES.items() if change != "plain_malloc"]
    parser.add_argument("--paired", choices=pairable,
                        help="time the default against this code change in one process, step by step, instead")
    parser.add_argument("--context", type=at_least_one, nargs="+",
                        help="time these context lengths at each of --depths instead (4,096 tokens per step)")
    parser.add_argument("--depths", type=at_least_one, nargs="+", default=[4, 8], help="sizes for --context")
    parser.add_argument("--tiny", action="store_true",
                        help="a smoke run: tiny models, 2 steps, two recipes, peaks from small matmuls")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--code_change", default="", help=argparse.SUPPRESS)
    parser.add_argument("--peaks", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peak_size", type=at_least_one, default=PEAK_SIZE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(json.loads(args.worker), args.steps, args.batch_size, args.code_change, args.peaks,
                          args.peak_size)
    recipes = {name: flags + (TINY_FLAGS if args.tiny else []) for name, flags in RECIPES.items()}
    if args.tiny:
        args.steps, args.batch_size, args.peak_size = 2, 2, 64
        args.recipes = args.recipes if args.recipes != list(RECIPES) else ["seed (fp32)", "default -compile"]
    if args.paired:
        return run_paired(args.paired, args.steps, args.batch_size)
    if args.context:
        return context_costs(args.depths, args.context, args.steps)

    rounds = {name: [] for name in args.recipes}
    for _ in range(args.rounds):
        for name in args.recipes:
            code_change = CODE_CHANGES.get(name, "")
            rounds[name].append(measure(recipes[name], args.steps, args.batch_size, code_change, True,
                                        args.peak_size))
    # The median round by throughput (the lower middle one for an even count), with the peaks measured in it.
    results = {name: sorted(runs, key=lambda r: r["tok_s"])[(len(runs) - 1) // 2] for name, runs in rounds.items()}
    every_run = [r for runs in rounds.values() for r in runs]
    bf16, fp32 = ([r["peaks"][dtype] for r in every_run] for dtype in ("bfloat16", "float32"))
    best_bf16 = max(bf16)
    print(f"matmul peak on {os.cpu_count()} cores, the higher of before and after each recipe: "
          f"bf16 {min(bf16):.2f} to {best_bf16:.2f} TFLOP/s, fp32 {min(fp32):.2f} to {max(fp32):.2f}")
    baseline = results[next(iter(results))]["tok_s"]
    width = max(len(name) for name in results)
    print(f"\n{'recipe':<{width}} {'params':>7} {'tok/s':>7} {'vs first':>8} {'TFLOP/s':>7} {'bf16 now':>8} "
          f"{'bf16 peak':>9} {'MFU':>6} {'MFU vs peak':>11} {'vs best':>7} {'own dtype':>9} {'peak RSS':>9}")
    for name, r in results.items():
        tflops = achieved_tflops(r)
        print(f"{name:<{width}} {r['params_m']:>6.2f}M {r['tok_s']:>7,.0f} {r['tok_s'] / baseline:>7.2f}x "
              f"{tflops:>7.3f} {r['bf16_between_steps']:>8.2f} {r['peaks']['bfloat16']:>9.2f} {mfu(r):>6.1%} "
              f"{tflops / r['peaks']['bfloat16']:>11.1%} {tflops / best_bf16:>7.1%} "
              f"{tflops / r['peaks'][r['dtype']]:>9.1%} {r['peak_rss_mb']:>7,.0f}MB")
    print("bf16 now: the bf16 matmul speed sampled between the timed steps; MFU: against it; MFU vs peak: "
          "against the bf16 peak measured before and after the steps; vs best: against the run's best bf16 "
          "peak; own dtype: against the peak of the recipe's own precision")
    for name, r in results.items():
        change = f", code change: {CODE_CHANGES[name]}" if name in CODE_CHANGES else ""
        print(f"{name}: {' '.join(recipes[name]) or '(defaults)'}{change} -> {json.dumps(r['config'])}")
    if args.rounds > 1:
        for name, runs in rounds.items():
            tok_s = ", ".join(f"{r['tok_s']:,.0f}" for r in runs)
            print(f"{name}: tok/s in each round {tok_s}; MFU {', '.join(f'{mfu(r):.1%}' for r in runs)}")


if __name__ == "__main__":
    main()
