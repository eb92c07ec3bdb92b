"""Answers of several checkpoints to the same five prompts, side by side, with the chat's default sampling.

    python -m bench.answers runs/experiments/seed_recipe runs/experiments/default
    python -m bench.answers --table runs/experiments/seed_recipe runs/experiments/default   # for README

Each prompt is a fresh conversation; the seed is fixed, so a rerun prints the same text. --table prints one
markdown row per prompt, with the answers' newlines as <br> and their pipes escaped, and nothing else changed.
"""

import argparse

import engine
import newgpt

PROMPTS = ["What is the capital of France?", "Give me three tips for staying healthy.",
           "Write a short poem about the sea.", "How do I reverse a list in Python?", "What is machine learning?"]


def answer(model, tokenizer, prompt, max_new_tokens):
    sampling = engine.SamplingConfig(max_new_tokens=max_new_tokens)
    answering = engine.Engine(model.eval(), tokenizer, "cpu", "float32")
    turn = answering.prepare("", [], prompt, max_new_tokens)
    return "".join(answering.reply(turn, sampling, answering.generator(sampling.seed))).strip()


def table_row(cells):
    return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", "<br>") for cell in cells) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files or directories")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--table", action="store_true", help="one markdown table row per prompt")
    args = parser.parse_args()
    loaded = {path: newgpt.load_checkpoint(path)[:2] for path in args.checkpoints}
    if args.table:
        print(table_row(["prompt", *args.checkpoints]))
        print(table_row(["---"] * (len(args.checkpoints) + 1)))
    for prompt in PROMPTS:
        answers = [answer(model, tokenizer, prompt, args.max_new_tokens) for model, tokenizer in loaded.values()]
        if args.table:
            print(table_row([prompt, *answers]))
            continue
        print(f"### {prompt}\n")
        for path, text in zip(loaded, answers):
            print(f"**{path}:** {text}\n")


if __name__ == "__main__":
    main()
