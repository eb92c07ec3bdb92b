"""
The data plumbing of newgpt.py: every source format becomes one conversation type, and the conversations
become train_texts.json, then token ids in newgpt.py's chat format. A learner can skip this file at first:
newgpt.py calls one function, prepare_tokens(), which returns the texts, the tokenizer and the token streams.

    formats (OASST message tables and trees, Llama-2 [INST] chat, "### Human:" chat, Dolly instructions,
    plain documents; .jsonl(.gz), .json, .parquet, or a Hugging Face dataset id)
      -> conversations {"turns": [{"role": "system"|"user"|"context"|"assistant"|"text", "content": str}],
                        "group": str} ("context": passages the next answer reads from)
      -> cleaned, deduplicated, split into train/val by message tree, evaluation prompts held out
      -> train_texts.json, rebuilt only when its sources or options change
      -> the tokenizer file (trained on them, or a checkpoint's) and a .npz of token ids per source, cached

Also here: streaming a dataset larger than memory into token shards, and mixing weighted sources.
"""

import gzip
import hashlib
import functools
import io
import itertools
import json
import math
import os
import re
import shutil
import socket
import time
import unicodedata
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runtime import UserError, atomic_write, barrier, remove_stale_temp_files

HF_DATASET = "OpenAssistant/oasst2"
STREAM_SAMPLE_RECORDS = 2000  # records of each streamed source that the tokenizer also trains on
STREAM_SHARD_TOKENS = 2 ** 20  # a streamed source is written in shards of this many tokens (bounded memory)
# The evaluation prompts of bench/chat_quality.py: no training run may see them.
HOLDOUT_FILES = [Path(__file__).resolve().parent / "bench" / name
                 for name in ("knowledge_questions.jsonl", "chat_prompts.jsonl")]

# -----------------------------------------------------------------------------
# Reading sources. "text" marks a plain document (no roles are invented for it); "group" keeps a message
# tree on one side of the train/val split.


