"""Decode speed with and without the KV cache, and against transformers' generate, side by side in one run.

    python -m bench.generate                      # default model size, random weights
    python -m bench.generate --ckpt ckpt --new_tokens 64 --repeats 7

For each prompt length (64, 256 and a full context window) it generates --new_tokens tokens greedily:
re-running the whole context every step (once), with our KV cache (prefill once, then one token per
step), and with transformers' `generate` on the same weights exported by export_hf.py (its own KV cache,
same dtype). The last two take turns, --repeats times each: speeds are medians, and ours/HF is the
median of the pairs' ratios, with the share of pairs ours won (a shared machine drifts less within a pair
than across the run). It reports tokens per second, the cache's speed-up, time to first token, and ours
against transformers timed end to end (the prompt and every new token). Greedy decoding makes all three
produce the same tokens: the script checks ours, and reports whether transformers' agree.
"""

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

import engine
import export_hf
import newgpt


def timed_generation(model, prompt, config, use_cache, ctx):
    started = time.perf_counter()
    tokens, first_token_s = [], None
    with ctx or nullcontext():
        for token, _ in engine.generate(model, engine.Prompt(prompt), config, use_cache=use_cache):
            if first_token_s is None:
                first_token_s = time.perf_counter() - started
            tokens.append(token)
    total = time.perf_counter() - started
    return tokens, first_token_s, (len(tokens) - 1) / (total - first_token_s), total


def timed_hf_generation(hf_model, prompt, new_tokens, ctx):
    started = time.perf_counter()
    with ctx:
        tokens = export_hf.greedy_generate(hf_model, prompt, new_tokens)
    return tokens, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="measure a trained checkpoint instead of a default-size random model")
    parser.add_argument("--new_tokens", type=int, default=64, help="tokens generated per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="turns each for ours (cached) and transformers")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype")
    args = parser.parse_args()
    if args.ckpt:
        model = newgpt.load_checkpoint(args.ckpt)[0].eval()
    else:
        torch.manual_seed(0)
        model = newgpt.GPT(newgpt.GPTConfig()).eval()
    # No end-of-turn id: transformers must generate all --new_tokens, as ours does without stop ids.
    hf_model = export_hf.to_hf_model(model, {"bos": None, "eos": None, "pad": None})
    block_size = model.config.block_size
    ctx = newgpt.autocast_context("cpu", args.dtype)
    config = engine.SamplingConfig(temperature=0.0, repetition_penalty=1.0, dry_multiplier=0.0,
                                 max_new_tokens=args.new_tokens)
    print(f"model: {model.num_params() / 1e6:.2f}M params, block_size {block_size}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens per run, medians of {args.repeats}\n")
    print(f"{'prompt':>11} {'no cache tok/s':>15} {'cache tok/s':>12} {'speed-up':>9} {'TTFT no cache':>14} "
          f"{'TTFT cache':>11} | {'end to end: ours':>17} {'HF generate':>12} {'ours/HF':>8} {'won':>5} {'same tokens':>12}")
    for prompt_len in (64, 256, block_size - args.new_tokens):
        prompt = torch.randint(0, model.config.vocab_size, (prompt_len,)).tolist()
        timed_generation(model, prompt[:16], config, False, ctx)  # warm-up
        uncached_tokens, uncached_ttft, uncached_tok_s, _ = timed_generation(model, prompt, config, False, ctx)
        timed_generation(model, prompt[:16], config, True, ctx)
        timed_hf_generation(hf_model, prompt[:16], args.new_tokens, ctx)
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(timed_generation(model, prompt, config, True, ctx))
            theirs.append(timed_hf_generation(hf_model, prompt, args.new_tokens, ctx))
        cached_tokens = ours[0][0]
        assert cached_tokens == uncached_tokens, "cached and uncached greedy decoding disagree"
        ttft, tok_s, total = (statistics.median(run[i] for run in ours) for i in (1, 2, 3))
        hf_total = statistics.median(run[1] for run in theirs)
        ours_e2e, hf_e2e = args.new_tokens / total, args.new_tokens / hf_total
        ratios = [hf_run[1] / our_run[3] for our_run, hf_run in zip(ours, theirs)]
        won = sum(r > 1 for r in ratios) / len(ratios)
        label = f"{prompt_len}" + (" (full)" if prompt_len + args.new_tokens == block_size else "")
        print(f"{label:>11} {uncached_tok_s:>15.1f} {tok_s:>12.1f} {tok_s / uncached_tok_s:>8.1f}x "
              f"{uncached_ttft * 1000:>12.0f}ms {ttft * 1000:>9.0f}ms | {ours_e2e:>11.1f} tok/s {hf_e2e:>6.1f} tok/s "
              f"{statistics.median(ratios):>7.2f}x {won:>5.0%} {str(theirs[0][0] == cached_tokens):>12}")


if __name__ == "__main__":
    main()
