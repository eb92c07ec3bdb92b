"""retrieval.py and its uses: the index (built, cached, rebuilt), search, the passages block of the chat format,
training conversations that read, the chat's lookups, and --init_from growing an older vocabulary."""

import dataclasses
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import chat_with_model as chat
import engine
import newgpt
import retrieval
from conftest import (COUNTRIES, REPO, TINY_FLAGS, knowledge_rows, oasst_rows, train_in_process, write_checkpoint,
                      write_jsonl)


def holdout_file(path, questions):
    return write_jsonl(path, [{"question": q} for q in questions])


# ---- the index


def test_search_finds_the_passage_that_holds_the_answer(knowledge):
    index = retrieval.open_index(knowledge, log=None)
    passages = index.search("Which city is the capital of Genovia?", k=2)
    assert passages and any("Pyrus" in p.text for p in passages), f"no passage with the answer: {passages}"
    assert passages[0].title in ("Genovia", "What is the capital of Genovia?"), "the best passage comes first"
    assert index.search("the of and what", k=3) == [], "a query of function words alone finds nothing"


def test_user_text_never_becomes_fts_syntax(knowledge):
    index = retrieval.open_index(knowledge, log=None)
    for query, country in [('Zembla" OR *', "Zembla"), ("NEAR(Florin", "Florin"), ("capital AND Genovia", "Genovia"),
                           ("(Freedonia", "Freedonia"), ("^Latveria:", "Latveria"), ("Sokovia col:x", "Sokovia"),
                           ("'; DROP TABLE Zembla", "Zembla")]:
        passages = index.search(query, k=1)
        assert passages and country in passages[0].text, (query, passages)
    # The quoting itself: FTS5's operators given as terms are plain words (unquoted, each raises a syntax error).
    for term in ["AND", "OR", "NOT", "NEAR", "*", 'x"y', "col:x", "^x", "(x"]:
        match = retrieval.fts_match([term, "zembla"])
        assert index.db.execute("SELECT count(*) FROM passages WHERE passages MATCH ?", (match,)).fetchone()[0] > 0


def test_the_index_is_cached_reopened_rebuilt_when_the_source_changes_and_when_damaged(knowledge):
    lines = []
    first = retrieval.open_index(knowledge, log=lines.append)
    assert len(lines) == 1 and "indexed" in lines[0], lines
    assert not str(first.path).startswith(str(knowledge)), "the cache lives away from the (maybe read-only) source"
    retrieval.open_index(knowledge, log=lines.append)
    assert len(lines) == 1, "a second open reuses the cache"
    write_jsonl(knowledge / "facts.jsonl", knowledge_rows() + [{"text": "Ruritania\nIts capital is Strelsau."}])
    index = retrieval.open_index(knowledge, log=lines.append)
    assert "indexed" in lines[1] and index.path != first.path, "a changed source builds a new index"
    assert not first.path.exists(), "the index of the same folder's older files is deleted"
    assert any("Strelsau" in p.text for p in index.search("capital of Ruritania"))
    index.close()
    index.path.write_bytes(b"not a database at all" * 100)
    index = retrieval.open_index(knowledge, log=lines.append)
    assert "rebuilding" in lines[-2] and index.search("Ruritania"), "a damaged index is rebuilt"


def test_bench_questions_stay_out_of_the_index_but_the_documents_stay(knowledge, tmp_path):
    holdout = holdout_file(tmp_path / "bench.jsonl", ["What is the capital of Zembla?"])
    index = retrieval.open_index(knowledge, [holdout], log=None)
    titles = [p.title for p in index.search("capital of Zembla", k=10)]
    assert "What is the capital of Zembla?" not in titles, "a Q/A pair asking a bench question is not indexed"
    assert "Zembla" in titles, "the document that holds the fact is"


