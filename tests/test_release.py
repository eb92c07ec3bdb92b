"""The release model: committed in ckpt/release/, what chat loads when nothing is trained yet, and how
`python newgpt.py --release RUN` makes one (bf16 weights, no optimizer state, its tokenizer beside it)."""

import pytest
import torch

import chat_with_model as chat
import engine
import newgpt
import runtime
from data import read_teacher_records, split_weight
from runtime import RELEASE_DIR, RELEASE_FILE, UserError, checkpoint_paths, latest_checkpoint
from conftest import copy_run, run_newgpt, train_in_process

RELEASE_MAX_BYTES = 30 * 10**6


def test_the_committed_release_model_answers_and_ends_its_turn():
    path = latest_checkpoint(RELEASE_DIR)
    assert path is not None, f"no release model committed in {RELEASE_DIR}"
    assert path.stat().st_size <= RELEASE_MAX_BYTES, f"{path} is {path.stat().st_size:,} bytes, over 30 MB"
    model, tokenizer, ckpt = newgpt.load_checkpoint(path)
    assert "optimizers" not in ckpt and all(t.dtype == torch.bfloat16 for t in ckpt["model"].values()
                                            if t.is_floating_point()), "a release holds bf16 weights only"
    sampling = engine.SamplingConfig()
    conversation = chat.Chat(engine.Engine(model.eval(), tokenizer, "cpu", "float32"), sampling)
    reply = "".join(conversation.stream_reply(conversation.add_user_turn("What is the capital of France?")))
    assert conversation.last_reply.finish_reason == "stop", f"no <|end|> within the limit: {reply!r}"
    assert len(reply.split()) >= 3, f"a reply of a few words at least: {reply!r}"


def test_the_release_ships_the_teacher_answers_it_trained_on():
    """A fresh clone rebuilds the release's training data from the same sources: the answers are committed."""
    ckpt = newgpt.load_checkpoint(latest_checkpoint(RELEASE_DIR))[2]
    teacher = ckpt["train_config"].get("teacher")
    if not teacher:
        pytest.skip("the release trained without a teacher")
    answers = RELEASE_DIR.parent.parent / split_weight(teacher)[0]  # as named from the repository's root
    assert answers.is_file() and answers.resolve().parent == RELEASE_DIR, f"{answers} is not shipped in {RELEASE_DIR}"
    assert answers.stat().st_size <= 20 * 10**6, f"{answers} is over 20 MB"
    records, intact = read_teacher_records(answers)
    assert intact and all({"key", "record", "kind", "turn", "tries"} <= set(r) for r in records)
    assert sum("answer" in r for r in records) > 1000, "the answers the release learned from"


def test_release_keeps_bf16_weights_and_the_tokenizer_and_replaces_the_old_one(trained_run, tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    (out / "tokenizer-8192-old.json").write_text("{}")  # an earlier release's tokenizer
    path = newgpt.make_release(trained_run, out)
    full_model, _, full = newgpt.load_checkpoint(trained_run)
    model, tokenizer, slim = newgpt.load_checkpoint(out)
    assert path == out / RELEASE_FILE and latest_checkpoint(out) == path
    assert sorted(p.name for p in out.glob("tokenizer-*.json")) == [full["tokenizer"]["file"]]
    assert not {"optimizers", "scaler", "rng"} & set(slim) and slim["step"] == full["step"]
    tied = slim["model"]["lm_head.weight"], slim["model"]["transformer.wte.weight"]
    assert tied[0].data_ptr() == tied[1].data_ptr(), "the tied embedding is stored once"
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, full_model.state_dict()[name].to(torch.bfloat16).float()), name
    assert path.stat().st_size < latest_checkpoint(trained_run).stat().st_size / 3


def test_chat_falls_back_to_the_release_only_when_nothing_is_trained(trained_run, tmp_path, monkeypatch):
    release = tmp_path / "release"
    monkeypatch.setattr(runtime, "RELEASE_DIR", release)
    with pytest.raises(UserError, match="no checkpoint in .* and no release model"):
        runtime.default_checkpoint(tmp_path / "ckpt")
    newgpt.make_release(trained_run, release)
    assert runtime.default_checkpoint(tmp_path / "ckpt") == release
    assert newgpt.load_checkpoint(release)[2]["step"] == 4
    trained = copy_run(trained_run, tmp_path / "ckpt")
    assert runtime.default_checkpoint(trained) == trained, "a trained run wins over the release"


@pytest.mark.slow
def test_a_release_cannot_be_resumed_and_a_new_run_is_not_blocked_by_it(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "ckpt")
    newgpt.make_release(run, tmp_path / "ckpt" / "release")
    for checkpoint in run.glob("gpt_step*.pt"):
        checkpoint.unlink()  # a fresh clone: ckpt/ holds only the release folder
    texts = tmp_path / "texts.json"
    assert checkpoint_paths(run) == [], "the release folder is not a run's checkpoint"
    result = run_newgpt("--resume", run / "release" / RELEASE_FILE, "--out_dir", run, "--texts", texts,
                        cwd=tmp_path)
    assert result.returncode == 2 and "cannot be resumed" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_release_flag_refuses_a_damaged_checkpoint_and_writes_nothing(trained_run, tmp_path, monkeypatch):
    release = tmp_path / "release"
    monkeypatch.setattr(newgpt, "RELEASE_DIR", release)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(latest_checkpoint(trained_run).read_bytes()[:4000])
    assert train_in_process("--release", broken) == 2
    assert not release.exists()