def read_json_lines(f, path):
    """Rows of a JSONL stream. A malformed line stops the run, naming the file's own line number: silently
    skipping it would change what the model trains on."""
    rows = []
    for number, line in enumerate(f, start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise UserError(f"{path}, line {number}: not valid JSON ({e.msg}); fix or delete that line")
    return rows


def read_records(path):
    """Rows of a local .jsonl, .jsonl.gz, .json or .parquet file, as dicts."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            if name.endswith((".json", ".json.gz")):
                rows = json.load(f)
                return rows if isinstance(rows, list) else [rows]
            return read_json_lines(f, path)
    except UserError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, EOFError) as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    except Exception as e:  # pyarrow raises its own error types
        raise UserError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]}")


def hub_reachable(timeout=3.0):
    """One quick connection attempt, so that an offline machine fails in seconds instead of waiting out
    the datasets library's retries. HF_HUB_OFFLINE=1 or HF_ENDPOINT skip it (a local cache or a mirror)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_ENDPOINT"):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_source(spec, split="train"):
    """Records of a local file, or of a split of a Hugging Face dataset id such as OpenAssistant/oasst2."""
    path = Path(spec)
    if path.is_file():
        return read_records(path)
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise UserError(f"data path not found or not a file: {spec}")
    if not hub_reachable():
        raise UserError(f"the Hugging Face hub is unreachable, so {spec} cannot be downloaded; pass local files "
                        f"with --data PATH (or set HF_HUB_OFFLINE=1 to use a cached copy)")
    try:
        import datasets
        return datasets.load_dataset(spec, split=split).to_list()
    except Exception as e:
        raise UserError(f"could not load the dataset {spec} from the Hugging Face hub ({type(e).__name__}); "
                        f"without network access pass local files with --data PATH")


def normalize_text(text):
    """NFC unicode, Unix newlines, no trailing spaces, at most one blank line; code indentation is kept."""
    text = unicodedata.normalize("NFC", text or "").replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def make_conversation(turns, group):
    turns = [{"role": role, "content": normalize_text(content)} for role, content in turns]
    return {"turns": [t for t in turns if t["content"]], "group": group}


def flatten_oasst_tree(tree):
    """OASST nested tree ({"prompt": {..., "replies": [...]}}) -> message-table rows with parent_id."""
    stack = [(tree["prompt"], None)]
    while stack:
        message, parent_id = stack.pop()
        row = {k: v for k, v in message.items() if k != "replies"}
        row.update(parent_id=parent_id, message_tree_id=tree["message_tree_id"])
        yield row
        stack.extend((reply, message["message_id"]) for reply in reversed(message.get("replies") or []))


def oasst_conversations(messages, langs, branches):
    """Threads from an OASST message table: paths from each root prompt down its reply tree.

    A message is kept only if it is not deleted, passed review, has text and is in `langs`; dropping a
    message drops its whole subtree, whose turns would answer a question nobody asked. branches="best"
    follows the best-ranked reply at every turn (rank 0 is the volunteers' favourite), which gives the
    cleanest answers and repeats no prefix; "all" takes every root-to-leaf path, several times the
    conversations but with shared prefixes repeated."""
    def keep(m):
        return (not m.get("deleted") and m.get("review_result") is not False and normalize_text(m.get("text"))
                and (langs is None or m.get("lang") in langs))

    kept = {m["message_id"]: m for m in messages if keep(m)}
    children = defaultdict(list)
    for m in kept.values():
        children[m.get("parent_id")].append(m)
    for replies in children.values():
        replies.sort(key=lambda m: (m.get("rank") is None, m.get("rank") or 0))

    def paths(message):
        replies = children.get(message["message_id"], [])
        if not replies:
            yield [message]
            return
        for reply in replies[:1] if branches == "best" else replies:
            for rest in paths(reply):
                yield [message] + rest

    for root in children.get(None, []):
        if root["role"] != "prompter":
            continue
        for path in paths(root):
            if path[-1]["role"] == "prompter":
                path = path[:-1]  # an unanswered question teaches nothing
            if len(path) >= 2:
                turns = [("user" if m["role"] == "prompter" else "assistant", m["text"]) for m in path]
                yield make_conversation(turns, root.get("message_tree_id", root["message_id"]))


LLAMA2_SYSTEM = re.compile(r"<<SYS>>(.*?)<</SYS>>", re.S)


def parse_llama2_chat(text):
    """'<s>[INST] user [/INST] assistant </s><s>[INST] ...' -> (role, content) turns."""
    turns = []
    for chunk in text.split("[INST]")[1:]:
        user, _, answer = chunk.partition("[/INST]")
        system = LLAMA2_SYSTEM.search(user)
        if system:
            turns.append(("system", system.group(1)))
            user = LLAMA2_SYSTEM.sub("", user)
        turns += [("user", user), ("assistant", answer.replace("</s>", "").replace("<s>", ""))]
    return turns


def parse_human_assistant(text):
    """'### Human: ... ### Assistant: ...' -> (role, content) turns."""
    parts = re.split(r"###\s*(Human|Assistant):", text)
    roles = ["user" if marker == "Human" else "assistant" for marker in parts[1::2]]
    return list(zip(roles, parts[2::2]))


def text_record_conversation(record, group):
    text = record["text"] or ""
    if "[INST]" in text and "[/INST]" in text:
        return make_conversation(parse_llama2_chat(text), group)
    if re.search(r"###\s*Human:", text) and re.search(r"###\s*Assistant:", text):
        return make_conversation(parse_human_assistant(text), group)
    return make_conversation([("text", text)], group)


def detect_format(record, source):
    keys = set(record) if isinstance(record, dict) else set()
    if {"message_id", "parent_id", "role", "text"} <= keys:
        return "oasst_messages"
    if {"message_tree_id", "prompt"} <= keys:
        return "oasst_trees"
    if {"instruction", "response"} <= keys:
        return "instruction"
    if "text" in keys:
        return "text"
    raise UserError(f"{source}: unrecognised record shape with keys {sorted(keys)[:8]}; expected an OASST "
                    f"message table or trees, {{'text'}} documents or {{'instruction', 'response'}} pairs")


def records_to_conversations(records, source, langs, branches):
    """Dispatch one source's records, by their shape, to the adapter for that format."""
    if not records:
        return []
    fmt = detect_format(records[0], source)
    if fmt == "oasst_trees":
        records = [row for tree in records for row in flatten_oasst_tree(tree)]
        fmt = "oasst_messages"
    if fmt == "oasst_messages":
        return list(oasst_conversations(records, langs, branches))
    conversations = []
    for i, r in enumerate(records):
        group = f"{source}:{i}"
        if fmt == "instruction":
            # A record's own context (Dolly's reading tasks) is the passage the answer reads from.
            context = [("context", r["context"])] if (r.get("context") or "").strip() else []
            turns = [("user", r["instruction"]), *context, ("assistant", r["response"])]
            conversations.append(make_conversation(turns, group))
        else:
            conversations.append(text_record_conversation(r, group))
    return conversations


def is_usable(conversation):
    """A document with text, or a chat with at least one user turn and one assistant turn."""
    roles = {t["role"] for t in conversation["turns"]}
    return roles == {"text"} or {"user", "assistant"} <= roles


DATASET_ID = re.compile(r"(?P<id>[\w.-]+/[\w.-]+)(:(?P<config>[\w.-]*[A-Za-z_][\w.-]*))?")  # a config is not a weight


def is_streamed(spec):
    """Knowledge sources that stream instead of loading: a dataset folder, or a Hugging Face dataset id with
    an optional config ("wikimedia/wikipedia:20231101.simple")."""
    path = Path(spec)
    return path.is_dir() or (not path.exists() and DATASET_ID.fullmatch(spec) is not None)


def stream_records(spec, split="train"):
    """The records of a Hugging Face dataset id (ID or ID:CONFIG) or a local dataset folder, one at a time
    (datasets' streaming=True): a corpus larger than memory is never held whole."""
    name, config = (spec, None) if Path(spec).is_dir() else DATASET_ID.fullmatch(spec).group("id", "config")
    if not Path(spec).is_dir() and not hub_reachable():
        raise UserError(f"the Hugging Face hub is unreachable, so {spec} cannot be streamed; pass local files")
    try:
        import datasets
        yield from datasets.load_dataset(name, config, split=split, streaming=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not stream the dataset {spec} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


def split_weight(spec):
    """'data/a.jsonl.gz:3' -> ('data/a.jsonl.gz', 3.0); a spec without a weight has weight 1."""
    path, _, weight = spec.rpartition(":")
    if not path or not re.fullmatch(r"\d+(\.\d*)?|\.\d+", weight):
        return spec, 1.0
    return path, float(weight)


def conversations_from_sources(specs, split, langs, branches, max_samples=0):
    """All sources' conversations, deduplicated, each tagged with its source. max_samples caps the records
    read over all sources (0: no cap)."""
    conversations, budget = [], max_samples or math.inf
    for spec in specs:
        source = split_weight(spec)[0]
        records = read_source(source, split)
        records = records[:budget] if budget < len(records) else records
        budget -= len(records)
        conversations += [c | {"source": source}
                          for c in records_to_conversations(records, source, langs, branches) if is_usable(c)]
        if budget <= 0:
            break
    return deduplicate(conversations)


# -----------------------------------------------------------------------------
# Cleaning: duplicates, the train/val split, leaks and evaluation prompts


def deduplicate(conversations):
    seen, unique = set(), []
    for c in conversations:
        key = json.dumps(c["turns"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def group_hash(group):
    return int(hashlib.sha256(group.encode()).hexdigest()[:12], 16)


def split_by_group(conversations, val_permille=20):
    """Deterministic ~2% validation split by message tree, so no conversation leaks across it."""
    train = [c for c in conversations if group_hash(c["group"]) % 1000 >= val_permille]
    val = [c for c in conversations if group_hash(c["group"]) % 1000 < val_permille]
    if not val and len({c["group"] for c in conversations}) > 1:  # tiny data: hold out one whole group
        held = min((c["group"] for c in conversations), key=group_hash)
        train = [c for c in conversations if c["group"] != held]
        val = [c for c in conversations if c["group"] == held]
    return train, val


def decontaminate(train, val, min_chars=64):
    """Drop training conversations that contain a message of the validation set verbatim. Short
    messages ("Thank you!") are shared by chance, not leaked, so they do not count."""
    val_contents = {t["content"] for c in val for t in c["turns"] if len(t["content"]) >= min_chars}
    return [c for c in train if not any(t["content"] in val_contents for t in c["turns"])]


def question_words(text):
    """The words that make a question this question: lower case, without function words or a plural s."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return frozenset(w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words if w not in FUNCTION_WORDS)


FUNCTION_WORDS = frozenset(
    "a an the is are was were be been of in on at to for by with from and or what which who whom whose how why "
    "when where do does did can could would should will shall may might me my you your i it its this that these "
    "those there s tell please about give some any".split())


def read_holdout(paths):
    """The questions of each holdout file, as word sets; a missing file stops the run."""
    questions = []
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"holdout file not found: {path} (--holdout lists evaluation prompts to keep out)")
        for record in read_records(path):
            text = record.get("question") or record.get("prompt") if isinstance(record, dict) else None
            if not text:
                raise UserError(f"{path}: each line needs a 'question' or 'prompt', got {str(record)[:80]}")
            questions.append(question_words(text))
    return [q for q in questions if q]


def asks_a_holdout_question(conversation, holdout):
    """A user turn that asks an evaluation question, or a close paraphrase: it holds all of that question's
    words and at most twice as many plus two. A long message that happens to use those words is kept, and so
    are documents: a fact stated in a document is knowledge, an evaluation question in the data is a leak."""
    for turn in conversation["turns"]:
        if turn["role"] == "user":
            words = question_words(turn["content"])
            if any(q <= words and len(words) <= 2 * len(q) + 2 for q in holdout):
                return True
    return False


def parse_langs(langs):
    if langs.strip() == "all":
        return None
    codes = [code.strip() for code in langs.split(",") if code.strip()]
    for code in codes:
        if not re.fullmatch(r"[a-z]{2,3}(-[A-Za-z]{2,4})?", code):
            raise UserError(f"unknown language {code!r} in --langs: use codes such as en, de, pt-BR, or 'all'")
    if not codes:
        raise UserError("--langs is empty: use codes such as en,de or 'all'")
    return set(codes)


# -----------------------------------------------------------------------------
# The teacher's answers (teacher.py): joined to the prompts they answer, rebuilt from the same sources


def record_name(group):
    """A conversation's group without the folder of its file ("dolly15k_en.jsonl.gz:12"): the same record,
    whatever path reached it (an OASST tree id stays as it is)."""
    head, sep, number = group.rpartition(":")
    return f"{Path(head).name}:{number}" if sep and head and number.isdigit() else group


def prompt_key(turns):
    """What a teacher's answer is stored under: a hash of the (role, content) turns it answered, so that the
    answers file holds no prompt text and a changed record no longer finds its answer."""
    return hashlib.sha256(json.dumps([list(t) for t in turns], ensure_ascii=False).encode()).hexdigest()[:16]


def read_teacher_records(path):
    """(records, intact) of an answers file: its JSON lines up to any chunk a kill cut short."""
    records, intact = [], True
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                records.append(json.loads(line))
    except (EOFError, gzip.BadGzipFile, zlib.error, ValueError):
        intact = False  # the last chunk was being written: what came before it stands
    except OSError as e:
        raise UserError(f"cannot read the teacher's answers {path}: {e}")
    return records, intact


def teacher_answers(path):
    """{key: answer} of an answers file's kept answers (its rejected prompts are there for resuming)."""
    if not Path(path).is_file():
        raise UserError(f"--teacher {path}: no such file (teacher.py writes it)")
    records, _ = read_teacher_records(path)
    if not records:
        raise UserError(f"--teacher {path}: not a teacher answers file, or empty")
    return {r["key"]: r["answer"] for r in records if isinstance(r, dict) and "answer" in r and "key" in r}


def taught_turns(conversation, answers):
    """A chat's user turns as the teacher is asked them: yields (position, prompt, key) per user turn, where
    the prompt is the turns before it as the teacher answered them, then the user turn (and the context turn
    after it); stops after the first turn the answers lack."""
    items = [(t["role"], t["content"]) for t in conversation["turns"]]
    turns = []
    for i, (role, content) in enumerate(items):
        if role == "system":
            turns.append((role, content))
        elif role == "user":
            context = [items[i + 1]] if i + 1 < len(items) and items[i + 1][0] == "context" else []
            prompt = turns + [(role, content)] + context
            key = prompt_key(prompt)
            yield i, prompt, key
            if key not in answers:
                return
            turns = prompt + [("assistant", answers[key])]


def as_taught(conversation, answers):
    """A chat as the teacher answered it, up to the first user turn it did not answer; None if it answered none."""
    taught = [prompt + [("assistant", answers[key])] for _, prompt, key in taught_turns(conversation, answers)
              if key in answers]
    return make_conversation(taught[-1], conversation["group"]) if taught else None


def with_teacher(conversations, path):
    """The chats as the teacher answered them, in place of the human answers to the same prompts (two
    answers to one prompt would teach their average), as a source of their own named by the answers file,
    so that --teacher PATH:WEIGHT weights them. The chats it did not answer stay as they were."""
    answers = teacher_answers(path)
    kept, taught = [], []
    for c in conversations:
        as_teacher = as_taught(c, answers)
        if as_teacher is None:
            kept.append(c)
        else:
            taught.append(as_teacher | {"source": str(path)})
    return kept + taught

# -----------------------------------------------------------------------------
# train_texts.json: built from the sources once, reused while they match


def content_hash(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def texts_hash(texts):
    """What the token caches and checkpoints key on: every conversation of every split."""
    return content_hash([texts["train"], texts["val"], texts["pretrain"]])


def build_texts(cfg):
    """Read every source, build conversations, split train/val, keep the evaluation prompts out of training
    and record where they came from."""
    langs = parse_langs(cfg.langs)
    holdout = read_holdout(cfg.holdout)
    train = conversations_from_sources(cfg.data, "train", langs, cfg.branches, cfg.max_samples)
    local, streamed = ([spec for spec in cfg.pretrain_data if is_streamed(split_weight(spec)[0]) == want]
                       for want in (False, True))
    pretrain = conversations_from_sources(local, "train", None, cfg.branches)
    # The first records of each streamed source, for the tokenizer's sample; the rest streams into shards.
    stream_sample = [c for spec in streamed for c in records_to_conversations(
        list(itertools.islice(stream_records(split_weight(spec)[0]), STREAM_SAMPLE_RECORDS)), spec, None, "best")]
    if cfg.val_data:
        val = conversations_from_sources(cfg.val_data, "validation", langs, cfg.branches)
    elif cfg.data == [HF_DATASET]:
        val = conversations_from_sources(cfg.data, "validation", langs, cfg.branches)
    else:
        train, val = split_by_group(train)
    train = decontaminate(train, val)
    pretrain = decontaminate(pretrain, val)
    kept = [[c for c in split if not asks_a_holdout_question(c, holdout)] for split in (train, pretrain)]
    held_out = len(train) + len(pretrain) - len(kept[0]) - len(kept[1])
    train, pretrain = kept
    if cfg.teacher:
        train = with_teacher(train, split_weight(cfg.teacher)[0])
    if not train:
        raise UserError(f"no usable training conversations in {' '.join(cfg.data)} "
                        f"(language filter: {cfg.langs}; messages must be non-empty, not deleted, reviewed)")
    if not val:
        raise UserError("no validation conversations: give --val_data or more data")
    if local and not pretrain:
        raise UserError(f"no usable documents or Q/A pairs in {' '.join(cfg.pretrain_data)}")
    texts = {"format": "tinygpt-texts-v1", "build": build_options(cfg), "held_out": held_out, "train": train,
             "val": val, "pretrain": pretrain, "stream_sample": stream_sample}
    return texts | {"sha256": texts_hash(texts)}


def file_digest(path):
    """A file by name and content: the texts are rebuilt when either changes."""
    if not Path(path).is_file():
        raise UserError(f"no such file: {path}")
    return [str(path), hashlib.sha256(Path(path).read_bytes()).hexdigest()]


def build_options(cfg):
    """What train_texts.json depends on: a file built with other options is rebuilt."""
    def sources(specs):  # weights only change how often rows are drawn, not the texts
        return [split_weight(spec)[0] for spec in specs]

    holdout = [content_hash(Path(p).read_text()) if Path(p).is_file() else p for p in cfg.holdout]
    return {"data": sources(cfg.data), "val_data": cfg.val_data, "pretrain_data": sources(cfg.pretrain_data),
            "langs": cfg.langs, "branches": cfg.branches, "max_samples": cfg.max_samples, "holdout": holdout,
            **({"knowledge": split_weight(cfg.knowledge)[0]} if cfg.knowledge else {}),
            **({"teacher": file_digest(split_weight(cfg.teacher)[0]), "reading_answers": cfg.reading_answers}
               if cfg.teacher else {})}


def is_texts_file(texts):
    if not isinstance(texts, dict) or not isinstance(texts.get("train"), list) or not texts["train"]:
        return False
    val = texts.get("val", [])  # optional: a user's own file may leave the split to us
    return isinstance(val, list) and all(isinstance(c, dict) and isinstance(c.get("turns"), list)
                                         for c in texts["train"] + val)


def read_texts_file(path):
    """A train_texts.json, ours or a user's own: groups, a validation split and a hash are added if missing."""
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        texts = None
    if not is_texts_file(texts):
        raise UserError(f"{path} is not a TinyGPT texts file: expected {{'train': [{{'turns': [...]}}], "
                        f"'val': [...]}}; delete it to rebuild it from --data")
    for c in texts["train"] + texts.get("val", []):
        c.setdefault("group", content_hash(c["turns"]))
    if not texts.get("val"):
        texts["train"], texts["val"] = split_by_group(texts["train"])
    texts.setdefault("pretrain", [])
    texts.setdefault("sha256", texts_hash(texts))
    return texts


def load_or_build_texts(cfg, add_passages=None, reading_options=None):
    """train_texts.json is reused when it was built from the same sources and options, or when it has no
    build record at all (a user's own file in the same format); otherwise it is rebuilt. With --knowledge,
    add_passages(texts) -> texts (retrieval.py's, passed in by newgpt.py) teaches the chats to read, and
    reading_options ({"passages": k}) are its own options."""
    path = Path(cfg.texts)
    options = build_options(cfg) | (reading_options or {})
    if path.is_file():
        texts = read_texts_file(path)
        if texts.get("build", options) == options:
            return texts, "reused"
    remove_stale_temp_files(path.parent, of=path.name)  # a build killed while writing (it takes minutes)
    texts = build_texts(cfg) | {"build": options}
    if cfg.knowledge:
        texts = add_passages(texts)
        texts["sha256"] = texts_hash(texts)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8"))
    return texts, "built"


# -----------------------------------------------------------------------------
# Token ids: the tokenizer file and the token caches, each built once and reused by later runs


@dataclass
class ChatFormat:
    """What newgpt.py defines and these files depend on: the special tokens, how the BPE is trained on
    texts -> tokenizer, how (tokenizer, conversations) -> [(ids, mask)] pairs are rendered, and the bytes
    behind each token id (tokenizer -> array), for the log's bytes per token."""
    special_tokens: list
    train_tokenizer: Callable
    render: Callable
    byte_lengths: Callable


@dataclass
class PreparedData:
    texts: dict
    tokenizer: object
    tokenizer_info: dict  # {"file", "sha256"}: stored in checkpoints, checked by load_checkpoint
    arrays: dict  # split -> [(source, token ids, target mask)], one entry per source (or streamed shard)


def load_tokenizer(path):
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(path))
    # Text that happens to contain "<|user|>" is encoded as plain characters: only the chat format places
    # special tokens, so a user can never forge a turn boundary.
    tokenizer.encode_special_tokens = True
    return tokenizer


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def token_dtype(tokenizer):
    return np.uint16 if tokenizer.get_vocab_size() <= 2 ** 16 else np.uint32


def tokenize_to_arrays(render, tokenizer, conversations):
    """Conversations -> one token stream and its target mask, as numpy arrays."""
    rendered = render(tokenizer, conversations)
    ids = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in rendered), dtype=token_dtype(tokenizer))
    mask = np.fromiter(itertools.chain.from_iterable(mask for _, mask in rendered), dtype=np.uint8)
    return ids, mask


def cached_token_arrays(chat_format, tokenizer, tokenizer_sha, conversations, texts_sha, split, cache_dir):
    """Token ids and target mask for one split; a second run loads them from a .npz keyed by content."""
    path = Path(cache_dir) / f"tokens-{split}-{texts_sha[:12]}-{tokenizer_sha[:12]}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return cached["ids"], cached["mask"]
    ids, mask = tokenize_to_arrays(chat_format.render, tokenizer, conversations)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_bytes(npz_bytes(ids=ids, mask=mask)))
    return ids, mask


def tokenizer_name(texts, vocab_size):
    return f"tokenizer-{vocab_size}-{texts['sha256'][:10]}.json"


def prepare_tokenizer(chat_format, texts, vocab_size, out_dir):
    """Train the BPE on training texts only, saved in out_dir under a name keyed by data and size, so
    another run's checkpoints keep their own tokenizer."""
    path = Path(out_dir) / tokenizer_name(texts, vocab_size)
    if not path.is_file():
        chat = [t["content"] for c in texts["train"] for t in c["turns"]]
        knowledge = [t["content"] for c in texts["pretrain"] + texts.get("stream_sample", []) for t in c["turns"]]
        # Every k-th knowledge text, about as many characters as the chat's: one vocabulary for both stages.
        every = math.ceil(sum(map(len, knowledge)) / max(1, sum(map(len, chat))))
        tokenizer = chat_format.train_tokenizer(chat + knowledge[::max(1, every)], vocab_size)
        atomic_write(path, lambda tmp: tokenizer.save(str(tmp)))
    return path


def checkpoint_tokenizer(chat_format, texts, vocab_size, out_dir, folder, info):
    """The tokenizer a checkpoint in `folder` was trained with, in out_dir: copied from beside it or, if it was
    deleted, trained again from the same texts (BPE training is deterministic) when that gives the same file."""
    path, beside = out_dir / info["file"], folder / info["file"]
    if not path.is_file() and beside.is_file():
        atomic_write(path, lambda tmp: shutil.copyfile(beside, tmp))
    elif not path.is_file() and path.name == tokenizer_name(texts, vocab_size):
        prepare_tokenizer(chat_format, texts, vocab_size, out_dir)
    if not path.is_file() or file_sha256(path) != info["sha256"]:
        raise UserError(f"{path}, the tokenizer of the checkpoint in {folder}/, is missing or changed; copy it "
                        f"back from where the checkpoint came from")
    return path


def with_chat_tokens(path, special_tokens):
    """A tokenizer file that has every chat-format token: an older checkpoint's (--init_from) gains those it
    lacks as new ids at the end, saved beside it under a new name."""
    tokenizer = load_tokenizer(path)
    missing = [t for t in special_tokens if tokenizer.token_to_id(t) is None]
    if not missing:
        return path
    tokenizer.add_special_tokens(missing)
    grown = path.with_name(f"tokenizer-{tokenizer.get_vocab_size()}-{file_sha256(path)[:10]}.json")
    atomic_write(grown, lambda tmp: tokenizer.save(str(tmp)))
    return grown


def run_tokenizer(cfg, chat_format, texts, vocab_size, start_from):
    """The tokenizer file of this run: trained, or that of the checkpoint resumed or fine-tuned from."""
    out_dir = Path(cfg.out_dir)
    if start_from is None:
        return prepare_tokenizer(chat_format, texts, vocab_size, out_dir)
    if cfg.resume and start_from[1]["texts_sha256"] != texts["sha256"]:  # before its tokenizer meets them
        raise UserError(f"--resume: {cfg.resume} was trained on other data than {cfg.texts}; "
                        f"use the same --data and --texts to continue it")
    path = checkpoint_tokenizer(chat_format, texts, vocab_size, out_dir, start_from[0], start_from[1]["tokenizer"])
    return with_chat_tokens(path, chat_format.special_tokens) if cfg.init_from and not cfg.resume else path


def load_or_build_data(cfg, vocab_size, chat_format, reading, start_from):
    """train_texts.json, the tokenizer (trained, or that of the checkpoint resumed or fine-tuned, given as
    (folder, checkpoint)) and the token caches, each reused when on disk. reading: (add_passages, its
    options) for load_or_build_texts. Returns (PreparedData, how)."""
    texts, how = load_or_build_texts(cfg, *reading)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)  # created only once the data is there
    tokenizer_path = run_tokenizer(cfg, chat_format, texts, vocab_size, start_from)
    tokenizer, sha = load_tokenizer(tokenizer_path), file_sha256(tokenizer_path)
    cache_dir = Path(cfg.out_dir) / "data"

    def cached(conversations, split):
        return cached_token_arrays(chat_format, tokenizer, sha, conversations, texts["sha256"], split, cache_dir)

    arrays = {"val": [("val", *cached(texts["val"], "val"))]}
    for split in ("train", "pretrain"):  # one token stream per source, so that each can have its weight
        arrays[split] = [(source, *cached(group, f"{split}{i}"))
                         for i, (source, group) in enumerate(by_source(texts[split]).items())]
    streamed = [spec for spec in (split_weight(spec)[0] for spec in cfg.pretrain_data) if is_streamed(spec)]
    holdout = read_holdout(cfg.holdout) if streamed else []
    render = functools.partial(chat_format.render, tokenizer)
    for spec in streamed:  # one entry per shard, all named after the source (and weighted as it is)
        arrays["pretrain"] += [(spec, ids, mask) for ids, mask in cached_stream_shards(
            spec, render, token_dtype(tokenizer), sha, holdout, texts["val"], cfg.stream_tokens, cache_dir)]
    return PreparedData(texts, tokenizer, {"file": tokenizer_path.name, "sha256": sha}, arrays), how


