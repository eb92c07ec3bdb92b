"""Attention kernels for CPU training, compiled, in bf16: are the gradients finite, and how fast is a step?

    python bench/attention_cpu.py              # the three kernels below, 12 timed steps each, one process each
    python bench/attention_cpu.py --paired     # sdpa against the written-out kernel, taking turns in one process
    python bench/attention_cpu.py --tiny       # a smoke run: a tiny model, 2 steps

newgpt.py computes attention with F.scaled_dot_product_attention. An earlier version wrote it out for CPU
training (softmax(q k^T / sqrt(hs) + causal mask) v, bf16 matmuls, fp32 softmax) because PyTorch's CPU flash
kernel runs its backward at fp32 speed. On an Intel Xeon with AMX and AVX512-FP16, torch.compile (2.13) turned
that version's backward into NaN gradients; compiled with AVX2 instead of AVX-512 code it stayed finite. This
script keeps the written-out kernel as a stand-in, so that the check can be repeated on another CPU or torch.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtime import keep_freed_memory  # noqa: E402
import newgpt  # noqa: E402

KERNELS = {
    "sdpa": "F.scaled_dot_product_attention, RoPE on (B, T, nh, hs): newgpt.py today",
    "written-out, RoPE on (B, nh, T, hs)": "the earlier CPU kernel, as it was",
    "written-out, RoPE on (B, T, nh, hs)": "the earlier CPU kernel with today's RoPE layout",
}


class WrittenOutAttention(newgpt.CausalSelfAttention):
    """softmax(q k^T / sqrt(hs) + causal mask) v with bf16 matmuls and an fp32 softmax (training only)."""

    def __init__(self, config, rope_before_transpose):
        super().__init__(config)
        self.rope_before_transpose = rope_before_transpose
        causal_bias = torch.full((config.block_size, config.block_size), float("-inf")).triu(1)
        self.register_buffer("causal_bias", causal_bias, persistent=False)

    def forward(self, x, rope=None, kv_cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in (q, k, v))  # (B, T, nh, hs)
        cos, sin = rope
        if self.rope_before_transpose:
            q, k = newgpt.apply_rope(q, cos, sin), newgpt.apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if not self.rope_before_transpose:
            q, k = newgpt.apply_rope(q, cos[:, 0], sin[:, 0]), newgpt.apply_rope(k, cos[:, 0], sin[:, 0])
        scores = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        weights = F.softmax(scores + self.causal_bias[:T, :T], dim=-1).to(v.dtype)
        y = (weights @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


TINY = {"n_layer": 1, "n_head": 1, "n_embd": 64, "block_size": 32, "vocab_size": 320}


def build_model(kernel, config):
    torch.manual_seed(0)
    model = newgpt.GPT(config)
    if kernel != "sdpa":
        for block in model.transformer.h:
            block.attn = WrittenOutAttention(config, rope_before_transpose="(B, T, nh, hs)" in kernel)
        model.init_weights()
    return model


def train_step(compiled, optimizers, rows, step, cfg, ctx):
    """newgpt's training step on the step's rows, on one process; returns the loss."""
    batch = rows.get(range(step * cfg.batch_size, (step + 1) * cfg.batch_size))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return newgpt.train_step(compiled, optimizers, scaler, [batch], cfg.grad_clip, ctx)


def random_rows(config, cfg, steps):
    """Rows of random token ids, every token a target: enough for `steps` steps and the warm-up."""
    n_tokens = (steps + 4) * cfg.batch_size * config.block_size + 1
    ids = np.random.default_rng(0).integers(0, config.vocab_size, n_tokens).astype(np.uint16)
    return newgpt.PackedRows(ids, np.ones(n_tokens, dtype=np.uint8), config.block_size, loss_on="all")


def run_worker(kernel, steps, config):
    keep_freed_memory()
    model = build_model(kernel, config)
    cfg = newgpt.TrainConfig()
    optimizers = newgpt.configure_optimizers(model, cfg, "cpu")
    compiled = torch.compile(model)
    ctx = newgpt.autocast_context("cpu", "bfloat16")
    rows = random_rows(config, cfg, steps)

    x, y = rows.get(range(cfg.batch_size))
    with ctx:
        _, loss = compiled(x, y)
    loss.backward()
    nan_grads = sum(bool(p.grad.isnan().any()) for p in model.parameters())
    model.zero_grad(set_to_none=True)

    for step in range(3):  # compilation is done; warm the allocator and kernels
        train_step(compiled, optimizers, rows, step, cfg, ctx)
    started, losses = time.perf_counter(), []
    for step in range(3, 3 + steps):
        losses.append(train_step(compiled, optimizers, rows, step, cfg, ctx))
    seconds = (time.perf_counter() - started) / steps
    print(json.dumps({"nan_grads": nan_grads, "n_params": len(list(model.parameters())), "ms": seconds * 1000,
                      "tok_s": cfg.batch_size * config.block_size / seconds, "last_loss": losses[-1]}))


def run_paired(steps, config):
    """Both finite kernels compiled in one process, taking turns step by step (the order swapped every step),
    so that both see the same machine: prints the median of the per-step time ratios."""
    keep_freed_memory()
    kernels = ["sdpa", "written-out, RoPE on (B, T, nh, hs)"]
    cfg = newgpt.TrainConfig()
    ctx = newgpt.autocast_context("cpu", "bfloat16")
    rows = random_rows(config, cfg, steps)
    setups = {}
    for kernel in kernels:
        model = build_model(kernel, config)
        setups[kernel] = (torch.compile(model), newgpt.configure_optimizers(model, cfg, "cpu"))
    times, losses = {k: [] for k in kernels}, {k: [] for k in kernels}
    for step in range(3 + steps):
        for kernel in (kernels if step % 2 else kernels[::-1]):
            compiled, optimizers = setups[kernel]
            started = time.perf_counter()
            loss = train_step(compiled, optimizers, rows, step, cfg, ctx)
            if step >= 3:  # the first steps compile
                times[kernel].append(time.perf_counter() - started)
                losses[kernel].append(loss)
    ratios = np.array(times[kernels[0]]) / np.array(times[kernels[1]])
    for kernel in kernels:
        print(f"{kernel:<36} median {np.median(times[kernel]) * 1000:.0f} ms/step, "
              f"last loss {losses[kernel][-1]:.3f}")
    print(f"{steps} paired steps: the written-out kernel is {np.median(ratios):.2f}x faster than sdpa (median of "
          f"the per-step ratios), faster in {np.mean(ratios > 1):.0%} of the pairs")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per kernel")
    parser.add_argument("--paired", action="store_true", help="sdpa against the written-out kernel, in turns")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: a tiny model, 2 steps")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = newgpt.GPTConfig(**TINY) if args.tiny else newgpt.GPTConfig()
    steps = 2 if args.tiny else args.steps
    if args.worker:
        return run_worker(args.worker, steps, config)
    if args.paired:
        return run_paired(steps, config)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"{'a tiny' if args.tiny else 'the default'} model, batch 8 x {config.block_size}, bf16")
    print(f"\n{'kernel':<36} {'NaN grads':>9} {'ms/step':>8} {'tok/s':>7} {'last loss':>9}")
    for kernel, meaning in KERNELS.items():
        out = subprocess.run([sys.executable, __file__, "--worker", kernel, "--steps", str(steps),
                              *(["--tiny"] if args.tiny else [])], capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{kernel:<36} {r['nan_grads']:>4} / {r['n_params']:<2} {r['ms']:>8.0f} {r['tok_s']:>7,.0f} "
              f"{r['last_loss']:>9.3f}   {meaning}", flush=True)


if __name__ == "__main__":
    main()
