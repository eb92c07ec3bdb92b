"""serve.py: the OpenAI-compatible API against a live server (the official openai client, raw HTTP for
malformed requests), concurrency, disconnects, and the chat page in a real headless Chromium."""

import contextlib
import dataclasses
import http.client
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import torch

import chat_with_model as chat
import engine
from runtime import RELEASE_DIR
import newgpt
import serve
from conftest import COUNTRIES, REPO

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
MAX_TOKENS = 12


STDERR = {}  # base URL -> the lines its server wrote to stderr so far


@contextlib.contextmanager
def running_server(ckpt, *flags):
    """serve.py in its own process on a free port; yields its base URL and stops it afterwards. Both of its
    pipes are drained, its stderr into STDERR[url]."""
    process = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--ckpt", str(ckpt), "--port", "0",
                                "--max_new_tokens", str(MAX_TOKENS), *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving "), f"no start-up line: {line!r} {process.stderr.read()[-2000:]}"
        url = line.split(" on ")[1].split()[0]
        threading.Thread(target=process.stdout.read, daemon=True).start()  # keep the pipe drained
        STDERR[url] = []
        threading.Thread(target=lambda: STDERR[url].extend(process.stderr), daemon=True).start()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(trained_run):
    with running_server(trained_run) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local_chat(trained_run):
    """The same checkpoint in this process: what the server must answer, token for token."""
    model, tokenizer, _ = newgpt.load_checkpoint(trained_run)
    return chat.Chat(engine.Engine(model.eval(), tokenizer, "cpu", "float32"),
                     engine.SamplingConfig(max_new_tokens=MAX_TOKENS))


def local_answer(local_chat, turns, seed, **sampling):
    local_chat.sampling = engine.SamplingConfig(max_new_tokens=MAX_TOKENS, seed=seed, **sampling)
    local_chat.generator.manual_seed(seed)
    local_chat.history = [(m["role"], m["content"]) for m in turns[:-1]]
    local_chat.system = ""
    turn = local_chat.add_user_turn(turns[-1]["content"])
    text = "".join(local_chat.stream_reply(turn))
    reply = local_chat.last_reply
    return text, len(turn.prompt.ids), reply.tokens + (reply.finish_reason == "stop")


def raw_request(server, method, path, body=b"", headers=None):
    """(status, parsed JSON or text) from a plain HTTP request, so that the body can be anything."""
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    try:
        return response.status, json.loads(text)
    except json.JSONDecodeError:
        return response.status, text


def health(server):
    return raw_request(server, "GET", "/health")[1]


# ---- the official client


@pytest.mark.slow
def test_completion_matches_the_terminal_chat_with_real_usage(client, local_chat):
    turns = [{"role": "user", "content": "one plus two"}]
    result = client.chat.completions.create(model="tinygpt", messages=turns, seed=5, temperature=0.8)
    expected, prompt_tokens, completion_tokens = local_answer(local_chat, turns, 5, temperature=0.8)
    assert result.object == "chat.completion" and result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == expected, "the server samples exactly as the terminal chat"
    assert result.choices[0].finish_reason == ("length" if completion_tokens == MAX_TOKENS else "stop")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


@pytest.mark.slow
def test_streaming_sends_the_same_text_in_chunks(client):
    turns = [{"role": "user", "content": "two plus two"}]
    hot = {"seed": 3, "temperature": 2.0, "top_p": 1.0, "extra_body": {"top_k": 0}}  # else the tiny model says " 6"
    whole = client.chat.completions.create(model="tinygpt", messages=turns, **hot).choices[0].message.content
    stream = client.chat.completions.create(model="tinygpt", messages=turns, stream=True,
                                            stream_options={"include_usage": True}, **hot)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 1, "streamed, in several pieces"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


@pytest.mark.slow
def test_multi_turn_messages_and_a_system_prompt_reach_the_model(client, local_chat):
    turns = [{"role": "user", "content": "one plus one"}, {"role": "assistant", "content": "two"},
             {"role": "user", "content": "and plus three?"}]
    multi = client.chat.completions.create(model="tinygpt", messages=turns, seed=11)
    expected, prompt_tokens, _ = local_answer(local_chat, turns, 11)
    assert multi.choices[0].message.content == expected and multi.usage.prompt_tokens == prompt_tokens
    with_system = client.chat.completions.create(
        model="tinygpt", messages=[{"role": "system", "content": "Be brief."}, *turns], seed=11, max_tokens=4)
    assert with_system.usage.prompt_tokens > prompt_tokens


