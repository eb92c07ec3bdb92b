"""
Retrieval: the chat looks things up before it answers. A 5M-parameter model cannot store facts, but it can
copy them from passages placed in its context (RETRO, Borgeaud et al. 2021; Atlas, Izacard et al. 2022).

    python chat_with_model.py --knowledge ../shared/data/knowledge      # index built on first use, cached
    python newgpt.py --data ... --knowledge ../shared/data/knowledge    # train the model to read passages

The index is SQLite's FTS5 full-text index (in Python's own sqlite3) over the knowledge sources cut into
passages of about PASSAGE_CHARS characters, ranked by BM25 with Porter stemming. It is cached under
~/.cache/tinygpt (or $XDG_CACHE_HOME/tinygpt), away from the sources, and rebuilt when a file changes (a
dataset id, streamed, is indexed once).

Everything outside this file calls one method, KnowledgeIndex.search(query, k) -> [Passage]. A corpus
that outgrows one machine would swap that method's body for a query to a search server (Elasticsearch or
OpenSearch, also BM25); nothing else changes.

The passages reach the model as a context turn of the chat format (newgpt.py): <|context|> [1] title
\\n text \\n\\n [2] ... <|end|>, right after the user turn they answer, with no loss on them.
"""

import contextlib
import hashlib
import json
import os
import random
import re
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from data import (asks_a_holdout_question, is_streamed, make_conversation, prompt_key, question_words,
                  read_holdout, read_records, read_teacher_records, record_name, stream_records)
from runtime import UserError, remove_stale_temp_files, temp_path

# Three passages of about 250 characters: as many bench answers as three of 400, in 30 fewer tokens of the
# 512-token window, which the conversation needs too (bench/RESULTS.md, "Retrieval").
PASSAGE_CHARS = 250
PASSAGES_PER_ANSWER = 3
COMMON_FRACTION = 0.02  # query words in more passages than this are dropped (bench/RESULTS.md, "Retrieval")
MAX_QUERY_WORDS = 8  # and only the rarest of the rest are looked up
INDEX_FORMAT = "tinygpt-fts5-v2"
SOURCE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")

# -----------------------------------------------------------------------------
# Knowledge records -> passages


@dataclass(frozen=True)
class Passage:
    title: str
    text: str
    source: str  # the file (or dataset id) the passage came from
    doc: str  # source:record number; a training question is never answered from its own record


