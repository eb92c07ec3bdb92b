"""
TinyGPT: train a small chat GPT from scratch on OpenAssistant conversations.

    python newgpt.py                                   # OASST2 from the Hugging Face hub
    python newgpt.py --data a.jsonl.gz b.parquet --val_data v.jsonl.gz --max_minutes 20
    python newgpt.py --depth 8 --max_minutes 5         # a bigger model, its schedule laid over 5 minutes
    python newgpt.py --resume                          # continue the newest checkpoint in ckpt/
    python newgpt.py --init_from ckpt/release --knowledge K --data ...   # fine-tune it to read passages
    torchrun --nproc_per_node=2 newgpt.py --data ...   # data-parallel (gloo on CPU, nccl on CUDA)

The file reads top to bottom as the pipeline runs:
  configs -> model (attention, MLP, block, GPT) -> tokenizer and chat format -> batches (packed rows)
  -> device, precision, optimizer and schedule -> checkpoints -> the training loop (evaluate -> checkpoint
  -> micro-batches -> clip -> step -> log) -> main()
Reading the data files into conversations and token ids, cached on disk (data.py), and the run's plumbing
(runtime.py: atomic files, torchrun, Ctrl-C, the progress bar) sit beside it.

Design choices (each measured: bench/RESULTS.md): pre-norm blocks; causal self-attention with heads of
128 dims (F.scaled_dot_product_attention); RoPE; ReLU^2 MLPs; no biases; tied input/output embeddings;
the loss on every token for the first pass over the data, then on the assistant's only; Muon for the
blocks' matrices and AdamW for the rest (the embedding at 5x the rate), a short linear warmup then cosine
decay, over the steps or over a time budget; one size dial (--depth), chosen for the device; bf16
autocast where the hardware has it (fp16 with loss scaling on older GPUs) and torch.compile; atomic
checkpoints that resume (a step-based run bit-exactly without torch.compile), on CPU, CUDA or MPS.
Optional: a knowledge stage before the chat stage, on weighted document and Q/A sources; --knowledge PATH,
which trains the model to read passages retrieved for each question (retrieval.py); --init_from, a fine-tune.
engine.py (sampling and generation, under the terminal chat and the server) imports the model and the chat
format from here, so training and chatting agree.
"""

import argparse
import dataclasses
import functools
import math
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import (HF_DATASET, HOLDOUT_FILES, ChatFormat, MixedRows, PreparedData, file_sha256, load_tokenizer,
                  prepare_tokens, split_weight)
from retrieval import add_passages, passages_for
from runtime import (Budget, Progress, RELEASE_DIR, StopRequest, UserError, atomic_write, autocast_context,
                     check_out_dir, checkpoint_paths, find_checkpoint, format_minutes, has_fast_bf16,
                     keep_freed_memory, max_over_ranks, non_negative, pick_device, pick_dtype, plot_metrics,
                     rank_zero_print, read_checkpoint, remove_stale_temp_files, resume_checkpoint, rng_state,
                     set_rng_state, setup_distributed, what_is_intact, why_unwritable, write_failure, write_metrics,
                     write_release)

# -----------------------------------------------------------------------------
# The chat format: every conversation is rendered with these tokens, in training and in chat.

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|context|>"]
# "context" holds passages looked up for the user turn before it (retrieval.py); like the user's, never a target.
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "context": "<|context|>"}
IGNORE_INDEX = -1  # target value that gets no loss (prompter tokens under --loss_on assistant)

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class GPTConfig:
    vocab_size: int = field(default=8192, metadata={"help": "BPE vocabulary size, chat special tokens included"})
    block_size: int = field(default=512, metadata={"help": "context length in tokens"})
    n_layer: int = field(default=4, metadata={"help": "number of transformer blocks"})
    n_head: int = field(default=2, metadata={"help": "attention heads per block"})
    n_embd: int = field(default=256, metadata={"help": "embedding width; must be divisible by n_head"})
    dropout: float = field(default=0.0, metadata={
        "help": "dropout probability (the size dial sets 0.1 from --depth 12, where overfitting starts)"})
    pos_encoding: str = field(default="rope", metadata={
        "help": "positional encoding: rotary (RoPE) or a learned table", "choices": ["rope", "learned"]})
    bias: bool = field(default=False, metadata={"help": "biases in Linear and LayerNorm layers"})
    mlp_act: str = field(default="relu2", metadata={
        "help": "MLP nonlinearity: GELU (GPT-2) or ReLU squared (Primer, So et al. 2021)",
        "choices": ["gelu", "relu2"]})