def prepare_tokens(cfg, vocab_size, chat_format, reading, rank, world_size, log, start_from=None):
    """Rank 0 builds (or finds) the texts, the tokenizer and the token caches first; then the other ranks
    read what it wrote."""
    started = time.time()
    log(f"data: preparing conversations, tokenizer and token ids in {cfg.out_dir}/ (reused on later runs)")
    if rank == 0:
        data, how = load_or_build_data(cfg, vocab_size, chat_format, reading, start_from)
    barrier(world_size)
    if rank > 0:
        data, how = load_or_build_data(cfg, vocab_size, chat_format, reading, start_from)
    log_data(data, how, cfg, chat_format, time.time() - started, log)
    return data


def log_data(data, how, cfg, chat_format, seconds, log):
    texts = data.texts
    n_tokens = {split: sum(len(ids) for _, ids, _ in data.arrays[split]) for split in data.arrays}
    train_ids = np.concatenate([ids for _, ids, _ in data.arrays["train"]])
    train_bytes = chat_format.byte_lengths(data.tokenizer)[train_ids]  # 0 for special tokens
    n_messages = {split: sum(len(c["turns"]) for c in texts[split]) for split in ("train", "val")}
    log(f"data: {how} {cfg.texts}: {len(texts['train']):,} / {len(texts['val']):,} train / val conversations, "
        f"{n_messages['train']:,} / {n_messages['val']:,} messages, {n_tokens['train']:,} / {n_tokens['val']:,} "
        f"tokens, {train_bytes.sum() / max(1, (train_bytes > 0).sum()):.2f} bytes/token, "
        f"{texts.get('held_out', 0):,} dropped as evaluation prompts (--holdout), {seconds:.1f}s")
    if texts["pretrain"]:
        log(f"data: knowledge stage: {len(texts['pretrain']):,} documents and Q/A pairs from "
            f"{len(data.arrays['pretrain'])} sources, {n_tokens['pretrain']:,} tokens")


