"""Sampling settings against repetition loops, chosen without fooling ourselves: every candidate is scored by
bench/chat_quality.py on the tuning half of its questions and prompts, one is chosen by a rule fixed in
advance, and only then are today's defaults and the choice scored on the test half.

    python -m bench.sampling_sweep ckpt/release                  # every candidate below
    python -m bench.sampling_sweep ckpt/release --only today dry  # some of them
    python -m bench.sampling_sweep ckpt/release --tiny            # a smoke run: two candidates, 8 tokens

The rule: among the candidates whose relevance is at most 0.01 below today's and whose knowledge is not
lower, the fewest loops; ties go to more answers that end their turn, then to a higher distinct-2. Results
are appended to bench/results/sampling_sweep.jsonl (--results).
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from bench import chat_quality

engine = chat_quality.engine

# name -> /set assignments on top of the chat's defaults when this sweep was written (today's row)
TODAY = ["temperature=0.3", "top_k=40", "top_p=0.9", "min_p=0", "repetition_penalty=1.3",
         "repetition_window=64", "frequency_penalty=0", "presence_penalty=0", "dry_multiplier=0",
         "no_repeat_ngram_size=0"]
CANDIDATES = {
    "today": [],
    "no penalty": ["repetition_penalty=1.0"],
    "rep 1.5": ["repetition_penalty=1.5"],
    "frequency 0.5": ["repetition_penalty=1.0", "frequency_penalty=0.5"],
    "rep 1.3 + presence 0.5": ["presence_penalty=0.5"],
    "rep 1.3 + frequency 0.3": ["frequency_penalty=0.3"],
    "no-repeat 3-grams": ["repetition_penalty=1.0", "no_repeat_ngram_size=3"],
    "rep 1.3 + no-repeat 4-grams": ["no_repeat_ngram_size=4"],
    "dry": ["repetition_penalty=1.0", "dry_multiplier=0.8"],
    "rep 1.3 + dry": ["dry_multiplier=0.8"],
    "rep 1.3 + dry 2": ["dry_multiplier=2.0"],
    "rep 1.3 + dry, allowed 3": ["dry_multiplier=0.8", "dry_allowed_length=3"],
    "min-p 0.1, t 0.7 + dry": ["temperature=0.7", "top_k=0", "top_p=1.0", "min_p=0.1", "repetition_penalty=1.0",
                               "dry_multiplier=0.8"],
    "min-p 0.1, t 0.7 + rep 1.3 + dry": ["temperature=0.7", "top_k=0", "top_p=1.0", "min_p=0.1",
                                         "dry_multiplier=0.8"],
    "min-p 0.05, t 0.5 + rep 1.3 + dry": ["temperature=0.5", "top_k=0", "top_p=1.0", "min_p=0.05",
                                          "dry_multiplier=0.8"],
    "t 0.5 + rep 1.3 + dry": ["temperature=0.5", "dry_multiplier=0.8"],
}
RESULTS = chat_quality.REPO / "bench" / "results" / "sampling_sweep.jsonl"


def score(ckpt, settings, which, data, max_new_tokens):
    """chat_quality's row for one setting on one half."""
    questions, prompts, embedder, word_list = data
    sampling = engine.apply_settings(engine.SamplingConfig(max_new_tokens=max_new_tokens), TODAY + settings)
    row = chat_quality.evaluate(ckpt, chat_quality.half(questions, which), chat_quality.half(prompts, which),
                                sampling, embedder, word_list)
    return row | {"half": which, "sampling": dataclasses.asdict(sampling)}


def choose(rows):
    """The rule of the module docstring, over the tuning half's rows ({name: row}, today's among them)."""
    today = rows["today"]
    allowed = {name: r for name, r in rows.items()
               if r["relevance"] >= today["relevance"] - 0.01 and r["knowledge"] >= today["knowledge"]}
    return min(allowed, key=lambda name: (allowed[name]["loop_rate"], -allowed[name]["ended_rate"],
                                          -allowed[name]["distinct_2"]))


def print_rows(title, rows):
    print(f"\n{title}\n| setting | knowledge | relevance | distinct-2 | loops | ended | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['knowledge_right']}/{r['questions']} | {r['relevance']:.3f} | {r['distinct_2']:.3f} | "
              f"{r['loop_rate']:.0%} | {r['ended_rate']:.0%} | {r['seconds']} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint file or run directory")
    parser.add_argument("--only", nargs="+", choices=list(CANDIDATES), help="these candidates (today's always)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest reply")
    parser.add_argument("--results", default=str(RESULTS), help="JSONL file the rows are appended to")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: two candidates, 8 tokens per reply")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    names = ["today", "dry"] if args.tiny else ["today", *[n for n in args.only or CANDIDATES if n != "today"]]
    max_new_tokens = 8 if args.tiny else args.max_new_tokens
    data = (chat_quality.read_jsonl(chat_quality.QUESTIONS), chat_quality.read_jsonl(chat_quality.PROMPTS),
            chat_quality.load_embedder(), chat_quality.load_word_list())
    tuned = {}
    for name in names:
        tuned[name] = score(args.checkpoint, CANDIDATES[name], "tune", data, max_new_tokens)
        print(f"tune  {name}: loops {tuned[name]['loop_rate']:.0%}, relevance {tuned[name]['relevance']:.3f}",
              flush=True)
    chosen = choose(tuned)
    tested = {name: score(args.checkpoint, CANDIDATES[name], "test", data, max_new_tokens)
              for name in dict.fromkeys(["today", chosen])}
    print_rows("tuning half", tuned)
    print(f"\nchosen on the tuning half: {chosen}: {' '.join(CANDIDATES[chosen]) or '(today)'}")
    print_rows("test half", tested)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        for rows in (tuned, tested):
            f.writelines(json.dumps(r | {"setting": name, "chosen": name == chosen, "date": time.strftime("%Y-%m-%d")})
                         + "\n" for name, r in rows.items())


if __name__ == "__main__":
    main()
