"""
Faults injected into real training runs, as a crash, a copy or a careful user makes them: kill -9 at a random
moment and inside torch.save, a deleted or garbled `latest`, a truncated or emptied newest checkpoint, a
deleted tokenizer, and a full disk during a save (ulimit -f). After each, a `--resume` run must continue from
the newest intact checkpoint, and no checkpoint that was good may be lost. Prints one row per fault.

    python -m bench.faults                            # 60 rounds, seed 0, OASST1's validation split
    python -m bench.faults --rounds 200 --seed 7 --data my_oasst.jsonl.gz

A round: the fault, then a check of the run folder (every file under a checkpoint's name loads, the newest
intact step did not go back), then `--resume` for two more steps, which must start from that step and end
well. Seeded: a failing round replays with the same --seed. tests/test_faults.py runs a few rounds of each.

    python -m bench.faults --disconnects 100          # serve.py with the release model: clients that hang up

Run as `faults.py --die_in_save N -- FLAGS`, this script is newgpt.py whose Nth torch.save writes half of
its file and then SIGKILLs its own process: a kill that lands inside the save every time.
"""

import argparse
import contextlib
import http.client
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from runtime import checkpoint_paths, try_read_checkpoint

REPO = Path(__file__).resolve().parent.parent

DEFAULT_DATA = REPO.parent / "shared" / "data" / "oasst" / "oasst1_en_validation.messages.jsonl.gz"
# A model small enough that a round takes seconds, saving every step so that kills often land in a save.
RUN_FLAGS = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--vocab_size", "320",
             "--batch_size", "4", "--grad_accum", "1", "--eval_tokens", "256", "--eval_interval", "1000",
             "--log_interval", "1000", "--dtype", "float32", "--no-compile", "--save_interval", "1",
             "--keep_last", "3"]


class Lost(Exception):
    """A good checkpoint was lost, or a file under a checkpoint's name is damaged: the one outcome that
    must never happen."""


@dataclass
class Run:
    """One run folder that every round damages and resumes."""
    data: Path
    out_dir: Path
    rng: random.Random
    log: list = field(default_factory=list)  # each process's command line and output, for a failure report
    landed: Counter = field(default_factory=Counter)  # where the random kills landed

    def flags(self, max_steps):
        return ["--data", str(self.data), "--texts", str(self.out_dir.parent / "texts.json"), "--out_dir",
                str(self.out_dir), *RUN_FLAGS, "--max_steps", str(max_steps)]

    def start(self, max_steps, resume=True, die_in_save=0, file_size_limit=0):
        command = [sys.executable, str(REPO / "newgpt.py")]
        if die_in_save:
            command = [sys.executable, "-m", "bench.faults", "--die_in_save", str(die_in_save), "--"]
        command += self.flags(max_steps) + (["--resume"] if resume else [])

        def limit_file_size():
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=limit_file_size if file_size_limit else None)

    def finish(self, process, timeout=120):
        """(exit status, stdout, stderr) of a process, recorded in the log."""
        out, err = process.communicate(timeout=timeout)
        self.log.append(f"$ {' '.join(process.args)}\n-> {process.returncode}\n{out[-1500:]}{err[-1500:]}")
        return process.returncode, out, err


def intact_steps(out_dir, damaged_on_purpose=()):
    """The steps of the folder's checkpoints. Every *.pt file must load, as a user's `ls *.pt` or a release
    script takes them all for checkpoints, except those the round damaged itself."""
    steps = []
    for path in sorted(Path(out_dir).glob("*.pt")):
        ckpt, problem = try_read_checkpoint(path)
        if ckpt is None and path.name not in damaged_on_purpose:
            raise Lost(f"{path.name} {problem}")
        if ckpt is not None:
            steps.append(ckpt["step"])
    return steps


def is_one_clean_line(status, err):
    """A failure told in one line, the last on stderr (after the progress bar, if there was one)."""
    lines = [line for line in err.splitlines() if line.strip()]
    return status not in (0, -signal.SIGKILL) and "Traceback" not in err and bool(lines) and \
        lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1


# -----------------------------------------------------------------------------
# The faults: each damages the run in its own way and returns whether the run, where one ran, ended in
# one clear line (None: it was killed, or no run was involved)


