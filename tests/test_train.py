"""newgpt.py as a user runs it: training, checkpoints, resume, Ctrl-C, torchrun and clean errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import newgpt
from conftest import REPO, TINY_FLAGS, oasst_rows, run_newgpt, write_jsonl


def train_args(data, out_dir, *extra):
    return ["--data", data, "--texts", out_dir.parent / "texts.json", "--out_dir", out_dir, *TINY_FLAGS, *extra]


def assert_clean_error(result, *fragments):
    assert result.returncode != 0, f"expected a failure, got rc 0:\n{result.stdout}"
    assert "Traceback" not in result.stderr, f"a traceback instead of a clean error:\n{result.stderr}"
    last_line = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last_line, f"{fragment!r} not in the error line {last_line!r}"


def test_training_writes_checkpoints_metrics_plot_and_a_loadable_model(tmp_path, oasst_file):
    out = tmp_path / "ckpt"
    result = run_newgpt(*train_args(oasst_file, out, "--max_steps", "6", "--save_interval", "2", "--keep_last", "2"),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("gpt_step*.pt")) == ["gpt_step0004.pt", "gpt_step0006.pt"], \
        "keeps the last two checkpoints"
    assert (out / "latest").read_text().strip() == "gpt_step0006.pt"
    assert (out / "loss.png").stat().st_size > 0 and (tmp_path / "texts.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_bpb" in r] == [0, 6] and all(r["val_bpb"] > 0 for r in records
                                                                          if "val_bpb" in r)
    model, tokenizer, ckpt = newgpt.load_checkpoint(out)
    assert ckpt["step"] == 6 and model.config.n_embd == 32 and tokenizer.get_vocab_size() == model.config.vocab_size
    assert ckpt["tokenizer"]["file"].startswith("tokenizer-") and (out / ckpt["tokenizer"]["file"]).is_file()
    assert list((out / "data").glob("tokens-train-*.npz")), "token ids are cached on disk"

    again = run_newgpt(*train_args(oasst_file, tmp_path / "second", "--max_steps", "1"), cwd=tmp_path)
    assert again.returncode == 0 and "reused" in again.stdout, "train_texts.json is reused on a second run"


def test_checkpoint_round_trip_restores_identical_logits(tmp_path, oasst_file):
    out = tmp_path / "ckpt"
    assert run_newgpt(*train_args(oasst_file, out, "--max_steps", "2"), cwd=tmp_path).returncode == 0
    model, _, ckpt = newgpt.load_checkpoint(out / "gpt_step0002.pt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reloaded, _, _ = newgpt.load_checkpoint(out / "gpt_step0002.pt")
    idx = torch.randint(0, model.config.vocab_size, (1, 16))
    assert torch.equal(model.eval()(idx)[0], reloaded.eval()(idx)[0])
    assert all(torch.equal(state[k], v) for k, v in ckpt["model"].items())
    assert set(ckpt) >= {"model", "optimizers", "model_config", "train_config", "step", "tokenizer", "rng",
                         "data_position", "val_loss"}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, oasst_file, optimizer):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ["--max_steps", "6", "--save_interval", "3", "--keep_last", "0", "--dropout", "0.1",
             "--optimizer", optimizer, "--curriculum_steps", "2", "--all_tokens_fraction", "0.5"]
    assert run_newgpt(*train_args(oasst_file, straight, *flags), cwd=tmp_path).returncode == 0
    resumed.mkdir()
    for name in ["gpt_step0003.pt", *[p.name for p in straight.glob("tokenizer-*.json")]]:
        shutil.copy(straight / name, resumed / name)
    result = run_newgpt(*train_args(oasst_file, resumed, *flags, "--resume"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    end_straight = torch.load(straight / "gpt_step0006.pt", weights_only=True)
    end_resumed = torch.load(resumed / "gpt_step0006.pt", weights_only=True)
    for name, tensor in end_straight["model"].items():
        assert torch.equal(tensor, end_resumed["model"][name]), f"{name} differs after resume"

    def losses(run):
        return {r["step"]: r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "train_loss" in r}
    assert {s: l for s, l in losses(straight).items() if s > 3} == losses(resumed)


def test_sigint_saves_a_loadable_checkpoint_and_exits_cleanly(tmp_path, oasst_file):
    out = tmp_path / "ckpt"
    process = subprocess.Popen([sys.executable, str(REPO / "newgpt.py"),
                                *map(str, train_args(oasst_file, out, "--max_steps", "100000"))],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() or "train_loss" not in (out / "metrics.jsonl").read_text():
        assert process.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "continue with --resume" in stdout
    model, _, ckpt = newgpt.load_checkpoint(out)
    assert ckpt["step"] >= 1


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_corrupt_or_truncated_checkpoint_gives_a_clean_error(tmp_path, oasst_file, content):
    out = tmp_path / "ckpt"
    assert run_newgpt(*train_args(oasst_file, out, "--max_steps", "1"), cwd=tmp_path).returncode == 0
    bad = out / "gpt_step0001.pt"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if content is None else content)
    with pytest.raises(newgpt.UserError, match="not a readable TinyGPT checkpoint"):
        newgpt.load_checkpoint(bad)
    assert_clean_error(run_newgpt(*train_args(oasst_file, out, "--max_steps", "2", "--resume"), cwd=tmp_path),
                       "not a readable TinyGPT checkpoint")


def test_checkpoint_without_its_tokenizer_is_a_clean_error(tmp_path, oasst_file):
    out = tmp_path / "ckpt"
    assert run_newgpt(*train_args(oasst_file, out, "--max_steps", "1"), cwd=tmp_path).returncode == 0
    for tokenizer_file in out.glob("tokenizer-*.json"):
        tokenizer_file.unlink()
    with pytest.raises(newgpt.UserError, match="tokenizer .* is missing"):
        newgpt.load_checkpoint(out)


def test_a_new_run_refuses_to_mix_with_existing_checkpoints(tmp_path, oasst_file):
    out = tmp_path / "ckpt"
    assert run_newgpt(*train_args(oasst_file, out, "--max_steps", "1"), cwd=tmp_path).returncode == 0
    assert_clean_error(run_newgpt(*train_args(oasst_file, out, "--max_steps", "1"), cwd=tmp_path), "--resume")


def cli_error_cases(tmp_path, oasst_file):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    only_german = write_jsonl(tmp_path / "de.jsonl", [r for r in oasst_rows() if r["lang"] == "de"])
    return {
        "missing data": (["--data", tmp_path / "missing.jsonl"], ["data path not found"]),
        "empty data": (["--data", empty], ["no usable training conversations"]),
        "no match for language": (["--data", oasst_file, "--langs", "fr"], ["no usable training", "fr"]),
        "unknown language": (["--data", oasst_file, "--langs", "klingon"], ["unknown language"]),
        "heads": (["--data", oasst_file, "--n_embd", "30", "--n_head", "4"], ["divisible"]),
        "block": (["--data", oasst_file, "--block_size", "4"], ["block_size"]),
        "unwritable ckpt dir": (["--data", oasst_file, "--out_dir", a_file / "ckpt"], ["cannot write"]),
        "bad flag value": (["--data", oasst_file, "--batch_size", "-3"], ["batch_size"]),
        "zero steps": (["--data", oasst_file, "--max_steps", "0"], ["max_steps"]),
        "bad device": (["--data", oasst_file, "--device", "tpu"], ["--device"]),
        "no network": (["--data", "OpenAssistant/oasst2"], ["--data PATH"]),
        "german only": (["--data", only_german], ["no usable training"]),
        "curriculum on odd block": (["--data", oasst_file, "--block_size", "30", "--curriculum_steps", "2"],
                                    ["divisible by 4"]),
        "all-tokens fraction above 1": (["--data", oasst_file, "--all_tokens_fraction", "1.5"],
                                        ["all_tokens_fraction", "between 0 and 1"]),
    }


@pytest.mark.parametrize("case", ["missing data", "empty data", "no match for language", "unknown language", "heads",
                                  "block", "unwritable ckpt dir", "bad flag value", "zero steps", "bad device",
                                  "no network", "german only", "curriculum on odd block",
                                  "all-tokens fraction above 1"])
def test_cli_errors_are_one_line_and_non_zero(tmp_path, oasst_file, case):
    args, fragments = cli_error_cases(tmp_path, oasst_file)[case]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = run_newgpt(*TINY_FLAGS, "--texts", tmp_path / "texts.json", "--out_dir", tmp_path / "out", *args,
                        cwd=tmp_path, env=env)
    assert_clean_error(result, *fragments)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_and_save(tmp_path, oasst_file):
    out = tmp_path / "ckpt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*torchrun, str(REPO / "newgpt.py"), *map(str, train_args(oasst_file, out, "--max_steps", "3"))],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout
    _, _, ckpt = newgpt.load_checkpoint(out)
    assert ckpt["step"] == 3 and ckpt["data_position"]["rows_consumed"] == 3 * 2 * 2 * 4


@pytest.mark.slow
def test_compiled_training_saves_plain_state_dicts(tmp_path, oasst_file):
    out = tmp_path / "ckpt"
    result = run_newgpt(*train_args(oasst_file, out, "--max_steps", "2", "--compile"), cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr
    _, _, ckpt = newgpt.load_checkpoint(out)
    assert not any("_orig_mod" in key for key in ckpt["model"]), "checkpoints hold the uncompiled model's keys"
