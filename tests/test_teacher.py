"""teacher.py and the join of its answers: a tiny model of ours, exported to transformers, stands in for the
teacher; the filter, the resume after a kill, the hidden sets and the join are checked on fixture data."""

import gzip
import json

import pytest
import torch

import data
import export_hf
import newgpt
import retrieval
import teacher
from conftest import COUNTRIES, knowledge_rows, oasst_rows, write_checkpoint, write_jsonl


@pytest.fixture(scope="module")
def stand_in(tokenizer, tmp_path_factory):
    """A tiny random model of ours as a transformers chat model: what it says is noise, how it is asked,
    sampled, filtered and stored is the real path."""
    torch.manual_seed(0)
    config = newgpt.GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=512, n_layer=1, n_head=1, n_embd=16)
    folder = tmp_path_factory.mktemp("stand_in")
    write_checkpoint(newgpt.GPT(config), tokenizer, folder / "ckpt")
    assert export_hf.main(["--ckpt", str(folder / "ckpt"), "--out", str(folder / "hf")]) == 0
    return folder / "hf"


def teacher_args(tmp_path, oasst, stand_in, *extra):
    return teacher.build_parser().parse_args([
        "--data", str(oasst), "--holdout", str(tmp_path / "holdout.jsonl"), "--out", str(tmp_path / "answers.jsonl.gz"),
        "--teacher_model", str(stand_in), "--dtype", "float32", "--tries", "1", "--chunk", "4", "--batch_size", "4",
        "--max_turns", "1", *extra])


@pytest.fixture
def oasst(tmp_path):
    write_jsonl(tmp_path / "holdout.jsonl", [{"question": "What is three plus four?"}])
    return write_jsonl(tmp_path / "oasst.jsonl.gz", oasst_rows(40))


def keys_of(path):
    records, intact = data.read_teacher_records(path)
    return [r["key"] for r in records], intact


# ---- what is kept


def test_an_answer_is_kept_only_on_topic_unlooped_ended_and_holding_the_answer():
    assert teacher.why_rejected("Paris is the capital of France.", True, 0.8) is None
    assert teacher.why_rejected("Paris is the capital of France.", False, 0.8) == "unended"
    assert teacher.why_rejected("The sky is blue. " * 10, True, 0.8) == "loop"
    assert teacher.why_rejected("I like trains.", True, 0.1) == "off topic"
    assert teacher.why_rejected("I am SmolLM, made by Hugging Face.", True, 0.8) == "foreign name"
    span = teacher.answer_span("What is the capital of Cuba?", "The capital of Cuba is Havana.",
                               "[1] Cuba\nHavana is the capital of Cuba.")
    assert span == {"havana"}, span
    assert teacher.why_rejected("It is Havana.", True, 0.8, span) is None
    assert teacher.why_rejected("It is Santiago.", True, 0.8, span) == "no answer"


def test_up_to_n_tries_keep_the_first_that_passes_and_drop_a_prompt_none_passes(monkeypatch):
    said = {"pass": ["loop loop loop loop loop " * 3, "Two and two make four."],
            "fail": ["a b c d e " * 4, "a b c d e " * 4, "a b c d e " * 4]}

    def generate(model, tokenizer, prompts, temperature, seed):
        return [(said[p.record].pop(0), True) for p in prompts]

    monkeypatch.setattr(teacher, "generate_answers", generate)
    monkeypatch.setattr(teacher, "similarities", lambda embedder, topics, answers: [0.9] * len(answers))
    prompts = [teacher.Prompt(name, name, "chat", 1, [("user", "What is two and two?")], "two and two")
               for name in ("pass", "fail")]
    records = teacher.answer_chunk(None, None, None, prompts, tries=3, batch_size=2, seed=0)
    kept, dropped = records
    assert kept["answer"] == "Two and two make four." and kept["tries"] == 2, kept
    assert dropped["rejected"] == ["loop", "loop", "loop"] and "answer" not in dropped, dropped

# ---- the run


