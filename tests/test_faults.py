"""Faults, and that nothing good is lost: kill -9 at random moments and inside torch.save (bench/faults.py's
rounds, seeded), temp files a kill leaves behind, a damaged `latest`, a truncated newest checkpoint, a folder
holding only a release, a deleted tokenizer, a full disk and a read-only folder during a save; and a server
whose clients vanish mid-stream, whose generation raises, and that is stopped with Ctrl-C or SIGTERM."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import uvicorn

import engine
import newgpt
import retrieval
import runtime
import serve
from conftest import REPO, copy_run, train_in_process
from data import load_or_build_texts
from runtime import RELEASE_FILE, UserError, checkpoint_paths, latest_checkpoint
from test_serve import health, raw_request, running_server

from bench import faults


def run_files(run):
    return sorted(p.name for p in run.iterdir())


def resume(run, max_steps=6):
    return train_in_process("--out_dir", run, "--resume", "--max_steps", max_steps)


# ---- kill -9, over many rounds


@pytest.mark.slow
def test_kill_9_at_random_and_inside_torch_save_then_every_checkpoint_fault_loses_nothing(tmp_path, oasst_file):
    rounds = tuple(faults.FAULTS) + ("kill -9 inside torch.save",)  # each once, the kill in a save twice
    outcomes, run = faults.campaign(oasst_file, tmp_path, len(rounds), seed=1234, faults=rounds)
    report = faults.table(outcomes) + "\n\n" + "\n\n".join(run.log[-3:])
    for fault, counts in outcomes.items():
        assert counts["lost"] == 0, f"after '{fault}': {counts['why']}\n{report}"
        assert counts["resumed"] == counts["injected"] >= 1, report
    assert not [p for p in run.out_dir.iterdir() if p.name.endswith(".tmp")], "stale temp files were removed"
    assert len(checkpoint_paths(run.out_dir)) == 3, "--keep_last 3 keeps three real checkpoints"


# ---- temp files and the `latest` pointer


def test_a_killed_saves_temp_file_is_never_taken_for_a_checkpoint_and_the_next_run_removes_it(
        tmp_path, trained_run, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    dead_pid = 2 ** 22 + 1  # above Linux's pid_max: no process has it
    stale = [f".gpt_step0005.pt.{dead_pid}.tmp", f"gpt_step0005.pt.tmp{dead_pid}.pt", f".latest.{dead_pid}.tmp"]
    for name in stale:
        (run / name).write_bytes(b"")  # what a kill inside the save leaves: an empty or half file
    live = run / f".gpt_step0099.pt.{os.getppid()}.tmp"  # its writer is still running: left alone
    live.write_bytes(b"")
    (run / "latest").unlink()
    assert [p.name for p in checkpoint_paths(run)] == ["gpt_step0002.pt", "gpt_step0004.pt"]
    assert latest_checkpoint(run).name == "gpt_step0004.pt"
    assert newgpt.load_checkpoint(run)[2]["step"] == 4
    assert resume(run) == 0, capsys.readouterr().err
    assert "removed 3 temp file(s) that a killed run left behind" in capsys.readouterr().out
    assert not any((run / name).exists() for name in stale) and live.exists()


def test_a_killed_build_of_the_texts_or_the_index_leaves_no_temp_file(tmp_path, oasst_file, knowledge):
    dead_pid = 2 ** 22 + 1
    texts = tmp_path / "texts.json"
    stale_texts = tmp_path / f".texts.json.{dead_pid}.tmp"
    stale_texts.write_text('{"train": [')  # half of a texts file
    args = newgpt.build_parser().parse_args(["--data", str(oasst_file), "--texts", str(texts)])
    assert load_or_build_texts(newgpt.configs_from_args(args)[1])[1] == "built"
    assert not stale_texts.exists()
    index = retrieval.open_index(knowledge, log=None).path
    index.unlink()
    stale_index = index.with_name(f".{index.name}.{dead_pid}.tmp")
    stale_index.write_bytes(b"SQLite format 3\0")
    assert retrieval.open_index(knowledge, log=None).search("capital of Zembla", 1)
    assert not stale_index.exists()


@pytest.mark.parametrize("pointer", [None, b"\xff\xfe\x00garbage", b"gpt_step0009.pt\n", b"../../etc/passwd\n",
                                     b"tokenizer.json\n"])
def test_a_missing_or_damaged_latest_still_finds_the_newest_checkpoint(tmp_path, trained_run, pointer, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    if pointer is None:
        (run / "latest").unlink()
    else:
        (run / "latest").write_bytes(pointer)
    assert newgpt.load_checkpoint(run)[2]["step"] == 4
    assert resume(run) == 0, capsys.readouterr().err
    assert "from" in capsys.readouterr().out and newgpt.load_checkpoint(run)[2]["step"] == 6


# ---- damaged checkpoints, a release-only folder, a deleted tokenizer


@pytest.mark.parametrize("damage", [lambda data: b"", lambda data: data[: len(data) // 3]],
                         ids=["emptied", "truncated"])
def test_the_chat_passes_over_a_damaged_newest_checkpoint_in_one_line(tmp_path, trained_run, damage, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    newest = run / "gpt_step0004.pt"
    newest.write_bytes(damage(newest.read_bytes()))
    model, _, ckpt = newgpt.load_checkpoint(run)
    assert ckpt["step"] == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("passing over gpt_step0004.pt is") and "using gpt_step0002.pt" in err and "\n" not in err


def test_a_folder_holding_only_a_release_loads_but_resumes_only_as_a_fine_tune(tmp_path, trained_run, capsys):
    release = tmp_path / "release"
    newgpt.make_release(trained_run, release)
    (release / "latest").unlink()  # lost with a copy: the release file is still found
    assert newgpt.load_checkpoint(release)[2]["step"] == 4
    assert train_in_process("--out_dir", release, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot be resumed" in err and f"--init_from {release / RELEASE_FILE}" in err, err


def test_a_deleted_tokenizer_is_trained_again_when_the_texts_give_the_same_file(tmp_path, trained_run, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    (tokenizer_file,) = run.glob("tokenizer-*.json")
    original = tokenizer_file.read_bytes()
    tokenizer_file.unlink()
    with pytest.raises(UserError, match="tokenizer .* is missing; copy it next to the checkpoint"):
        newgpt.load_checkpoint(run)  # the chat cannot train one: it says what to do
    assert resume(run) == 0, capsys.readouterr().err
    assert tokenizer_file.read_bytes() == original, "BPE training is deterministic: the same file again"
    assert newgpt.load_checkpoint(run)[2]["step"] == 6


def test_a_tokenizer_that_cannot_be_trained_again_is_a_one_line_error(tmp_path, trained_run, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    (tokenizer_file,) = run.glob("tokenizer-*.json")
    renamed = tokenizer_file.with_name("tokenizer-320-fromelsewhere.json")
    tokenizer_file.rename(renamed)
    for path in checkpoint_paths(run):  # as if trained with a tokenizer from another run (--init_from)
        ckpt = torch.load(path, weights_only=True)
        ckpt["tokenizer"]["file"] = renamed.name
        torch.save(ckpt, path)
    renamed.unlink()
    assert resume(run) == 2
    assert "is missing or changed; copy it back" in capsys.readouterr().err.strip().splitlines()[-1]
    assert len(checkpoint_paths(run)) == 2, "nothing was deleted"


# ---- a full disk and a read-only folder during a save


def run_until_it_saves(run, **popen):
    """newgpt.py --resume in a new process, saving every step until it is stopped."""
    process = subprocess.Popen([sys.executable, str(REPO / "newgpt.py"), "--out_dir", str(run), "--resume",
                                "--max_steps", "100000", "--save_interval", "1", "--log_interval", "100000",
                                "--keep_last", "100"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               **popen)
    return process


def assert_stopped_in_one_line(process, *fragments):
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert process.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def assert_nothing_half_written(run):
    for path in run.glob("*.pt"):
        assert newgpt.load_checkpoint(path), path
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")], run_files(run)


@pytest.mark.slow
def test_a_full_disk_during_a_save_stops_the_run_in_one_line_and_keeps_the_checkpoints(tmp_path, trained_run):
    import resource
    run = copy_run(trained_run, tmp_path / "run")
    limit = (run / "gpt_step0004.pt").stat().st_size // 2  # files may grow to half a checkpoint's size

    def full_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    line = assert_stopped_in_one_line(run_until_it_saves(run, preexec_fn=full_disk), "could not save",
                                      "gpt_step0005.pt", "ulimit -f", "gpt_step0004.pt is intact", "--resume")
    assert [p.name for p in checkpoint_paths(run)] == ["gpt_step0002.pt", "gpt_step0004.pt"], line
    assert_nothing_half_written(run)
    assert resume(run) == 0 and newgpt.load_checkpoint(run)[2]["step"] == 6


def test_a_failed_save_names_the_newest_checkpoint_that_loads_not_a_damaged_one(tmp_path, trained_run):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "gpt_step0009.pt").write_bytes(b"PK\x03\x04 half a file")  # left by an older crash, newest by name
    assert runtime.what_is_intact(run).startswith(f"{run / 'gpt_step0004.pt'} is intact")


@contextlib.contextmanager
def read_only(folder):
    """folder made read-only for newgpt.py: by permissions, or for root (whom they do not stop) by a
    read-only bind mount."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"root without the right to mount cannot make a folder read-only ({mounted.stderr.strip()})")
    try:
        deadline = time.time() + 10
        while subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode:
            assert time.time() < deadline, "could not remount the folder read-only"
            time.sleep(0.01)  # busy while a file in it is open for writing: a save in flight
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_a_folder_made_read_only_during_the_run_stops_it_in_one_line_and_loses_nothing(tmp_path, trained_run):
    run = copy_run(trained_run, tmp_path / "run")
    process = run_until_it_saves(run)
    deadline = time.time() + 120
    while not (run / "gpt_step0006.pt").exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.05)
    with read_only(run):
        line = assert_stopped_in_one_line(process, "could not save", "is intact", "--resume")
        assert "read-only" in line or "not writable" in line, line
    newest = newgpt.load_checkpoint(run)[2]["step"]
    assert resume(run, newest + 1) == 0 and newgpt.load_checkpoint(run)[2]["step"] == newest + 1
    # A save caught between writing its temp file and renaming it cannot delete the temp in a read-only
    # folder; the resume removes it.
    assert_nothing_half_written(run)