def source_files(spec):
    """The files of a knowledge path (a file, or a folder's files in name order), or [spec] for a dataset id."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(SOURCE_SUFFIXES))
        if not files:
            raise UserError(f"--knowledge {spec}: no .jsonl(.gz), .json or .parquet files in that folder")
        return files
    if is_streamed(spec):
        return [spec]
    raise UserError(f"--knowledge {spec}: no such file or folder (or Hugging Face dataset id)")


def records_of(source):
    return stream_records(source) if isinstance(source, str) else read_records(source)


def split_sentences(text):
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def cut_passages(text, size=PASSAGE_CHARS):
    """Whole sentences, packed greedily up to about size characters (a longer sentence stands alone, cut)."""
    pieces, current = [], ""
    for sentence in split_sentences(text):
        if current and len(current) + 1 + len(sentence) > size:
            pieces.append(current)
            current = ""
        current = f"{current} {sentence}".strip()
    if current:
        pieces.append(current)
    return [p[:2 * size] for p in pieces]


def record_id(source, number):
    """A record's name in the index: its file's name (not the path that reached it) and its line number."""
    return f"{Path(str(source)).name}:{number}"


def record_passages(record, source, number, size=PASSAGE_CHARS):
    """A document {"text"} -> its passages under its title (a short first line); a Q/A pair {"instruction",
    "response"} -> one passage titled by its question; a record with a "context" adds that context."""
    doc = record_id(source, number)
    if not isinstance(record, dict):
        return []
    if "instruction" in record and "response" in record:
        context = (record.get("context") or "").strip()
        passages = [Passage(record["instruction"].strip(), (record["response"] or "").strip(), source, doc)]
        return passages + [Passage("", text, source, doc) for text in cut_passages(context, size)]
    text = (record.get("text") or "").strip()
    title, _, body = text.partition("\n")
    if not body.strip() or len(title) > 100:
        title, body = "", text
    return [Passage(title.strip(), piece, source, doc) for piece in cut_passages(body, size)]


def asks_holdout(record, holdout):
    question = record.get("instruction") if isinstance(record, dict) else None
    return bool(question) and asks_a_holdout_question(make_conversation([("user", question)], ""), holdout)

# -----------------------------------------------------------------------------
# The index: built once per set of sources, cached, reopened in milliseconds


def cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinygpt"


def fingerprint(files, holdout_files, passage_chars):
    """What the index depends on: each source's path, size and modification time (a changed source
    rebuilds), the holdout questions it keeps out, and the passage length."""
    def stat(f):
        return [str(Path(f).resolve()), os.path.getsize(f), os.path.getmtime(f)] if Path(f).is_file() else [str(f)]
    parts = {"format": INDEX_FORMAT, "passage_chars": passage_chars, "sources": [stat(f) for f in files],
             "holdout": [stat(f) for f in holdout_files]}
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def query_words(text):
    """The words of a question that make it this question (no function words), in a stable order."""
    return sorted(question_words(text))


def fts_match(words):
    """OR-ed terms: BM25 ranks passages by how many they hold and how rare each is. Quoting makes every word
    a plain term, so user text never becomes FTS5 syntax."""
    return " OR ".join(f'"{w}"' for w in words)


class KnowledgeIndex:
    """An FTS5 index of passages: search(query, k) for the chat, and is_about(passages, query) for its
    decoding. Only search and count read the database: a BM25 server (Elasticsearch, OpenSearch) would
    replace those two."""

    def __init__(self, path, common_fraction=COMMON_FRACTION, max_words=MAX_QUERY_WORDS):
        self.path, self.common_fraction, self.max_words = Path(path), common_fraction, max_words
        self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        self.n_passages = self.db.execute("SELECT value FROM meta WHERE key = 'passages'").fetchone()[0]
        self.counts = {}  # word -> how many passages hold it

    def search(self, query, k=PASSAGES_PER_ANSWER, exclude_doc=None):
        """The k best passages for a query, best first (none for a query without content words).
        exclude_doc leaves one record's own passages out (training's leave-one-out)."""
        words = self.rare_words(query_words(query))
        if not words or k <= 0:
            return []
        # Ranked through FTS5's rank column, not ORDER BY bm25(...): the same passages in half the time.
        rows = self.db.execute(
            "SELECT title, text, source, doc FROM passages WHERE passages MATCH ? AND rank MATCH 'bm25(2.0, 1.0)' "
            "AND doc IS NOT ? ORDER BY rank LIMIT ?", (fts_match(words), exclude_doc, k)).fetchall()
        return [Passage(*row) for row in rows]

    def rare_words(self, words):
        """The max_words rarest words, none found in more than common_fraction of the passages ("known",
        "first", "world"): BM25 gives common words little weight, but scoring the passages that hold them is
        most of a query's time, and a long message would OR together dozens of words."""
        rarest = sorted((w for w in words if self.count(w)), key=self.count)  # in no passage: no use
        rare = [w for w in rarest if not self.is_common(w)][:self.max_words]
        return rare or rarest[:1]

    def count(self, word):
        """How many passages hold the word."""
        if word not in self.counts:
            self.counts[word] = self.db.execute("SELECT count(*) FROM passages WHERE passages MATCH ?",
                                                (fts_match([word]),)).fetchone()[0]
        return self.counts[word]

    def is_common(self, word):
        return self.count(word) > self.common_fraction * self.n_passages

    def is_about(self, passages, query):
        """Whether one passage holds every word of the query but the common ones ("used", "people"). Only
        then does the chat let the passages outweigh what the model believes (context-aware decoding): a
        chat turn that merely shares a word or two with them would otherwise be steered off its topic."""
        words = set(query_words(query))
        words = {w for w in words if not self.is_common(w)} or words  # a small corpus: every word is common
        return bool(words) and any(words <= question_words(f"{p.title} {p.text}") for p in passages)

    def close(self):
        self.db.close()