@pytest.mark.slow
def test_models_list_names_the_loaded_checkpoint(client, trained_run):
    models = client.models.list().data
    step = newgpt.load_checkpoint(trained_run)[2]["step"]
    assert [m.id for m in models] == [f"{trained_run.name}-step{step}"]


@pytest.mark.slow
def test_a_bad_request_raises_the_clients_error(client):
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="tinygpt", messages=[{"role": "user", "content": "hi"}], n=2)


@pytest.mark.slow
def test_stop_sequences_cut_the_answer(client):
    turns = [{"role": "user", "content": "one plus two"}]
    full = client.chat.completions.create(model="tinygpt", messages=turns, seed=5, temperature=0.8)
    text = full.choices[0].message.content
    if len(text) < 4:
        pytest.skip("the tiny model's answer is too short to cut")
    stop = text[2:4]
    cut = client.chat.completions.create(model="tinygpt", messages=turns, seed=5, temperature=0.8, stop=[stop])
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tinygpt", messages=turns, seed=5, temperature=0.8, stop=stop, stream=True) if c.choices)
    assert cut.choices[0].message.content == text[:text.index(stop)] == streamed
    assert cut.choices[0].finish_reason == "stop"


# ---- malformed requests


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"model": "x"}', 400, "messages"),
    (b'{"messages": "hello"}', 400, "messages"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "role"),
    (b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content: "),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', 400, "messages[0].content: "),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', 400, "temperature must be between 0 and 2"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n must be 1"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "max_tokens"),
    (b'{"messages": [{"role": "assistant", "content": "hi"}]}', 400, "last message must be the user"),
    (b'{"messages": []}', 400, "at least one message"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 2_000_000}]}).encode(), 413, "over"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}] * 300}).encode(), 400, "at most"),
])
@pytest.mark.slow
def test_malformed_requests_get_an_error_object_and_the_server_stays_up(server, body, status, words):
    got, answer = raw_request(server, "POST", "/v1/chat/completions", body)
    assert got == status, answer
    assert set(answer["error"]) >= {"message", "type", "param", "code"} and words in answer["error"]["message"]
    assert health(server)["status"] == "ok"


@pytest.mark.slow
def test_a_message_longer_than_the_window_is_refused_as_openai_does(server):
    """Not cut silently to its last tokens: OpenAI's context_length_exceeded, naming what would fit."""
    body = json.dumps({"messages": [{"role": "user", "content": "why " * 125_000}]}).encode()
    got, answer = raw_request(server, "POST", "/v1/chat/completions", body)
    assert got == 400 and answer["error"]["code"] == "context_length_exceeded", answer
    assert "500,000 characters" in answer["error"]["message"] and answer["error"]["param"] == "messages", answer
    assert health(server)["status"] == "ok"


REFUSED = [  # (the request's extra fields, the parameter the 400 must name)
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"wizardry": 1}, "wizardry"),
    ({"frequency_penalty": "a"}, "frequency_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"stream": "yes"}, "stream"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("inf")}, "top_p"),
    ({"temperature": 2.5}, "temperature"),
    ({"logit_bias": {"abc": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"min_p": 2}, "min_p"),
    ({"seed": 1.5}, "seed"),
]


@pytest.mark.slow
def test_every_parameter_not_honoured_is_refused_by_name_and_logged(server):
    for extra, param in REFUSED:
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], **extra}).encode()  # NaN as NaN
        got, answer = raw_request(server, "POST", "/v1/chat/completions", body)
        assert got == 400 and param in answer["error"]["message"], (extra, answer)
        assert (answer["error"]["param"] or "").split(".")[0] == param, (extra, answer)
    assert health(server)["status"] == "ok"
    logged = [line for line in STDERR[server] if line.startswith("failed: POST /v1/chat/completions: 400")]
    assert len(logged) >= len(REFUSED), "each failed request leaves one line in the server's log"