def test_a_missing_knowledge_path_is_a_one_line_error(tmp_path):
    with pytest.raises(newgpt.UserError, match="no such file or folder"):
        retrieval.open_index(str(tmp_path / "nowhere"), log=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(newgpt.UserError, match="no .jsonl"):
        retrieval.open_index(tmp_path / "empty", log=None)


def test_an_unwritable_cache_is_a_one_line_error(knowledge, tmp_path, monkeypatch):
    blocker = tmp_path / "a file, not a folder"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(newgpt.UserError, match="set XDG_CACHE_HOME"):
        retrieval.open_index(knowledge, log=None)


def war_and_popes(folder):
    """A corpus where BM25 over the rare words alone goes wrong: "world" and "war" are in every filler
    passage, so "When did World War II end?" looks up "ii" and "end", which the popes hold."""
    filler = [{"text": f"Filler {i}\nThe world saw war number {i} on a plain."} for i in range(80)]
    popes = [{"text": f"{name}\n{name} reigned until the end of his life, and the end came in year {year}."}
             for name, year in (("Pope Pius II", 1464), ("Apple II", 1993), ("Mieszko II", 1034))]
    war = [{"text": "World War II\nWorld War II was a global war that lasted from 1939 to 1945."}]
    write_jsonl(folder / "docs.jsonl", filler + popes + war)
    return folder


def test_the_second_stage_finds_the_passage_that_bm25_alone_ranks_below(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "k").mkdir()
    index = retrieval.open_index(war_and_popes(tmp_path / "k"), log=None)
    query = "When did World War II end?"
    first_stage = index.bm25(index.rare_words(retrieval.query_words(query)), 1, None)
    assert first_stage[0][0].title != "World War II", "the fixture no longer fools BM25 over the rare words"
    passages = index.search(query, k=3)
    assert passages[0].title == "World War II", [p.title for p in passages]
    assert index.search("What is 17 times 23?") == [], "arithmetic looks nothing up"


def bees_and_make(folder):
    """A corpus where the words mislead: the build tool "Make" holds both "bees" and "make"; honey holds one."""
    rows = [{"text": "Honey\nHoney is a sweet food made by bees from the nectar of flowers."},
            {"text": "Make (software)\nMake is a build tool for programs; its test suite is called bees, so make "
                     "bees runs the tests."}]
    write_jsonl(folder / "docs.jsonl", rows + [{"text": f"Filler {i}\nA plain note number {i} about a river."}
                                               for i in range(300)])
    return folder


def test_the_reranker_puts_first_the_passage_that_means_what_the_question_asks(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "k").mkdir()
    folder, lines = bees_and_make(tmp_path / "k"), []
    by_words = retrieval.open_index(folder, log=None).search("What do bees make?", k=2)
    assert [p.title for p in by_words] == ["Make (software)", "Honey"], "the fixture no longer fools BM25"
    reranked = retrieval.open_index(folder, log=lines.append, rerank=True)  # the index is built: one line
    assert [p.title for p in reranked.search("What do bees make?", k=2)] == ["Honey", "Make (software)"]
    assert lines == ["knowledge: reranked by all-MiniLM-L6-v2"]


def test_without_the_reranker_package_bm25_ranks_alone_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "k").mkdir()
    real_find_spec = retrieval.importlib.util.find_spec
    monkeypatch.setattr(retrieval.importlib.util, "find_spec",
                        lambda name: None if name == retrieval.RERANKER_PACKAGE else real_find_spec(name))
    lines = []
    index = retrieval.open_index(bees_and_make(tmp_path / "k"), log=lines.append, rerank=True)
    assert index.reranker is None and index.search("What do bees make?", k=1)[0].title == "Make (software)"
    assert "BM25 alone" in lines[-1] and "pip install" in lines[-1], lines


def test_a_document_and_a_title_are_shown_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "k"
    folder.mkdir()
    long_doc = " ".join(f"The inch is a unit of length, fact {i} of the inch." for i in range(30))
    write_jsonl(folder / "a.jsonl", [{"text": f"Inch\n{long_doc}"}])
    write_jsonl(folder / "b.jsonl", [{"text": "Inch (Unit of length)\nAn inch is 2.54 centimetres."},
                                     {"text": "Foot\nA foot is twelve inches."}])
    passages = retrieval.open_index(folder, log=None).search("How long is an inch?", k=3)
    keys = [retrieval.title_key(p.title) for p in passages]
    assert len(keys) == len(set(keys)) and keys.count("inch") == 1, [p.title for p in passages]