def write_index(path, files, holdout, passage_chars, key, log):
    """Read every record, cut passages, and write them into a new FTS5 database at path."""
    from tqdm import tqdm
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
    # Porter stemming: "painted" finds "painting"; unicode61 folds case and diacritics.
    db.execute("CREATE VIRTUAL TABLE passages USING fts5(title, text, source UNINDEXED, doc UNINDEXED, "
               "tokenize = 'porter unicode61 remove_diacritics 2')")
    n_passages, n_held_out = 0, 0
    with tqdm(total=len(files), unit="file", desc="indexing", disable=log is None) as bar:
        for source in files:
            rows = []
            for number, record in enumerate(records_of(source)):
                if asks_holdout(record, holdout):
                    n_held_out += 1
                    continue
                passages = record_passages(record, str(source), number, passage_chars)
                rows += [(p.title, p.text, p.source, p.doc) for p in passages]
                if len(rows) >= 10_000:  # in batches: a streamed dataset may not fit in memory
                    db.executemany("INSERT INTO passages VALUES (?, ?, ?, ?)", rows)
                    n_passages, rows = n_passages + len(rows), []
            db.executemany("INSERT INTO passages VALUES (?, ?, ?, ?)", rows)
            n_passages += len(rows)
            bar.update(1)
    db.execute("INSERT INTO passages(passages) VALUES ('optimize')")
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("fingerprint", key), ("passages", n_passages),
                                                      ("held_out", n_held_out)])
    db.commit()
    db.close()
    return n_passages, n_held_out


def is_usable_index(path, key):
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
            db.execute("SELECT count(*) FROM passages WHERE passages MATCH '\"a\"'").fetchone()
        return stored.get("fingerprint") == key
    except sqlite3.DatabaseError:
        return False


def open_index(spec, holdout_files=(), passage_chars=PASSAGE_CHARS, log=print):
    """The index for a knowledge path or dataset id, built on first use (a progress bar, then one line) and
    reopened from the cache later. A stale or damaged cache file is rebuilt; log=None builds silently."""
    files = source_files(spec)
    key = fingerprint(files, holdout_files, passage_chars)
    name = hashlib.sha256(f"{Path(spec).resolve()}:{passage_chars}".encode()).hexdigest()[:16]
    path = cache_dir() / f"knowledge-{name}.sqlite"
    if not is_usable_index(path, key):
        if path.exists() and log:
            log(f"knowledge: the index {path} is stale or damaged; rebuilding it")
        started = time.time()
        remove_stale_temp_files(path.parent, of=path.name)  # an earlier build that was killed: 100s of MB
        tmp = temp_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            n_passages, n_held_out = write_index(tmp, files, read_holdout(holdout_files), passage_chars, key, log)
            os.replace(tmp, path)
        except (sqlite3.Error, OSError) as e:
            raise UserError(f"could not write the knowledge index {path} ({e}); set XDG_CACHE_HOME to a "
                            f"writable folder")
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if log:
            log(f"knowledge: indexed {n_passages:,} passages from {len(files)} sources in "
                f"{time.time() - started:.0f}s ({path.stat().st_size / 2**20:.0f} MB, {path}); "
                f"{n_held_out} Q/A pairs asking a bench question left out")
    return KnowledgeIndex(path)

# -----------------------------------------------------------------------------
# What the model sees


def format_passages(passages):
    """The content of a context turn: numbered passages, each under its title."""
    return "\n\n".join(f"[{i}] {p.title}\n{p.text}" if p.title else f"[{i}] {p.text}"
                       for i, p in enumerate(passages, start=1))


REFERRING_WORDS = frozenset("it its he him his she her they them their there that this those these".split())


def is_follow_up(turn):
    """A turn that leans on the one before: it refers back ("and its population?") or names almost nothing
    ("tell me more")."""
    words = set(re.findall(r"[a-z]+", turn.lower()))
    return bool(words & REFERRING_WORDS) or len(question_words(turn)) < 2


def conversation_query(user_turns):
    """What to look up for the newest user turn: the turn alone, or for a follow-up, with the turns before it
    back to the last that stands on its own."""
    query = user_turns[-1]
    for earlier in reversed(user_turns[:-1]):
        if not is_follow_up(query.split("\n")[0]):
            break
        query = f"{earlier}\n{query}"
    return query

# -----------------------------------------------------------------------------
# Training the model to read: conversations whose context holds passages from the same retriever

NO_PASSAGES_SHARE = 0.2  # chats left without passages, so that the model still answers without --knowledge
READING_QUESTIONS_PER_SOURCE = 5000  # Q/A pairs per knowledge file whose answer the passages hold


def answer_in(passages, question, answer):
    """Whether the passages hold the answer: 80% of the answer's own words (those not already in the
    question) occur in them."""
    words = question_words(answer) - question_words(question)
    return bool(words) and len(words & question_words(format_passages(passages))) >= 0.8 * len(words)


