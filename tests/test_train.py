"""newgpt.py as a user runs it: training, checkpoints, resume, Ctrl-C, time limits, torchrun and clean errors.

Most runs call newgpt.main(argv) in this process (the command line's own code path); the tests that are about
the process itself (a first run, Ctrl-C, torchrun, torch.compile) start a new one."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from data import conversations_from_sources
from runtime import UserError
import newgpt
from conftest import (REPO, TINY_FLAGS, copy_run, oasst_rows, run_newgpt, train_args, train_in_process,
                      write_checkpoint, write_jsonl)


def assert_clean_error(result, *fragments):
    assert result.returncode != 0, f"expected a failure, got rc 0:\n{result.stdout}"
    assert "Traceback" not in result.stderr, f"a traceback instead of a clean error:\n{result.stderr}"
    last_line = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last_line, f"{fragment!r} not in the error line {last_line!r}"


def error_line(capsys):
    """The one error line a failed in-process run wrote to stderr (after the progress bar, if it had one)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1].startswith("error: "), f"expected one error line, last, got {lines}"
    return lines[-1]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_writes_checkpoints_metrics_plot_and_a_loadable_model(tmp_path, oasst_file):
    out = tmp_path / "ckpt"
    result = run_newgpt(*train_args(oasst_file, out, "--max_steps", "6", "--save_interval", "2", "--keep_last", "2"),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("data: preparing"), "the run says what it does before the first step"
    assert sorted(p.name for p in out.glob("gpt_step*.pt")) == ["gpt_step0004.pt", "gpt_step0006.pt"], \
        "keeps the last two checkpoints"
    assert (out / "latest").read_text().strip() == "gpt_step0006.pt"
    assert (out / "loss.png").stat().st_size > 0 and (tmp_path / "texts.json").is_file()
    evaluations = [r for r in records(out) if "val_bpb" in r]
    assert [r["step"] for r in evaluations] == [0, 6] and all(r["val_bpb"] > 0 for r in evaluations)
    model, tokenizer, ckpt = newgpt.load_checkpoint(out)
    assert ckpt["step"] == 6 and model.config.n_embd == 32 and tokenizer.get_vocab_size() == model.config.vocab_size
    assert ckpt["tokenizer"]["file"].startswith("tokenizer-") and (out / ckpt["tokenizer"]["file"]).is_file()
    assert list((out / "data").glob("tokens-train0-*.npz")), "token ids are cached on disk"
    assert not list(out.rglob("*.tmp*")), "no temp files are left behind"

    again = run_newgpt(*train_args(oasst_file, tmp_path / "second", "--max_steps", "1"), cwd=tmp_path)
    assert again.returncode == 0 and "reused" in again.stdout, "train_texts.json is reused on a second run"


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, oasst_file, optimizer, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ["--max_steps", "6", "--save_interval", "3", "--keep_last", "0", "--dropout", "0.1",
             "--optimizer", optimizer, "--all_tokens_epochs", "1"]  # switches at step 5
    assert train_in_process(*train_args(oasst_file, straight, *flags)) == 0
    resumed.mkdir()
    for name in ["gpt_step0003.pt", *[p.name for p in straight.glob("tokenizer-*.json")]]:
        shutil.copy(straight / name, resumed / name)
    capsys.readouterr()
    assert train_in_process(*train_args(oasst_file, resumed, *flags, "--resume")) == 0
    assert "resuming from" in capsys.readouterr().out
    end_straight = torch.load(straight / "gpt_step0006.pt", weights_only=True)
    end_resumed = torch.load(resumed / "gpt_step0006.pt", weights_only=True)
    for name, tensor in end_straight["model"].items():
        assert torch.equal(tensor, end_resumed["model"][name]), f"{name} differs after resume"

    def losses(run):
        return {r["step"]: r["train_loss"] for r in records(run) if "train_loss" in r}
    assert {s: loss for s, loss in losses(straight).items() if s > 3} == losses(resumed)


def test_resume_from_a_checkpoint_path_in_another_directory(tmp_path, trained_run, capsys):
    data = trained_run.parent / "oasst.jsonl.gz"
    elsewhere = tmp_path / "continued"
    status = train_in_process("--data", data, "--texts", trained_run.parent / "texts.json", "--out_dir", elsewhere,
                              *TINY_FLAGS, "--max_steps", "5", "--resume", trained_run / "gpt_step0004.pt")
    assert status == 0, capsys.readouterr().err
    _, _, ckpt = newgpt.load_checkpoint(elsewhere)
    assert ckpt["step"] == 5, "continued from step 4 for one more step"
    assert (elsewhere / ckpt["tokenizer"]["file"]).is_file(), "the checkpoint's tokenizer is copied along"


def test_the_embedding_learns_at_its_own_multiple_of_the_rate(tmp_path, trained_run):
    run = copy_run(trained_run, tmp_path / "run")
    data = trained_run.parent / "oasst.jsonl.gz"
    assert train_in_process(*train_args(data, run, "--max_steps", "5", "--resume", "--embedding_lr_scale", "3")) == 0
    embedding, *others = newgpt.read_checkpoint(run / "gpt_step0005.pt")["optimizers"][0]["param_groups"]
    assert all(embedding["lr"] == pytest.approx(3 * group["lr"]) for group in others), "the flag wins on resume"


def test_resume_refuses_other_data_and_another_optimizer(tmp_path, trained_run, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    data = trained_run.parent / "oasst.jsonl.gz"
    other_data = write_jsonl(tmp_path / "other.jsonl", oasst_rows(30))
    common = ["--texts", tmp_path / "texts.json", "--out_dir", run, *TINY_FLAGS, "--max_steps", "6", "--resume"]
    next(run.glob("tokenizer-*.json")).unlink()  # the data is checked first, before the tokenizer meets it
    assert train_in_process("--data", other_data, *common) == 2
    assert "trained on other data" in error_line(capsys)
    assert train_in_process("--data", data, *common, "--optimizer", "adamw") == 2
    assert "another --optimizer" in error_line(capsys)


class TickingClock:
    """A fake clock that moves `tick` seconds each time it is read, so that a budgeted run ends without
    waiting; `interrupt_at` sends this process a Ctrl-C once the clock passes it."""

    def __init__(self, tick, interrupt_at=None):
        self.now, self.tick, self.interrupt_at = 0.0, tick, interrupt_at

    def __call__(self):
        self.now += self.tick
        if self.interrupt_at is not None and self.now >= self.interrupt_at:
            self.interrupt_at = None
            signal.raise_signal(signal.SIGINT)
        return self.now


def budgeted_run(data, out_dir, clock, *extra):
    """newgpt.train in this process on a fake clock, with the command line's flags."""
    args = newgpt.parse_args([str(a) for a in train_args(data, out_dir, *extra)])
    model_config, cfg, size_note = newgpt.configs_from_args(args)
    return newgpt.train(cfg, model_config, size_note, clock=clock)


def train_lrs(run_dir):
    return [(r["step"], r["lr"]) for r in records(run_dir) if "lr" in r]


@pytest.mark.slow
def test_a_budgeted_run_ends_decayed_at_the_budget_with_a_final_evaluation(tmp_path, oasst_file, capsys):
    out = tmp_path / "ckpt"
    assert budgeted_run(oasst_file, out, TickingClock(0.1), "--max_minutes", "0.5") == 0
    assert "the 0.5-minute budget ended at step" in capsys.readouterr().out
    _, _, ckpt = newgpt.load_checkpoint(out)
    assert ckpt["elapsed_s"] == pytest.approx(30, rel=0.03), "the run ends within 3% of its budget"
    assert [r["step"] for r in records(out) if "val_bpb" in r][-1] == ckpt["step"], "with a final evaluation"
    last_step, last_lr = train_lrs(out)[-1]
    assert last_step == ckpt["step"] > 50, "no step limit: the budget alone ends the run"
    assert last_lr == pytest.approx(1e-4, rel=0.05), f"the learning rate has decayed to --min_lr: {last_lr}"


@pytest.mark.slow
def test_resuming_a_budgeted_run_continues_its_schedule(tmp_path, oasst_file, capsys):
    whole, first, resumed = tmp_path / "whole" / "ckpt", tmp_path / "part" / "ckpt", tmp_path / "part" / "ckpt"
    assert budgeted_run(oasst_file, whole, TickingClock(0.1), "--max_minutes", "0.5") == 0
    assert budgeted_run(oasst_file, first, TickingClock(0.1, interrupt_at=12), "--max_minutes", "0.5") == 130
    _, _, stopped = newgpt.load_checkpoint(first)
    assert stopped["elapsed_s"] == pytest.approx(12, abs=1), "the checkpoint records the time spent"
    # Resumed without --max_minutes: the checkpoint's budget continues.
    assert budgeted_run(oasst_file, resumed, TickingClock(0.1), "--resume") == 0
    assert "for 0.5 minutes (0.3 left)" in capsys.readouterr().out, "what is left, not the whole budget"
    whole_lrs, resumed_lrs = dict(train_lrs(whole)), train_lrs(resumed)
    step, lr = next((s, lr) for s, lr in resumed_lrs if s > stopped["step"])
    assert lr == pytest.approx(whole_lrs[step], rel=0.05), "the schedule goes on where it stopped"
    assert resumed_lrs[-1][0] == pytest.approx(train_lrs(whole)[-1][0], abs=3), "and ends where it would have"


@pytest.mark.slow
def test_the_chosen_size_is_printed(tmp_path, oasst_file, capsys):
    small = ["--vocab_size", "320", "--block_size", "32", "--batch_size", "2", "--max_steps", "1", "--no-compile",
             "--dtype", "float32", "--eval_tokens", "64"]
    data = ["--data", oasst_file, "--texts", tmp_path / "texts.json"]
    assert train_in_process(*data, *small, "--out_dir", tmp_path / "auto", "--max_minutes", "5") == 0
    out = capsys.readouterr().out
    assert "model: 4 x 256 (" in out, out
    assert "depth 4, chosen for cpu and a 5-minute budget; --depth overrides" in out, out
    assert train_in_process(*data, *small, "--out_dir", tmp_path / "one", "--depth", "1") == 0
    out = capsys.readouterr().out
    assert "model: 1 x 256 (" in out and "depth 1, from --depth (--block_size, --batch_size as given)" in out, out


@pytest.mark.slow
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
    _, _, ckpt = newgpt.load_checkpoint(out)
    assert ckpt["step"] >= 1


def test_an_in_process_run_puts_the_signal_handlers_back(tmp_path, trained_run):
    before = signal.getsignal(signal.SIGINT)
    run = copy_run(trained_run, tmp_path / "run")
    data, texts = trained_run.parent / "oasst.jsonl.gz", trained_run.parent / "texts.json"
    assert train_in_process("--data", data, "--texts", texts, "--out_dir", run, *TINY_FLAGS, "--max_steps", "5",
                            "--resume") == 0
    assert signal.getsignal(signal.SIGINT) is before, "Ctrl-C handling is restored after training"


def test_checkpoint_round_trip_restores_the_saved_model(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = newgpt.GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = newgpt.GPT(config)
    path = write_checkpoint(model, tokenizer, tmp_path, step=7, last_eval={"val_loss": 1.5, "val_bpb": 0.5})
    loaded, loaded_tokenizer, ckpt = newgpt.load_checkpoint(path)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    assert torch.equal(model.eval()(idx)[0], loaded.eval()(idx)[0]), "the loaded model computes the saved one"
    assert ckpt["step"] == 7 and ckpt["val_loss"] == 1.5 and ckpt["val_bpb"] == 0.5 and loaded.config == config
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()


def truncated(data):
    return data[: len(data) // 2]


@pytest.mark.parametrize("damage, message", [
    (lambda data: b"", "is empty"),
    (lambda data: b"not a checkpoint at all", "is not a PyTorch checkpoint at all"),
    (truncated, "is truncated or damaged"),
])
def test_damaged_checkpoints_say_what_is_wrong(tmp_path, trained_run, damage, message):
    run = copy_run(trained_run, tmp_path / "run")
    bad = run / "gpt_step0004.pt"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(UserError, match=message):
        newgpt.load_checkpoint(bad)


def test_resume_passes_over_a_damaged_newest_checkpoint_and_says_so(tmp_path, trained_run, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    damaged = truncated((run / "gpt_step0004.pt").read_bytes())
    (run / "gpt_step0004.pt").write_bytes(damaged)
    assert train_in_process("--out_dir", run, "--resume", "--max_steps", "5", "--save_interval", "100") == 0, \
        capsys.readouterr().err
    captured = capsys.readouterr()
    assert "passing over gpt_step0004.pt is truncated or damaged" in captured.err, captured.err
    assert "using gpt_step0002.pt, the newest intact checkpoint" in captured.err
    assert "resuming from" in captured.out and "gpt_step0002.pt at step 2" in captured.out
    assert newgpt.load_checkpoint(run / "gpt_step0005.pt")[2]["step"] == 5, "continued from step 2"
    assert (run / "gpt_step0004.pt").read_bytes() == damaged, "the damaged file is left for the user to inspect"


@pytest.mark.slow
def test_resume_with_no_intact_checkpoint_is_a_one_line_error(tmp_path, trained_run):
    run = copy_run(trained_run, tmp_path / "run")
    for path in run.glob("gpt_step*.pt"):
        path.write_bytes(truncated(path.read_bytes()))
    result = run_newgpt("--out_dir", run, "--resume", cwd=tmp_path)
    assert_clean_error(result, "no intact checkpoint", "gpt_step0004.pt is truncated or damaged")


def test_resume_reuses_the_checkpoints_sources_and_flags_given_still_win(tmp_path, trained_run, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    assert train_in_process("--out_dir", run, "--resume", "--max_steps", "5", "--log_interval", "5") == 0
    _, _, ckpt = newgpt.load_checkpoint(run)
    stored = ckpt["train_config"]
    assert stored["data"] == [str(trained_run.parent / "oasst.jsonl.gz")], "no hub download: the run's own data"
    assert (stored["max_steps"], stored["log_interval"], stored["batch_size"]) == (5, 5, 4)
    assert "reused" in capsys.readouterr().out, "the run's train_texts.json is reused, not rebuilt"


def edit_checkpoint(path, edit):
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)


def test_foreign_and_mismatched_checkpoints_are_refused(tmp_path, trained_run):
    run = copy_run(trained_run, tmp_path / "run")
    path = run / "gpt_step0004.pt"
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(UserError, match="not a TinyGPT checkpoint .*'model'"):
        newgpt.load_checkpoint(foreign)

    original = path.read_bytes()
    edit_checkpoint(path, lambda c: c["model_config"].update(vocab_size=c["model_config"]["vocab_size"] + 8))
    with pytest.raises(UserError, match="tokenizer has .* tokens, model expects"):
        newgpt.load_checkpoint(path)
    path.write_bytes(original)
    edit_checkpoint(path, lambda c: c["model_config"].update(n_layer=3))
    with pytest.raises(UserError, match="weights do not fit"):
        newgpt.load_checkpoint(path)
    path.write_bytes(original)
    edit_checkpoint(path, lambda c: c["model_config"].update(qk_norm=True))
    with pytest.raises(UserError, match="--qk_norm, an option this version"):
        newgpt.load_checkpoint(path)
    edit_checkpoint(path, lambda c: c["model_config"].update(qk_norm=False))
    assert newgpt.load_checkpoint(path)[2]["step"] == 4, "an old checkpoint with the option off still loads"


def test_checkpoint_needs_its_own_tokenizer(tmp_path, trained_run):
    run = copy_run(trained_run, tmp_path / "run")
    (tokenizer_file,) = run.glob("tokenizer-*.json")
    tokenizer_file.write_text(tokenizer_file.read_text() + "\n")  # the same tokens, another file
    with pytest.raises(UserError, match="is not the tokenizer this checkpoint was trained with"):
        newgpt.load_checkpoint(run)
    tokenizer_file.unlink()
    with pytest.raises(UserError, match="tokenizer .* is missing"):
        newgpt.load_checkpoint(run)


def test_a_new_run_refuses_to_mix_with_existing_checkpoints(tmp_path, trained_run, capsys):
    status = train_in_process("--data", trained_run.parent / "oasst.jsonl.gz", "--texts", tmp_path / "t.json",
                              "--out_dir", trained_run, *TINY_FLAGS, "--max_steps", "1")
    assert status == 2 and "--resume" in error_line(capsys)


def cli_error_cases(tmp_path, oasst_file):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    only_german = write_jsonl(tmp_path / "de.jsonl", [r for r in oasst_rows() if r["lang"] == "de"])
    bad_line = tmp_path / "bad_line.jsonl"
    bad_line.write_text("".join(json.dumps(row) + "\n" for row in oasst_rows()[:200]) + "{not json\n")
    json_array = tmp_path / "rows.json"
    json_array.write_text(json.dumps([{"text": f"document number {i}"} for i in range(3)]))
    return {
        "missing data": (["--data", tmp_path / "missing.jsonl"], ["data path not found"]),
        "empty data": (["--data", empty], ["no usable training conversations"]),
        "malformed line": (["--data", bad_line], ["bad_line.jsonl, line 201: not valid JSON"]),
        "no match for language": (["--data", oasst_file, "--langs", "fr"], ["no usable training", "fr"]),
        "unknown language": (["--data", oasst_file, "--langs", "klingon"], ["unknown language"]),
        "heads": (["--data", oasst_file, "--n_embd", "30", "--n_head", "4"], ["divisible"]),
        "block": (["--data", oasst_file, "--block_size", "4"], ["block_size"]),
        "out_dir under a file": (["--data", oasst_file, "--out_dir", a_file / "ckpt"], ["cannot write", "is a file"]),
        "out_dir is a file": (["--data", oasst_file, "--out_dir", a_file], ["is a file, not a directory"]),
        "zero steps": (["--data", oasst_file, "--max_steps", "0"], ["max_steps"]),
        "bad device": (["--data", oasst_file, "--device", "tpu"], ["--device"]),
        "german only": (["--data", only_german], ["no usable training"]),
        "no decay": (["--data", oasst_file, "--decay_fraction", "0"], ["decay_fraction", "above 0"]),
        "embedding rate": (["--data", oasst_file, "--embedding_lr_scale", "0"], ["--embedding_lr_scale must be"]),
        "too little data for the block": (["--data", json_array, "--block_size", "512"], ["too little data"]),
        "stage share": (["--data", oasst_file, "--pretrain_data", json_array, "--pretrain_fraction", "1"],
                        ["--pretrain_fraction must be between 0 and 1"]),
        "missing knowledge": (["--data", oasst_file, "--pretrain_data", tmp_path / "missing.jsonl.gz:3"],
                              ["data path not found", "missing.jsonl.gz"]),
    }


CLI_ERROR_CASES = ["missing data", "empty data", "malformed line", "no match for language", "unknown language",
                   "heads", "block", "out_dir under a file", "out_dir is a file", "zero steps", "bad device",
                   "german only", "no decay", "embedding rate", "too little data for the block", "stage share",
                   "missing knowledge"]


@pytest.mark.parametrize("case", CLI_ERROR_CASES)
def test_cli_errors_are_one_line_and_non_zero(tmp_path, oasst_file, case, capsys):
    args, fragments = cli_error_cases(tmp_path, oasst_file)[case]
    status = train_in_process(*TINY_FLAGS, "--texts", tmp_path / "texts.json", "--out_dir", tmp_path / "out", *args)
    line = error_line(capsys)
    assert status == 2
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    if case not in ("out_dir is a file", "too little data for the block"):  # the latter fails after tokenizing
        assert not (tmp_path / "out").exists(), "a failed run creates no checkpoint directory"


def test_an_unreachable_hub_fails_at_once_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("data.hub_reachable", lambda timeout=3.0: False)
    monkeypatch.chdir(tmp_path)
    started = time.time()
    assert train_in_process(*TINY_FLAGS) == 2, "the default data is OpenAssistant/oasst2 from the hub"
    assert "hub is unreachable" in error_line(capsys) and time.time() - started < 10
    assert list(tmp_path.iterdir()) == [], "no ckpt/ or train_texts.json is left behind"


@pytest.mark.parametrize("flag, value", [("--batch_size", "-3"), ("--lr", "nan"), ("--max_minutes", "soon"),
                                         ("--dtype", "float8"), ("--depth", "2.5")])
def test_bad_flag_values_are_rejected_by_the_parser(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        newgpt.parse_args([flag, value])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and flag in error and value in error, error


def test_a_json_array_file_is_read_as_records(tmp_path):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"text": "first document"}, {"text": "second document"}]))
    conversations = conversations_from_sources([str(path)], "train", {"en"}, "best")
    assert [c["turns"] for c in conversations] == [[{"role": "text", "content": "first document"}],
                                                   [{"role": "text", "content": "second document"}]]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_and_save(tmp_path, oasst_file):
    out = tmp_path / "ckpt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    flags = map(str, train_args(oasst_file, out, "--max_steps", "3"))
    result = subprocess.run([*torchrun, str(REPO / "newgpt.py"), *flags], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout
    _, _, ckpt = newgpt.load_checkpoint(out)
    assert ckpt["step"] == 3 and ckpt["train_config"]["batch_size"] == 4
    assert result.stdout.count("data: preparing") == 1, "only rank 0 prints"


@pytest.mark.slow
def test_a_failing_compiler_falls_back_to_eager_training_in_one_line(tmp_path, oasst_file):
    out = tmp_path / "ckpt"
    no_compiler = {"CXX": str(tmp_path / "no-such-c++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    result = run_newgpt(*train_args(oasst_file, out, "--max_steps", "3", "--compile"), cwd=tmp_path, timeout=400,
                        env=os.environ | no_compiler)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "torch.compile failed" in line]
    assert "C++ compiler" in line and "training without it" in line and "--no-compile" in line, line
    assert newgpt.load_checkpoint(out)[2]["step"] == 3, "the run carried on and finished"


@pytest.mark.slow
def test_compiled_training_saves_plain_state_dicts(tmp_path, oasst_file):
    out = tmp_path / "ckpt"
    result = run_newgpt(*train_args(oasst_file, out, "--max_steps", "2", "--compile"), cwd=tmp_path, timeout=400,
                        env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    assert "compiling the model" in result.stdout
    _, _, ckpt = newgpt.load_checkpoint(out)
    assert not any("_orig_mod" in key for key in ckpt["model"]), "checkpoints hold the uncompiled model's keys"


def test_a_diverging_run_stops_with_one_line(tmp_path, oasst_file, monkeypatch, capsys):
    real_loss, calls = newgpt.GPT.loss, []

    def diverging_loss(self, logits, targets):  # two micro-batches a step (TINY_FLAGS): NaN in step 3's
        calls.append(1)
        loss = real_loss(self, logits, targets)
        return loss * float("nan") if len(calls) == 5 else loss
    monkeypatch.setattr(newgpt.GPT, "loss", diverging_loss)
    out = tmp_path / "ckpt"
    assert train_in_process(*train_args(oasst_file, out, "--max_steps", "10", "--save_interval", "1")) == 2
    line = error_line(capsys)
    assert "loss is nan at step 3" in line and "gpt_step0002.pt holds the last good weights" in line, line


@pytest.mark.parametrize("pos_encoding, window", [("rope", 128), ("learned", 64)])
def test_a_fine_tune_keeps_the_architecture_but_may_widen_a_rope_window(tmp_path, tokenizer, pos_encoding, window):
    config = newgpt.GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=64, n_layer=1, n_head=2, n_embd=32,
                              pos_encoding=pos_encoding)
    write_checkpoint(newgpt.GPT(config), tokenizer, tmp_path / "start")
    args = newgpt.parse_args(["--init_from", str(tmp_path / "start"), "--block_size", "128", "--n_embd", "64"])
    model_config, _, _ = newgpt.configs_from_args(args)
    assert (model_config.n_embd, model_config.block_size) == (32, window), \
        "RoPE positions are computed, so only a RoPE model's window may change"