def test_hold_out_prompts_and_validation_never_reach_the_teacher(tmp_path, oasst, stand_in):
    args = teacher_args(tmp_path, oasst, stand_in)
    asked = [p for c in teacher.training_conversations(args) if (p := teacher.next_prompt(c, {}))]
    questions = [p.turns[-1][1] for p in asked]
    assert asked and "What is three plus four?" not in questions, "the holdout question is never asked"
    assert len(asked) < 40, "the validation trees are left out as newgpt.py leaves them out"
    assert all(len(p.turns) == 1 and p.turns[0][0] == "user" for p in asked), "first turns, the user's alone"


def test_the_run_appends_chunks_and_resumes_after_a_kill_without_asking_twice(tmp_path, oasst, stand_in):
    out = tmp_path / "answers.jsonl.gz"
    assert teacher.run(teacher_args(tmp_path, oasst, stand_in, "--chats", "8"), log=lambda line: None) == 0
    first, intact = keys_of(out)
    assert intact and len(first) == 8 and len(set(first)) == 8, first
    blob = out.read_bytes()
    last_member = blob.rfind(b"\x1f\x8b\x08")  # the start of the last chunk's gzip member
    out.write_bytes(blob[:last_member + 20])  # a kill in the middle of writing that chunk
    damaged, intact = keys_of(out)
    assert not intact and len(damaged) == 4, "what came before the cut stands"
    assert teacher.run(teacher_args(tmp_path, oasst, stand_in, "--chats", "12"), log=lambda line: None) == 0
    resumed, intact = keys_of(out)
    assert intact and len(resumed) == len(set(resumed)) == 12, "the cut chunk is asked again, nothing twice"
    assert resumed[:4] == first[:4], "the answers that stood are kept as they were"


def test_follow_ups_are_asked_after_the_teachers_own_answers(tmp_path, oasst, stand_in, monkeypatch):
    monkeypatch.setattr(teacher, "why_rejected", lambda *args: None)  # the stand-in's noise counts as an answer
    args = teacher_args(tmp_path, oasst, stand_in, "--chats", "4", "--max_turns", "2")
    assert teacher.run(args, log=lambda line: None) == 0
    records, _ = data.read_teacher_records(tmp_path / "answers.jsonl.gz")
    assert sorted(r["turn"] for r in records) == [1] * 4 + [2] * 4, [r["turn"] for r in records]
    answers = {r["key"]: r["answer"] for r in records}
    for conversation in teacher.training_conversations(args):
        taught = data.as_taught(conversation, answers)
        roles = [t["role"] for t in taught["turns"]]
        assert roles == ["user", "assistant", "user", "assistant"], roles
        assert taught["turns"][1]["content"] != conversation["turns"][1]["content"], "the teacher's, not the human's"

# ---- the join of stored answers to rebuilt prompts


def answers_for(conversations, path, skip=()):
    """An answers file as teacher.py writes it, for the first turn of each conversation."""
    records = []
    for c in conversations:
        prompt = teacher.next_prompt(c, {})
        if prompt and c["group"] not in skip:
            records.append({"key": prompt.key, "record": data.record_name(c["group"]), "kind": "chat", "turn": 1,
                            "answer": f"The teacher says: {prompt.turns[-1][1]}", "tries": 1})
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    return path


def test_a_changed_source_record_drops_only_its_own_answer(tmp_path, oasst):
    cfg = newgpt.TrainConfig(data=[str(oasst)], holdout=[str(tmp_path / "holdout.jsonl")])
    answers = answers_for(data.build_texts(cfg)["train"], tmp_path / "answers.jsonl.gz")
    cfg.teacher = str(answers)
    taught = [c for c in data.build_texts(cfg)["train"] if c["source"] == str(answers)]
    assert len(taught) == len({c["group"] for c in taught}), "each chat once: the teacher's in place of the human's"
    assert taught and all(c["turns"][1]["content"].startswith("The teacher says:") for c in taught)
    rows = oasst_rows(40)
    changed = next(r for r in rows if r["message_id"] == "tree5-q")
    changed["text"] = "What is five plus nothing?"
    write_jsonl(oasst, rows)
    again = [c for c in data.build_texts(cfg)["train"] if c["source"] == str(answers)]
    assert {c["group"] for c in taught} - {c["group"] for c in again} == {"tree5"}, "only the changed record"
    assert len(again) == len(taught) - 1


