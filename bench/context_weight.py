"""
How much should the passages outweigh what the model believes? Context-aware decoding (Shi et al. 2023)
samples from (1 + w) x the logits with the passages - w x the logits without them; this script asks
bench/knowledge_questions.jsonl with retrieval at several weights w and seeds, and counts the right answers
and the reading rate (right among the questions whose passages hold the answer).

    python -m bench.context_weight ckpt/release --knowledge ../shared/data/knowledge             # tune half
    python -m bench.context_weight ckpt/release --knowledge ../shared/data/knowledge --half test --weights 0 1

The weight is chosen on the tuning half (even positions) and reported on the test half, as the sampling
defaults are (bench/sampling_sweep.py). Answers are scored as bench/chat_quality.py scores them.
"""

import argparse
import time

import torch

from bench import chat_quality
import engine
import newgpt
import retrieval
from data import HOLDOUT_FILES


def ask(model, tokenizer, questions, sampling, index):
    """(right, found, right among the found) counts over the questions, asked with retrieval."""
    replies = chat_quality.answer_all(model, tokenizer, [q["question"] for q in questions], sampling, index)
    right = [chat_quality.names_an_answer(r.text, q["answers"]) for q, r in zip(questions, replies)]
    found = [chat_quality.holds_an_answer(r.passages, q["answers"]) for q, r in zip(questions, replies)]
    return sum(right), sum(found), sum(r and f for r, f in zip(right, found))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("checkpoint", help="checkpoint file or run directory (a model that reads passages)")
    parser.add_argument("--knowledge", required=True, help="the index to look things up in")
    parser.add_argument("--weights", type=float, nargs="+", default=[0, 0.5, 1, 1.5, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1000, 2000, 3000])
    parser.add_argument("--half", choices=["all", "tune", "test"], default="tune")
    parser.add_argument("--max_new_tokens", type=int, default=96, help="longest answer (60 words are scored)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    questions = chat_quality.half(chat_quality.read_jsonl(chat_quality.QUESTIONS), args.half)
    model, tokenizer, _ = newgpt.load_checkpoint(args.checkpoint)
    index = retrieval.open_index(args.knowledge, HOLDOUT_FILES)
    print(f"| context_weight | right (of {len(questions)} x {len(args.seeds)} seeds) | found | reading rate | "
          f"seconds |\n|---|---|---|---|---|")
    for weight in args.weights:
        started, totals = time.time(), [0, 0, 0]
        for seed in args.seeds:
            sampling = engine.SamplingConfig(max_new_tokens=args.max_new_tokens, seed=seed, context_weight=weight)
            totals = [a + b for a, b in zip(totals, ask(model, tokenizer, questions, sampling, index))]
        right, found, read = totals
        print(f"| {weight:g} | {right} | {found} | {read / max(1, found):.2f} | {time.time() - started:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
