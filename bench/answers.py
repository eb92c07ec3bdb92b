"""Answers of several checkpoints to the same five prompts, side by side, with the chat's default sampling.

    python bench/answers.py runs/experiments/seed_recipe runs/experiments/default

Each prompt is a fresh conversation; the seed is fixed, so a rerun prints the same text.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chat_with_model as chat  # noqa: E402
import newgpt  # noqa: E402

PROMPTS = ["What is the capital of France?", "Give me three tips for staying healthy.",
           "Write a short poem about the sea.", "How do I reverse a list in Python?", "What is machine learning?"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files or directories")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    args = parser.parse_args()
    loaded = {path: newgpt.load_checkpoint(path)[:2] for path in args.checkpoints}
    for prompt in PROMPTS:
        print(f"### {prompt}\n")
        for path, (model, tokenizer) in loaded.items():
            sampling = chat.SamplingConfig(max_new_tokens=args.max_new_tokens)
            session = chat.Chat(model.eval(), tokenizer, sampling, "cpu", "float32")
            prompt_ids, _ = session.add_user_turn(prompt)
            answer = "".join(session.stream_reply(prompt_ids)).strip()
            print(f"**{path}:** {answer}\n")


if __name__ == "__main__":
    main()