def build_in_a_process(folder, cache, *extra):
    code = ("import sys, retrieval; index = retrieval.open_index(sys.argv[1], log=print); "
            "print('passages', index.n_passages, index.path)")
    return subprocess.Popen([sys.executable, "-c", code, str(folder), *extra], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "XDG_CACHE_HOME": cache})


def big_corpus(folder, n=30000):
    folder.mkdir()
    write_jsonl(folder / "big.jsonl", [{"text": f"Topic {i}\nTopic {i} is about thing {i % 97}. It has {i} parts."}
                                       for i in range(n)])
    return folder


def test_two_processes_building_one_index_build_it_once(tmp_path):
    folder = big_corpus(tmp_path / "k", n=8000)
    cache = str(tmp_path / "cache")
    outputs = [p.communicate(timeout=120) for p in [build_in_a_process(folder, cache) for _ in range(2)]]
    built = sum("indexed" in out for out, _ in outputs)
    assert built == 1, f"one builds, the other waits and opens it: {outputs}"
    paths = {out.split()[-1] for out, _ in outputs}
    assert len(paths) == 1 and all("passages 8000" in out for out, _ in outputs), outputs


def test_two_paths_to_the_same_files_share_one_index(knowledge, tmp_path):
    link = tmp_path / "another name"
    link.symlink_to(knowledge)
    lines = []
    first = retrieval.open_index(knowledge, log=lines.append)
    second = retrieval.open_index(str(link) + "/", log=lines.append)
    copy = tmp_path / "a copy"
    copy.mkdir()
    (copy / "facts.jsonl").write_bytes((knowledge / "facts.jsonl").read_bytes())
    os.utime(copy / "facts.jsonl", ns=(os.stat(knowledge / "facts.jsonl").st_mtime_ns,) * 2)
    third = retrieval.open_index(copy, log=lines.append)
    assert first.path == second.path == third.path and len(lines) == 1, lines


def test_a_build_killed_midway_leaves_the_old_index_usable(tmp_path):
    folder = big_corpus(tmp_path / "k")
    cache = tmp_path / "cache"
    old = build_in_a_process(folder, str(cache))
    out, err = old.communicate(timeout=180)
    old_path = Path(out.split()[-1])
    write_jsonl(folder / "more.jsonl", [{"text": "Ruritania\nIts capital is Strelsau."}])
    killed = build_in_a_process(folder, str(cache))
    for _ in range(600):  # until its temp file is being written
        if list((cache / "tinygpt").glob(".*tmp")):
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert old_path.exists() and retrieval.KnowledgeIndex(old_path).search("Topic 12 parts"), "the old index works"
    os.remove(folder / "more.jsonl")
    os.utime(folder / "big.jsonl")  # the same content, touched: a source that changed
    rebuilt = build_in_a_process(folder, str(cache))
    out, err = rebuilt.communicate(timeout=180)
    assert rebuilt.returncode == 0 and "indexed" in out, err
    assert not list((cache / "tinygpt").glob(".*tmp")), "the killed build's temp file is removed"


def test_a_hub_dataset_with_a_config_is_streamed_in_its_own_schema(tmp_path, monkeypatch):
    """The README's route for a user without our files: a Wikipedia dump on the hub, by id and config. Its
    records ({"id", "url", "title", "text"}) come from a local file here, through datasets' own call."""
    import datasets
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = write_jsonl(tmp_path / "wiki.jsonl", [
        {"id": "1", "url": "https://simple.wikipedia.org/wiki/Zembla", "title": "Zembla",
         "text": "Zembla is a small country in the north. Its capital is Ostrova."},
        {"id": "2", "url": "https://simple.wikipedia.org/wiki/Florin", "title": "Florin",
         "text": "Florin is a country by the sea. Its capital is Guilder Town."}])
    calls = []

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return iter(json.loads(line) for line in local.read_text().splitlines())

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    index = retrieval.open_index("wikimedia/wikipedia:20231101.simple", log=None)
    assert calls == [("wikimedia/wikipedia", "20231101.simple", "train", True)], calls
    passages = index.search("What is the capital of Zembla?", k=1)
    assert passages[0].title == "Zembla" and "Ostrova" in passages[0].text, passages


