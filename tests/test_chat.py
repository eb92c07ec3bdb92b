"""chat_with_model.py: KV-cache generation, sampling, UTF-8 streaming, history and the REPL."""

import dataclasses
import io
import subprocess
import sys

import pytest
import torch

import chat_with_model as chat
import engine
from runtime import UserError
import newgpt
from conftest import REPO, TINY_FLAGS, copy_run, oasst_rows, train_in_process, write_jsonl


def tiny_model(pos_encoding, block_size=32):
    torch.manual_seed(0)
    config = newgpt.GPTConfig(vocab_size=300, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                              pos_encoding=pos_encoding)
    return newgpt.GPT(config).eval()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A real checkpoint, trained for two steps by newgpt.py on fixture data."""
    tmp = tmp_path_factory.mktemp("chat")
    data = write_jsonl(tmp / "oasst.jsonl", oasst_rows(100))
    flags = [f if f != "32" or TINY_FLAGS[i - 1] != "--block_size" else "64" for i, f in enumerate(TINY_FLAGS)]
    status = train_in_process("--data", data, "--texts", tmp / "texts.json", "--out_dir", tmp / "ckpt", *flags,
                              "--max_steps", "2")
    assert status == 0, "the tiny training run failed"
    return tmp / "ckpt"


def run_chat(*args, stdin="", timeout=120):
    return subprocess.run([sys.executable, str(REPO / "chat_with_model.py"), *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


# ---- generation


@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
def test_kv_cache_matches_full_forward(pos_encoding):
    model = tiny_model(pos_encoding)
    idx = torch.randint(0, 300, (2, 30))
    full, _ = model(idx)
    cache = newgpt.KVCache(model.config)
    pieces = [model(idx[:, :17], kv_cache=cache)[0]]
    pieces += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(17, 30)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-4), "cached logits drift from the full forward"


@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
def test_greedy_generation_with_cache_equals_without_past_the_window(pos_encoding):
    model = tiny_model(pos_encoding)
    config = engine.SamplingConfig(temperature=0.0, max_new_tokens=150, repetition_penalty=1.3)
    prompt = torch.randint(0, 300, (20,)).tolist()
    cached = [t for t, _ in engine.generate(model, engine.Prompt(prompt), config, use_cache=True)]
    uncached = [t for t, _ in engine.generate(model, engine.Prompt(prompt), config, use_cache=False)]
    assert len(cached) == 150, "150 tokens run well past the 32-token window"
    assert cached == uncached


def test_window_keeps_the_newest_half_when_full():
    assert engine.window_start(32, 0, 32) == 0
    assert engine.window_start(33, 0, 32) == 17, "33 tokens overflow a 32 window: keep the newest 16"
    assert engine.window_start(40, 17, 32) == 17


def test_generation_stops_at_the_stop_token():
    model = tiny_model("rope")
    config = engine.SamplingConfig(temperature=0.0, max_new_tokens=50)
    first, _ = next(engine.generate(model, engine.Prompt([1, 2, 3]), config))
    assert [t for t, _ in engine.generate(model, engine.Prompt([1, 2, 3], stop_ids=(first,)), config)] == [first]


# ---- sampling


def test_top_k_keeps_exactly_k():
    logits = torch.randn(100)
    kept = torch.isfinite(engine.filter_top_k_top_p(logits, top_k=7, top_p=1.0))
    assert kept.sum() == 7 and set(kept.nonzero().flatten().tolist()) == set(torch.topk(logits, 7).indices.tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    kept = torch.isfinite(engine.filter_top_k_top_p(probs.log(), top_k=0, top_p=0.8))
    assert kept.tolist() == [False, True, False, True, True], "0.4 + 0.3 = 0.7 < 0.8, so 0.15 joins, 0.1 does not"
    exactly = torch.isfinite(engine.filter_top_k_top_p(probs.log(), top_k=0, top_p=0.7))
    assert exactly.sum() == 2, "mass 0.7 is reached by two tokens"


def test_repetition_penalty_lowers_repeated_tokens():
    logits = torch.tensor([2.0, -1.0, 0.5, 1.0])
    penalized = engine.apply_repetition_penalty(logits, [0, 1], 2.0)
    assert penalized.tolist() == [1.0, -2.0, 0.5, 1.0]
    before, after = logits.softmax(-1), penalized.softmax(-1)
    assert after[0] < before[0] and after[1] < before[1]


def test_frequency_and_presence_penalties_follow_openais_formula():
    config = engine.SamplingConfig(repetition_penalty=1.0, dry_multiplier=0.0, frequency_penalty=0.5,
                                 presence_penalty=1.0)
    context, answer = [3, 4, 1, 1, 2], [1, 1, 2]  # the prompt (3, 4) does not count
    penalized = engine.penalize(torch.zeros(5), config, context, answer)
    assert penalized.tolist() == [0.0, -(2 * 0.5 + 1.0), -(1 * 0.5 + 1.0), 0.0, 0.0]
    encouraged = engine.penalize(torch.zeros(5), dataclasses.replace(config, frequency_penalty=-1.0,
                                                                   presence_penalty=0.0), context, answer)
    assert encouraged.tolist() == [0.0, 2.0, 1.0, 0.0, 0.0], "negative values make repeats likelier, as OpenAI's"


def test_dry_penalises_the_token_that_would_continue_a_repeat():
    context = [5, 6, 7, 9, 5, 6, 7]  # "5 6 7" was followed by 9: a 9 now would repeat four tokens
    assert engine.dry_penalties(context, multiplier=0.8, base=1.75, allowed_length=2) == {9: 0.8 * 1.75 ** (3 - 2)}
    assert engine.dry_penalties(context, multiplier=0.8, base=1.75, allowed_length=4) == {}, "a repeat of 3 is allowed"
    config = engine.SamplingConfig(repetition_penalty=1.0, dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    penalized = engine.penalize(torch.zeros(10), config, context, [])
    assert penalized[9].item() == pytest.approx(-1.4) and penalized[:9].abs().sum() == 0


def test_no_repeat_ngram_bans_only_what_would_complete_a_seen_ngram():
    assert engine.banned_by_ngrams([1, 2, 3, 1, 2], 3) == {3}, "1 2 was followed by 3"
    assert engine.banned_by_ngrams([1, 2, 3, 1, 2], 2) == {3}, "2 was followed by 3"
    assert engine.banned_by_ngrams([1, 2, 3, 4], 3) == set(), "3 4 never occurred before"
    config = engine.SamplingConfig(repetition_penalty=1.0, dry_multiplier=0.0, no_repeat_ngram_size=3, temperature=0.0)
    logits = torch.tensor([0.0, 0.0, 0.0, 5.0, 1.0])
    assert engine.sample_next(logits, config, [1, 2, 3, 1, 2], [], None) == 4, "the likeliest token, 3, is banned"


def test_min_p_keeps_tokens_within_a_fraction_of_the_likeliest():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = torch.isfinite(engine.filter_min_p(probs.log(), 0.2))
    assert kept.tolist() == [True, True, True, False], "0.05 < 0.2 * 0.5"


def test_same_seed_same_output_and_temperature_zero_is_argmax():
    logits = torch.randn(300)
    config = engine.SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    draws = [engine.sample_next(logits, config, [], [], torch.Generator().manual_seed(5)) for _ in range(2)]
    assert draws[0] == draws[1]
    many = {engine.sample_next(logits, config, [], [], torch.Generator().manual_seed(s)) for s in range(30)}
    assert len(many) > 1, "sampling at temperature 1 must vary with the seed"
    greedy = dataclasses.replace(config, temperature=0.0)
    assert engine.sample_next(logits, greedy, [], [], None) == int(logits.argmax())


def test_set_command_validates_every_value():
    sampling = engine.SamplingConfig()
    assert engine.apply_settings(sampling, ["temperature=0.2", "top_k=5"]).top_k == 5
    with pytest.raises(UserError, match="temperature needs a number.*top_p must be in"):
        engine.apply_settings(sampling, ["temperature=hot", "top_p=1.5"])
    with pytest.raises(UserError, match="not NAME=VALUE"):
        engine.apply_settings(sampling, ["colour=blue"])


# ---- streaming and history


def test_utf8_stream_never_prints_broken_characters(tokenizer):
    text = "Grüße! 🙂👍🏽 你好，世界 — 東京 🇫🇷"
    stream = engine.Utf8Stream(newgpt.token_bytes(tokenizer))
    pieces = [stream.push(i) for i in tokenizer.encode(text).ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces), "no replacement characters mid-stream"


def make_chat(checkpoint_dir, **sampling):
    model, tokenizer, _ = newgpt.load_checkpoint(checkpoint_dir)
    return chat.Chat(engine.Engine(model.eval(), tokenizer, "cpu", "float32"), engine.SamplingConfig(**sampling))


def test_history_truncation_keeps_the_newest_turns_within_the_window(checkpoint_dir):
    session = make_chat(checkpoint_dir, max_new_tokens=16)
    session.system = "Be kind."
    for i in range(12):
        session.history += [("user", f"q{i}"), ("assistant", f"a{i}")]
    turn = session.add_user_turn("the newest question")
    ids, notice = turn.prompt.ids, turn.notice
    assert len(ids) + 16 <= session.engine.model.config.block_size
    assert "dropped" in notice
    assert session.history[-1] == ("user", "the newest question")
    assert session.history[-3:-1] == [("user", "q11"), ("assistant", "a11")], "the newest exchange survives"
    assert ("user", "q0") not in session.history, "the oldest goes first"
    assert session.history[0][0] == "user", "whole exchanges are dropped"
    assert session.engine.tokenizer.decode(ids).startswith("Be kind."), "the system prompt is kept"


def test_a_huge_message_is_cut_to_fit_with_a_notice(checkpoint_dir):
    session = make_chat(checkpoint_dir, max_new_tokens=16)
    turn = session.add_user_turn("word " * 20000 + "the end")
    assert len(turn.prompt.ids) + 16 <= session.engine.model.config.block_size and "kept its last" in turn.notice
    assert session.history[-1][1].endswith("the end")


# ---- the program


def transcript_answers(stdout):
    """The answers of a piped chat's transcript: the text after each "bot> ", up to the blank line."""
    return [block.split("bot> ", 1)[1].rstrip("\n") for block in stdout.split("\nyou> ") if "bot> " in block]


