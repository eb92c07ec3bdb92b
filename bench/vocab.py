"""Bytes per token of the byte-level BPE at several vocabulary sizes, side by side in one run.

    python -m bench.vocab --texts train_texts.json --sizes 4096 8192 16384 32768

Each tokenizer is trained on the training conversations of a prepared texts file (what newgpt.py writes)
and measured on its validation conversations, as rendered for training (special tokens excluded). More
bytes per token means shorter sequences, so more text per context window and per second of training, at
the cost of a larger embedding matrix (vocab_size x n_embd parameters, shown for the default n_embd).
"""

import argparse
import time
from pathlib import Path

from data import read_texts_file, tokenize_to_arrays
import newgpt


def bytes_per_token(tokenizer, conversations):
    lengths = newgpt.token_byte_lengths(tokenizer)
    ids, _ = tokenize_to_arrays(newgpt.render_conversations, tokenizer, conversations)
    token_bytes = lengths[ids]
    return token_bytes.sum() / (token_bytes > 0).sum()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--texts", default="train_texts.json", help="prepared texts file written by newgpt.py")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--n_embd", type=int, default=newgpt.GPTConfig().n_embd, help="width for the embedding column")
    args = parser.parse_args()
    texts = read_texts_file(Path(args.texts))
    print(f"{len(texts['train']):,} train / {len(texts['val']):,} val conversations from {args.texts}\n")
    print(f"{'vocab':>7} {'train B/tok':>12} {'val B/tok':>10} {'embedding params':>17} {'train time':>11}")
    for size in args.sizes:
        started = time.time()
        tokenizer = newgpt.train_tokenizer((t["content"] for c in texts["train"] for t in c["turns"]), size)
        seconds = time.time() - started
        print(f"{size:>7} {bytes_per_token(tokenizer, texts['train']):>12.2f} "
              f"{bytes_per_token(tokenizer, texts['val']):>10.2f} {size * args.n_embd / 1e6:>16.2f}M {seconds:>10.1f}s")


if __name__ == "__main__":
    main()
