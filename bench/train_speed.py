"""Training throughput, side by side: the original project's recipe against ours, in one run.

    python bench/train_speed.py                  # seed recipe fp32/bf16 and the default model fp32/bf16
    python bench/train_speed.py --steps 20 --batch_size 8

Each recipe runs in its own subprocess (so peak RSS is its own) for --steps optimizer steps of the real
training step: forward and backward under autocast, gradient clipping, fused AdamW. The same run measures
this machine's matmul peak in fp32 and bf16, and reports model FLOPs utilization (MFU) against it.
The machine is shared and noisy: read the ratios, not the absolute numbers.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import newgpt  # noqa: E402

SEED_MODEL = newgpt.GPTConfig(n_layer=4, n_head=4, n_embd=256, pos_encoding="learned")
RECIPES = {
    "seed fp32": (SEED_MODEL, "float32"),
    "seed bf16": (SEED_MODEL, "bfloat16"),
    "default fp32": (newgpt.GPTConfig(), "float32"),
    "default bf16": (newgpt.GPTConfig(), "bfloat16"),
}


def matmul_peak_tflops(dtype, n=2048, repeats=10):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - started) / 1e12


def flops_per_token(config):
    """6 FLOPs per matmul weight per token (forward + backward) plus attention's 6 * 2 * L * T * C
    (the PaLM paper's appendix B). Embedding lookups are free; the tied lm_head matmul is not."""
    C, L, T, V = config.n_embd, config.n_layer, config.block_size, config.vocab_size
    matmul_weights = L * 12 * C * C + V * C
    return 6 * matmul_weights + 12 * L * T * C


def run_worker(name, steps, batch_size):
    config, dtype = RECIPES[name]
    torch.manual_seed(0)
    model = newgpt.GPT(config)
    optimizer = newgpt.configure_optimizer(model, newgpt.TrainConfig(), "cpu")
    ctx = newgpt.autocast_context("cpu", dtype)
    x = torch.randint(0, config.vocab_size, (batch_size, config.block_size))
    y = torch.randint(0, config.vocab_size, (batch_size, config.block_size))

    def step():
        with ctx:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: allocator, kernel selection
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - started
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tok_s": steps * batch_size * config.block_size / seconds, "peak_rss_mb": peak_rss_mb,
                      "params_m": model.num_params() / 1e6, "flops_per_token": flops_per_token(config)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per recipe")
    parser.add_argument("--batch_size", type=int, default=8, help="rows of block_size tokens per step")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args.worker, args.steps, args.batch_size)

    peaks = {"float32": matmul_peak_tflops(torch.float32), "bfloat16": matmul_peak_tflops(torch.bfloat16)}
    print(f"matmul peak on {os.cpu_count()} cores: fp32 {peaks['float32']:.2f} TFLOP/s, "
          f"bf16 {peaks['bfloat16']:.2f} TFLOP/s")
    results = {}
    for name in args.recipes:
        out = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
                              "--batch_size", str(args.batch_size)], capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    baseline = results.get("seed fp32", next(iter(results.values())))["tok_s"]
    print(f"\n{'recipe':<14} {'params':>8} {'tok/s':>8} {'vs seed fp32':>13} {'TFLOP/s':>8} "
          f"{'MFU(own dtype)':>15} {'MFU(bf16 peak)':>15} {'peak RSS':>9}")
    for name, r in results.items():
        dtype = RECIPES[name][1]
        tflops = r["tok_s"] * r["flops_per_token"] / 1e12
        print(f"{name:<14} {r['params_m']:>7.2f}M {r['tok_s']:>8,.0f} {r['tok_s'] / baseline:>12.2f}x "
              f"{tflops:>8.3f} {tflops / peaks[dtype]:>14.1%} {tflops / peaks['bfloat16']:>14.1%} "
              f"{r['peak_rss_mb']:>7,.0f}MB")
    print(f"\nconfigs: {json.dumps({name: asdict(c) | {'dtype': d} for name, (c, d) in RECIPES.items()})}")


if __name__ == "__main__":
    main()