def test_reading_answers_join_by_record_and_drop_when_their_record_changes(tmp_path, knowledge):
    index = retrieval.open_index(knowledge, log=None)
    prompts = teacher.reading_prompts(knowledge, [], seed=0, per_source=100, log=None)
    assert len(prompts) == len(COUNTRIES) and all(p.span for p in prompts)
    records = [{"key": p.key, "record": p.record, "kind": "reading", "turn": 1, "answer": f"Answer to {p.topic}",
                "tries": 1} for p in prompts]
    path = tmp_path / "answers.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    joined = retrieval.taught_reading_questions(knowledge, index, retrieval.taught_records(path))
    assert len(joined) == len(COUNTRIES)
    assert all([t["role"] for t in c["turns"]] == ["user", "context", "assistant"] for c in joined)
    rows = knowledge_rows()
    qa = next(r for r in rows if r.get("instruction") == "What is the capital of Zembla?")
    qa["instruction"] = "Which city is the capital of Zembla?"
    write_jsonl(knowledge / "facts.jsonl", rows)
    index = retrieval.open_index(knowledge, log=None)
    again = retrieval.taught_reading_questions(knowledge, index, retrieval.taught_records(path))
    assert len(again) == len(COUNTRIES) - 1 and all("Zembla" not in c["turns"][0]["content"] for c in again)


def test_training_with_teacher_answers_weights_them_as_a_source_of_their_own(tmp_path, oasst):
    from conftest import train_args, train_in_process
    cfg = newgpt.TrainConfig(data=[str(oasst)], holdout=[str(tmp_path / "holdout.jsonl")])
    answers = answers_for(data.build_texts(cfg)["train"], tmp_path / "answers.jsonl.gz")
    args = train_args(oasst, tmp_path / "ckpt", "--max_steps", "2", "--holdout", tmp_path / "holdout.jsonl",
                      "--teacher", f"{answers}:3")
    assert train_in_process(*args) == 0
    texts = json.loads((tmp_path / "texts.json").read_text())
    taught = [c for c in texts["train"] if c["source"] == str(answers)]
    human = [c for c in texts["train"] if c["source"] == str(oasst)]
    assert taught and all(c["turns"][1]["content"].startswith("The teacher says:") for c in taught)
    assert not {c["group"] for c in taught} & {c["group"] for c in human}, "a taught chat replaces the human one"
    assert texts["build"]["teacher"][0] == str(answers), "a changed answers file rebuilds the texts"


def test_reading_questions_take_the_teachers_answer_where_it_answered_and_the_records_elsewhere(tmp_path, knowledge):
    rows = knowledge_rows() + [{"instruction": "What is Zembla?", "response": "The word \"Zembla\" means a small "
                                "country; its capital is Ostrova, a city on a river, and the people grow apples and pears."}]
    write_jsonl(knowledge / "facts.jsonl", rows)
    prompts = [p for p in teacher.reading_prompts(knowledge, [], seed=0, per_source=100, log=None)
               if "Zembla" not in p.topic]
    records = [{"key": p.key, "record": p.record, "kind": "reading", "turn": 1, "answer": f"Taught: {p.topic}",
                "tries": 1} for p in prompts]
    path = tmp_path / "answers.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    texts = {"train": [], "val": []}

    def answers(reading_answers):
        conversations = retrieval.add_passages(texts, str(knowledge), [], seed=0, teacher=str(path),
                                               reading_answers=reading_answers, log=None)["train"]
        return {c["turns"][0]["content"]: c["turns"][-1]["content"] for c in conversations}
    both = answers("both")
    assert len(both) == len(COUNTRIES), f"each question once, the template's left out: {sorted(both)}"
    assert both["What is the capital of Zembla?"] == "The capital of Zembla is Ostrova.", "the record's own answer"
    assert sum(a.startswith("Taught:") for a in both.values()) == len(COUNTRIES) - 1
    assert set(answers("teacher")) == set(both) - {"What is the capital of Zembla?"}
    assert not any(a.startswith("Taught:") for a in answers("records").values())