@pytest.mark.slow
def test_openai_penalties_and_the_extensions_sample_as_the_terminal_chat(client, local_chat):
    turns = [{"role": "user", "content": "one plus two"}]
    settings = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "temperature": 0.9}
    extensions = {"min_p": 0.05, "dry_multiplier": 0.8, "no_repeat_ngram_size": 3, "repetition_penalty": 1.0}
    result = client.chat.completions.create(model="tinygpt", messages=turns, seed=9, extra_body=extensions,
                                            **settings)
    expected, _, _ = local_answer(local_chat, turns, 9, **settings, **extensions)
    assert result.choices[0].message.content == expected
    plain = client.chat.completions.create(model="tinygpt", messages=turns, seed=9, temperature=0.9)
    assert plain.choices[0].message.content != expected, "the settings change the answer: they are applied"


@pytest.mark.slow
def test_logprobs_are_the_models_log_softmax_of_the_chosen_tokens(client, local_chat):
    turns = [{"role": "user", "content": "two plus two"}]
    greedy = {"temperature": 0.0, "extra_body": {"repetition_penalty": 1.0, "dry_multiplier": 0.0}}
    result = client.chat.completions.create(model="tinygpt", messages=turns, logprobs=True, top_logprobs=3,
                                            **greedy)
    entries = result.choices[0].logprobs.content
    local_chat.history, local_chat.system = [], ""
    end_id, prompt_ids = local_chat.engine.end_id, local_chat.add_user_turn(turns[-1]["content"]).prompt.ids
    config = engine.SamplingConfig(temperature=0.0, repetition_penalty=1.0, dry_multiplier=0.0,
                                   max_new_tokens=MAX_TOKENS)
    steps = [(i, logits) for i, logits in engine.generate(local_chat.engine.model,
                                                          engine.Prompt(prompt_ids, stop_ids=(end_id,)), config)
             if i != end_id]
    assert len(entries) == len(steps) >= 1
    for entry, (token_id, logits) in zip(entries, steps):
        expected = torch.log_softmax(logits.float(), -1)
        assert entry.logprob == pytest.approx(expected[token_id].item(), abs=1e-5)
        table, tokenizer = local_chat.engine.token_table, local_chat.engine.tokenizer
        raw = table[token_id] or tokenizer.id_to_token(token_id).encode()  # a special token: <|user|>
        assert bytes(entry.bytes) == raw and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(expected.max().item(), abs=1e-5), "greedy: the top"
    plain = client.chat.completions.create(model="tinygpt", messages=turns, **greedy)
    assert plain.choices[0].logprobs is None, "no logprobs unless asked for"


@pytest.mark.slow
def test_logit_bias_makes_a_token_certain_or_impossible(client, local_chat):
    turns = [{"role": "user", "content": "two plus two"}]
    token_a = local_chat.engine.tokenizer.token_to_id("a")
    forced = client.chat.completions.create(model="tinygpt", messages=turns, temperature=0.0,
                                            logit_bias={str(token_a): 100})
    assert forced.choices[0].message.content == "a" * MAX_TOKENS
    local_answer(local_chat, turns, 0, temperature=0.0)
    local_chat.history, local_chat.system = [], ""
    prompt = engine.Prompt(local_chat.add_user_turn(turns[-1]["content"]).prompt.ids)
    (first_id, _), = engine.generate(local_chat.engine.model, prompt,
                                     dataclasses.replace(local_chat.sampling, max_new_tokens=1))
    banned = client.chat.completions.create(model="tinygpt", messages=turns, temperature=0.0, max_tokens=1,
                                            logprobs=True, logit_bias={str(first_id): -100})
    raw = local_chat.engine.token_table[first_id] or local_chat.engine.tokenizer.id_to_token(first_id).encode()
    assert bytes(banned.choices[0].logprobs.content[0].bytes) != raw, "-100 bans the greedy choice"


@pytest.mark.slow
def test_unknown_paths_and_methods_get_error_objects(server):
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        got, answer = raw_request(server, method, path)
        assert got == status and "message" in answer["error"]


@pytest.mark.slow
def test_api_key_is_required_on_the_api_when_set(trained_run):
    with running_server(trained_run, "--api_key", "s3cret") as url:
        denied = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            denied.models.list()
        allowed = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert len(allowed.models.list().data) == 1
        assert raw_request(url, "GET", "/health")[0] == 200 and raw_request(url, "GET", "/")[0] == 200


# ---- concurrency and disconnects