@pytest.mark.slow
def test_piped_repl_multi_turn_reset_set_and_odd_lines(checkpoint_dir):
    stdin = "\n".join(["Hello there", "", "/set temperature=-1 top_k=x", "/settings", "And then?", "/reset",
                       "x" * 100_000, "/quit", "never read"]) + "\n"
    result = run_chat("--ckpt", checkpoint_dir, "--max_new_tokens", "8", "--temperature", "0", stdin=stdin)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "temperature must be a finite number >= 0" in out and "top_k needs an integer" in out
    assert "temperature=0.0" in out and "(conversation cleared)" in out
    assert "kept its last" in result.stderr, "the huge line is cut with a notice on stderr"
    assert "Traceback" not in result.stderr and "never read" not in out
    assert out.startswith("you> Hello there\nbot> "), "piped input gives a transcript"
    assert len(transcript_answers(out)) == 3, "one answer for each of the three messages"


@pytest.mark.slow
def test_a_long_piped_conversation_never_overflows_the_window(checkpoint_dir):
    questions = [f"Tell me fact number {i} about the sea" for i in range(40)]
    result = run_chat("--ckpt", checkpoint_dir, "--max_new_tokens", "12",
                      stdin="\n".join(["/system Answer briefly.", *questions]) + "\n")
    assert result.returncode == 0, result.stderr
    assert "(system prompt set; conversation cleared)" in result.stdout
    answers = transcript_answers(result.stdout)
    assert len(answers) == 40 and all(answers), "every question gets an answer of its own, none empty"
    assert [line[5:] for line in result.stdout.splitlines() if line.startswith("you> ")][1:] == questions


