"""Shared fixtures: small data sets in the OASST2 schema, written by the tests themselves (no third-party
text), a tokenizer trained in-process, and a tiny model config that trains in seconds on a CPU."""

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import PreparedData, file_sha256
import newgpt
import runtime

REPO = Path(__file__).resolve().parent.parent

# Flags for a model and run small enough to train a few steps in a second or two.
TINY_FLAGS = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--vocab_size", "320",
              "--batch_size", "4", "--grad_accum", "2", "--eval_tokens", "256", "--eval_interval", "1000",
              "--log_interval", "1", "--dtype", "float32", "--warmup_steps", "2", "--no-compile", "--device", "cpu"]


@pytest.fixture(autouse=True)
def on_the_cpu(request, monkeypatch):
    """Every test sees a CPU-only machine (`--device auto` means cpu, in-process and in the processes it
    starts), so that a GPU or a Mac changes no expectation; tests marked cuda are about the GPU and see it."""
    if request.node.get_closest_marker("cuda"):
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def message(message_id, parent_id, tree_id, role, text, lang="en", rank=None, deleted=False, review_result=True):
    """One row of the OASST2 message table (the Hugging Face schema, less the columns we never read)."""
    return {"message_id": message_id, "parent_id": parent_id, "message_tree_id": tree_id, "role": role, "text": text,
            "lang": lang, "rank": rank, "deleted": deleted, "review_result": review_result, "review_count": 3,
            "synthetic": False, "model_name": None, "user_id": "u", "created_date": "2023-01-01T00:00:00+00:00",
            "tree_state": "ready_for_export", "emojis": None, "labels": None, "detoxify": None}


def arithmetic_tree(i):
    """A branching tree: a question, two ranked answers, a follow-up on the best one."""
    a, b = i % 10, (i // 10) % 10
    t = f"tree{i}"
    return [
        message(f"{t}-q", None, t, "prompter", f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?"),
        message(f"{t}-a0", f"{t}-q", t, "assistant", f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {a + b}.", rank=0),
        message(f"{t}-a1", f"{t}-q", t, "assistant", f"It is {a + b}, I think.", rank=1),
        message(f"{t}-f", f"{t}-a0", t, "prompter", "And times two?"),
        message(f"{t}-fa", f"{t}-f", t, "assistant", f"Twice {a + b} is {2 * (a + b)}.", rank=0),
    ]


def oasst_rows(n_trees=40):
    rows = [row for i in range(n_trees) for row in arithmetic_tree(i)]
    rows += [  # messages that must never reach the training data
        message("del-q", None, "del", "prompter", "A deleted question?", deleted=True),
        message("del-a", "del-q", "del", "assistant", "An answer to a deleted question."),
        message("bad-q", None, "bad", "prompter", "A question that failed review?", review_result=False),
        message("bad-a", "bad-q", "bad", "assistant", "An answer below a failed review."),
        message("de-q", None, "de", "prompter", "Wie spät ist es?", lang="de"),
        message("de-a", "de-q", "de", "assistant", "Es ist drei Uhr.", lang="de"),
    ]
    return rows


def write_jsonl(path, rows):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


# Knowledge (retrieval.py): made-up facts, so that a hit can only come from the index.
COUNTRIES = {"Zembla": "Ostrova", "Florin": "Guilder Town", "Genovia": "Pyrus", "Freedonia": "Fredville",
             "Latveria": "Doomstadt", "Sokovia": "Novi Grad"}


def knowledge_rows():
    docs = [{"text": f"{country}\n{country} is a small country. Its capital is {capital}, a city on a river. "
                     f"The people of {country} grow apples and pears."} for country, capital in COUNTRIES.items()]
    qa = [{"instruction": f"What is the capital of {country}?", "response": f"The capital of {country} is {capital}."}
          for country, capital in COUNTRIES.items()]
    return docs + qa


@pytest.fixture
def knowledge(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "knowledge"
    folder.mkdir()
    write_jsonl(folder / "facts.jsonl", knowledge_rows())
    return folder


@pytest.fixture
def oasst_file(tmp_path):
    return write_jsonl(tmp_path / "oasst.jsonl.gz", oasst_rows())


@pytest.fixture(scope="session")
def tokenizer():
    texts = [f"{w} plus {v} is {i}. Héllo wörld, 你好世界 🙂 ok" for i, (w, v) in
             enumerate(zip(NUMBER_WORDS * 5, reversed(NUMBER_WORDS * 5)))]
    return newgpt.train_tokenizer(texts, 400)


def run_newgpt(*args, cwd, timeout=180, **kwargs):
    """Run newgpt.py as a user would, from `cwd`, in a new process."""
    return subprocess.run([sys.executable, str(REPO / "newgpt.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def train_args(data, out_dir, *extra):
    """Flags for a tiny training run on `data`, its texts file beside out_dir."""
    return ["--data", data, "--texts", Path(out_dir).parent / "texts.json", "--out_dir", out_dir, *TINY_FLAGS, *extra]


def train_in_process(*args):
    """newgpt.main(argv) in this process: the same code path as the command line, without the seconds a new
    Python process spends importing torch. Returns the exit status."""
    return newgpt.main([str(a) for a in args])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny run, trained once for every test that only needs *a* checkpoint: 4 steps, saved at 2 and 4.
    Tests that change files copy them first (see copy_run)."""
    tmp = tmp_path_factory.mktemp("trained")
    data = write_jsonl(tmp / "oasst.jsonl.gz", oasst_rows())
    status = train_in_process(*train_args(data, tmp / "ckpt", "--max_steps", "4", "--save_interval", "2"))
    assert status == 0, "the shared tiny training run failed"
    return tmp / "ckpt"


def copy_run(run_dir, destination):
    """A copy of a run's directory (checkpoints and tokenizer), for a test that damages or edits it."""
    shutil.copytree(run_dir, destination)
    return destination


def write_checkpoint(model, tokenizer, directory, step=7, last_eval=None, reads_passages=False):
    """Save `model` as a TinyGPT checkpoint with `tokenizer` beside it, as a training run would
    (reads_passages: as one trained with --knowledge)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tok.json"))
    tokenizer_info = {"file": "tok.json", "sha256": file_sha256(directory / "tok.json")}
    prepared = PreparedData(texts={"sha256": "abc"}, tokenizer=tokenizer, arrays={}, tokenizer_info=tokenizer_info)
    optimizers = newgpt.configure_optimizers(model, newgpt.TrainConfig(), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = newgpt.checkpoint_state(model, optimizers, scaler, newgpt.TrainConfig(), prepared, step, elapsed_s=60.0,
                                    reads_passages=reads_passages,
                                    **(last_eval or {"val_loss": 1.5, "val_bpb": 0.5}))
    return newgpt.save_checkpoint(state, directory, keep_last=3)


@pytest.fixture
def wide_window_checkpoint(tokenizer, tmp_path):
    """Random weights with a 256-token window: room for passages and everyday prompts, which a 32-token tiny
    run has not."""
    model = newgpt.GPT(newgpt.GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=256, n_layer=1, n_head=1,
                                        n_embd=16))
    write_checkpoint(model, tokenizer, tmp_path / "wide", reads_passages=True)
    return tmp_path / "wide"


def as_reader(run_dir, destination):
    """A copy of a run whose newest checkpoint says it trained on passages, for what only such a model does."""
    copy = copy_run(run_dir, destination)
    path = runtime.latest_checkpoint(copy)
    state = torch.load(path, weights_only=True)
    torch.save(state | {"reads_passages": True}, path)
    return copy