def kill_at_random(run, newest):
    process = run.start(newest + 300)
    time.sleep(run.rng.uniform(0.3, 6.0))  # from the imports (about 4 s), through set-up, into training
    process.send_signal(signal.SIGKILL)
    _, out, _ = run.finish(process)
    in_save = any(p.name.endswith(".tmp") for p in run.out_dir.iterdir())
    run.landed["inside a save" if in_save else "in training" if "training on" in out else "while starting"] += 1
    return None, ()


def kill_inside_save(run, newest):
    process = run.start(newest + 30, die_in_save=run.rng.randint(1, 3))
    status, _, _ = run.finish(process)
    assert status == -signal.SIGKILL, f"the run was to kill itself inside torch.save, got exit status {status}"
    return None, ()


def damage_pointer(run, newest):
    pointer = run.out_dir / "latest"
    if run.rng.random() < 0.5:
        pointer.unlink(missing_ok=True)
    else:
        pointer.write_bytes(bytes(run.rng.randrange(256) for _ in range(run.rng.randint(1, 64))))
    return None, ()


def truncate_newest(run, newest):
    path = checkpoint_paths(run.out_dir)[-1]
    data = path.read_bytes()
    path.write_bytes(data[:run.rng.choice([0, run.rng.randrange(1, len(data))])])
    return None, (path.name,)


def delete_tokenizer(run, newest):
    for tokenizer in run.out_dir.glob("tokenizer-*.json"):
        tokenizer.unlink()
    return None, ()


def fill_disk(run, newest):
    """A run whose next checkpoint does not fit: files may grow to half a checkpoint's size."""
    limit = checkpoint_paths(run.out_dir)[-1].stat().st_size // 2
    status, _, err = run.finish(run.start(newest + 5, file_size_limit=limit))
    if not (is_one_clean_line(status, err) and "could not save" in err):
        raise AssertionError(f"a full disk did not stop the run in one clear line ({status}):\n{err[-2000:]}")
    leftovers = [p.name for p in run.out_dir.iterdir() if p.name.endswith(".tmp")]
    if leftovers:
        raise Lost(f"the failed save left {leftovers}")
    return True, ()


FAULTS = {
    "kill -9 at a random moment": kill_at_random,
    "kill -9 inside torch.save": kill_inside_save,
    "`latest` deleted or garbled": damage_pointer,
    "newest checkpoint truncated or emptied": truncate_newest,
    "tokenizer deleted": delete_tokenizer,
    "disk full during a save (ulimit -f)": fill_disk,
}


def one_round(run, fault):
    """Inject the fault, check the folder, resume. Returns (ended in one clear line or None, resumed)."""
    before = intact_steps(run.out_dir)
    clean, damaged = FAULTS[fault](run, max(before))
    after = intact_steps(run.out_dir, damaged)
    if max(after) < max(before) and not damaged:
        raise Lost(f"the newest intact checkpoint went back from step {max(before)} to {max(after)}")
    newest = max(after)
    status, out, err = run.finish(run.start(newest + 2))
    if status != 0 or re.findall(r"resuming from .* at step (\d+)", out) != [str(newest)]:
        raise AssertionError(f"--resume after '{fault}' did not continue from step {newest} (status {status}):\n"
                             f"{out[-1500:]}{err[-1500:]}")
    if max(intact_steps(run.out_dir)) != newest + 2:
        raise Lost(f"--resume from step {newest} did not save step {newest + 2}")
    return clean, True


def campaign(data, folder, rounds, seed, faults=tuple(FAULTS)):
    """Run `rounds` faults, drawn in turn from `faults` in a seeded order; returns {fault: Counter}."""
    run = Run(Path(data), Path(folder) / "run", random.Random(seed))
    status, _, err = run.finish(run.start(3, resume=False))
    assert status == 0, f"the first run failed:\n{err[-2000:]}"
    order = [faults[i % len(faults)] for i in range(rounds)]
    run.rng.shuffle(order)
    outcomes = {fault: Counter() for fault in faults}
    for fault in order:
        outcomes[fault]["injected"] += 1
        try:
            clean, resumed = one_round(run, fault)
        except Lost as e:
            outcomes[fault]["lost"] += 1
            outcomes[fault]["why"] = str(e)
            continue
        outcomes[fault]["one clear line"] += bool(clean)
        outcomes[fault]["resumed"] += resumed
    return outcomes, run