def test_a_model_trained_without_passages_is_refused_with_knowledge(trained_run, knowledge, capsys):
    assert chat.main(["--ckpt", str(trained_run), "--knowledge", str(knowledge), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "not trained to read passages" in err and len(err.strip().splitlines()) == 1, err


def test_passages_are_cut_on_sentence_ends():
    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    pieces = retrieval.cut_passages(text, size=100)
    assert all(len(p) <= 100 and p.endswith(".") for p in pieces), pieces
    assert " ".join(pieces) == text, "no words are lost or repeated"


def test_a_follow_up_borrows_the_words_of_the_turns_before():
    query = retrieval.conversation_query(["Tell me about Zembla.", "What is its capital?", "And the river there?"])
    assert "Zembla" in query and "capital" in query and "river" in query, query
    assert retrieval.conversation_query(["Who painted the Mona Lisa?", "What is the capital of Norway?"]) == \
        "What is the capital of Norway?", "a question that names its subject stands alone"
    assert "Norway" in retrieval.conversation_query(["What is the capital of Norway?", "Tell me more."])

# ---- training to read


def test_reading_questions_hold_their_answer_and_never_their_own_record(knowledge):
    index = retrieval.open_index(knowledge, log=None)
    source = knowledge / "facts.jsonl"
    conversations = retrieval.reading_questions(source, index, [], random.Random(0), n=100)
    assert len(conversations) == len(COUNTRIES), "every Q/A pair's answer stands in its country's document"
    for c in conversations:
        user, context, answer = c["turns"]
        assert [user["role"], context["role"], answer["role"]] == ["user", "context", "assistant"]
        assert answer["content"].split()[-1].rstrip(".") in context["content"], "the passages hold the answer"
        assert user["content"] not in context["content"], "leave-one-out: the pair is not retrieved for itself"


def test_chats_get_passages_after_their_first_user_turn_or_none(knowledge):
    index = retrieval.open_index(knowledge, log=None)
    conversation = {"turns": [{"role": "user", "content": "Tell me about Florin."},
                              {"role": "assistant", "content": "Florin is a country."}], "group": "g"}
    rng = random.Random(0)
    results = [retrieval.with_passages(conversation, index, rng) for _ in range(200)]
    with_context = [r for r in results if len(r["turns"]) == 3]
    assert [t["role"] for t in with_context[0]["turns"]] == ["user", "context", "assistant"]
    assert "Guilder Town" in with_context[0]["turns"][1]["content"]
    share_without = 1 - len(with_context) / len(results)
    assert abs(share_without - retrieval.NO_PASSAGES_SHARE) < 0.08, f"{share_without:.2f} left without passages"


def test_passages_are_never_targets_even_with_the_loss_on_every_token(tokenizer):
    conversation = {"turns": [{"role": "user", "content": "one plus two"}, {"role": "context", "content": "two is 2"},
                              {"role": "assistant", "content": "three"}]}
    ((ids, mask),) = newgpt.render_conversations(tokenizer, [conversation])
    start = ids.index(tokenizer.token_to_id("<|context|>"))
    end = ids.index(tokenizer.token_to_id("<|end|>"), start)
    assert set(mask[start:end + 1]) == {newgpt.PASSAGE} and newgpt.PASSAGE not in mask[:start] + mask[end + 1:]
    ids, mask = np.array(ids * 3), np.array(mask * 3, dtype=np.uint8)
    rows = newgpt.PackedRows(ids, mask, block_size=len(ids) - 1)
    for loss_on in ("all", "assistant"):
        _, y = rows.get([0], loss_on=loss_on)
        targeted = (y[0] != newgpt.IGNORE_INDEX).numpy()
        assert not targeted[mask[1:] == newgpt.PASSAGE].any(), f"a passage token is a target under {loss_on}"

# ---- the chat


def tiny_knowledge_run(tmp, knowledge, *extra, weight=""):
    data = write_jsonl(tmp / "oasst.jsonl", oasst_rows(60))
    chats = write_jsonl(tmp / "chats.jsonl", [{"instruction": f"Tell me about {country}.", "response": "A country."}
                                              for country in COUNTRIES])
    flags = [f if f != "32" or TINY_FLAGS[i - 1] != "--block_size" else "256" for i, f in enumerate(TINY_FLAGS)]
    status = train_in_process("--data", data, chats, "--knowledge", f"{knowledge}{weight}", "--texts", tmp / "texts.json",
                              "--out_dir", tmp / "ckpt", *flags, "--max_steps", "2", *extra)
    assert status == 0, "the tiny training run with --knowledge failed"
    return tmp / "ckpt"


def test_training_with_knowledge_puts_passages_in_the_texts(knowledge, tmp_path):
    tiny_knowledge_run(tmp_path, knowledge, weight=":3")
    texts = json.loads((tmp_path / "texts.json").read_text())
    assert texts["build"]["knowledge"] == str(knowledge), "the weight is not part of the path"
    reading = [c for c in texts["train"] if c["source"].startswith("reading:")]
    chats = [c for c in texts["train"] if not c["source"].startswith("reading:")]
    assert len(reading) == len(COUNTRIES), "the Q/A pairs become reading questions"
    assert any(t["role"] == "context" for c in chats for t in c["turns"]), "chats get passages"
    shown = [t["content"].count("\n\n[") + 1 for c in texts["train"] for t in c["turns"] if t["role"] == "context"]
    assert max(shown) == retrieval.passages_for(32), "as many passages as the chat shows in this window"
    assert not any(t["role"] == "context" for c in texts["val"] for t in c["turns"]), "validation stays as it was"


def test_the_chat_looks_up_each_turn_and_names_its_sources(knowledge, tmp_path):
    ckpt = tiny_knowledge_run(tmp_path, knowledge)
    model, tokenizer, _ = newgpt.load_checkpoint(ckpt)
    sampling = engine.SamplingConfig(max_new_tokens=8, dry_multiplier=0.0)
    index = retrieval.open_index(knowledge, log=None)
    conversation = chat.Chat(engine.Engine(model, tokenizer, "cpu", "float32", index), sampling)
    turn = conversation.add_user_turn("What is the capital of Sokovia?")
    prompt = turn.prompt.ids
    context_id = tokenizer.token_to_id("<|context|>")
    assert prompt.count(context_id) == 1 and prompt.index(context_id) > prompt.index(tokenizer.token_to_id("<|user|>"))
    assert any("Novi Grad" in p.text for p in conversation.passages)
    assert turn.steer, "a passage holds the question's words: context-aware decoding applies"
    "".join(conversation.stream_reply(turn))
    out = io.StringIO()
    chat.handle_command(conversation, "/sources", out)
    assert "Novi Grad" in out.getvalue()
    chat.handle_command(conversation, "/retrieval off", out)
    prompt = conversation.add_user_turn("And of Zembla?").prompt.ids
    assert context_id not in prompt and conversation.passages == [], "retrieval switched off looks nothing up"
    assert context_id not in conversation.engine.render("", conversation.history), "old passages leave the history"


def test_passages_give_way_before_the_question_when_the_window_is_tight(knowledge, tmp_path):
    ckpt = tiny_knowledge_run(tmp_path, knowledge)
    model, tokenizer, _ = newgpt.load_checkpoint(ckpt)
    sampling = engine.SamplingConfig(max_new_tokens=model.config.block_size - 60)
    index = retrieval.open_index(knowledge, log=None)
    conversation = chat.Chat(engine.Engine(model, tokenizer, "cpu", "float32", index), sampling)
    question = "What is the capital of Freedonia, and what do its people grow?"
    turn = conversation.add_user_turn(question)
    assert len(turn.prompt.ids) <= model.config.block_size // 2 and turn.notice == ""
    assert len(conversation.passages) < retrieval.passages_for(model.config.block_size), "the weakest passages were dropped"
    assert conversation.history[-1] == ("user", question), "the question itself is whole"


def test_copying_from_passages_is_not_penalised_as_repetition():
    """DRY sees the answer continue a sequence of the passages; with the span marked as passages it must not."""
    torch.manual_seed(0)
    model = newgpt.GPT(newgpt.GPTConfig(vocab_size=64, block_size=64, n_layer=1, n_head=1, n_embd=16)).eval()
    passage = [5, 6, 7, 8, 9, 10]
    prompt = [1, 2] + passage + [3, 5, 6, 7, 8]  # the answer has begun to copy the passage
    config = engine.SamplingConfig(temperature=0.0, max_new_tokens=1, repetition_penalty=1.0, dry_multiplier=50.0)
    bias = {9: 100.0}  # the model "wants" to continue the copy
    penalised = [t for t, _ in engine.generate(model, engine.Prompt(prompt, logit_bias=bias), config)]
    copied = [t for t, _ in engine.generate(model, engine.Prompt(prompt, (2, 8), logit_bias=bias), config)]
    assert penalised != [9] and copied == [9], (penalised, copied)


def test_context_aware_decoding_weighs_the_passages_against_the_same_turn_without_them():
    torch.manual_seed(0)
    model = newgpt.GPT(newgpt.GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    for weight in model.parameters():  # the zero-initialised projections would leave attention out
        torch.nn.init.normal_(weight, std=0.3)
    plain = engine.SamplingConfig(temperature=0.0, repetition_penalty=1.0, dry_multiplier=0.0, max_new_tokens=1)
    for seed in range(100):  # a prompt whose steered choice differs from the plain one
        prompt = torch.randint(1, 64, (9,), generator=torch.Generator().manual_seed(seed)).tolist()
        with torch.no_grad():
            read = model(torch.tensor([prompt]))[0][0, -1]
            unread = model(torch.tensor([prompt[:2] + prompt[6:]]))[0][0, -1]
        if int((3 * read - 2 * unread).argmax()) != int(read.argmax()):
            break
    else:
        pytest.fail("no prompt where the passages change the choice")
    steered = dataclasses.replace(plain, context_weight=2.0)
    expected = int((3 * read - 2 * unread).argmax())
    with_passages, without = engine.Prompt(prompt, (2, 6)), engine.Prompt(prompt)
    assert [t for t, _ in engine.generate(model, with_passages, steered)] == [expected]
    off = dataclasses.replace(plain, context_weight=0.0)
    assert [t for t, _ in engine.generate(model, with_passages, off)] == [int(read.argmax())]
    assert [t for t, _ in engine.generate(model, without, steered)] == [int(read.argmax())], "no passages, no steering"
    longer = dataclasses.replace(steered, max_new_tokens=20, temperature=1.0)  # past the window: both slide
    runs = [[t for t, _ in engine.generate(model, with_passages, longer, torch.Generator().manual_seed(1), cache)]
            for cache in (True, False)]
    assert runs[0] == runs[1], "the cached and uncached windows read the same tokens"


def test_the_passages_steer_only_an_answer_they_are_about(knowledge):
    index = retrieval.open_index(knowledge, log=None)
    question = "What is the capital of Zembla?"
    assert index.is_about(index.search(question, 3), question)
    chit_chat = "Which songs do people sing at parties in Ostrova?"  # the passages name Ostrova, and nothing else
    assert index.search(chit_chat, 3) and not index.is_about(index.search(chit_chat, 3), chit_chat)
    assert not index.is_about([], question)
    passage = retrieval.Passage("Genovia", "Its capital is Pyrus.", "facts.jsonl", "facts.jsonl:2")
    question = "The capital and the people of Genovia?"
    assert not index.is_about([passage], question), "where no word is rare, the passage must hold every one"
    wider = retrieval.KnowledgeIndex(index.path, common_fraction=0.3)  # "people": in 6 of the 12 passages
    assert wider.is_about([passage], question), "a common word the passage lacks does not count against it"


def test_prompt_with_knowledge_keeps_stdout_for_the_answer(knowledge, tmp_path):
    ckpt = tiny_knowledge_run(tmp_path, knowledge)
    result = subprocess.run([sys.executable, str(REPO / "chat_with_model.py"), "--ckpt", ckpt, "--knowledge",
                             knowledge, "--prompt", "What is the capital of Latveria?", "--max_new_tokens", "5"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "sources: [1]" in result.stderr and "sources" not in result.stdout
    assert result.stdout.strip() and len(result.stdout.strip().splitlines()) <= 5


def test_knowledge_needs_a_model_that_reads(knowledge, tmp_path, capsys):
    old = old_tokenizer()
    write_checkpoint(newgpt.GPT(newgpt.GPTConfig(vocab_size=old.get_vocab_size(), block_size=32, n_layer=1,
                                                 n_head=1, n_embd=16)), old, tmp_path / "old")
    assert chat.main(["--ckpt", str(tmp_path / "old"), "--knowledge", str(knowledge), "--prompt", "hi"]) == 2
    assert "not trained to read passages" in capsys.readouterr().err

# ---- fine-tuning an older model


def old_tokenizer():
    """A tokenizer from before the context turn: the chat's special tokens less <|context|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [t for t in newgpt.SPECIAL_TOKENS if t != "<|context|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["one plus two is three"] * 10, trainer=trainer)
    return tokenizer


def test_init_from_grows_an_older_vocabulary_and_keeps_the_weights(knowledge, tmp_path):
    old = old_tokenizer()
    torch.manual_seed(0)
    config = newgpt.GPTConfig(vocab_size=old.get_vocab_size(), block_size=64, n_layer=2, n_head=2, n_embd=32)
    start = newgpt.GPT(config)
    write_checkpoint(start, old, tmp_path / "old")
    data = write_jsonl(tmp_path / "oasst.jsonl", oasst_rows(60))
    status = train_in_process("--init_from", tmp_path / "old", "--knowledge", knowledge, "--data", data,
                              "--texts", tmp_path / "texts.json", "--out_dir", tmp_path / "tuned", "--max_steps", "1",
                              "--lr", "1e-12", "--min_lr", "0", "--batch_size", "2", "--eval_tokens", "64",
                              "--dtype", "float32", "--no-compile")
    assert status == 0
    model, tokenizer, _ = newgpt.load_checkpoint(tmp_path / "tuned")
    assert tokenizer.get_vocab_size() == old.get_vocab_size() + 1 and tokenizer.token_to_id("<|context|>") is not None
    assert model.config.n_embd == 32 and model.config.block_size == 64, "the architecture is the checkpoint's"
    before, after = start.state_dict(), model.state_dict()
    for name, weight in before.items():
        assert torch.allclose(after[name][:len(weight)], weight, atol=1e-6), f"{name} did not start from the checkpoint"
    assert train_in_process("--resume", "--out_dir", tmp_path / "tuned", "--max_steps", "2") == 0, \
        "a fine-tune resumes with its grown tokenizer"
    assert newgpt.load_checkpoint(tmp_path / "tuned")[2]["step"] == 2


def test_a_binary_file_fails_in_one_line_before_any_progress_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    binary = tmp_path / "photo.jsonl"
    binary.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(newgpt.UserError, match="cannot read"):
        retrieval.open_index(binary, log=lambda line: None)
    assert "indexing" not in capsys.readouterr().err, "no progress bar for a build that cannot start"