# -----------------------------------------------------------------------------
# Streaming: a knowledge source larger than memory becomes token shards on disk, read memory-mapped


def npy_bytes(values, dtype):
    buffer = io.BytesIO()
    np.save(buffer, np.array(values, dtype=dtype))
    return buffer.getvalue()


def npz_bytes(**arrays):
    """np.savez's file as bytes: given a file name, np.savez would add .npz to an atomic write's temp name."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_stream_shards(spec, render, dtype, holdout, val, max_tokens, folder):
    """Stream a dataset into token shards of STREAM_SHARD_TOKENS (ids and target mask, .npy each), keeping
    out evaluation prompts and validation messages as for local sources, up to max_tokens. render turns
    conversations into (ids, mask) pairs (newgpt.render_conversations with its tokenizer). The manifest,
    written last, marks the set complete."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, ids, mask, total = [], [], [], 0

    def flush():
        name = f"shard{len(shards):05d}"
        for suffix, values, kind in (("ids", ids, dtype), ("mask", mask, np.uint8)):
            atomic_write(folder / f"{name}-{suffix}.npy", lambda tmp: tmp.write_bytes(npy_bytes(values, kind)))
        shards.append(name)

    records = stream_records(spec)
    while total < max_tokens and (batch := list(itertools.islice(records, 1000))):
        conversations = [c for c in records_to_conversations(batch, spec, None, "best")
                         if is_usable(c) and not asks_a_holdout_question(c, holdout)]
        for conv_ids, conv_mask in render(decontaminate(conversations, val)):
            take = min(len(conv_ids), max_tokens - total)
            ids += conv_ids[:take]
            mask += conv_mask[:take]
            total += take
            if len(ids) >= STREAM_SHARD_TOKENS:
                flush()
                ids, mask = [], []
    if ids:
        flush()
    atomic_write(folder / "manifest.json", lambda tmp: tmp.write_text(json.dumps({"shards": shards, "tokens": total})))