# ---- the server


def endless_question(trained_run):
    return faults.endless_question(newgpt.load_checkpoint(trained_run)[1])


@pytest.mark.slow
def test_a_hundred_clients_leaving_mid_stream_leak_no_thread_memory_or_queue_place(trained_run):
    with running_server(trained_run) as url:
        before, after, _ = faults.disconnects(url, endless_question(trained_run), 100)
        assert after["cancelled"] - before["cancelled"] == 100, "every generation stopped when its client left"
        assert after["threads"] == before["threads"], (before, after)
        assert after["memory_mb"] - before["memory_mb"] < 25, (before, after)
        # A random tiny model may end its turn at once; with <|end|> banned the next answer has 8 tokens.
        end_id = newgpt.load_checkpoint(trained_run)[1].token_to_id("<|end|>")
        request = {"messages": [{"role": "user", "content": "two"}], "max_tokens": 8, "logit_bias": {end_id: -100}}
        status, answer = raw_request(url, "POST", "/v1/chat/completions", json.dumps(request).encode())
        assert status == 200, (status, answer)
        served = (answer["choices"][0]["finish_reason"], answer["usage"]["completion_tokens"])
        assert served == ("length", 8), f"the next request is served: {answer}"


class FailingModel(torch.nn.Module):
    """The model, but its forward raises on the third call while `failing` is set: a fault mid-generation."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.failing, self.calls = model, model.config, False, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.failing and self.calls % 3 == 0:
            raise RuntimeError("out of memory (injected)")
        return self.model(*args, **kwargs)


@contextlib.contextmanager
def in_process_server(app):
    """uvicorn serving `app` on a free port in a thread of this process; yields its URL."""
    sock = serve.listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_generation_that_raises_is_a_500_error_object_and_the_next_request_is_served(trained_run):
    model, tokenizer, _ = newgpt.load_checkpoint(trained_run)
    failing = FailingModel(model.eval())
    sampling = engine.SamplingConfig(max_new_tokens=8)
    app = serve.create_app(engine.Engine(failing, tokenizer, "cpu", "float32"), "tiny", sampling)
    ask = {"messages": [{"role": "user", "content": "three plus four"}], "max_tokens": 8}
    with in_process_server(app) as url:
        failing.failing = True
        status, body = raw_request(url, "POST", "/v1/chat/completions", json.dumps(ask).encode())
        assert status == 500 and body["error"]["type"] == "server_error", body
        assert "out of memory (injected)" in body["error"]["message"]
        status, text = raw_request(url, "POST", "/v1/chat/completions", json.dumps(ask | {"stream": True}).encode())
        events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
        assert status == 200 and events[-1] == "[DONE]" and "out of memory (injected)" in events[-2], text
        failing.failing = False
        status, body = raw_request(url, "POST", "/v1/chat/completions", json.dumps(ask).encode())
        assert status == 200 and body["usage"]["completion_tokens"] >= 1, body
        assert health(url)["generating"] is False


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_stop_the_server_cleanly_mid_stream(trained_run, stop):
    process = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--ckpt", str(trained_run), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().split(" on ")[1].split()[0]
        body = endless_question(trained_run)
        answers = []
        reader = threading.Thread(target=lambda: answers.append(raw_request(url, "POST", "/v1/chat/completions",
                                                                            json.dumps(body).encode())), daemon=True)
        reader.start()
        deadline = time.time() + 60
        while not health(url)["generating"]:
            assert time.time() < deadline, "the answer did not start"
            time.sleep(0.05)
        process.send_signal(stop)
        _, err = process.communicate(timeout=30)
    finally:  # a failed check must not leave the server running
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in err and "error" not in err.lower(), err
    assert process.returncode in (0, -signal.SIGTERM), process.returncode
    reader.join(timeout=10)
    (status, stream), = answers
    assert status == 200 and stream.endswith("data: [DONE]\n\n"), "the answer in flight ended whole"
    assert '"finish_reason": "stop"' in stream
    with socket.create_server(("127.0.0.1", int(url.rsplit(":", 1)[1]))):
        pass  # the port is free again