def table(outcomes):
    lines = ["| fault | injected | ended in one clear line | --resume continued | good checkpoints lost |",
             "|---|---|---|---|---|"]
    for fault, counts in outcomes.items():
        clean = counts["one clear line"] if fault == "disk full during a save (ulimit -f)" else "-"
        lines.append(f"| {fault} | {counts['injected']} | {clean} | {counts['resumed']} | {counts['lost']} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The server: clients that hang up mid-stream


def get_json(url, path, body=None):
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    connection.request("POST" if body else "GET", path, json.dumps(body) if body else None,
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = response.status, json.loads(response.read())
    connection.close()
    return answer


def leave_mid_stream(url, body):
    """Ask for a streamed answer, read its first generated piece, and hang up."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.status
    events = 0
    while events < 2:  # the role chunk, then the first piece of text
        events += response.readline().startswith(b"data: ")
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()


def settled(url, timeout=60):
    """/health once nothing is generating or waiting."""
    deadline = time.time() + timeout
    while (state := get_json(url, "/health")[1])["generating"] or state["waiting"]:
        assert time.time() < deadline, f"the server did not settle: {state}"
        time.sleep(0.1)
    return state


def endless_question(tokenizer):
    """A streamed request whose answer only a hang-up ends: the end of turn is forbidden."""
    return {"messages": [{"role": "user", "content": "Go on."}], "stream": True, "max_tokens": 2048,
            "logit_bias": {str(tokenizer.token_to_id("<|end|>")): -100}}


def disconnects(url, body, n, warm_up=10):
    """/health before and after n clients that hang up mid-stream (after warm_up more, which let the
    allocator and the caches reach their working size), and the seconds the n took."""
    for _ in range(warm_up):
        leave_mid_stream(url, body)
    before, started = settled(url), time.time()
    for _ in range(n):
        leave_mid_stream(url, body)
    return before, settled(url), time.time() - started


@contextlib.contextmanager
def running_server(ckpt):
    process = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--ckpt", str(ckpt), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        yield process.stdout.readline().split(" on ")[1].split()[0]
    finally:
        process.terminate()
        process.wait(timeout=30)


def server_row(ckpt, n):
    import newgpt
    with running_server(ckpt) as url:
        before, after, seconds = disconnects(url, endless_question(newgpt.load_checkpoint(ckpt)[1]), n)
        status, _ = get_json(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi!"}]})
    keys = ("threads", "memory_mb", "waiting", "cancelled")
    return (f"| clients hanging up mid-stream ({Path(ckpt).name}) | {n} in {seconds:.1f} s | "
            + ", ".join(f"{k} {before[k]} -> {after[k]}" for k in keys) + f" | next request: {status} |")


# -----------------------------------------------------------------------------
# The run that kills itself inside torch.save


def die_in_save(n, argv):
    """newgpt.py, whose nth torch.save writes half of its file, flushed to disk, then SIGKILLs the process."""
    import torch
    import newgpt
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) < n:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buffer.getbuffer()[: len(buffer.getbuffer()) // 2])
            out.flush()
            os.fsync(out.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save
    sys.exit(newgpt.main(argv))


def main():
    if sys.argv[1:2] == ["--die_in_save"]:
        die_in_save(int(sys.argv[2]), sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="conversations in the OASST2 schema")
    parser.add_argument("--folder", default="runs/faults", help="where the run goes (emptied first)")
    parser.add_argument("--disconnects", type=int, default=0, help="instead: this many clients that hang up")
    parser.add_argument("--ckpt", default=str(REPO / "ckpt" / "release"), help="the server's, with --disconnects")
    args = parser.parse_args()
    if args.disconnects:
        print("| fault | injected | /health before -> after | then |\n|---|---|---|---|")
        print(server_row(args.ckpt, args.disconnects))
        return 0
    folder = Path(args.folder)
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    started = time.time()
    outcomes, run = campaign(args.data, folder, args.rounds, args.seed)
    print(table(outcomes))
    print("\nRandom kills landed: " + ", ".join(f"{n} {where}" for where, n in run.landed.most_common()))
    lost = {fault: counts["why"] for fault, counts in outcomes.items() if counts["lost"]}
    print(f"\n{args.rounds} rounds, seed {args.seed}, {time.time() - started:.0f} s"
          + "".join(f"\nLOST after '{fault}': {why}" for fault, why in lost.items()))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