def with_passages(conversation, index, rng, k=PASSAGES_PER_ANSWER):
    """A chat conversation with passages looked up for its first user turn, which may or may not help the
    answer. Left as it is: a conversation that has its own context, and NO_PASSAGES_SHARE of the rest. Its own
    record is never retrieved for itself (leave-one-out, as RETRO filters a chunk's own document)."""
    turns = conversation["turns"]
    roles = [t["role"] for t in turns]
    if "context" in roles or "user" not in roles or rng.random() < NO_PASSAGES_SHARE:
        return conversation
    first = roles.index("user")
    passages = index.search(turns[first]["content"], k, exclude_doc=record_name(conversation.get("group", "")))
    if not passages:
        return conversation
    context = {"role": "context", "content": format_passages(passages)}
    return conversation | {"turns": turns[:first + 1] + [context] + turns[first + 1:]}


def reading_questions(source, index, holdout, rng, n, k=PASSAGES_PER_ANSWER):
    """Up to n Q/A pairs of one local knowledge file, each with passages retrieved from the other records
    that hold its answer: the model learns to answer from what it reads."""
    records = [(number, r) for number, r in enumerate(read_records(Path(source))) if isinstance(r, dict)
               and r.get("instruction") and r.get("response") and not asks_holdout(r, holdout)]
    rng.shuffle(records)
    conversations = []
    for number, record in records[:3 * n]:  # about half hold their answer; the cap bounds the searching
        question, answer, doc = record["instruction"], record["response"], record_id(source, number)
        passages = index.search(question, k, exclude_doc=doc)
        if answer_in(passages, question, answer):
            conversations.append(reading_conversation(question, passages, answer, doc))
            if len(conversations) == n:
                break
    return conversations


def reading_conversation(question, passages, answer, doc):
    turns = [("user", question), ("context", format_passages(passages)), ("assistant", answer)]
    return make_conversation(turns, doc) | {"source": f"reading:{doc.rpartition(':')[0]}"}


def taught_reading_questions(knowledge, index, path, k=PASSAGES_PER_ANSWER):
    """The reading questions the teacher answered (teacher.py), each rebuilt from its record with passages
    retrieved again: one whose record or passages changed since no longer matches its key, and is left out."""
    wanted = defaultdict(dict)  # file name -> {record number: teacher record}
    for r in read_teacher_records(path)[0]:
        if r.get("kind") == "reading" and "answer" in r:
            name, _, number = r["record"].rpartition(":")
            wanted[name][int(number)] = r
    conversations = []
    for source in (f for f in source_files(knowledge) if not isinstance(f, str) and f.name in wanted):
        for number, record in enumerate(read_records(source)):
            taught = wanted[source.name].get(number)
            if taught is None or not isinstance(record, dict) or not record.get("instruction"):
                continue
            doc = record_id(source, number)
            passages = index.search(record["instruction"], k, exclude_doc=doc)
            conversation = reading_conversation(record["instruction"], passages, taught["answer"], doc)
            if prompt_key([(t["role"], t["content"]) for t in conversation["turns"][:2]]) == taught["key"]:
                conversations.append(conversation)
    return conversations


def add_passages(texts, knowledge, holdout_files, seed, teacher="", log=print):
    """train_texts.json's training conversations, taught to read: chats get passages (or none), and Q/A pairs
    of the knowledge sources come with the passages that answer them, answered by the record's own response
    or, given the teacher's answers, by the teacher (only those it answered: the records' own answers carry
    WordNet's "The word X means" into chat). Validation stays as it was."""
    from tqdm import tqdm
    index, holdout = open_index(knowledge, holdout_files, log=log), read_holdout(holdout_files)
    rng = random.Random(seed)
    started = time.time()
    chats = tqdm(texts["train"], desc="passages for chats", unit="chat", disable=log is None, mininterval=2)
    train = [with_passages(c, index, rng) for c in chats]
    if teacher:
        reading = taught_reading_questions(knowledge, index, teacher)
    else:
        files = tqdm([f for f in source_files(knowledge) if not isinstance(f, str)], desc="reading questions",
                     unit="file", disable=log is None)
        reading = [c for source in files
                   for c in reading_questions(source, index, holdout, rng, READING_QUESTIONS_PER_SOURCE)]
    if log:
        n_with = sum(any(t["role"] == "context" for t in c["turns"]) for c in train)
        log(f"knowledge: passages for {n_with:,} of {len(train):,} chats, {len(reading):,} reading questions "
            f"({time.time() - started:.0f}s)")
    return texts | {"train": train + reading}
