"""
The engine every front end shares: sampling, generation with a KV cache, and one answer to one request.
chat_with_model.py (the terminal), serve.py (the page and the API), export_hf.py and the benches import
it; it imports the model and the chat format from newgpt.py and the retriever from retrieval.py.

    engine = Engine(model, tokenizer, "cpu", "float32")
    turn = engine.prepare(system="", history=[], user_text="What is a llama?", max_new_tokens=256)
    reply = engine.reply(turn, SamplingConfig(), engine.generator(seed=1337))
    for piece in reply:               # the answer's text as it is generated
        print(piece, end="", flush=True)
    reply.tokens, reply.finish_reason, turn.passages

Sampling first pushes repeats down (a CTRL penalty on recent tokens, OpenAI's frequency and presence
penalties, DRY on repeated sequences, banned n-grams), then applies temperature (0 means greedy), top-k,
top-p and min-p, and draws with a seeded torch.Generator. Generation prefills the prompt once into a KV
cache, then feeds one token at a time. With passages about the question, the same conversation without
them is decoded alongside and the two are contrasted (context-aware decoding, Shi et al. 2023): what the
passages say outweighs what the model believes. Output bytes go through an incremental UTF-8 decoder, so a
character split across tokens is never shown broken.
"""

import codecs
import dataclasses
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from data import HOLDOUT_FILES, make_conversation
from newgpt import KVCache, model_from_checkpoint, reads_passages, render_conversations, token_bytes
from retrieval import conversation_query, format_passages, open_index, passages_for
from runtime import UserError, autocast_context, chosen_checkpoint, pick_device, pick_dtype

# -----------------------------------------------------------------------------
# Sampling