def cached_stream_shards(spec, render, dtype, tokenizer_sha, holdout, val, max_tokens, cache_dir):
    """A streamed source's token shards, written once (see write_stream_shards) and memory-mapped when read,
    so that training touches only the rows it draws."""
    key = hashlib.sha256(f"{spec}|{max_tokens}|{tokenizer_sha}".encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"stream-{key}"
    if not (folder / "manifest.json").is_file():
        write_stream_shards(spec, render, dtype, holdout, val, max_tokens, folder)
    shards = json.loads((folder / "manifest.json").read_text())["shards"]
    return [(np.load(folder / f"{name}-ids.npy", mmap_mode="r"), np.load(folder / f"{name}-mask.npy", mmap_mode="r"))
            for name in shards]


# -----------------------------------------------------------------------------
# Mixtures: several sources, each drawn in proportion to its weight


def by_source(conversations):
    """{source: its conversations}, in the order the sources first appear ("texts" for a user's own file)."""
    groups = {}
    for c in conversations:
        groups.setdefault(c.get("source", "texts"), []).append(c)
    return groups


class MixedRows:
    """Several sources' PackedRows as one table of (source, row) pairs, in which each source's rows appear
    `weight` times: an epoch of the table draws each source in proportion to weight x size. A fractional
    weight keeps a fixed, seeded share of a source's rows (0.5: half of them, every epoch the same half)."""

    def __init__(self, parts, weights, seed=0):
        rng = np.random.default_rng(seed)
        table = []
        for source, (rows, weight) in enumerate(zip(parts, weights)):
            whole, fraction = divmod(weight, 1.0)
            picked = [np.tile(np.arange(rows.n_rows), int(whole)),
                      rng.permutation(rows.n_rows)[:round(fraction * rows.n_rows)]]
            picked = np.concatenate(picked)
            table.append(np.stack([np.full(len(picked), source), picked], axis=1))
        self.parts, self.table = parts, np.concatenate(table)  # (n_rows, 2)
        self.block_size, self.n_rows = parts[0].block_size, len(self.table)

    def get(self, rows, loss_on=None):
        picks = self.table[np.asarray(rows)]
        x = torch.empty(len(picks), self.block_size, dtype=torch.long)
        y = torch.empty_like(x)
        for source in np.unique(picks[:, 0]):
            chosen = picks[:, 0] == source
            x[chosen], y[chosen] = self.parts[source].get(picks[chosen, 1], loss_on)
        return x, y
