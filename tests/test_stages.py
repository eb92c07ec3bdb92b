"""Training in stages: a knowledge stage on documents and Q/A pairs, then the chat stage; mixture weights per
source; evaluation prompts kept out of the training data."""

import json
import shutil

import numpy as np
import pytest
import torch

from data import MixedRows, build_texts, read_records, split_weight, stream_records
import newgpt
from conftest import oasst_rows, train_args, train_in_process, write_jsonl

PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]


def knowledge_records():
    """Documents and Q/A pairs written for these tests (no third-party text)."""
    documents = [{"text": f"{planet}\n{planet} is planet number {i + 1} counted from the Sun. "
                          f"Its moons and rings are described in many books about {planet}."}
                 for i, planet in enumerate(PLANETS)]
    pairs = [{"instruction": f"Which planet is number {i + 1} from the Sun?",
              "response": f"Planet number {i + 1} from the Sun is {planet}."} for i, planet in enumerate(PLANETS)]
    return documents, pairs


@pytest.fixture
def knowledge_files(tmp_path):
    documents, pairs = knowledge_records()
    return (write_jsonl(tmp_path / "docs.jsonl", documents * 5), write_jsonl(tmp_path / "qa.jsonl", pairs * 5))


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_chat_stage_starts_at_its_share_of_the_steps(tmp_path, oasst_file, knowledge_files, capsys):
    out = tmp_path / "staged"
    flags = ["--pretrain_data", *map(str, knowledge_files), "--pretrain_fraction", "0.4", "--max_steps", "10"]
    assert train_in_process(*train_args(oasst_file, out, *flags)) == 0
    printed = capsys.readouterr().out
    assert "knowledge stage: " in printed and "step 4: the knowledge stage ends, the chat stage begins" in printed
    stages = {r["step"]: r["stage"] for r in records(out) if "stage" in r}  # logged after step N is taken
    assert stages == {step: "knowledge" if step <= 4 else "chat" for step in range(1, 11)}
    assert torch.load(out / "gpt_step0010.pt", weights_only=True)["chat_start_step"] == 4


def test_without_knowledge_data_every_step_is_a_chat_step(tmp_path, oasst_file):
    out = tmp_path / "plain"
    assert train_in_process(*train_args(oasst_file, out, "--max_steps", "3")) == 0
    assert {r["stage"] for r in records(out) if "stage" in r} == {"chat"}


@pytest.mark.parametrize("save_at", [3, 5])  # before and after the switch at step 4
def test_resume_across_the_stage_boundary_continues_exactly(tmp_path, oasst_file, knowledge_files, save_at):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ["--pretrain_data", *map(str, knowledge_files), "--pretrain_fraction", "0.5", "--max_steps", "8",
             "--save_interval", str(save_at), "--keep_last", "0", "--dropout", "0.1"]
    assert train_in_process(*train_args(oasst_file, straight, *flags)) == 0
    resumed.mkdir()
    for path in [straight / f"gpt_step{save_at:04d}.pt", *straight.glob("tokenizer-*.json")]:
        shutil.copy(path, resumed / path.name)
    assert train_in_process(*train_args(oasst_file, resumed, *flags, "--resume")) == 0
    end_straight = torch.load(straight / "gpt_step0008.pt", weights_only=True)
    end_resumed = torch.load(resumed / "gpt_step0008.pt", weights_only=True)
    assert end_resumed["chat_start_step"] == end_straight["chat_start_step"] == 4
    for name, tensor in end_straight["model"].items():
        assert torch.equal(tensor, end_resumed["model"][name]), f"{name} differs after resuming at {save_at}"


def packed(n_rows, value, block_size=4):
    """PackedRows of n_rows rows whose every token id is `value`, to tell the sources apart."""
    ids = np.full(n_rows * block_size + 1, value, dtype=np.uint16)
    return newgpt.PackedRows(ids, np.ones_like(ids, dtype=np.uint8), block_size, loss_on="all")