def test_multi_line_answers_stay_apart_in_piped_mode(checkpoint_dir, monkeypatch, capsys):
    session = make_chat(checkpoint_dir)
    replies = iter(["first line\nsecond line\n\nlast line", "another\nanswer"])

    def scripted_reply(turn):
        yield next(replies)
    monkeypatch.setattr(session, "stream_reply", scripted_reply)
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n"))
    chat.repl(session, interactive=False, show_speed=False)
    assert capsys.readouterr().out == ("you> one\nbot> first line\nsecond line\n\nlast line\n\n"
                                       "you> two\nbot> another\nanswer\n\n")


@pytest.mark.slow
def test_prompt_flag_answers_once_and_is_deterministic(checkpoint_dir):
    first = run_chat("--ckpt", checkpoint_dir, "--prompt", "Hi", "--max_new_tokens", "12", "--seed", "3")
    second = run_chat("--ckpt", checkpoint_dir, "--prompt", "Hi", "--max_new_tokens", "12", "--seed", "3")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.endswith("\n")


@pytest.mark.slow
def test_missing_corrupt_and_foreign_checkpoints_give_one_line_errors(tmp_path, checkpoint_dir):
    missing = run_chat("--ckpt", tmp_path / "empty_dir_that_does_not_exist")
    assert missing.returncode != 0 and "checkpoint not found" in missing.stderr
    (tmp_path / "empty").mkdir()
    none = run_chat("--ckpt", tmp_path / "empty")
    assert none.returncode != 0 and "no checkpoint in" in none.stderr and "python newgpt.py" in none.stderr
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((checkpoint_dir / "gpt_step0002.pt").read_bytes()[:5000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    for path, message in ((corrupt, "is truncated or damaged"), (foreign, "not a TinyGPT checkpoint")):
        result = run_chat("--ckpt", path, "--prompt", "hi")
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    bad_flag = run_chat("--ckpt", checkpoint_dir, "--top_p", "3", "--prompt", "hi")
    assert bad_flag.returncode != 0 and "top_p must be in" in bad_flag.stderr


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--repetition_penalty", "inf"], "repetition_penalty must be a finite number"),
    (["--top_p", "nan"], "top_p must be in (0, 1]"),
    (["--seed", "99999999999999999999999"], "seed must be between 0 and"),
    (["--seed", "-1"], "seed must be between 0 and"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", " \n\t"], "--prompt is empty"),
])
def test_bad_values_are_one_line_errors(checkpoint_dir, flags, message, capsys):
    assert chat.main(["--ckpt", str(checkpoint_dir), "--prompt", "hi", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_the_chat_names_the_checkpoint_it_loaded(checkpoint_dir, tmp_path):
    """Without --ckpt a fresh run in ckpt/ becomes the chat's model: one line on stderr says so."""
    copy_run(checkpoint_dir, tmp_path / "ckpt")
    result = subprocess.run([sys.executable, str(REPO / "chat_with_model.py"), "--prompt", "hi", "--max_new_tokens",
                             "2"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == ("model: ckpt/gpt_step0002.pt, step 2, the newest in ckpt/ or else the "
                                             "release (--ckpt picks another)"), result.stderr


@pytest.mark.slow
def test_a_reader_that_leaves_early_ends_the_chat_quietly(checkpoint_dir):
    """`... | head -c 1`: the pipe closes while the chat still has answers to write."""
    args = ["--ckpt", checkpoint_dir, "--max_new_tokens", "8"]
    stdin = "".join(f"question {i}\n" for i in range(30))
    whole = run_chat(*args, stdin=stdin)
    assert whole.returncode == 0 and len(whole.stdout) > 300, "writing goes on long after the first byte"
    process = subprocess.Popen([sys.executable, str(REPO / "chat_with_model.py"), *map(str, args)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdin.write(stdin.encode())
    process.stdin.close()
    process.stdout.read(1)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0 and stderr.startswith("model: ") and stderr.count("\n") == 1, stderr