@dataclass
class TrainConfig:
    data: list = field(default_factory=lambda: [HF_DATASET], metadata={
        "help": "chat sources: a Hugging Face dataset id or local .jsonl/.jsonl.gz/.json/.parquet files; "
                "SOURCE:WEIGHT repeats a source's rows WEIGHT times per pass (0.5: half of them)"})
    pretrain_data: list = field(default_factory=list, metadata={
        "help": "knowledge-stage sources (documents, Q/A pairs), trained on before the chat stage, with the "
                "loss on every token; SOURCE:WEIGHT as for --data (none: one chat stage)"})
    stream_tokens: int = field(default=50_000_000, metadata={
        "help": "the most tokens to take from each streamed knowledge source: a Hugging Face dataset id (e.g. "
                "HuggingFaceFW/fineweb-edu) or a local dataset folder, read with datasets' streaming=True"})
    pretrain_fraction: float = field(default=0.5, metadata={
        "help": "the knowledge stage's share of the steps, or of the time budget"})
    holdout: list = field(default_factory=lambda: [str(p) for p in HOLDOUT_FILES], metadata={
        "help": "JSONL files of evaluation prompts ('question' or 'prompt'): training conversations that ask "
                "one of them, or a close paraphrase, are dropped"})
    val_data: list = field(default_factory=list, metadata={
        "help": "held-out sources; without it about 2% of the message trees are held out"})
    knowledge: str = field(default="", metadata={
        "help": "teach the model to read: chats get passages retrieved from this knowledge file, folder or "
                "dataset id (retrieval.py), and its Q/A pairs come with the passages that answer them "
                "(PATH:WEIGHT weights those reading questions as --data weights a source)"})
    teacher: str = field(default="", metadata={
        "help": "a teacher's answers (teacher.py): the chats it answered take its answers in place of the human "
                "ones, as a source of their own (PATH:WEIGHT as for --data); with --knowledge, the reading "
                "questions are those it answered"})
    reading_answers: str = field(default="both", metadata={
        "help": "with --knowledge and --teacher, whose answers the reading questions take: the teacher's (only "
                "those it answered), the records' own, or both (the teacher's where it answered)",
        "choices": ["both", "teacher", "records"]})
    init_from: str = field(default="", metadata={
        "help": "start from this checkpoint's weights and tokenizer with a fresh optimizer and schedule (a "
                "fine-tune); its vocabulary gains any chat-format token it lacks"})
    texts: str = field(default="train_texts.json", metadata={
        "help": "prepared conversations, written from --data and reused while the sources match"})
    langs: str = field(default="en", metadata={"help": "comma-separated language codes to keep, or 'all'"})
    branches: str = field(default="best", metadata={
        "help": "which paths to take through each OASST tree", "choices": ["best", "all"]})
    max_samples: int = field(default=0, metadata={"help": "read only the first N training records (0: all)"})
    out_dir: str = field(default="ckpt", metadata={"help": "directory for checkpoints, tokenizer and logs"})
    resume: str = field(default="", metadata={
        "help": "continue from 'latest' (bare --resume) or a checkpoint path"})
    batch_size: int = field(default=8, metadata={"help": "rows per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=6800, metadata={
        "help": "optimizer steps in total; the run prints how long they will take after its first steps "
                "(with --max_minutes and no --max_steps: no step limit)"})
    max_minutes: float = field(default=0.0, metadata={
        "help": "a time budget: the learning rate follows the clock (see --decay_fraction) and the run ends, "
                "with a final evaluation and checkpoint, when it runs out (0: no budget)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    embedding_lr_scale: float = field(default=5.0, metadata={
        "help": "the tied embedding's learning rate as a multiple of --lr (bench.training tricks measures it)"})
    min_lr: float = field(default=1e-4, metadata={"help": "learning rate at the end of the cosine decay"})
    warmup_steps: int = field(default=20, metadata={"help": "steps of linear learning-rate warmup"})
    decay_fraction: float = field(default=1.0, metadata={
        "help": "the share of the run, at its end, over which the learning rate decays to min_lr; before it "
                "stays at lr (1: cosine decay over the whole run; with --max_minutes the default is 0.4)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay, applied to matrices only"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    loss_on: str = field(default="assistant", metadata={
        "help": "which tokens are targets", "choices": ["assistant", "all"]})
    all_tokens_epochs: float = field(default=1.0, metadata={
        "help": "curriculum: put the loss on every token for this many passes over the training data first, "
                "then on --loss_on's tokens (0: off)"})
    eval_interval: int = field(default=200, metadata={"help": "evaluate every N steps"})
    eval_tokens: int = field(default=131072, metadata={"help": "validation tokens per evaluation (at most)"})
    save_interval: int = field(default=500, metadata={"help": "save a checkpoint every N steps"})
    keep_last: int = field(default=3, metadata={"help": "keep this many newest checkpoints"})
    log_interval: int = field(default=10, metadata={"help": "write a training-loss line every N steps"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    dtype: str = field(default="auto", metadata={
        "help": "autocast precision", "choices": ["auto", "float32", "bfloat16", "float16"]})
    seed: int = field(default=1337, metadata={"help": "seed for the data order and the model init"})
    optimizer: str = field(default="muon", metadata={
        "help": "adamw for everything, or muon for the hidden matrices plus adamw for the rest",
        "choices": ["adamw", "muon"]})
    compile: bool = field(default=True, metadata={"help": "torch.compile the model for training"})


# The original project's recipe, the baseline of every comparison: `python newgpt.py --recipe seed` (explicit
# flags still win; --max_samples 20000 also takes its data, the first 20,000 OASST2 rows).
RECIPES = {
    "default": {},
    "seed": {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 512, "batch_size": 8,
             "pos_encoding": "learned", "bias": True, "mlp_act": "gelu", "dtype": "float32", "optimizer": "adamw",
             "compile": False, "all_tokens_epochs": 0.0, "embedding_lr_scale": 1.0, "warmup_steps": 100},
}


# A budgeted run keeps its peak learning rate for longer: decaying over the whole run, as a step run does,
# lost to the same schedule cut short by the clock (bench/RESULTS.md, "Time budget").
BUDGET_DECAY_FRACTION = 0.4


def size_for_depth(depth, device_type):
    """The size dial: --depth N sets blocks, width, heads, dropout, context and batch together. The width grows
    by 64 per block (nanochat's aspect ratio), rounded up to whole heads of 128 dims (the best head size),
    at least two (the narrowest width measured). From depth 12 (91M parameters, ten per training token)
    dropout holds off overfitting. The learning rate stays: Muon scales each matrix's update to AdamW's
    size, and 1e-3 trained every depth measured. CUDA doubles the context, for longer chats, at the same
    tokens per step; a CPU keeps 512."""
    n_head = max(2, (depth + 1) // 2)
    size = {"n_layer": depth, "n_head": n_head, "n_embd": 128 * n_head, "dropout": 0.1 if depth >= 12 else 0.0}
    if device_type == "cuda":
        return size | {"block_size": 1024, "batch_size": 16}
    return size | {"block_size": 512, "batch_size": 8}


def auto_depth(device_type, max_minutes):
    """The depth measured best for the device and budget (bench/RESULTS.md, "Time budget and model size";
    on a CPU, "A smaller model for the shortest budgets")."""
    if device_type == "cuda":
        return 8 if 0 < max_minutes < 3 else 12
    return 2 if 0 < max_minutes < 3 else 4

# -----------------------------------------------------------------------------
# Model


ROPE_BASE = 10000.0  # RoPE's wavelength base (Su et al. 2021); export_hf.py writes it into the HF config


def rope_tables(block_size, head_size, base=ROPE_BASE):
    """cos/sin tables for rotary position embeddings (Su et al. 2021), each (block_size, 1, head_size/2):
    one row per position, broadcast over the heads."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)[:, None, :]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # Rotate the two halves of each head as pairs: the "rotate_half" layout of GPT-NeoX and Llama.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache:
    """Keys and values of every layer for the tokens processed so far, so that generating one more token
    costs one position of compute instead of re-running the whole context. Preallocated to block_size."""

    def __init__(self, config):
        self.n_layer, self.block_size = config.n_layer, config.block_size
        self.keys = self.values = None
        self.length = 0

    def append(self, layer, k, v):
        """Store k, v (B, nh, T, hs) at positions [length, length + T) of `layer`; return all so far."""
        if self.keys is None:
            shape = (self.n_layer, *k.shape[:2], self.block_size, k.size(3))  # (L, B, nh, block_size, hs)
            self.keys = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.values = torch.empty(shape, dtype=v.dtype, device=v.device)
        end = self.length + k.size(2)
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and earlier positions."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, kv_cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head)  # (B, T, nh, hs)
        k = k.view(B, T, self.n_head, C // self.n_head)  # (B, T, nh, hs)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            # The cache is filled by one prefill into an empty cache, then one token at a time; a single
            # new query attends to every cached key, so it needs no mask.
            assert T == 1 or kv_cache.length == 0, "prefill must start from an empty cache"
            k, v = kv_cache.append(layer, k, v)  # (B, nh, S, hs), S = cached + T
        dropout_p = self.dropout if self.training else 0.0
        # softmax(q k^T / sqrt(hs) + causal mask) v in one fused kernel (flash attention where available).
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.relu2 = config.mlp_act == "relu2"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        x = F.relu(x).square() if self.relu2 else F.gelu(x, approximate="tanh")
        return self.dropout(self.c_proj(x))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope, kv_cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.pos_encoding == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        else:
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head)
            # Not persistent: derived from the config, so checkpoints stay small and exact.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): one matrix both embeds tokens and scores the next token.
        self.transformer.wte.weight = self.lm_head.weight
        self.init_weights()

    def init_weights(self):
        """GPT-2 init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer) so the
        residual stream's variance does not grow with depth; zero biases, unit LayerNorm gains."""
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def num_params(self):
        """Parameters counted once: named_parameters() yields the tied embedding a single time."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, kv_cache=None):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), loss or None). With a kv_cache, idx holds
        only the new tokens and their positions continue from those already cached."""
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0
        assert start + T <= self.config.block_size, f"{start + T} positions exceed {self.config.block_size}"
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos_encoding == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.length += T
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = self.loss(logits.view(-1, logits.size(-1)), targets.view(-1))
            # Only the loss is differentiated. Logits that still required grad would make autograd zero-fill
            # a (B, T, vocab_size) gradient for them on every backward.
            logits = logits.detach()
        return logits, loss

    def loss(self, logits, targets):
        """Mean next-token cross-entropy of logits (N, V) against the targets (N,) that are not IGNORE_INDEX:
        0, not NaN, for a micro-batch without any (all of its tokens are prompt or padding)."""
        total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def check_model_config(config):
    if config.n_embd % config.n_head != 0:
        raise UserError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
    if config.pos_encoding == "rope" and (config.n_embd // config.n_head) % 2 != 0:
        raise UserError(f"rope needs an even head size, got n_embd/n_head = {config.n_embd // config.n_head}")
    if config.block_size < 16:
        raise UserError(f"block_size {config.block_size} is too small: a chat turn needs at least 16 tokens")
    if config.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"vocab_size {config.vocab_size} is too small: byte-level BPE needs at least "
                        f"{256 + len(SPECIAL_TOKENS)} (256 bytes plus special tokens)")
    if min(config.n_layer, config.n_head, config.n_embd) < 1 or not 0.0 <= config.dropout < 1.0:
        raise UserError("n_layer, n_head and n_embd must be positive and dropout in [0, 1)")


# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE (any UTF-8 text round-trips) plus the chat's special tokens.


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.encode_special_tokens = True
    return tokenizer


TARGET, PROMPT, PASSAGE = 1, 0, 2  # the mask's values: PROMPT tokens are targets only under --loss_on all


def render_conversations(tokenizer, conversations):
    """Conversations -> (ids, mask) pairs; mask[i] says whether token i is a training target.

    Layout: <|bos|> then per turn <|role|> content <|end|>; a plain document is <|bos|> text <|end|>.
    Targets are the assistant replies with their <|end|> (so the model learns to stop) and documents.
    Passages (the context turn) are never targets: the model learns to read them, not to recite them.
    All contents are encoded in one batch call; chat renders its history with this same function."""
    special = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    contents = [t["content"] for c in conversations for t in c["turns"]]
    encoded = iter(tokenizer.encode_batch(contents, add_special_tokens=False))
    kinds = {"assistant": TARGET, "text": TARGET, "context": PASSAGE}
    rendered = []
    for c in conversations:
        ids, mask = [special["<|bos|>"]], [PROMPT]
        for turn in c["turns"]:
            content, kind = next(encoded).ids, kinds.get(turn["role"], PROMPT)
            if turn["role"] != "text":
                ids.append(special[ROLE_TOKENS[turn["role"]]])
                mask.append(PASSAGE if kind == PASSAGE else PROMPT)
            ids += content + [special["<|end|>"]]
            mask += [kind] * (len(content) + 1)
        rendered.append((ids, mask))
    return rendered


def byte_level_chars():
    """GPT-2's byte-level alphabet: the printable character that stands for each byte inside a token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unprintable = [b for b in range(256) if b not in printable]
    stand_ins = printable + [256 + i for i in range(len(unprintable))]  # unprintable bytes shift past 255
    return {chr(c): b for c, b in zip(stand_ins, printable + unprintable)}


def token_bytes(tokenizer):
    """The raw UTF-8 bytes behind each token id (b"" for special tokens). A token may end in the middle
    of a multi-byte character, which is why streaming output decodes bytes, not tokens."""
    to_byte = byte_level_chars()
    table = [b""] * tokenizer.get_vocab_size()
    for token, i in tokenizer.get_vocab().items():
        if token not in SPECIAL_TOKENS:
            table[i] = bytes(to_byte[ch] for ch in token)
    return table


def token_byte_lengths(tokenizer):
    """Bytes per token id (0 for special tokens), for tokenizer-independent bits per byte."""
    return np.array([len(b) for b in token_bytes(tokenizer)], dtype=np.int64)


# What data.py needs to build a run's tokenizer and token caches in this format.
CHAT_FORMAT = ChatFormat(SPECIAL_TOKENS, train_tokenizer, render_conversations, token_byte_lengths)


# -----------------------------------------------------------------------------
# Batches: each split is one token stream, cut into rows of block_size + 1, cached on disk.


class PackedRows:
    """A token stream cut into non-overlapping rows of block_size + 1 tokens (inputs plus shifted
    targets). Conversations are packed back to back, so no compute is spent on padding; attention may
    look across a <|bos|> into the previous conversation, which the model learns to ignore."""

    def __init__(self, ids, mask, block_size, loss_on="assistant", pad_id=None):
        if pad_id is not None:  # evaluation scores every token: fill the last row with untargeted padding
            missing = -(len(ids) - 1) % block_size
            ids = np.concatenate([ids, np.full(missing, pad_id, dtype=ids.dtype)])
            mask = np.concatenate([mask, np.zeros(missing, dtype=mask.dtype)])
        self.block_size = block_size
        self.n_rows = (len(ids) - 1) // block_size
        self.ids, self.mask, self.loss_on = ids, mask, loss_on

    def get(self, rows, loss_on=None):
        """Inputs and targets (B, T) for these rows; loss_on overrides the targets' mask for this call."""
        T = self.block_size
        starts = np.asarray(rows)[:, None] * T + np.arange(T + 1)  # (B, T+1)
        chunk = torch.from_numpy(self.ids[starts].astype(np.int64))
        x, y = chunk[:, :-1], chunk[:, 1:].clone()
        mask = self.mask[starts[:, 1:]]
        ignored = mask != TARGET if (loss_on or self.loss_on) == "assistant" else mask == PASSAGE
        y[torch.from_numpy(ignored)] = IGNORE_INDEX
        return x, y


@functools.lru_cache(maxsize=2)
def row_order(n_rows, seed, epoch):
    """The seeded shuffle of one epoch; cached, since every micro-batch of the epoch reads it."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def training_rows(step, micro, cfg, rank, world_size, n_rows):
    """Rows of one micro-batch, a pure function of (step, micro, rank): resuming at a step replays
    exactly the batches an uninterrupted run would have seen. Each epoch is a fresh seeded shuffle."""
    first = ((step * cfg.grad_accum + micro) * world_size + rank) * cfg.batch_size
    rows = []
    for i in range(first, first + cfg.batch_size):
        epoch, position = divmod(i, n_rows)
        rows.append(row_order(n_rows, cfg.seed, epoch)[position])
    return rows


def prepare_data(cfg, model_config, rank, world_size, log, start_from=None):
    """The texts, the tokenizer and the token ids (data.py builds each once and reuses it); each reading
    question gets as many passages as the chat will show in this window."""
    k = passages_for(model_config.block_size)
    teach_reading = functools.partial(add_passages, knowledge=split_weight(cfg.knowledge)[0],
                                      holdout_files=cfg.holdout, seed=cfg.seed, teacher=split_weight(cfg.teacher)[0],
                                      reading_answers=cfg.reading_answers, k=k)
    reading = (teach_reading, {"passages": k} if cfg.knowledge else {})
    return prepare_tokens(cfg, model_config.vocab_size, CHAT_FORMAT, reading, rank, world_size, log, start_from)


def mixed_rows(arrays, specs, block_size, loss_on, seed):
    """One split's sources as MixedRows, each weighted as its spec says (SOURCE:WEIGHT); None if empty."""
    weights = dict(split_weight(spec) for spec in specs)
    parts = [(PackedRows(ids, mask, block_size, loss_on), weights.get(source, 1.0)) for source, ids, mask in arrays]
    parts = [(rows, weight) for rows, weight in parts if rows.n_rows > 0]
    if not parts:
        return None
    return MixedRows([rows for rows, _ in parts], [weight for _, weight in parts], seed)


def packed_splits(data, block_size, cfg):
    """Chat rows (targets per --loss_on; reading questions weighted as --knowledge says), knowledge rows (every
    token; None without --pretrain_data) and validation rows (always the assistant's tokens)."""
    reading = [f"{source}:{split_weight(cfg.knowledge)[1]}" for source, _, _ in data.arrays["train"]
               if source.startswith("reading:")]
    taught = [cfg.teacher] if cfg.teacher else []
    train_rows = mixed_rows(data.arrays["train"], cfg.data + reading + taught, block_size, cfg.loss_on, cfg.seed)
    knowledge_rows = mixed_rows(data.arrays["pretrain"], cfg.pretrain_data, block_size, "all", cfg.seed)
    (_, val_ids, val_mask), = data.arrays["val"]
    val_rows = PackedRows(val_ids, val_mask, block_size, "assistant", data.tokenizer.token_to_id("<|pad|>"))
    if train_rows is None or val_rows.n_rows < 1:
        raise UserError(f"too little data for block_size {block_size}: {train_rows.n_rows if train_rows else 0} "
                        f"train / {val_rows.n_rows} val rows")
    return train_rows, knowledge_rows, val_rows

# -----------------------------------------------------------------------------
# The optimizer (the device and precision are picked in runtime.py)


def orthogonalize(G, steps=5, eps=1e-7, dtype=torch.bfloat16):
    """Newton-Schulz iteration towards the nearest semi-orthogonal matrix, for a stack G (n, rows, cols) with
    rows <= cols. The quintic's coefficients (Jordan et al. 2024) trade exactness for speed: after 5 steps the
    singular values lie roughly between 0.5 and 1.5 instead of at 1, which they found trains as well as the
    exact U V^T. That inexactness is also why bf16 is precise enough where it is fast."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT  # (n, rows, rows)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + b A X + c A^2 X
    return X


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for 2-D hidden matrices: Nesterov momentum whose update is orthogonalised,
    so that every direction of the matrix moves by a similar amount. The step is scaled by
    0.2 * sqrt(max(rows, cols)) to match AdamW's update RMS (Liu et al. 2025), so that one learning rate and
    schedule serve both optimizers. It computes what torch.optim.Muon(adjust_lr_fn="match_rms_adamw") does
    (a test checks that), but orthogonalises same-shaped matrices together in batched matmuls, in ns_dtype."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95, ns_steps=5, ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
            updates = torch._foreach_lerp(grads, buffers, group["momentum"])  # Nesterov: look one step ahead
            # Tall matrices are orthogonalised transposed, so (1024, 256) and (256, 1024) share one batch.
            wide = [u if u.size(0) <= u.size(1) else u.mT for u in updates]
            by_shape = defaultdict(list)
            for i, u in enumerate(wide):
                by_shape[u.shape].append(i)
            for (_, cols), indices in by_shape.items():
                ortho = orthogonalize(torch.stack([wide[i] for i in indices]), group["ns_steps"], dtype=self.ns_dtype)
                step_size = group["lr"] * 0.2 * math.sqrt(cols)
                for i, o in zip(indices, ortho):
                    p = params[i]
                    p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay
                    p.add_(o if o.shape == p.shape else o.mT, alpha=-step_size)


def configure_optimizers(model, cfg, device):
    """A list of optimizers that together cover every parameter. AdamW decays matrices (embeddings and
    linear weights), never gains or biases. With --optimizer muon, the blocks' hidden matrices go to Muon
    (Jordan et al. 2024: orthogonalised momentum), with its step scaled to match AdamW's RMS (Liu et al.
    2025) so the same learning rate and schedule apply; embeddings, gains and biases stay on AdamW. The
    tied embedding has a group of its own, whose rate the loop sets to --embedding_lr_scale times the rest."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if p.dim() == 2 and ".h." in f".{name}"] if cfg.optimizer == "muon" else []
    embedding = model.transformer.wte.weight  # also the output layer (tied)
    own_groups = {id(p) for p in hidden} | {id(embedding)}
    rest = [p for _, p in named if id(p) not in own_groups]
    # At the blocks' rate the embedding learns too slowly: 5x ended 0.11 bits/byte lower (bench.training tricks).
    groups = [{"params": [embedding], "weight_decay": cfg.weight_decay, "is_embedding": True},
              {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.split(":")[0] in ("cpu", "cuda")
    optimizers = [torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)]
    if hidden:
        ns_dtype = torch.bfloat16 if has_fast_bf16(device) else torch.float32
        optimizers.append(Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, ns_dtype=ns_dtype))
    return optimizers


def get_lr(step, progress, cfg):
    """Linear warmup to cfg.lr over the first steps, then cfg.lr until the last cfg.decay_fraction of the
    run, then cosine decay to cfg.min_lr as progress reaches 1 (decay_fraction 1: cosine over the whole run).
    Progress goes from 0 to 1, counted in steps, or in time under --max_minutes (Budget, below)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decayed = max(0.0, 1.0 - (1.0 - progress) / cfg.decay_fraction)  # 0 until the decay starts, then to 1
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * decayed)) * (cfg.lr - cfg.min_lr)


@torch.no_grad()
def evaluate(model, val_rows, byte_lengths, cfg, ctx, device):
    """Validation loss (nats per target token) and bits per byte over the same targets. Bits per byte
    divides the summed loss by the UTF-8 bytes those tokens stand for, so vocabularies compare fairly."""
    model.eval()
    n_rows = min(val_rows.n_rows, max(1, cfg.eval_tokens // val_rows.block_size))
    loss_sum, n_targets, bits_sum, n_bytes = 0.0, 0, 0.0, 0
    # One micro-batch of rows at a time: a training step already holds that many rows' logits in memory.
    for first in range(0, n_rows, cfg.batch_size):
        x, y = val_rows.get(range(first, min(first + cfg.batch_size, n_rows)))
        x, y = x.to(device), y.to(device)
        with ctx:
            logits, _ = model(x)
        losses = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none")
        valid = y.view(-1) != IGNORE_INDEX
        token_bytes = byte_lengths[y.view(-1).clamp(min=0)] * valid
        loss_sum += losses[valid].sum().item()
        n_targets += valid.sum().item()
        bits_sum += (losses * (token_bytes > 0)).sum().item() / math.log(2)
        n_bytes += token_bytes.sum().item()
    model.train()
    return loss_sum / max(1, n_targets), bits_sum / max(1, n_bytes)


# -----------------------------------------------------------------------------
# Checkpoints: everything --resume needs to continue exactly, and everything chat needs to rebuild the model


def checkpoint_state(model, optimizers, scaler, cfg, data, step, **progress):
    """The model and optimizer state, both configs, the tokenizer's name and hash, the data's hash and the
    RNG. progress: val_loss and val_bpb (the newest evaluation), elapsed_s (the time spent, for a budgeted
    schedule) and chat_start_step (the step the chat stage began at; None while in the knowledge stage)."""
    return {"model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
            "scaler": scaler.state_dict(), "model_config": asdict(model.config), "train_config": asdict(cfg),
            "step": step, "tokenizer": data.tokenizer_info, "texts_sha256": data.texts["sha256"],
            "rng": rng_state(), **progress}


def save_checkpoint(state, out_dir, keep_last):
    """Written atomically, then out_dir/latest points at it; only the keep_last newest are kept. A save that
    fails (a full disk, a folder made read-only) stops the run in one line, the checkpoints before it intact."""
    path = Path(out_dir) / f"gpt_step{state['step']:04d}.pt"
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        atomic_write(Path(out_dir) / "latest", lambda tmp: tmp.write_text(path.name + "\n"))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        raise UserError(f"could not save {path}: {why_unwritable(out_dir, e)}; {what_is_intact(out_dir)}")
    for old in checkpoint_paths(out_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def model_config_from(stored):
    """GPTConfig from a checkpoint's dict. Options that an older version stored switched off are ignored;
    one switched on cannot be rebuilt."""
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    for name, value in stored.items():
        if name not in known and value:
            raise UserError(f"the checkpoint uses --{name}, an option this version of TinyGPT does not have")
    return GPTConfig(**{name: value for name, value in stored.items() if name in known})


def load_checkpoint(path, device="cpu"):
    """Rebuild (model, tokenizer, checkpoint dict) from a checkpoint file, or the newest one in a dir."""
    path, ckpt = find_checkpoint(path, device)
    return (*model_from_checkpoint(path, ckpt, device), ckpt)


def model_from_checkpoint(path, ckpt, device="cpu"):
    """(model, tokenizer) of a checkpoint dict read from path, checking that the tokenizer next to it is the
    one it was trained with. Weights stored in bf16 (a release) load into the fp32 model."""
    try:
        model_config = model_config_from(ckpt["model_config"])
    except UserError as e:
        raise UserError(f"{path}: {e}")
    tokenizer_path = path.parent / ckpt["tokenizer"]["file"]
    if not tokenizer_path.is_file():
        raise UserError(f"{path}: its tokenizer {tokenizer_path} is missing; copy it next to the checkpoint")
    if file_sha256(tokenizer_path) != ckpt["tokenizer"]["sha256"]:
        raise UserError(f"{path}: {tokenizer_path} is not the tokenizer this checkpoint was trained with")
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.get_vocab_size() != model_config.vocab_size:
        raise UserError(f"{path}: tokenizer has {tokenizer.get_vocab_size()} tokens, model expects "
                        f"{model_config.vocab_size}")
    model = GPT(model_config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the stored config ({str(e).splitlines()[0][:120]})")
    return model.to(device), tokenizer


def reads_passages(ckpt):
    """Whether a checkpoint's model trained on passages (--knowledge), itself or the model it started from."""
    return bool(ckpt.get("reads_passages", ckpt.get("train_config", {}).get("knowledge")))


def make_release(source, out_dir):
    """Make the newest checkpoint of a run (or a checkpoint file) the release model in out_dir."""
    _, _, ckpt = load_checkpoint(source)  # refuses a damaged checkpoint or a tokenizer that does not match
    return write_release(Path(source) if Path(source).is_dir() else Path(source).parent, ckpt, out_dir)


# -----------------------------------------------------------------------------
# Training: the setup, one step, and the loop


def check_train_config(cfg):
    for name in ("batch_size", "grad_accum", "eval_interval", "save_interval", "log_interval", "eval_tokens"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_steps < 1 and not cfg.max_minutes:
        raise UserError(f"--max_steps must be at least 1 (or set --max_minutes), got {cfg.max_steps}")
    negative = min(cfg.min_lr, cfg.warmup_steps, cfg.max_minutes, cfg.keep_last) < 0
    if min(cfg.lr, cfg.embedding_lr_scale) <= 0 or negative:
        raise UserError("--lr and --embedding_lr_scale must be positive; --min_lr, --warmup_steps, --max_minutes, "
                        "--keep_last non-negative")
    if not 0 < cfg.decay_fraction <= 1:
        raise UserError(f"--decay_fraction must be above 0 and at most 1, got {cfg.decay_fraction}")
    if cfg.pretrain_data and not 0 < cfg.pretrain_fraction < 1:
        raise UserError(f"--pretrain_fraction must be between 0 and 1 (the knowledge stage's share of the run), "
                        f"got {cfg.pretrain_fraction}")
    if cfg.stream_tokens < 1:
        raise UserError(f"--stream_tokens must be at least 1, got {cfg.stream_tokens}")


@dataclass
class Run:
    """What the training loop works with; start_run() builds it."""
    cfg: TrainConfig
    device: str
    ctx: object  # the autocast context (or nullcontext for float32)
    rank: int
    world_size: int
    data: PreparedData
    model: GPT  # uncompiled: what is evaluated and saved
    trained: nn.Module  # what the steps run: the model, compiled and, under torchrun, wrapped in DDP
    optimizers: list
    scaler: torch.amp.GradScaler  # fp16's loss scaler; switched off (a no-op) for bf16 and fp32
    left_off: dict  # where the checkpoint resumed from left off: step, stage, time, last evaluation ({}: none)
    log: object  # print on rank 0, nothing on the others
    reads_passages: bool  # trained on retrieved passages, now or in the model it started from

    @property
    def master(self):
        return self.rank == 0


def start_run(cfg, model_config, size_note):
    """Check the flags, pick the device, prepare the data, build the model and optimizers, and restore
    them from the checkpoint being resumed (cfg.resume, found by configs_from_args)."""
    check_train_config(cfg)
    check_model_config(model_config)
    check_out_dir(cfg.out_dir, resuming=bool(cfg.resume))
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    rank, world_size, device = setup_distributed(device)
    ckpt = read_checkpoint(Path(cfg.resume)) if cfg.resume else None
    init = read_checkpoint(Path(cfg.init_from)) if cfg.init_from and not ckpt else None  # a fine-tune's start
    source, source_path = (ckpt, cfg.resume) if ckpt else (init, cfg.init_from)
    start_from = (Path(source_path).parent, source) if source else None
    log = rank_zero_print(rank)
    if rank == 0 and Path(cfg.out_dir).is_dir() and (stale := remove_stale_temp_files(cfg.out_dir)):
        log(f"removed {len(stale)} temp file(s) that a killed run left behind: {', '.join(stale[:3])}")
    data = prepare_data(cfg, model_config, rank, world_size, log, start_from)
    model_config.vocab_size = data.tokenizer.get_vocab_size()
    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device)
    optimizers = configure_optimizers(model, cfg, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")
    if ckpt is not None:
        restore_training_state(ckpt, model, optimizers, scaler, cfg.resume)
    elif init is not None:
        load_weights_growing_vocab(model, init["model"])
    log(f"model: {model_config.n_layer} x {model_config.n_embd} ({model.num_params() / 1e6:.2f}M parameters), "
        f"{size_note}: {asdict(model_config)}, batch {cfg.batch_size}")
    ctx = autocast_context(device, dtype)
    trained = compile_model(model, cfg, device, ctx, log)
    if world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(trained)
    budget = ""
    if cfg.max_minutes:
        left = f" ({max(cfg.max_minutes - ckpt.get('elapsed_s', 0.0) / 60, 0):.1f} left)" if ckpt else ""
        budget = f", for {cfg.max_minutes:g} minutes{left}: the schedule follows the clock"
    log(f"training on {device} ({dtype}, {world_size} process{'es' * (world_size > 1)})"
        + (f", resuming from {cfg.resume} at step {ckpt['step']}" if ckpt else "") + budget)
    left_off = {"step": ckpt["step"], "chat_start_step": ckpt.get("chat_start_step", 0),  # None: knowledge stage
               "elapsed_s": ckpt.get("elapsed_s", 0.0), "val_loss": ckpt.get("val_loss"),
               "val_bpb": ckpt.get("val_bpb")} if ckpt else {}
    reads = bool(cfg.knowledge) or bool(source and reads_passages(source))
    return Run(cfg, device, ctx, rank, world_size, data, model, trained, optimizers, scaler, left_off, log, reads)


def restore_training_state(ckpt, model, optimizers, scaler, resume_path):
    """Weights, optimizer moments, the fp16 loss scale and the RNG of a checkpoint."""
    model.load_state_dict(ckpt["model"])
    if [len(state["param_groups"]) for state in ckpt["optimizers"]] != [len(o.param_groups) for o in optimizers]:
        raise UserError(f"--resume: {resume_path} was trained with another --optimizer or an older TinyGPT")
    for optimizer, state in zip(optimizers, ckpt["optimizers"]):
        optimizer.load_state_dict(state)
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])


def load_weights_growing_vocab(model, weights):
    """A checkpoint's weights into a model whose vocabulary may have gained tokens: new rows keep their init."""
    weights = dict(weights)
    for name in ("transformer.wte.weight", "lm_head.weight"):
        grown = model.state_dict()[name].clone()
        grown[:len(weights[name])] = weights[name]
        weights[name] = grown
    model.load_state_dict(weights)


def compile_model(model, cfg, device, ctx, log):
    """torch.compile the model and run one forward and backward on a dummy batch, so that a missing C++
    compiler or an unsupported platform shows up here, once: then say so and train without it. The dummy
    step leaves no trace: its gradients are dropped and the RNG is put back."""
    if not cfg.compile:
        return model
    if device == "mps":
        log("torch.compile is not used on MPS: it has not been measured to work there")
        return model
    log("compiling the model (--no-compile skips it)")
    compiled, rng = torch.compile(model), rng_state()
    dummy = torch.zeros(cfg.batch_size, model.config.block_size, dtype=torch.long, device=device)
    try:
        with ctx:
            _, loss = compiled(dummy, dummy)
        loss.backward()
    except torch._dynamo.exc.TorchDynamoException as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
        log(f"torch.compile failed ({reason}); training without it (--no-compile skips the attempt)")
        compiled = model
    finally:
        model.zero_grad(set_to_none=True)
        set_rng_state(rng)
    return compiled


def stage_at(step, chat_start, chat_rows, knowledge_rows, cfg, world_size):
    """(stage name, its rows, the step counted from the stage's start, loss_on) for this step. The knowledge
    stage puts the loss on every token. So does the chat stage for its first cfg.all_tokens_epochs passes
    over the data: while the data is new, every token teaches English; after that, the replies teach
    answering (--loss_on)."""
    if chat_start is None:
        return "knowledge", knowledge_rows, step, "all"
    stage_step = step - chat_start
    rows_seen = stage_step * cfg.grad_accum * world_size * cfg.batch_size
    return "chat", chat_rows, stage_step, "all" if rows_seen < cfg.all_tokens_epochs * chat_rows.n_rows else cfg.loss_on


def train_step(model, optimizers, scaler, batches, grad_clip, ctx):
    """One optimizer step over the micro-batches [(x, y), ...]: forward and backward each, then clip the
    gradient and step. Returns the mean loss. Under DDP, gradients are all-reduced on the last micro-batch
    only (no_sync before it). Under float16 the scaler multiplies the loss so that small gradients do not
    round to zero, and skips a step whose gradients overflowed; for bf16 and fp32 it does nothing."""
    mean_loss = 0.0
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        with (model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()), ctx:
            _, loss = model(x, y)
        scaler.scale(loss / len(batches)).backward()
        mean_loss += loss.item() / len(batches)
    if grad_clip > 0:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for optimizer in optimizers:
        scaler.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    scaler.update()
    return mean_loss


def train(cfg, model_config, size_note="", clock=time.monotonic):
    """One training run, from flags to checkpoints; returns the exit status (130 after Ctrl-C). Each step,
    in order: (the stage switch) -> evaluate -> checkpoint -> micro-batches -> clip -> step -> log."""
    run = start_run(cfg, model_config, size_note)
    chat_rows, knowledge_rows, val_rows = packed_splits(run.data, run.model.config.block_size, cfg)
    byte_lengths = torch.from_numpy(token_byte_lengths(run.data.tokenizer)).to(run.device)
    metrics = Path(cfg.out_dir) / "metrics.jsonl"
    left_off = run.left_off
    step = first_step = left_off.get("step", 0)
    chat_start = left_off["chat_start_step"] if left_off else None  # None: in the knowledge stage
    last_eval = {key: left_off.get(key) for key in ("val_loss", "val_bpb")}
    budget, saved = Budget(cfg, spent_s=left_off.get("elapsed_s", 0.0), clock=clock), None
    tokens_per_step = cfg.batch_size * cfg.grad_accum * run.world_size * run.model.config.block_size
    with StopRequest() as stop, Progress(cfg, step, tokens_per_step, budget, enabled=run.master) as bar:
        while True:
            progress, stopping = agreed_position(budget, step, stop, run)
            last_step, eval_started = progress >= 1.0, budget.clock()
            chat_start = chat_stage_start(step, chat_start, progress, knowledge_rows, cfg, bar)
            stage, rows, stage_step, loss_on = stage_at(step, chat_start, chat_rows, knowledge_rows, cfg,
                                                        run.world_size)
            if step % cfg.eval_interval == 0 or last_step or stopping:
                last_eval = evaluate_and_log(run, val_rows, byte_lengths, metrics, step, budget, bar)
            if run.master and step > first_step and (step % cfg.save_interval == 0 or last_step or stopping):
                state = checkpoint_state(run.model, run.optimizers, run.scaler, cfg, run.data, step, **last_eval,
                                         elapsed_s=budget.elapsed(), chat_start_step=chat_start,
                                         reads_passages=run.reads_passages)
                saved = save_checkpoint(state, cfg.out_dir, cfg.keep_last)
            if last_step or stopping:
                break
            if step % cfg.eval_interval == 0:  # the final evaluation and checkpoint will take about as long
                budget.reserve_s = budget.clock() - eval_started
            step_started, lr = time.time(), get_lr(step, progress, cfg)
            loss = optimizer_step(run, rows, stage_step, loss_on, lr, step, saved)
            step += 1
            tok_per_s = bar.update(step, time.time() - step_started, loss, lr)
            if run.master and step % cfg.log_interval == 0:
                write_metrics(metrics, {"step": step, "stage": stage, "train_loss": loss, "lr": lr,
                                        "tok_per_s": round(tok_per_s or 0), "elapsed_s": round(budget.elapsed(), 1)})
    return finish_run(run, saved, stop.requested, step, budget)


def agreed_position(budget, step, stop, run):
    """(progress through the run, whether to stop now), the same on every rank: the furthest progress and
    any rank's stop request, so that all ranks take the same steps and save together."""
    progress, stop_votes = max_over_ranks([budget.progress(step), float(stop.requested)], run.world_size,
                                          run.device)
    return progress, stop_votes > 0


def chat_stage_start(step, chat_start, progress, knowledge_rows, cfg, bar):
    """The step the chat stage began at: this one when the knowledge stage ends now (or there is none)."""
    if chat_start is None and (knowledge_rows is None or progress >= cfg.pretrain_fraction):
        if knowledge_rows is not None:
            bar.write(f"step {step}: the knowledge stage ends, the chat stage begins")
        return step
    return chat_start


def evaluate_and_log(run, val_rows, byte_lengths, metrics, step, budget, bar):
    """Validation loss and bits per byte, written to metrics.jsonl and the terminal."""
    val_loss, val_bpb = evaluate(run.model, val_rows, byte_lengths, run.cfg, run.ctx, run.device)
    if run.master:
        write_metrics(metrics, {"step": step, "val_loss": val_loss, "val_bpb": val_bpb,
                                "elapsed_s": round(budget.elapsed(), 1)})
    bar.write(f"step {step}: val loss {val_loss:.4f}, val bpb {val_bpb:.4f}")
    return {"val_loss": val_loss, "val_bpb": val_bpb}


def optimizer_step(run, rows, stage_step, loss_on, lr, step, saved):
    """Set the learning rate, then micro-batches forward and backward, clip, step: the training loss. A loss
    that is not finite stops the run instead of spending its budget on NaN."""
    cfg = run.cfg
    for group in (group for optimizer in run.optimizers for group in optimizer.param_groups):
        group["lr"] = lr * (cfg.embedding_lr_scale if group.get("is_embedding") else 1.0)
    batches = [rows.get(training_rows(stage_step, micro, cfg, run.rank, run.world_size, rows.n_rows), loss_on)
               for micro in range(cfg.grad_accum)]
    batches = [(x.to(run.device), y.to(run.device)) for x, y in batches]
    loss = train_step(run.trained, run.optimizers, run.scaler, batches, cfg.grad_clip, run.ctx)
    if not math.isfinite(loss):
        last_good = f"{saved} holds the last good weights" if saved else "no checkpoint was saved yet"
        raise UserError(f"the training loss is {loss} at step {step + 1}: the run diverged "
                        f"({last_good}); try a lower --lr or --dtype float32")
    return loss


def finish_run(run, saved, interrupted, step, budget):
    """Plot the losses, say how the run ended, and return the exit status."""
    if run.master:
        plot_metrics(Path(run.cfg.out_dir) / "metrics.jsonl", Path(run.cfg.out_dir) / "loss.png")
        if saved:
            run.log(f"saved {saved}; loss curve in {Path(run.cfg.out_dir) / 'loss.png'}")
    if run.world_size > 1:
        torch.distributed.destroy_process_group()
    if interrupted:
        run.log("interrupted: checkpoint saved; continue with --resume")
        return 130
    if run.cfg.max_minutes:
        run.log(f"the {run.cfg.max_minutes:g}-minute budget ended at step {step}, after "
                f"{format_minutes(budget.elapsed())}")
    return 0

# -----------------------------------------------------------------------------
# Command line: every GPTConfig and TrainConfig field is a flag of the same name


def field_default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def build_parser():
    """Every flag defaults to None, meaning "not given": configs_from_args fills in the rest."""
    parser = argparse.ArgumentParser(description="Train TinyGPT, a small chat GPT, on OASST-style data.")
    for config_class in (GPTConfig, TrainConfig):
        group = parser.add_argument_group(config_class.__name__)
        for f in dataclasses.fields(config_class):
            default = field_default(f)
            kwargs = {"help": f"{f.metadata['help']} (default: {default})".replace("%", "%%")}
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            if isinstance(default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif isinstance(default, list):
                kwargs["nargs"] = "+"
            elif f.name == "resume":
                kwargs.update(nargs="?", const="latest")
            elif isinstance(default, (int, float)):
                kwargs["type"] = non_negative(type(default))
            group.add_argument(f"--{f.name}", **kwargs)
    parser.add_argument("--recipe", choices=list(RECIPES), default="default",
                        help="a named set of defaults: 'seed' reproduces the original project (4 layers x 4 "
                             "heads x 256 dims, learned positions, GELU, AdamW, fp32), the baseline of every "
                             "comparison in bench/RESULTS.md")
    parser.add_argument("--depth", type=non_negative(int), default=0,
                        help="model size in one number: N blocks of 64*N dims (in 128-dim heads), with the context "
                             "and batch to match (0: the size measured best for the device and --max_minutes)")
    parser.add_argument("--release", metavar="RUN", default="",
                        help="do not train: make the newest checkpoint of RUN (a directory or file) the release "
                             "model, bf16 weights without optimizer state, in ckpt/release/")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def configs_from_args(args):
    """(GPTConfig, TrainConfig, size note). Each field comes from the first of: its flag; the checkpoint
    being resumed; the recipe; the size dial (--depth, or the depth measured best for the device and
    budget); a time budget's own defaults (no step limit, a later decay); the dataclass default."""
    given = {name: value for name, value in vars(args).items() if value is not None}
    stored = {}  # the flags a checkpoint holds: a resumed run's, or a fine-tune's architecture
    if args.resume:  # a resumed run keeps its architecture, and its sources and schedule unless told otherwise
        path, ckpt = resume_checkpoint(given.get("out_dir", "ckpt"), args.resume)
        given["resume"] = str(path)
        stored = ckpt["model_config"] | {name: value for name, value in ckpt["train_config"].items()
                                          if name not in ("resume", "out_dir")}
        given = {name: value for name, value in given.items() if name not in ckpt["model_config"]}
    elif args.init_from:  # a fine-tune keeps the architecture of the model it starts from
        path, init = find_checkpoint(args.init_from)
        given["init_from"], stored = str(path), init["model_config"]
        given = {name: value for name, value in given.items() if name not in stored or is_longer_window(name, init)}
    device_type = pick_device(given.get("device", "auto")).split(":")[0]
    max_minutes = given.get("max_minutes", stored.get("max_minutes", 0.0))
    depth = args.depth or auto_depth(device_type, max_minutes)
    size = size_for_depth(depth, device_type)
    budget = {"max_steps": 0, "decay_fraction": BUDGET_DECAY_FRACTION} if max_minutes else {}
    layers = [given, stored, RECIPES[args.recipe], size, budget]

    def value(f):
        return next((layer[f.name] for layer in layers if f.name in layer), field_default(f))
    model_config = GPTConfig(**{f.name: value(f) for f in dataclasses.fields(GPTConfig)})
    train_config = TrainConfig(**{f.name: value(f) for f in dataclasses.fields(TrainConfig)})
    return model_config, train_config, size_note(args, given, stored, depth, size, device_type, max_minutes)


def is_longer_window(name, init):
    """A fine-tune may change the window of a RoPE model: its positions are computed, not learned weights."""
    return name == "block_size" and init["model_config"].get("pos_encoding") == "rope"


def size_note(args, given, stored, depth, size, device_type, max_minutes):
    """How the model's size (size_for_depth's `size` at `depth`) was chosen, for the run's first lines."""
    if stored:
        return "the checkpoint's"
    chosen = {name for name in size if name in given or name in RECIPES[args.recipe]}
    if {"n_layer", "n_head", "n_embd"} <= chosen and not args.depth:
        return "as given"
    budget = f" and a {max_minutes:g}-minute budget" if max_minutes else ""
    how = "from --depth" if args.depth else f"chosen for {device_type}{budget}; --depth overrides"
    flags = ", ".join(f"--{name}" for name in size if name in chosen)
    return f"depth {depth}, {how}" + (f" ({flags} as given)" if flags else "")


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.release:
            release = make_release(args.release, RELEASE_DIR)
            print(f"release model: {release} ({release.stat().st_size / 2**20:.1f} MiB)")
            return 0
        model_config, train_config, note = configs_from_args(args)
        return train(train_config, model_config, note)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a folder made read-only while writing data or logs
        print(f"error: {write_failure(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted before a checkpoint could be saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    keep_freed_memory()
    sys.exit(main())