def test_mixture_weights_give_the_expected_sampling_frequencies():
    sizes, weights = [40, 20, 10], [1.0, 0.5, 3.0]
    mixed = MixedRows([packed(n, source) for source, n in enumerate(sizes)], weights, seed=0)
    expected = [n * w for n, w in zip(sizes, weights)]  # 40, 10, 30 rows per epoch
    assert mixed.n_rows == sum(expected)
    cfg = newgpt.TrainConfig(batch_size=8, grad_accum=1)
    drawn = [r for step in range(5 * mixed.n_rows // 8) for r in newgpt.training_rows(step, 0, cfg, 0, 1, mixed.n_rows)]
    x, _ = mixed.get(drawn)
    counts = np.bincount(x[:, 0].numpy(), minlength=3)
    assert counts.tolist() == [5 * e for e in expected], "five epochs draw each source weight x size times each"
    half = mixed.table[mixed.table[:, 0] == 1, 1]
    assert len(set(half.tolist())) == 10, "weight 0.5 keeps half of the rows, each once"


def test_a_source_weight_is_read_from_the_spec():
    assert split_weight("data/a.jsonl.gz:2.5") == ("data/a.jsonl.gz", 2.5)
    assert split_weight("data/a.jsonl.gz") == ("data/a.jsonl.gz", 1.0)
    assert split_weight("OpenAssistant/oasst2") == ("OpenAssistant/oasst2", 1.0)


def test_holdout_drops_planted_evaluation_questions_and_their_paraphrases(tmp_path):
    holdout = write_jsonl(tmp_path / "questions.jsonl", [{"question": "Which planet is number 5 from the Sun?",
                                                          "answers": ["jupiter"]}])
    planted = [
        {"instruction": "Which planet is number 5 from the Sun?", "response": "Jupiter."},  # verbatim
        {"instruction": "For a school report on the solar system I need one fact per planet, say that Jupiter is "
                        "number 5 from the Sun, plus moons, rings, storms and telescopes.",
         "response": "Jupiter."},  # a long message that uses the words: kept
        {"instruction": "which planets is number 5 from the Sun", "response": "Jupiter."},  # a paraphrase
        {"instruction": "Which planet is number 6 from the Sun?", "response": "Saturn."},  # another question
    ]
    document = {"text": "Jupiter is planet number 5 from the Sun."}  # a document stating the fact: kept
    chat = write_jsonl(tmp_path / "chat.jsonl", oasst_rows(20))
    sources = [write_jsonl(tmp_path / "qa.jsonl", planted), write_jsonl(tmp_path / "docs.jsonl", [document])]
    cfg = newgpt.TrainConfig(data=[str(chat)], pretrain_data=list(map(str, sources)), holdout=[str(holdout)])
    texts = build_texts(cfg)
    kept = [t["content"] for c in texts["pretrain"] for t in c["turns"] if t["role"] in ("user", "text")]
    assert texts["held_out"] == 2
    assert kept == [planted[1]["instruction"], planted[3]["instruction"], document["text"]]


def test_a_missing_holdout_file_is_a_one_line_error(tmp_path, oasst_file, capsys):
    status = train_in_process(*train_args(oasst_file, tmp_path / "out", "--holdout", tmp_path / "nope.jsonl"))
    assert status == 2 and "holdout file not found" in capsys.readouterr().err


def write_dataset_folder(folder, records, per_file=7):
    """A local dataset in the layout `datasets` reads from a folder: several JSONL files."""
    folder.mkdir()
    for i in range(0, len(records), per_file):
        write_jsonl(folder / f"part-{i // per_file:03d}.jsonl", records[i:i + per_file])
    return folder


def test_the_streaming_reader_yields_the_records_of_a_full_load(tmp_path):
    documents, pairs = knowledge_records()
    folder = write_dataset_folder(tmp_path / "docs", documents * 3)
    streamed = list(stream_records(str(folder)))
    full = [r for path in sorted(folder.glob("*.jsonl")) for r in read_records(path)]
    assert streamed == full and len(streamed) == 24


def test_a_streamed_source_trains_from_bounded_shards_written_once(tmp_path, oasst_file, monkeypatch, capsys):
    monkeypatch.setattr("data.STREAM_SHARD_TOKENS", 128)
    documents, _ = knowledge_records()
    folder = write_dataset_folder(tmp_path / "docs", documents * 10)
    out = tmp_path / "streamed"
    flags = ["--pretrain_data", str(folder), "--stream_tokens", "300", "--max_steps", "4"]
    assert train_in_process(*train_args(oasst_file, out, *flags)) == 0
    assert "knowledge stage" in capsys.readouterr().out
    manifest, = (out / "data").glob("stream-*/manifest.json")
    written = json.loads(manifest.read_text())
    assert written["tokens"] == 300 and len(written["shards"]) > 1, "--stream_tokens bounds the shards"
    stamp = manifest.stat().st_mtime_ns
    assert train_in_process(*train_args(oasst_file, out, *flags, "--max_steps", "6", "--resume")) == 0
    assert manifest.stat().st_mtime_ns == stamp and len(list((out / "data").glob("stream-*"))) == 1, "reused"
