"""Decode speed with and without the KV cache, side by side in one run.

    python bench/generate.py                      # default model size, random weights
    python bench/generate.py --ckpt ckpt --new_tokens 64

For each prompt length (64, 256 and a full context window) it generates --new_tokens tokens greedily,
once re-running the whole context every step and once with the KV cache (prefill once, then one token
per step), and reports tokens per second, the speed-up, and time to first token. Greedy decoding makes
both produce the same tokens, which the script checks.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chat_with_model as chat  # noqa: E402
import newgpt  # noqa: E402


def timed_generation(model, prompt, config, use_cache, ctx):
    started = time.perf_counter()
    tokens, first_token_s = [], None
    for token in chat.generate(model, prompt, config, use_cache=use_cache, ctx=ctx):
        if first_token_s is None:
            first_token_s = time.perf_counter() - started
        tokens.append(token)
    total = time.perf_counter() - started
    return tokens, first_token_s, (len(tokens) - 1) / (total - first_token_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--ckpt", help="measure a trained checkpoint instead of a default-size random model")
    parser.add_argument("--new_tokens", type=int, default=64, help="tokens generated per measurement")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype")
    args = parser.parse_args()
    if args.ckpt:
        model = newgpt.load_checkpoint(args.ckpt)[0].eval()
    else:
        torch.manual_seed(0)
        model = newgpt.GPT(newgpt.GPTConfig()).eval()
    block_size = model.config.block_size
    ctx = newgpt.autocast_context("cpu", args.dtype)
    config = chat.SamplingConfig(temperature=0.0, repetition_penalty=1.0, max_new_tokens=args.new_tokens)
    print(f"model: {model.num_params() / 1e6:.2f}M params, block_size {block_size}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens per run\n")
    print(f"{'prompt':>11} {'no cache tok/s':>15} {'cache tok/s':>12} {'speed-up':>9} {'TTFT no cache':>14} "
          f"{'TTFT cache':>11}")
    for prompt_len in (64, 256, block_size - args.new_tokens):
        prompt = torch.randint(0, model.config.vocab_size, (prompt_len,)).tolist()
        chat_tokens = {}
        results = {}
        for use_cache in (False, True):
            timed_generation(model, prompt[:16], config, use_cache, ctx)  # warm-up
            chat_tokens[use_cache], ttft, tok_s = timed_generation(model, prompt, config, use_cache, ctx)
            results[use_cache] = (ttft, tok_s)
        assert chat_tokens[True] == chat_tokens[False], "cached and uncached greedy decoding disagree"
        label = f"{prompt_len}" + (" (full)" if prompt_len + args.new_tokens == block_size else "")
        print(f"{label:>11} {results[False][1]:>15.1f} {results[True][1]:>12.1f} "
              f"{results[True][1] / results[False][1]:>8.1f}x {results[False][0] * 1000:>12.0f}ms "
              f"{results[True][0] * 1000:>9.0f}ms")


if __name__ == "__main__":
    main()