@dataclass
class SamplingConfig:
    # The defaults were chosen by bench/sampling_sweep.py on half of the bench's prompts (bench/RESULTS.md).
    temperature: float = field(default=0.5, metadata={"help": "softmax temperature; 0 means greedy"})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens (0: off)"})
    top_p: float = field(default=1.0, metadata={"help": "sample from the smallest set with this mass (1: off)"})
    min_p: float = field(default=0.05, metadata={
        "help": "drop tokens less likely than min_p times the likeliest one (Nguyen et al. 2024; 0: off)"})
    repetition_penalty: float = field(default=1.3, metadata={"help": "push recent tokens down by this (1: off)"})
    repetition_window: int = field(default=64, metadata={"help": "how many recent tokens the penalty looks at"})
    frequency_penalty: float = field(default=0.0, metadata={
        "help": "OpenAI's: subtract this times a token's count in the answer so far from its logit (-2 to 2)"})
    presence_penalty: float = field(default=0.0, metadata={
        "help": "OpenAI's: subtract this from the logit of every token already in the answer (-2 to 2)"})
    dry_multiplier: float = field(default=0.8, metadata={
        "help": "DRY: penalise a token that would continue a repeat of the context, by multiplier * "
                "base^(repeat length - allowed length) (0: off)"})
    dry_base: float = field(default=1.75, metadata={"help": "DRY: how fast the penalty grows with the repeat"})
    dry_allowed_length: int = field(default=2, metadata={"help": "DRY: the longest repeat left unpenalised"})
    no_repeat_ngram_size: int = field(default=0, metadata={
        "help": "never produce an n-gram of this many tokens that the context already holds (0: off)"})
    context_weight: float = field(default=1.0, metadata={
        "help": "with passages about the question (--knowledge): sample from (1 + w) x the logits with them - w x "
                "the logits without, so that what they say outweighs what the model believes (Shi et al. 2023; "
                "0: off)"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest answer, in tokens"})
    seed: int = field(default=1337, metadata={"help": "sampling seed; the same seed gives the same answers"})


MAX_SEED = 2 ** 64 - 1  # the largest seed torch.Generator takes


def check_sampling(config):
    """Every bad value, in words a user can act on; empty when all is well. The comparisons are written
    so that NaN fails them too."""
    problems = []
    if not (math.isfinite(config.temperature) and config.temperature >= 0):
        problems.append("temperature must be a finite number >= 0")
    if not config.top_k >= 0:
        problems.append("top_k must be >= 0")
    if not 0 < config.top_p <= 1:
        problems.append("top_p must be in (0, 1]")
    if not 0 <= config.min_p <= 1:
        problems.append("min_p must be in [0, 1]")
    if not (math.isfinite(config.repetition_penalty) and config.repetition_penalty >= 1):
        problems.append("repetition_penalty must be a finite number >= 1")
    if not config.repetition_window >= 0:
        problems.append("repetition_window must be >= 0")
    for name in ("frequency_penalty", "presence_penalty"):
        if not -2 <= getattr(config, name) <= 2:
            problems.append(f"{name} must be between -2 and 2")
    if not 0 <= config.dry_multiplier <= 100 or not 1 <= config.dry_base <= 10:
        problems.append("dry_multiplier must be in [0, 100] and dry_base in [1, 10]")
    if not 1 <= config.dry_allowed_length <= 100:
        problems.append("dry_allowed_length must be between 1 and 100")
    if not 0 <= config.no_repeat_ngram_size <= 100:
        problems.append("no_repeat_ngram_size must be between 0 and 100")
    if not 0 <= config.context_weight <= 10:
        problems.append("context_weight must be between 0 and 10")
    if not config.max_new_tokens >= 1:
        problems.append("max_new_tokens must be >= 1")
    if not 0 <= config.seed <= MAX_SEED:
        problems.append(f"seed must be between 0 and {MAX_SEED}")
    return problems


def apply_settings(sampling, assignments):
    """'/set a=1 b=2' -> a new SamplingConfig, or UserError naming every bad part; nothing changes on error."""
    types = {f.name: type(f.default) for f in dataclasses.fields(SamplingConfig)}
    changes, problems = {}, []
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        if name not in types or not value:
            problems.append(f"{assignment!r} is not NAME=VALUE with NAME one of {', '.join(types)}")
            continue
        try:
            changes[name] = types[name](value)
        except ValueError:
            problems.append(f"{name} needs {'an integer' if types[name] is int else 'a number'}, got {value!r}")
    updated = dataclasses.replace(sampling, **changes)
    problems += check_sampling(updated)
    if problems or not assignments:
        raise UserError("; ".join(problems) or "usage: /set NAME=VALUE ...")
    return updated


def apply_repetition_penalty(logits, recent_ids, penalty):
    """CTRL (Keskar et al. 2019): make tokens seen recently less likely, dividing a positive logit and
    multiplying a negative one, so the penalty always pushes down."""
    if penalty == 1.0 or not recent_ids:
        return logits
    ids = torch.tensor(sorted(set(recent_ids)), device=logits.device)
    chosen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(chosen > 0, chosen / penalty, chosen * penalty)
    return logits


def apply_frequency_presence(logits, answer_ids, frequency_penalty, presence_penalty):
    """OpenAI's penalties: logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty, where
    count[j] is how often token j occurs in the answer so far (the prompt does not count)."""
    if not answer_ids or (frequency_penalty == 0 and presence_penalty == 0):
        return logits
    counts = torch.bincount(torch.tensor(answer_ids, device=logits.device), minlength=logits.size(-1))
    return logits - counts * frequency_penalty - (counts > 0) * presence_penalty


def dry_penalties(context, multiplier, base, allowed_length, max_length=64):
    """DRY, "don't repeat yourself" (Weidmann 2024, in llama.cpp and text-generation-webui): {token: penalty}.
    Where the context's last tokens occurred before, the token that followed them then would continue the
    repeat now; the longer the repeat it would extend, the larger its penalty: multiplier *
    base^(length - allowed_length), for repeats of at least allowed_length tokens."""
    penalties, n = {}, len(context)
    if multiplier == 0 or n < 2:
        return penalties
    for j in range(n - 2, -1, -1):  # j: the end of an earlier occurrence of the context's last token(s)
        length = 0
        while length <= j and length < max_length and context[j - length] == context[n - 1 - length]:
            length += 1
        if length >= allowed_length:
            follower = context[j + 1]
            penalties[follower] = max(penalties.get(follower, 0.0), multiplier * base ** (length - allowed_length))
    return penalties


def banned_by_ngrams(context, n):
    """Tokens that would complete an n-gram the context already holds (transformers' no_repeat_ngram_size)."""
    if n < 1 or len(context) < n:
        return set()
    prefix = tuple(context[len(context) - n + 1:]) if n > 1 else ()
    return {context[i + n - 1] for i in range(len(context) - n + 1) if tuple(context[i:i + n - 1]) == prefix}


def penalize(logits, config, context, answer):
    """Every repetition penalty of `config`, for the next token after `context` (the model's window), whose
    last len(answer) tokens are the answer so far."""
    logits = apply_repetition_penalty(logits, context[-config.repetition_window:] if config.repetition_window
                                      else [], config.repetition_penalty)
    logits = apply_frequency_presence(logits, answer, config.frequency_penalty, config.presence_penalty)
    dry = dry_penalties(context, config.dry_multiplier, config.dry_base, config.dry_allowed_length)
    if dry:
        ids = torch.tensor(list(dry), device=logits.device)
        logits = logits.index_put((ids,), -torch.tensor(list(dry.values()), device=logits.device), accumulate=True)
    banned = banned_by_ngrams(context, config.no_repeat_ngram_size)
    if banned:
        logits = logits.index_fill(0, torch.tensor(sorted(banned), device=logits.device), float("-inf"))
    return logits


def filter_top_k_top_p(logits, top_k, top_p):
    """Set to -inf every logit outside the top k and outside the smallest set whose probability reaches p."""
    if top_k and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # keep a token if the mass before it is still short of p: the smallest set reaching p
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits


def filter_min_p(logits, min_p):
    """Set to -inf every logit whose probability is below min_p times the likeliest token's."""
    if min_p == 0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def sample_next(logits, config, context, answer, generator):
    """One token id from a (vocab_size,) row of logits: penalties, then greedy (temperature 0) or
    temperature, top-k, top-p and min-p (transformers' order), then a draw."""
    logits = penalize(logits.float(), config, context, answer)
    if config.temperature == 0:
        return int(logits.argmax())
    logits = filter_top_k_top_p(logits / config.temperature, config.top_k, config.top_p)
    logits = filter_min_p(logits, config.min_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


# -----------------------------------------------------------------------------
# Generation


def window_start(n_tokens, start, block_size):
    """Where the model's context begins. When the tokens outgrow the window, it jumps forward to keep the
    newest half: the cache must be rebuilt after any jump, and jumping by half makes that rare."""
    if n_tokens - start > block_size:
        return n_tokens - block_size // 2
    return start


class Window:
    """The tokens the model reads while it generates, and their KV cache: the context is prefilled once, then
    each step feeds only the newest token. When the tokens outgrow the window it jumps (window_start) and the
    cache is rebuilt; without a cache, each step re-runs the whole window. Both see the same context."""

    def __init__(self, model, tokens, use_cache):
        self.model, self.tokens, self.use_cache = model, list(tokens), use_cache
        self.start, self.cache = 0, None
        self.device = next(model.parameters()).device

    def next_logits(self):
        """The model's logits (vocab_size,) for the token after self.tokens."""
        new_start = window_start(len(self.tokens), self.start, self.model.config.block_size)
        if self.use_cache and self.cache is not None and new_start == self.start:
            feed = self.tokens[-1:]  # everything before it is in the cache
        else:
            self.start, self.cache = new_start, KVCache(self.model.config) if self.use_cache else None
            feed = self.tokens[self.start:]
        logits, _ = self.model(torch.tensor([feed], device=self.device), kv_cache=self.cache)
        return logits[0, -1]


@dataclass(frozen=True)
class Prompt:
    """Token ids to continue, and what shapes the continuation: ids[passages[0]:passages[1]] is the passages'
    turn, stop_ids end the answer, logit_bias ({id: value}) is added to the logits before sampling."""
    ids: list
    passages: tuple = (0, 0)
    stop_ids: tuple = ()
    logit_bias: dict = field(default_factory=dict)

    def without_passages(self):
        first, last = self.passages
        return self.ids[:first] + self.ids[last:]


def contrast(with_passages, without_passages, weight):
    """Context-aware decoding (Shi et al. 2023): (1 + w) * logits with the passages - w * logits without, so
    that what the passages change is amplified and what the model would say anyway is not."""
    return torch.lerp(without_passages.float(), with_passages.float(), 1 + weight)


@torch.inference_mode()  # no autograd bookkeeping at all, which no_grad still keeps: faster per token
def generate(model, prompt, config, generator=None, use_cache=True):
    """Yield (token id, the model's logits for it) one token at a time, until a stop id (yielded too) or
    config.max_new_tokens. The repetition penalties do not look at the passages' turn (copying from it is the
    point); with config.context_weight and passages, each token is drawn from contrast(...). Runs under
    whatever autocast the caller has entered."""
    read, (first, last) = Window(model, prompt.ids, use_cache), prompt.passages
    unread = Window(model, prompt.without_passages(), use_cache) if last > first and config.context_weight else None
    if prompt.logit_bias:
        bias_ids = torch.tensor(list(prompt.logit_bias), device=read.device)
        bias_values = torch.tensor(list(prompt.logit_bias.values()), device=read.device)
    for _ in range(config.max_new_tokens):
        row = read.next_logits()
        steered = row if unread is None else contrast(row, unread.next_logits(), config.context_weight)
        biased = steered.index_add(0, bias_ids, bias_values.to(steered.dtype)) if prompt.logit_bias else steered
        tokens, start = read.tokens, read.start
        seen = tokens[start:first] + tokens[max(start, last):] if last > start else tokens[start:]
        next_id = sample_next(biased, config, seen, tokens[len(prompt.ids):], generator)
        yield next_id, row
        if next_id in prompt.stop_ids:
            return
        for window in (read, unread) if unread else (read,):
            window.tokens.append(next_id)


class Utf8Stream:
    """Token ids in, printable text out: bytes are held back until they complete a UTF-8 character."""

    def __init__(self, table):
        self.table = table  # token_bytes(tokenizer): the raw bytes of each token id
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self.decoder.decode(self.table[token_id])

    def flush(self):
        return self.decoder.decode(b"", final=True)


# -----------------------------------------------------------------------------
# One request: a conversation in, one answer out


class ContextLengthExceeded(UserError):
    """The newest message does not fit the context window whole (the API refuses it; the terminal cuts it)."""


@dataclass
class Turn:
    """A conversation made ready to answer (Engine.prepare)."""
    prompt: Prompt
    history: list  # the (role, content) turns the prompt holds, the new user turn last
    passages: list  # looked up for the new user turn, as many as fit
    steer: bool  # the passages are about that turn: context_weight applies
    notice: str  # what was cut to fit, in words; empty if nothing


class Reply:
    """One answer as it is generated: iterate for its text pieces. Afterwards (or when the caller stops
    early) text holds what was produced, tokens the answer's token count without the end of turn, and
    finish_reason is "stop" (the model ended its turn), "length" or, stopped early, None."""

    def __init__(self, engine, turn, sampling, generator, on_token=None):
        self.engine, self.turn, self.generator, self.on_token = engine, turn, generator, on_token
        self.sampling = sampling if turn.steer else dataclasses.replace(sampling, context_weight=0.0)
        self.text, self.tokens, self.finish_reason = "", 0, None

    def __iter__(self):
        stream = Utf8Stream(self.engine.token_table)
        steps = generate(self.engine.model, self.turn.prompt, self.sampling, self.generator)
        while True:
            with self.engine.ctx:  # autocast for the model's forward only, not for the caller's code
                token_id, logits = next(steps, (None, None))
            if token_id is None or token_id == self.engine.end_id:
                self.finish_reason = "stop" if token_id is not None else "length"
                break
            self.tokens += 1
            if self.on_token:
                self.on_token(token_id, logits)
            yield self.add(stream.push(token_id))
        yield self.add(stream.flush())

    def add(self, piece):
        self.text += piece
        return piece


class Engine:
    """What every front end shares and none changes: the model, its tokenizer, the autocast to run it
    under, and the knowledge index (or None)."""

    def __init__(self, model, tokenizer, device, dtype, index=None):
        self.model, self.tokenizer, self.index = model, tokenizer, index
        self.ctx = autocast_context(device, dtype) or nullcontext()
        self.device = next(model.parameters()).device
        # Far more characters than fit in the window; bounds the tokenizer's work on a pasted novel.
        self.max_input_chars = 32 * model.config.block_size
        self.assistant_id = tokenizer.token_to_id("<|assistant|>")
        self.end_id = tokenizer.token_to_id("<|end|>")
        self.context_id = tokenizer.token_to_id("<|context|>")
        self.token_table = token_bytes(tokenizer)

    def generator(self, seed):
        """A seeded generator on the model's device: torch.multinomial draws there, where the logits are."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def render(self, system, history, passages=()):
        """The prompt: the system prompt, the history, the passages for the newest user turn, <|assistant|>."""
        turns = ([("system", system)] if system else []) + history
        turns += [("context", format_passages(passages))] if passages else []
        ids, _ = render_conversations(self.tokenizer, [make_conversation(turns, "chat")])[0]
        return ids + [self.assistant_id]

    def look_up(self, history):
        """(passages, query) for the newest user turn (a short follow-up also uses the turns before it)."""
        query = conversation_query([content for role, content in history if role == "user"])
        return self.index.search(query, passages_for(self.model.config.block_size)), query

    def prepare(self, system, history, user_text, max_new_tokens, retrieval=True, cut_to_fit=True):
        """A Turn for user_text after history: passages looked up (with retrieval and an index), then the
        oldest exchanges dropped (never the system prompt) until the prompt leaves room for max_new_tokens,
        then the weakest passages; a message too long on its own keeps its end (or, not cut_to_fit, is
        refused with ContextLengthExceeded)."""
        block_size = self.model.config.block_size
        # A longer answer than fits slides the window during generation; the prompt keeps at least half.
        budget = max(block_size // 2, block_size - max_new_tokens)
        kept = list(history) + [("user", user_text[-self.max_input_chars:])]
        passages, query = self.look_up(kept) if retrieval and self.index else ([], "")
        while len(kept) > 1 and len(self.render(system, kept, passages)) > budget:
            kept = kept[1:]
            while kept[0][0] == "assistant":  # drop whole exchanges: the history starts with a question
                kept = kept[1:]
        while passages and len(self.render(system, kept, passages)) > budget:
            passages = passages[:-1]
        dropped = len(history) + 1 - len(kept)
        ids = self.render(system, kept, passages)
        notice = f"(dropped the {dropped} oldest turns to fit the context window)" if dropped else ""
        if not cut_to_fit and (len(ids) > budget or len(user_text) > self.max_input_chars):
            raise ContextLengthExceeded(
                f"the newest message ({len(user_text):,} characters) does not fit this model's {block_size}-token "
                f"context window with {max_new_tokens} tokens left for the answer: shorten it or lower max_tokens")
        if len(ids) > budget:
            (ids, kept), passages = self.cut_message(system, kept, budget), []
            notice = (f"(your message has {len(user_text):,} characters, more than fits in the context window: "
                      f"kept its last {len(kept[-1][1]):,})")
        # A follow-up is judged by the query that looked its passages up: with the turns it leans on.
        steer = bool(passages) and self.index.is_about(passages, query)
        return Turn(Prompt(ids, self.passages_span(ids), (self.end_id,)), kept, passages, steer, notice)

    def cut_message(self, system, kept, budget):
        """(ids, kept) with the newest message cut to its end until the prompt fits the budget."""
        ids = self.render(system, kept)
        while len(ids) > budget:  # re-encoding a cut text can merge tokens differently: repeat until it fits
            tail = self.tokenizer.encode(kept[-1][1]).ids[len(ids) - budget:]
            if not tail:
                raise UserError("the system prompt leaves no room for a message; shorten it or lower "
                                "max_new_tokens")
            kept[-1] = ("user", self.tokenizer.decode(tail))
            ids = self.render(system, kept)
        return ids, kept

    def passages_span(self, ids):
        """Where the passages' turn is in a prompt: (start, end), or (0, 0) without one."""
        if self.context_id not in ids:
            return (0, 0)
        start = ids.index(self.context_id)
        return (start, ids.index(self.end_id, start) + 1)

    def reply(self, turn, sampling, generator, logit_bias=None, on_token=None):
        """The answer to a prepared turn, as a Reply to iterate. on_token(token id, logits) sees each token
        before its text."""
        prompt = dataclasses.replace(turn.prompt, logit_bias=logit_bias or {})
        return Reply(self, dataclasses.replace(turn, prompt=prompt), sampling, generator, on_token)


# -----------------------------------------------------------------------------
# The flags every front end shares


def add_model_arguments(parser):
    """The flags that pick the checkpoint, the device and the sampling: every front end's."""
    parser.add_argument("--ckpt", help="checkpoint file, or a directory to take the newest from (default: the "
                                       "newest in ckpt/, else the release model shipped in ckpt/release/)")
    parser.add_argument("--system", default="", help="system prompt")
    parser.add_argument("--knowledge", help="look things up before each answer in this knowledge file, folder "
                                            "or dataset id (indexed on first use, then cached; retrieval.py)")
    parser.add_argument("--no_rerank", action="store_true",
                        help="rank passages by BM25 alone, not reranked by all-MiniLM-L6-v2 where it is installed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: float32 on CPU (a one-token step under bf16 autocast re-casts every weight, "
                             "which costs more than it saves), bf16 on CUDA")
    for f in dataclasses.fields(SamplingConfig):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default,
                            help=f"{f.metadata['help']} (default: {f.default})")


def load_engine(args):
    """(Engine, SamplingConfig, checkpoint path, checkpoint dict) for the parsed flags (add_model_arguments),
    or a UserError naming what is wrong."""
    sampling = SamplingConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig)})
    problems = check_sampling(sampling)
    if problems:
        raise UserError("; ".join(problems))
    device = pick_device(args.device)
    path, ckpt, how = chosen_checkpoint(args.ckpt, device)
    model, tokenizer = model_from_checkpoint(path, ckpt, device)
    dtype = "float32" if args.dtype == "auto" and device == "cpu" else pick_dtype(args.dtype, device)
    index = None
    if args.knowledge:
        if not reads_passages(ckpt):
            raise UserError(f"{path} was not trained to read passages, so --knowledge would only confuse it; "
                            f"train or fine-tune one with newgpt.py --knowledge PATH")
        index = open_index(args.knowledge, HOLDOUT_FILES, log=lambda line: print(line, file=sys.stderr),
                           rerank=not args.no_rerank)
    print(f"model: {path}, step {ckpt['step']}{how}", file=sys.stderr)
    return Engine(model.eval(), tokenizer, device, dtype, index), sampling, path, ckpt