@pytest.mark.slow
def test_fifty_simultaneous_requests_are_all_answered_correctly(server, local_chat):
    turns = [{"role": "user", "content": "three plus four"}]
    answers, errors = {}, []

    def ask(seed):
        try:
            status, body = raw_request(server, "POST", "/v1/chat/completions",
                                       json.dumps({"messages": turns, "seed": seed, "temperature": 1.0}).encode())
            answers[seed] = body["choices"][0]["message"]["content"] if status == 200 else body
        except Exception as e:  # noqa: BLE001  collected, so that one failure does not hide the rest
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(seed,)) for seed in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and len(answers) == 50, errors[:3]
    for seed in range(50):
        assert answers[seed] == local_answer(local_chat, turns, seed, temperature=1.0)[0], f"seed {seed}"


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_frees_the_worker(server):
    before = health(server)["cancelled"]
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"messages": [{"role": "user", "content": "one"}], "stream": True, "max_tokens": 2048,
            "repetition_penalty": 1.0}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.sock.shutdown(2)  # the client goes away after the first event
    connection.close()
    deadline = time.time() + 120
    while health(server)["cancelled"] == before and time.time() < deadline:
        time.sleep(0.2)
    assert health(server)["cancelled"] == before + 1, "the server noticed the disconnect and stopped generating"
    status, body = raw_request(server, "POST", "/v1/chat/completions",
                               json.dumps({"messages": [{"role": "user", "content": "two"}], "max_tokens": 4}).encode())
    assert status == 200 and body["usage"]["completion_tokens"] >= 1, "the next request is served"


# ---- the parts without a server


def test_sources_come_in_an_extension_field_and_retrieval_can_be_switched_off(wide_window_checkpoint, knowledge):
    with running_server(wide_window_checkpoint, "--knowledge", knowledge) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What is the capital of Genovia?"}]
        answer = client.chat.completions.create(model="tinygpt", messages=messages)
        assert any("Pyrus" in s["text"] for s in answer.model_extra["sources"]), answer.model_extra
        stream = client.chat.completions.create(model="tinygpt", messages=messages, stream=True)
        streamed = [c.model_extra.get("sources") for c in stream if c.choices and c.choices[0].finish_reason]
        assert streamed == [answer.model_extra["sources"]], "the last chunk carries the same sources"
        off = client.chat.completions.create(model="tinygpt", messages=messages, extra_body={"retrieval": False})
        assert off.model_extra["sources"] == [] and off.usage.prompt_tokens < answer.usage.prompt_tokens
        with urllib.request.urlopen(f"{url}/health") as response:
            assert json.load(response)["knowledge"]["passages"] == 2 * len(COUNTRIES)


def test_retrieval_asked_of_a_server_without_knowledge_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="no knowledge index"):
        client.chat.completions.create(model="tinygpt", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"retrieval": True})


def test_every_sampling_option_is_a_flag_a_set_name_a_page_setting_and_an_api_parameter():
    options = {f.name for f in dataclasses.fields(engine.SamplingConfig)} - {"seed", "max_new_tokens"}
    page_settings = set(re.findall(r'<input id="(\w+)" type="number"', serve.PAGE.read_text()))
    assert page_settings == options | {"max_tokens"}
    assert options <= set(serve.ChatRequest.model_fields), options - set(serve.ChatRequest.model_fields)
    flags = {action.dest for action in chat.build_parser()._actions}
    assert options <= flags
    for name in options:
        value = {int: "2", float: "1.0"}[type(getattr(engine.SamplingConfig(), name))]  # valid for every option
        changed = engine.apply_settings(engine.SamplingConfig(), [f"{name}={value}"])
        assert getattr(changed, name) == float(value), f"/set {name}={value}"


def test_stop_scanner_holds_back_a_possible_start_of_a_stop_sequence():
    scanner = serve.StopScanner(["END"])
    assert scanner.push("hello E") == "hello"
    assert scanner.push("N") == " ", "two characters are held back: 'EN' may begin 'END'"
    assert scanner.push("Dgone") == "" and scanner.stopped and scanner.flush() == ""
    free = serve.StopScanner([])
    assert free.push("abc") == "abc" and free.flush() == ""
    late = serve.StopScanner(["xyz"])
    assert late.push("ab") == "" and late.push("c") == "a" and late.flush() == "bc"


