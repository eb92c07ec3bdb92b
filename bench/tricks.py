"""The speedrun's tricks (modded-nanogpt's record history), each tried on newgpt.py at equal steps: a patch
applied to a copy of the source, trained for the steps the default takes in an 8-minute budget on a 2-core
CPU, with the budgeted run's schedule (warmup, then the peak rate, then a decay over the last 40%).

    python -m bench.tricks                                     # the unpatched default, then every trick
    python -m bench.tricks --only default "zero-init projections" --steps 300
    python -m bench.tricks --tiny --data a.jsonl --val_data v.jsonl --runs /tmp/runs   # smoke

Equal steps rather than equal time: on the same seed and data order, the comparison does not move with the
machine's speed, which varies by more than 10% between runs here. A trick that changes a step's cost shows
it in the tok/s column (each run alone); one that wins there is then checked at equal wall-clock
(bench/experiments.py's run_budgeted). A patch is a list of (text in newgpt.py, its replacement); it fails
loudly once newgpt.py no longer holds that text. Kept tricks become newgpt.py's code, and their rows here
become patches that take them out again. Runs go to runs/tricks/NAME; rows to bench/results/tricks.jsonl.
"""

import argparse
import shutil
from pathlib import Path

from bench import experiments

RESULTS = experiments.REPO / "bench" / "results" / "tricks.jsonl"
# What newgpt.py reads from the repo: the modules it imports, and the evaluation prompts it keeps out of training.
SOURCES = ["newgpt.py", "data.py", "retrieval.py", "runtime.py", "bench/knowledge_questions.jsonl",
           "bench/chat_prompts.jsonl"]
STEPS = 300  # the default's steps in `--max_minutes 8` here (bench/results/speedrun_8min.jsonl)

SET_LR = '        group["lr"] = lr * (cfg.embedding_lr_scale if group.get("is_embedding") else 1.0)\n'
LOGITS = "        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)\n"
BLOCKS = "        for layer, block in enumerate(self.transformer.h):\n            x = block(x, rope, kv_cache, layer)\n"
HEAD = "        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)\n"

TRICKS = {
    "default": ([], []),
    # Each residual branch starts as the identity (modded-nanogpt; nanochat's init_weights).
    "zero-init projections": ([(
        "nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))", "nn.init.zeros_(p)")], []),
    # The tied embedding at the blocks' learning rate, as before it had its own (modded-nanogpt trains its
    # embeddings far faster than its matrices); and faster still.
    "embedding at the blocks' lr": ([], ["--embedding_lr_scale", "1"]),
    "embedding lr x10": ([], ["--embedding_lr_scale", "10"]),
    # Muon's momentum warms up from 0.85 to 0.95 over the first 300 steps (modded-nanogpt).
    "Muon momentum warmup": ([(SET_LR, SET_LR + '        if "ns_steps" in group:\n'
                               '            group["momentum"] = 0.85 + 0.10 * min(step / 300, 1)\n')], []),
    # Block i's output is added back before block n-1-i, with a learned weight per pair (modded-nanogpt).
    "U-net skips": ([
        (HEAD, HEAD + "        self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2))\n"),
        (BLOCKS, "        skips, half, n = [], self.config.n_layer // 2, self.config.n_layer\n"
                 "        for layer, block in enumerate(self.transformer.h):\n"
                 "            if layer >= n - half:\n"
                 "                x = x + self.skip_weights[n - 1 - layer] * skips.pop()\n"
                 "            x = block(x, rope, kv_cache, layer)\n"
                 "            if layer < half:\n"
                 "                skips.append(x)\n")], []),
    # Logits squashed into (-15, 15) by a tanh (Gemma 2; modded-nanogpt's later records).
    "logit soft-cap 15": ([(LOGITS, LOGITS + "        logits = 15 * torch.tanh(logits / 15)\n")], []),
    "warmup 100 steps (before)": ([], ["--warmup_steps", "100"]),
    # Shorter warmups, and twice the peak learning rate, for the ~100 steps of a budget near the time to target.
    "warmup 10 steps": ([], ["--warmup_steps", "10"]),
    "warmup 5 steps": ([], ["--warmup_steps", "5"]),
    "lr 2e-3": ([], ["--lr", "2e-3", "--min_lr", "2e-4"]),
}


def patched_source(patch, folder):
    """A copy of the repo's training sources in `folder`, with newgpt.py patched."""
    for name in SOURCES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(experiments.REPO / name, folder / name)
    source = (folder / "newgpt.py").read_text()
    for old, new in patch:
        if source.count(old) != 1:
            raise SystemExit(f"the patch no longer applies: newgpt.py does not hold exactly one {old.strip()!r}")
        source = source.replace(old, new)
    (folder / "newgpt.py").write_text(source)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(TRICKS), help="run only these")
    parser.add_argument("--steps", type=int, default=STEPS, help="steps per run")
    parser.add_argument("--results", default=str(RESULTS), help="file the rows are appended to")
    experiments.add_run_arguments(parser)
    args = parser.parse_args()
    steps = experiments.TINY_STEPS if args.tiny else args.steps
    schedule = ["--max_steps", str(steps), "--decay_fraction", "0.4", "--eval_interval", str(steps),
                "--save_interval", str(steps)]
    rows = []
    for name in args.only or TRICKS:
        patch, flags = TRICKS[name]
        source = patched_source(patch, Path(args.runs) / "tricks" / "src" / name.replace(" ", "_"))
        row = experiments.train(name, flags + (experiments.TINY_FLAGS if args.tiny else []), args,
                                schedule, repo=source, folder="tricks")
        rows.append(experiments.record(row, args.results))
    experiments.print_table(rows, "trick")


if __name__ == "__main__":
    main()
