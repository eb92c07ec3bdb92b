"""Train and validation bits per byte of a checkpoint, measured the same way: is the model overfitting?

    python -m bench.bpb runs/release --tokens 1000000     # run from where the run was trained (its --texts)
    python -m bench.bpb runs/wide --window 512            # a RoPE model scored in shorter rows than it trained on

Rebuilds the run's data from its stored TrainConfig (the texts file and token caches in its out_dir are
reused, not rebuilt), then evaluates the first --tokens of its first --data source (OASST1 train for the
README's command) and of the validation rows (OASST1 validation), each scored as newgpt.py trains on it:
the assistant's tokens of a conversation, every token of a plain document (OASST1 train is plain text).
"""

import argparse
import dataclasses
from pathlib import Path

import torch

from runtime import find_checkpoint
import newgpt


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("ckpt", help="checkpoint file or run directory")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="tokens of each split to evaluate")
    parser.add_argument("--window", type=int, default=0, help="rows of this many tokens (0: the model's window)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer, ckpt = newgpt.load_checkpoint(args.ckpt)
    window = args.window or model.config.block_size
    if not 16 <= window <= model.config.block_size:
        parser.error(f"--window must be between 16 and the model's {model.config.block_size} tokens")
    fields = {f.name for f in dataclasses.fields(newgpt.TrainConfig)}
    cfg = newgpt.TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k in fields})
    cfg.eval_tokens = args.tokens
    folder = find_checkpoint(args.ckpt)[0].parent
    data = newgpt.prepare_data(cfg, model.config, 0, 1, print, (folder, ckpt))
    _, _, val_rows = newgpt.packed_splits(data, window, cfg)
    (source, train_ids, train_mask), *_ = data.arrays["train"]
    pad = tokenizer.token_to_id("<|pad|>")
    train_rows = newgpt.PackedRows(train_ids, train_mask, window, "assistant", pad)
    byte_lengths = torch.from_numpy(newgpt.token_byte_lengths(tokenizer))
    device = "cpu"
    ctx = newgpt.autocast_context(device, newgpt.pick_dtype("auto", device))
    for name, rows in ((f"train ({Path(source).name})", train_rows), ("val", val_rows)):
        loss, bpb = newgpt.evaluate(model, rows, byte_lengths, cfg, ctx, device)
        tokens = min(rows.n_rows * rows.block_size, args.tokens)
        print(f"{name}: {bpb:.4f} bits/byte, {loss:.4f} nats/token, over its first {tokens:,} tokens "
              f"in rows of {window}")


if __name__ == "__main__":
    main()