def test_sampling_comes_from_the_flags_overridden_by_the_request():
    defaults = engine.SamplingConfig(temperature=0.3, top_k=40, max_new_tokens=100)
    request = serve.ChatRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.9, top_k=5,
                                max_completion_tokens=7, seed=1)
    sampling = serve.sampling_for(request, defaults, serve.Limits())
    assert (sampling.temperature, sampling.top_k, sampling.max_new_tokens, sampling.seed, sampling.top_p) == \
        (0.9, 5, 7, 1, defaults.top_p)
    unseeded = serve.ChatRequest(messages=[{"role": "user", "content": "hi"}])
    seeds = {serve.sampling_for(unseeded, defaults, serve.Limits()).seed for _ in range(3)}
    assert len(seeds) == 3, "without a seed every request samples anew"


@pytest.mark.slow
def test_a_taken_port_is_a_one_line_error(trained_run):
    with running_server(trained_run) as url:
        port = url.rsplit(":", 1)[1]
        result = subprocess.run([sys.executable, str(REPO / "serve.py"), "--ckpt", str(trained_run), "--port", port],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "cannot listen on" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_port_out_of_range_is_refused(port, capsys):
    with pytest.raises(SystemExit) as exit_info:
        serve.build_parser().parse_args(["--port", port])
    assert exit_info.value.code == 2 and "--port" in capsys.readouterr().err


# ---- the page in a real browser


@pytest.mark.slow
def launch_chromium(playwright):
    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM}: apt-get install chromium (as .ci/run does)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"])


def test_the_chat_page_shows_sources_and_can_switch_retrieval_off(wide_window_checkpoint, knowledge):
    from playwright.sync_api import expect, sync_playwright
    with running_server(wide_window_checkpoint, "--knowledge", knowledge) as url, sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        page.goto(url)
        for turn, look_up in enumerate([True, False], start=1):
            if not look_up:
                page.locator("details.settings summary").click()
                page.uncheck("#retrieval")
            page.fill("#prompt", "What is the capital of Genovia?")
            page.keyboard.press("Enter")
            expect(page.locator(".msg.assistant")).to_have_count(turn)
            expect(page.locator(".msg.assistant.streaming")).to_have_count(0, timeout=60_000)
        answers = page.locator(".msg.assistant")
        expect(answers.nth(0).locator("details.sources summary")).to_contain_text("[1] ")
        answers.nth(0).locator("details.sources summary").click()
        expect(answers.nth(0).locator("details.sources")).to_contain_text("Pyrus")
        expect(answers.nth(1).locator("details.sources")).to_have_count(0)
        browser.close()


def test_the_chat_page_streams_answers_keeps_the_conversation_and_stops():
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright
    ARTIFACTS.mkdir(exist_ok=True)
    # The release model: real answers, and slow enough on a CPU that Stop lands mid-answer.
    with running_server(RELEASE_DIR) as url, sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 390, "height": 800})  # a phone-width screen
        page.goto(url)
        expect(page.locator("#model")).to_contain_text("step")
        for turn, text in enumerate(["Hi! Who are you?", "What can you do?"], start=1):
            page.fill("#prompt", text)
            page.keyboard.press("Enter")
            expect(page.locator(".msg.user")).to_have_count(turn)
            expect(page.locator(".msg.assistant")).to_have_count(turn)
            expect(page.locator(".msg.assistant.streaming")).to_have_count(0, timeout=60_000)
            assert page.locator(".msg.assistant").nth(turn - 1).inner_text().strip(), "an answer appeared"
        page.locator("details.settings summary").click()
        page.fill("#max_tokens", "2048")
        for attempt in range(5):  # an answer may still end on its own before Stop is pressed: ask again
            page.fill("#prompt", "Tell me a long story about a dragon.")
            page.click("#send")
            page.wait_for_function("document.querySelector('.msg.assistant.streaming')?.textContent.length > 0")
            page.screenshot(path=str(ARTIFACTS / "chat_page.png"), full_page=True)
            try:
                page.click("#stop", timeout=2_000)
                break
            except PlaywrightError:
                expect(page.locator(".msg.assistant.streaming")).to_have_count(0, timeout=120_000)
        expect(page.locator(".msg.assistant").last.locator(".note")).to_have_text(" [stopped]")
        expect(page.locator("#send")).to_be_enabled()
        expect(page.locator(".error")).to_have_count(0)
        browser.close()
