"""Load on the server: requests/s, latency, time to first token and streamed tok/s at several concurrencies.

    python -m bench.serve_load                                  # the release model, 1, 4 and 16 clients
    python -m bench.serve_load --ckpt runs/default --requests 48 --concurrency 1 4 16 --max_tokens 64

Starts serve.py in its own process on 127.0.0.1, then, for each concurrency C, sends the same fixed count of
streaming requests from C client threads (prompts from bench/chat_prompts.jsonl, a seed per request) and
times each from sending to its first content chunk and to [DONE]. Streamed tok/s is a request's tokens
after its first (the count from its usage chunk) over the time from its first token to its end. Client and
server share this machine's cores, as a local user's would.
"""

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "bench" / "chat_prompts.jsonl"


def start_server(ckpt):
    flags = ["--ckpt", ckpt] if ckpt else []
    process = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--port", "0", *flags],
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("serving "):
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return process, line.split(" on ")[1].split()[0], line.split()[1]


def timed_request(url, prompt, seed, max_tokens):
    """(seconds to the first content chunk, seconds to [DONE], completion tokens) of one streamed request."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=600)
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True, "seed": seed,
            "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first = tokens = None
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif first is None and event["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - started
    total = time.perf_counter() - started
    connection.close()
    return first if first is not None else total, total, tokens or 0


def run_load(url, prompts, concurrency, n_requests, max_tokens):
    """Send n_requests from `concurrency` threads; returns the per-request timings and the wall time."""
    results, errors, lock, next_index = [], [], threading.Lock(), iter(range(n_requests))

    def client():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            try:
                results.append(timed_request(url, prompts[i % len(prompts)], i, max_tokens))
            except Exception as e:  # noqa: BLE001  counted and reported, not fatal to the run
                errors.append(repr(e))

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors, time.perf_counter() - started


def percentile(values, q):
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="", help="checkpoint (default: serve.py's, the release model if untrained)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="client threads per round")
    parser.add_argument("--requests", type=int, default=48, help="requests per round")
    parser.add_argument("--max_tokens", type=int, default=64, help="longest answer per request")
    args = parser.parse_args()
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines() if line.strip()]
    process, url, model_id = start_server(args.ckpt)
    try:
        run_load(url, prompts, 1, 2, args.max_tokens)  # warm-up: first-call allocations
        print(f"{model_id}, {args.requests} streamed requests per round, at most {args.max_tokens} tokens each\n")
        print("| clients | requests/s | p50 latency (s) | p95 latency (s) | p50 first token (s) | p95 first token (s) "
              "| streamed tok/s (median) | errors |")
        print("|---|---|---|---|---|---|---|---|")
        for concurrency in args.concurrency:
            results, errors, wall = run_load(url, prompts, concurrency, args.requests, args.max_tokens)
            first = [r[0] for r in results]
            total = [r[1] for r in results]
            speed = [(r[2] - 1) / (r[1] - r[0]) for r in results if r[2] > 1 and r[1] > r[0]]
            print(f"| {concurrency} | {len(results) / wall:.2f} | {percentile(total, 50):.2f} | "
                  f"{percentile(total, 95):.2f} | {percentile(first, 50):.3f} | {percentile(first, 95):.3f} | "
                  f"{statistics.median(speed):.0f} | {len(errors)} |", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
