"""
TinyGPT: train a small chat GPT from scratch on OpenAssistant conversations.

    python newgpt.py                                   # OASST2 from the Hugging Face hub
    python newgpt.py --data a.jsonl.gz b.parquet --val_data v.jsonl.gz --max_minutes 20
    python newgpt.py --depth 8 --max_minutes 5         # a bigger model, its schedule laid over 5 minutes
    python newgpt.py --data chat.jsonl.gz --pretrain_data facts.jsonl.gz:4 docs.jsonl.gz   # knowledge, then chat
    torchrun --nproc_per_node=2 newgpt.py --data ...   # data-parallel (gloo on CPU, nccl on CUDA)

The file reads top to bottom as the pipeline runs:
  configs -> model (attention, MLP, block, GPT) -> data (formats -> conversations -> train_texts.json)
  -> tokenizer (byte-level BPE + chat special tokens) -> batches (packed rows, cached on disk)
  -> device, precision, optimizer -> checkpoints -> training loop (eval -> checkpoint -> micro-batches
  -> clip -> step -> log) -> main()

Design choices (each measured: bench/RESULTS.md): pre-norm blocks; causal self-attention with heads of
128 dims (F.scaled_dot_product_attention); RoPE; ReLU^2 MLPs; no biases; tied input/output embeddings;
a cross-entropy whose gradient is written out; the loss on every token for the first pass over the data,
then on the assistant's only; Muon for the blocks' matrices and AdamW for the rest, linear warmup then
cosine decay, over the steps or over a time budget; one size dial (--depth), chosen for the device; bf16
autocast where the hardware has it (fp16 with loss scaling on older GPUs) and torch.compile; atomic
checkpoints that resume (a step-based run bit-exactly), on CPU, CUDA or MPS. Optional: a knowledge stage
before the chat stage, on weighted document and Q/A sources, streamed when they are Hugging Face datasets.
chat_with_model.py imports the model and the chat format from here, so training and chatting can never
disagree.
"""

import argparse
import ctypes
import dataclasses
import functools
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
import unicodedata
from collections import defaultdict, deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


class UserError(Exception):
    """A problem with the user's input: reported as one line and a non-zero exit, never a traceback."""


def atomic_write(path, write):
    """Call write(tmp_path), then rename the temp file over `path`: a kill mid-write never leaves a
    half-written file under the real name, and never damages the previous version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# The chat format: every conversation is rendered with these tokens, in training and in chat.

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
IGNORE_INDEX = -1  # target value that gets no loss (prompter tokens under --loss_on assistant)
HF_DATASET = "OpenAssistant/oasst2"
STREAM_SAMPLE_RECORDS = 2000  # records of each streamed source that the tokenizer also trains on
STREAM_SHARD_TOKENS = 2 ** 20  # a streamed source is written in shards of this many tokens (bounded memory)
# The evaluation prompts of bench/chat_quality.py: no training run may see them.
HOLDOUT_FILES = [Path(__file__).resolve().parent / "bench" / name
                 for name in ("knowledge_questions.jsonl", "chat_prompts.jsonl")]

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
        "help": "dropout probability (0: the default 3-epoch run does not overfit)"})
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
        "help": "held-out sources; without it about 2%% of the message trees are held out"})
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
    min_lr: float = field(default=1e-4, metadata={"help": "learning rate at the end of the cosine decay"})
    warmup_steps: int = field(default=100, metadata={"help": "steps of linear learning-rate warmup"})
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


# The original project's recipe, for comparisons: `python newgpt.py --recipe seed` (explicit flags still win).
# Its data was the first 20k OASST2 rows: add --max_samples 20000 to reproduce that too.
RECIPES = {
    "default": {},
    "seed": {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 512, "batch_size": 8,
             "pos_encoding": "learned", "bias": True, "mlp_act": "gelu", "dtype": "float32", "optimizer": "adamw",
             "compile": False, "all_tokens_epochs": 0.0},
}


# A budgeted run keeps its peak learning rate for longer: decaying over the whole run, as a step run does,
# lost to the same schedule cut short by the clock (bench/RESULTS.md, "Time budget").
BUDGET_DECAY_FRACTION = 0.4


def size_for_depth(depth, device_type):
    """The size dial: --depth N sets blocks, width, heads, dropout, context and batch together. The width
    grows by 64 per block (nanochat's aspect ratio), rounded up to whole heads of 128 dims, the head size
    that measured best. From depth 12 (91M parameters, ten per training token) dropout holds off
    overfitting. The learning rate stays: Muon scales each matrix's update to AdamW's size, and the same
    1e-3 trained every depth measured. On CUDA the context doubles, for longer chat histories, at the same
    tokens per step; a CPU keeps the 512 that its measurements used."""
    n_head = (depth + 1) // 2
    size = {"n_layer": depth, "n_head": n_head, "n_embd": 128 * n_head, "dropout": 0.1 if depth >= 12 else 0.0}
    if device_type == "cuda":
        return size | {"block_size": 1024, "batch_size": 16}
    return size | {"block_size": 512, "batch_size": 8}


def auto_depth(device_type, max_minutes):
    """The depth measured best for the device and budget (bench/RESULTS.md, "Time budget and model size")."""
    if device_type == "cuda":
        return 8 if 0 < max_minutes < 3 else 12
    return 4

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


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, V) against targets (N,), over the targets that are not IGNORE_INDEX
    (0, not NaN, when all are), with its gradient written out: (softmax(logits) - one_hot(target)) / n_targets.
    Autograd's own backward, compiled, builds the one-hot by comparing every vocabulary index with the
    target; this one overwrites the target column alone."""

    @staticmethod
    def forward(ctx, logits, targets):
        keep = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)  # ignored rows read any column: their gradient is scaled by 0
        logsumexp = logits.float().logsumexp(dim=-1)  # (N,)
        nll = logsumexp - logits.gather(-1, safe_targets[:, None]).squeeze(-1).float()  # (N,) -log p(target)
        n_targets = keep.sum().clamp(min=1)
        ctx.save_for_backward(logits, logsumexp, nll, safe_targets, keep, n_targets)
        return (nll * keep).sum() / n_targets

    @staticmethod
    def backward(ctx, grad_loss):
        logits, logsumexp, nll, safe_targets, keep, n_targets = ctx.saved_tensors
        scale = (keep * grad_loss / n_targets)[:, None]  # (N, 1)
        probs = (logits.float() - logsumexp[:, None]).exp()  # (N, V) softmax
        target_grads = ((-nll).exp()[:, None] - 1) * scale  # (N, 1) p(target) - 1
        grad = (probs * scale).to(logits.dtype)
        return grad.scatter(-1, safe_targets[:, None], target_grads.to(logits.dtype)), None


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
        """Mean next-token cross-entropy of logits (N, V) against targets (N,)."""
        return CrossEntropy.apply(logits, targets)


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
# Data: every source format becomes one conversation type,
#   {"turns": [{"role": "system"|"user"|"assistant"|"text", "content": str}, ...], "group": str}
# "text" marks a plain document (no roles are invented for it); "group" keeps a message tree on one
# side of the train/val split.


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
            prompt = r["instruction"] + ("\n\n" + r["context"] if (r.get("context") or "").strip() else "")
            conversations.append(make_conversation([("user", prompt), ("assistant", r["response"])], group))
        else:
            conversations.append(text_record_conversation(r, group))
    return conversations


def is_usable(conversation):
    """A document with text, or a chat with at least one user turn and one assistant turn."""
    roles = {t["role"] for t in conversation["turns"]}
    return roles == {"text"} or {"user", "assistant"} <= roles


def is_streamed(spec):
    """Knowledge sources that stream instead of loading: a dataset folder, or a Hugging Face dataset id."""
    path = Path(spec)
    return path.is_dir() or (not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None)


def stream_records(spec, split="train"):
    """The records of a Hugging Face dataset id or a local dataset folder, one at a time (datasets'
    streaming=True): a corpus larger than memory is never held whole."""
    if not Path(spec).is_dir() and not hub_reachable():
        raise UserError(f"the Hugging Face hub is unreachable, so {spec} cannot be streamed; pass local files")
    try:
        import datasets
        yield from datasets.load_dataset(spec, split=split, streaming=True)
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
    read over all sources, as the original project took the first 20k rows of OASST2."""
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


def content_hash(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


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
    if not train:
        raise UserError(f"no usable training conversations in {' '.join(cfg.data)} "
                        f"(language filter: {cfg.langs}; messages must be non-empty, not deleted, reviewed)")
    if not val:
        raise UserError("no validation conversations: give --val_data or more data")
    if local and not pretrain:
        raise UserError(f"no usable documents or Q/A pairs in {' '.join(cfg.pretrain_data)}")
    return {"format": "tinygpt-texts-v1", "build": build_options(cfg), "sha256": content_hash([train, val, pretrain]),
            "held_out": held_out, "train": train, "val": val, "pretrain": pretrain, "stream_sample": stream_sample}


def build_options(cfg):
    """What train_texts.json depends on: a file built with other options is rebuilt."""
    def sources(specs):  # weights only change how often rows are drawn, not the texts
        return [split_weight(spec)[0] for spec in specs]

    holdout = [content_hash(Path(p).read_text()) if Path(p).is_file() else p for p in cfg.holdout]
    return {"data": sources(cfg.data), "val_data": cfg.val_data, "pretrain_data": sources(cfg.pretrain_data),
            "langs": cfg.langs, "branches": cfg.branches, "max_samples": cfg.max_samples, "holdout": holdout}


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
    texts.setdefault("sha256", content_hash([texts["train"], texts["val"], texts["pretrain"]]))
    return texts


def load_or_build_texts(cfg):
    """train_texts.json is reused when it was built from the same sources and options, or when it has no
    build record at all (a user's own file in the same format); otherwise it is rebuilt."""
    path = Path(cfg.texts)
    options = build_options(cfg)
    if path.is_file():
        texts = read_texts_file(path)
        if texts.get("build", options) == options:
            return texts, "reused"
    texts = build_texts(cfg)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8"))
    return texts, "built"


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


def load_tokenizer(path):
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(path))
    # Text that happens to contain "<|user|>" is encoded as plain characters: only render_conversations
    # places special tokens, so a user can never forge a turn boundary.
    tokenizer.encode_special_tokens = True
    return tokenizer


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def render_conversations(tokenizer, conversations):
    """Conversations -> (ids, mask) pairs; mask[i] = 1 where token i is a training target.

    Layout: <|bos|> then per turn <|role|> content <|end|>; a plain document is <|bos|> text <|end|>.
    Targets are the assistant replies with their <|end|> (so the model learns to stop) and documents.
    All contents are encoded in one batch call; chat renders its history with this same function."""
    special = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    contents = [t["content"] for c in conversations for t in c["turns"]]
    encoded = iter(tokenizer.encode_batch(contents, add_special_tokens=False))
    rendered = []
    for c in conversations:
        ids, mask = [special["<|bos|>"]], [0]
        for turn in c["turns"]:
            content = next(encoded).ids
            is_target = int(turn["role"] in ("assistant", "text"))
            if turn["role"] != "text":
                ids.append(special[ROLE_TOKENS[turn["role"]]])
                mask.append(0)
            ids += content + [special["<|end|>"]]
            mask += [is_target] * (len(content) + 1)
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


# -----------------------------------------------------------------------------
# Batches: each split is one token stream, cut into rows of block_size + 1, cached on disk.


def tokenize_to_arrays(tokenizer, conversations):
    ids, mask = [], []
    for conv_ids, conv_mask in render_conversations(tokenizer, conversations):
        ids += conv_ids
        mask += conv_mask
    return np.array(ids, dtype=token_dtype(tokenizer)), np.array(mask, dtype=np.uint8)


def token_dtype(tokenizer):
    return np.uint16 if tokenizer.get_vocab_size() <= 2 ** 16 else np.uint32


def cached_token_arrays(tokenizer, tokenizer_sha, conversations, texts_sha, split, cache_dir):
    """Token ids and target mask for one split; a second run loads them from a .npz keyed by content."""
    path = Path(cache_dir) / f"tokens-{split}-{texts_sha[:12]}-{tokenizer_sha[:12]}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return cached["ids"], cached["mask"]
    ids, mask = tokenize_to_arrays(tokenizer, conversations)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: np.savez(tmp, ids=ids, mask=mask))
    return ids, mask


def npy_bytes(values, dtype):
    buffer = io.BytesIO()
    np.save(buffer, np.array(values, dtype=dtype))
    return buffer.getvalue()


def write_stream_shards(spec, tokenizer, holdout, val, max_tokens, folder):
    """Stream a dataset into token shards of STREAM_SHARD_TOKENS (ids and target mask, .npy each), keeping
    out evaluation prompts and validation messages as for local sources, up to max_tokens. The manifest,
    written last, marks the set complete."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, ids, mask, total = [], [], [], 0

    def flush():
        name = f"shard{len(shards):05d}"
        for suffix, values, dtype in (("ids", ids, token_dtype(tokenizer)), ("mask", mask, np.uint8)):
            atomic_write(folder / f"{name}-{suffix}.npy", lambda tmp: tmp.write_bytes(npy_bytes(values, dtype)))
        shards.append(name)

    records = stream_records(spec)
    while total < max_tokens and (batch := list(itertools.islice(records, 1000))):
        conversations = [c for c in records_to_conversations(batch, spec, None, "best")
                         if is_usable(c) and not asks_a_holdout_question(c, holdout)]
        for conv_ids, conv_mask in render_conversations(tokenizer, decontaminate(conversations, val)):
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


def cached_stream_shards(spec, tokenizer, tokenizer_sha, holdout, val, max_tokens, cache_dir):
    """A streamed source's token shards, written once (see write_stream_shards) and memory-mapped when read,
    so that training touches only the rows it draws."""
    key = hashlib.sha256(f"{spec}|{max_tokens}|{tokenizer_sha}".encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"stream-{key}"
    if not (folder / "manifest.json").is_file():
        write_stream_shards(spec, tokenizer, holdout, val, max_tokens, folder)
    shards = json.loads((folder / "manifest.json").read_text())["shards"]
    return [(np.load(folder / f"{name}-ids.npy", mmap_mode="r"), np.load(folder / f"{name}-mask.npy", mmap_mode="r"))
            for name in shards]


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
        if (loss_on or self.loss_on) == "assistant":
            y[torch.from_numpy(self.mask[starts[:, 1:]] == 0)] = IGNORE_INDEX
        return x, y


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


# -----------------------------------------------------------------------------
# Device, precision and the optimizer


def pick_device(requested):
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {requested}: CUDA is not available on this machine")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps: MPS is not available on this machine")
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", requested):
            raise UserError(f"--device {requested}: use auto, cpu, cuda, cuda:N or mps")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_fast_bf16():
    """AVX512-BF16 or AMX run bf16 matmuls natively (about 6x fp32 peak on the AMX machines here)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def pick_dtype(requested, device):
    device_type = device.split(":")[0]
    if requested == "auto":
        if device_type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16" if device_type == "cpu" and cpu_has_fast_bf16() else "float32"
    if requested == "float16" and device_type != "cuda":
        raise UserError("--dtype float16 needs CUDA; use bfloat16 or float32")
    return requested


def keep_freed_memory():
    """Tell glibc to keep freed memory in the process's heap. By default it serves big blocks (the 64 MB
    logits, their gradient) with fresh mmap pages and unmaps them on free, so every training step
    page-faults them in again: a (4096, 256) @ (256, 8192) bf16 matmul then takes 26 ms instead of 7. This
    changes the allocator of the whole process, so only a training run started from the command line calls
    it (newgpt.py's __main__), never an import of this module into a chat, a server or a notebook."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator behaves differently
        pass


def autocast_context(device, dtype):
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def orthogonalize(G, steps=5, eps=1e-7):
    """Newton-Schulz iteration towards the nearest semi-orthogonal matrix, for a stack G (n, rows, cols) with
    rows <= cols. The quintic's coefficients (Jordan et al. 2024) trade exactness for speed: after 5 steps the
    singular values lie roughly between 0.5 and 1.5 instead of at 1, which they found trains as well as the
    exact U V^T. Runs in bf16."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
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
    (a test checks that), but orthogonalises same-shaped matrices together in batched matmuls."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95, ns_steps=5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))

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
                ortho = orthogonalize(torch.stack([wide[i] for i in indices]), group["ns_steps"])
                step_size = group["lr"] * 0.2 * math.sqrt(cols)
                for i, o in zip(indices, ortho):
                    p = params[i]
                    p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay
                    p.add_(o if o.shape == p.shape else o.mT, alpha=-step_size)


def configure_optimizers(model, cfg, device):
    """A list of optimizers that together cover every parameter. AdamW decays matrices (embeddings and
    linear weights), never gains or biases. With --optimizer muon, the blocks' hidden matrices go to Muon
    (Jordan et al. 2024: orthogonalised momentum), with its step scaled to match AdamW's RMS (Liu et al.
    2025) so the same learning rate and schedule apply; embeddings, gains and biases stay on AdamW."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if p.dim() == 2 and ".h." in f".{name}"] if cfg.optimizer == "muon" else []
    hidden_ids = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in hidden_ids]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.split(":")[0] in ("cpu", "cuda")
    optimizers = [torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)]
    if hidden:
        optimizers.append(Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay))
    return optimizers


def get_lr(step, progress, cfg):
    """Linear warmup to cfg.lr over the first steps, then cfg.lr until the last cfg.decay_fraction of the
    run, then cosine decay to cfg.min_lr as progress reaches 1 (decay_fraction 1: cosine over the whole run).
    Progress goes from 0 to 1, counted in steps, or in time under --max_minutes (Budget, below)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decayed = max(0.0, 1.0 - (1.0 - progress) / cfg.decay_fraction)  # 0 until the decay starts, then to 1
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * decayed)) * (cfg.lr - cfg.min_lr)


class Budget:
    """How far a run is through its schedule, from 0 to 1: the further of its steps (out of --max_steps)
    and its time (out of --max_minutes). Time counts from the start of training, compilation and
    evaluations included, and carries over --resume. The last evaluation and checkpoint must fit in the
    budget too, so the time they last took is kept back."""

    def __init__(self, cfg, spent_s=0.0, clock=time.monotonic):
        self.max_steps, self.seconds = cfg.max_steps, 60 * cfg.max_minutes
        self.clock, self.started, self.spent_s = clock, clock(), spent_s
        self.reserve_s = 0.0

    def elapsed(self):
        return self.spent_s + self.clock() - self.started

    def progress(self, step):
        by_steps = step / self.max_steps if self.max_steps else 0.0
        by_time = self.elapsed() / max(1e-9, self.seconds - self.reserve_s) if self.seconds else 0.0
        return min(1.0, max(by_steps, by_time))

    def seconds_left(self):
        return max(0.0, self.seconds - self.elapsed()) if self.seconds else math.inf


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
# Checkpoints


# The release model, trained by this repo and committed with it (bench/RESULTS.md, "The release model"), so
# that chat works right after a clone; python newgpt.py --release RUN_DIR replaces it.
RELEASE_DIR = Path(__file__).resolve().parent / "ckpt" / "release"
RELEASE_FILE = "tinygpt.pt"


def checkpoint_paths(out_dir):
    return sorted(Path(out_dir).glob("gpt_step*.pt"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))


def latest_checkpoint(out_dir):
    """The checkpoint named by out_dir/latest, or else the highest-numbered gpt_step*.pt."""
    pointer = Path(out_dir) / "latest"
    if pointer.is_file():
        named = Path(out_dir) / pointer.read_text().strip()
        if named.is_file():
            return named
    found = checkpoint_paths(out_dir)
    return found[-1] if found else None


def save_checkpoint(state, out_dir, keep_last):
    """Written atomically, then out_dir/latest points at it; only the keep_last newest are kept."""
    path = Path(out_dir) / f"gpt_step{state['step']:04d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    atomic_write(Path(out_dir) / "latest", lambda tmp: tmp.write_text(path.name + "\n"))
    for old in checkpoint_paths(out_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def why_unreadable(path, error):
    """What is wrong with a file torch.load could not read, in words a user can act on."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    if not is_zip:
        return "is not a PyTorch checkpoint at all"
    if "weights_only" in str(error) or "Unpickl" in type(error).__name__:
        return ("holds Python objects that safe loading (weights_only=True) refuses: it is not a TinyGPT "
                "checkpoint")
    return f"is truncated or damaged ({size:,} bytes; was it copied or saved completely?)"


def model_config_from(stored):
    """GPTConfig from a checkpoint's dict. Options that an older version stored switched off are ignored;
    one switched on cannot be rebuilt."""
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    for name, value in stored.items():
        if name not in known and value:
            raise UserError(f"the checkpoint uses --{name}, an option this version of TinyGPT does not have")
    return GPTConfig(**{name: value for name, value in stored.items() if name in known})


def default_checkpoint(out_dir="ckpt"):
    """What chat loads when not told: the newest checkpoint trained into out_dir, else the release model."""
    found = latest_checkpoint(out_dir) or latest_checkpoint(RELEASE_DIR)
    if found:
        return found
    raise UserError(f"no checkpoint in {out_dir}/ and no release model in {RELEASE_DIR}/; train one with: "
                    f"python newgpt.py")


def checkpoint_file(path):
    """A checkpoint file as given, or the newest one in a run directory."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise UserError(f"no checkpoint in {path}/; train one with: python newgpt.py --out_dir {path}")
        path = found
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path, device="cpu"):
    """Rebuild (model, tokenizer, checkpoint dict) from a checkpoint file, or the newest one in a dir.
    Loads with weights_only=True (no pickled code runs) and checks that the tokenizer next to it is the
    one it was trained with. Weights stored in bf16 (a release) load into the fp32 model."""
    path = checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} {why_unreadable(path, e)}; use another checkpoint or train a new one")
    missing = [key for key in ("model", "model_config", "tokenizer", "step")
               if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise UserError(f"{path} is a PyTorch file but not a TinyGPT checkpoint (it has no {missing[0]!r})")
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
    return model.to(device), tokenizer, ckpt


def release_state(ckpt):
    """What a shipped model needs: bf16 weights (half of fp32; the chat runs them in fp32 or bf16 anyway)
    and what chat and export_hf.py read. No optimizer, scaler or RNG state: a release cannot be resumed."""
    weights, converted = {}, {}
    for name, t in ckpt["model"].items():
        key = (t.data_ptr(), t.shape)  # the tied embedding and output layer: converted once, saved once
        if key not in converted:
            converted[key] = t.to(torch.bfloat16) if t.is_floating_point() else t
        weights[name] = converted[key]
    kept = ("model_config", "train_config", "step", "elapsed_s", "val_loss", "val_bpb", "tokenizer",
            "texts_sha256", "chat_start_step")
    return {"model": weights, **{key: ckpt[key] for key in kept if key in ckpt}}


def write_release(source, out_dir):
    """Replace the release model in out_dir with the newest checkpoint of a run (or a checkpoint file),
    its tokenizer beside it; returns the new file's path."""
    path = checkpoint_file(source)
    _, _, ckpt = load_checkpoint(path)  # refuses a damaged checkpoint or a tokenizer that does not match
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_name = ckpt["tokenizer"]["file"]
    atomic_write(out_dir / tokenizer_name, lambda tmp: shutil.copyfile(path.parent / tokenizer_name, tmp))
    release = out_dir / RELEASE_FILE
    atomic_write(release, lambda tmp: torch.save(release_state(ckpt), tmp))
    atomic_write(out_dir / "latest", lambda tmp: tmp.write_text(RELEASE_FILE + "\n"))
    for old in out_dir.glob("tokenizer-*.json"):  # only once the new release is in place
        if old.name != tokenizer_name:
            old.unlink()
    return release


# -----------------------------------------------------------------------------
# Training: setup, data, model, then the loop


class StopRequest:
    """First Ctrl-C (or SIGTERM) asks the loop to save and stop after the current step; a second one
    interrupts at once. Used as a context manager, it puts the previous handlers back on exit."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def setup_distributed(device):
    """torchrun sets RANK/WORLD_SIZE; then one process per rank, gloo on CPU and nccl on CUDA."""
    if "RANK" not in os.environ:
        return 0, 1, device
    import torch.distributed as dist
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return rank, world_size, device


def barrier(world_size):
    if world_size > 1:
        torch.distributed.barrier()


def max_over_ranks(values, world_size, device):
    """Each value's maximum over the ranks. All ranks must stop at the same step (or DDP would hang
    waiting for the one that left) and take the same learning rate, though their clocks differ."""
    if world_size == 1:
        return values
    shared = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MAX)
    return shared.tolist()


def check_train_config(cfg):
    for name in ("batch_size", "grad_accum", "eval_interval", "save_interval", "log_interval", "eval_tokens"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_steps < 1 and not cfg.max_minutes:
        raise UserError(f"--max_steps must be at least 1 (or set --max_minutes), got {cfg.max_steps}")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.warmup_steps < 0 or cfg.max_minutes < 0 or cfg.keep_last < 0:
        raise UserError("--lr must be positive; --min_lr, --warmup_steps, --max_minutes, --keep_last non-negative")
    if not 0 < cfg.decay_fraction <= 1:
        raise UserError(f"--decay_fraction must be above 0 and at most 1, got {cfg.decay_fraction}")
    if cfg.pretrain_data and not 0 < cfg.pretrain_fraction < 1:
        raise UserError(f"--pretrain_fraction must be between 0 and 1 (the knowledge stage's share of the run), "
                        f"got {cfg.pretrain_fraction}")
    if cfg.stream_tokens < 1:
        raise UserError(f"--stream_tokens must be at least 1, got {cfg.stream_tokens}")


def check_out_dir(out_dir):
    """Fail before any work if out_dir cannot be created or written, without creating it yet: a run that
    fails later (no network, bad data) leaves nothing behind."""
    path = Path(out_dir).absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot write to checkpoint directory {out_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to checkpoint directory {out_dir}: {existing} is not writable")


def resolve_resume(cfg):
    """The checkpoint to continue from, or None for a new run (which must not mix with an old one)."""
    if not cfg.resume:
        existing = checkpoint_paths(cfg.out_dir)
        if existing:
            raise UserError(f"{cfg.out_dir}/ already holds checkpoints ({existing[-1].name}); pass --resume to "
                            f"continue them or --out_dir DIR to start a new run")
        return None
    if cfg.resume == "latest":
        path = latest_checkpoint(cfg.out_dir)
        if path is None:
            raise UserError(f"--resume: no checkpoint in {cfg.out_dir}/ to resume from")
        return path
    return Path(cfg.resume)


def prepare_tokenizer(texts, vocab_size, out_dir):
    """Train the BPE on training texts only, saved in out_dir under a name keyed by data and size, so
    another run's checkpoints keep their own tokenizer."""
    path = Path(out_dir) / f"tokenizer-{vocab_size}-{texts['sha256'][:10]}.json"
    if not path.is_file():
        chat = [t["content"] for c in texts["train"] for t in c["turns"]]
        knowledge = [t["content"] for c in texts["pretrain"] + texts.get("stream_sample", []) for t in c["turns"]]
        # Every k-th knowledge text, about as many characters as the chat's: one vocabulary for both stages.
        every = math.ceil(sum(map(len, knowledge)) / max(1, sum(map(len, chat))))
        tokenizer = train_tokenizer(chat + knowledge[::max(1, every)], vocab_size)
        atomic_write(path, lambda tmp: tokenizer.save(str(tmp)))
    return path


@dataclass
class PreparedData:
    texts: dict
    tokenizer: object
    tokenizer_info: dict  # {"file", "sha256"}: stored in checkpoints, checked by load_checkpoint
    arrays: dict  # split -> (token ids, target mask)


def load_or_build_data(cfg, vocab_size, resumed):
    """train_texts.json, the tokenizer (trained, or a resumed checkpoint's, copied into out_dir) and the
    token caches, each reused when already on disk."""
    texts, how = load_or_build_texts(cfg)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)  # created only once the data is there
    if resumed is None:
        tokenizer_path = prepare_tokenizer(texts, vocab_size, cfg.out_dir)
    else:
        tokenizer_path = Path(cfg.out_dir) / resumed["file"]
        if not tokenizer_path.is_file():
            source = Path(resumed["dir"]) / resumed["file"]
            atomic_write(tokenizer_path, lambda tmp: shutil.copyfile(source, tmp))
    tokenizer, sha = load_tokenizer(tokenizer_path), file_sha256(tokenizer_path)
    cache_dir = Path(cfg.out_dir) / "data"
    arrays = {"val": [("val", *cached_token_arrays(tokenizer, sha, texts["val"], texts["sha256"], "val", cache_dir))]}
    for split in ("train", "pretrain"):  # one token stream per source, so that each can have its weight
        arrays[split] = [(source, *cached_token_arrays(tokenizer, sha, group, texts["sha256"], f"{split}{i}", cache_dir))
                         for i, (source, group) in enumerate(by_source(texts[split]).items())]
    streamed = [spec for spec in (split_weight(spec)[0] for spec in cfg.pretrain_data) if is_streamed(spec)]
    holdout = read_holdout(cfg.holdout) if streamed else []
    for spec in streamed:  # one entry per shard, all named after the source (and weighted as it is)
        arrays["pretrain"] += [(spec, ids, mask) for ids, mask in cached_stream_shards(
            spec, tokenizer, sha, holdout, texts["val"], cfg.stream_tokens, cache_dir)]
    return PreparedData(texts, tokenizer, {"file": tokenizer_path.name, "sha256": sha}, arrays), how


def prepare_data(cfg, vocab_size, rank, world_size, log, resumed=None):
    """Rank 0 builds (or finds) the texts, the tokenizer and the token caches first; then the other ranks
    read what it wrote."""
    started = time.time()
    log(f"data: preparing conversations, tokenizer and token ids in {cfg.out_dir}/ "
        f"(about 20 s the first time, reused afterwards)")
    if rank == 0:
        data, how = load_or_build_data(cfg, vocab_size, resumed)
    barrier(world_size)
    if rank > 0:
        data, how = load_or_build_data(cfg, vocab_size, resumed)
    texts = data.texts
    n_tokens = {split: sum(len(ids) for _, ids, _ in data.arrays[split]) for split in data.arrays}
    train_token_bytes = token_byte_lengths(data.tokenizer)[np.concatenate([ids for _, ids, _ in data.arrays["train"]])]
    n_messages = {split: sum(len(c["turns"]) for c in texts[split]) for split in ("train", "val")}
    log(f"data: {how} {cfg.texts}: {len(texts['train']):,} / {len(texts['val']):,} train / val conversations, "
        f"{n_messages['train']:,} / {n_messages['val']:,} messages, {n_tokens['train']:,} / {n_tokens['val']:,} "
        f"tokens, {train_token_bytes.sum() / max(1, (train_token_bytes > 0).sum()):.2f} bytes/token, "
        f"{texts.get('held_out', 0):,} dropped as evaluation prompts (--holdout), {time.time() - started:.1f}s")
    if texts["pretrain"]:
        log(f"data: knowledge stage: {len(texts['pretrain']):,} documents and Q/A pairs from "
            f"{len(data.arrays['pretrain'])} sources, {n_tokens['pretrain']:,} tokens")
    return data


def mixed_rows(arrays, specs, block_size, loss_on, seed):
    """One split's sources as MixedRows, each weighted as its spec says (SOURCE:WEIGHT); None if empty."""
    weights = dict(split_weight(spec) for spec in specs)
    parts = [(PackedRows(ids, mask, block_size, loss_on), weights.get(source, 1.0)) for source, ids, mask in arrays]
    parts = [(rows, weight) for rows, weight in parts if rows.n_rows > 0]
    if not parts:
        return None
    return MixedRows([rows for rows, _ in parts], [weight for _, weight in parts], seed)


def packed_splits(data, model_config, cfg):
    """Chat rows (targets per --loss_on), knowledge rows (every token; None without --pretrain_data) and
    validation rows (always the assistant's tokens)."""
    T = model_config.block_size
    train_rows = mixed_rows(data.arrays["train"], cfg.data, T, cfg.loss_on, cfg.seed)
    knowledge_rows = mixed_rows(data.arrays["pretrain"], cfg.pretrain_data, T, "all", cfg.seed)
    (_, val_ids, val_mask), = data.arrays["val"]
    val_rows = PackedRows(val_ids, val_mask, T, "assistant", data.tokenizer.token_to_id("<|pad|>"))
    if train_rows is None or train_rows.n_rows < 1 or val_rows.n_rows < 1:
        raise UserError(f"too little data for block_size {T}: {train_rows.n_rows if train_rows else 0} train / "
                        f"{val_rows.n_rows} val rows")
    return train_rows, knowledge_rows, val_rows


def rng_state():
    """The random generators' state: the CPU's, and each CUDA device's where there are any (dropout)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_training_state(ckpt, model, optimizers, scaler, resume_path):
    """Weights, optimizer moments, the fp16 loss scale and the RNG of a checkpoint; returns its step."""
    model.load_state_dict(ckpt["model"])
    if len(ckpt["optimizers"]) != len(optimizers):
        raise UserError(f"--resume: {resume_path} was trained with another --optimizer")
    for optimizer, state in zip(optimizers, ckpt["optimizers"]):
        optimizer.load_state_dict(state)
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return ckpt["step"]


def checkpoint_state(model, optimizers, scaler, model_config, cfg, data, step, last_eval, elapsed_s, chat_start=0):
    """Everything --resume needs to continue exactly (the time spent too, for a budgeted schedule, and the
    step the chat stage began at, None while in the knowledge stage), and everything chat needs to rebuild
    the model; last_eval holds the newest val_loss and val_bpb."""
    return {"model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
            "scaler": scaler.state_dict(), "model_config": asdict(model_config), "train_config": asdict(cfg),
            "step": step, "elapsed_s": elapsed_s, **last_eval, "tokenizer": data.tokenizer_info,
            "texts_sha256": data.texts["sha256"], "rng": rng_state(), "chat_start_step": chat_start}


def write_metrics(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_metrics(metrics_path, png_path):
    """Train and val loss, and val bits per byte, against step, from the metrics log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in open(metrics_path)]
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"], r["val_bpb"]) for r in records if "val_loss" in r]
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot(*zip(*train), label="train loss", alpha=0.7)
    if val:
        steps, losses, bpbs = zip(*val)
        ax_loss.plot(steps, losses, "o-", label="val loss")
        ax_bpb.plot(steps, bpbs, "o-", color="C2")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def format_minutes(seconds):
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


class Progress:
    """The progress bar and the run's time estimate. Speed is measured over the last `window` steps
    (the first step, which compiles, and evaluations are left out), and the time left is the sooner of
    the steps' and the budget's end. Once the window is full, one line says when the run will end."""

    def __init__(self, cfg, step, tokens_per_step, budget, enabled, window=20):
        self.max_steps, self.tokens_per_step, self.budget = cfg.max_steps, tokens_per_step, budget
        self.step_seconds = deque(maxlen=window)
        self.skipped_first, self.announced = False, False
        # Redrawn 10 times a second on a terminal, every 30 s into a log file.
        self.bar = tqdm(total=cfg.max_steps or None, initial=step, disable=not enabled, dynamic_ncols=True,
                        unit="step", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                        mininterval=0.1 if sys.stderr.isatty() else 30)

    def update(self, step, seconds, loss, lr):
        """Record one finished step; returns the recent tokens per second (None until it is known)."""
        tok_s = None
        if self.skipped_first:
            self.step_seconds.append(seconds)
            tok_s = self.tokens_per_step * len(self.step_seconds) / sum(self.step_seconds)
            step_s = sum(self.step_seconds) / len(self.step_seconds)
            by_steps = (self.max_steps - step) * step_s if self.max_steps else math.inf
            left = min(by_steps, self.budget.seconds_left())
            self.bar.set_postfix_str(f"loss {loss:.3f}, lr {lr:.2e}, {tok_s:,.0f} tok/s, {format_minutes(left)} left",
                                     refresh=False)  # drawn by update() below, at most every mininterval
            if not self.announced and len(self.step_seconds) == self.step_seconds.maxlen:
                self.announced = True
                end = time.strftime("%H:%M", time.localtime(time.time() + left))
                steps = (f"{self.max_steps:,} steps, plus evaluations" if left == by_steps
                         else f"about {step + left / step_s:,.0f} steps (--max_minutes)")
                self.write(f"speed: {tok_s:,.0f} tok/s; the run will end in about {format_minutes(left)}, at {end}, "
                           f"after {steps}")
        self.skipped_first = True
        self.bar.update(1)
        return tok_s

    def write(self, line):
        if not self.bar.disable:
            self.bar.write(line)

    def close(self):
        self.bar.close()


@dataclass
class Stage:
    """What one training stage's steps read: its rows, in an order that starts over at the step the stage
    began, with the loss on every token for its first all_tokens_rows rows (then on --loss_on's)."""
    name: str  # "knowledge" or "chat"
    rows: object  # MixedRows
    first_step: int
    all_tokens_rows: float


def current_stage(chat_rows, knowledge_rows, cfg, chat_start):
    """The stage a run is in: knowledge until the chat stage starts (at step chat_start, or never yet: None)."""
    if chat_start is None:
        return Stage("knowledge", knowledge_rows, 0, math.inf)
    return Stage("chat", chat_rows, chat_start, cfg.all_tokens_epochs * chat_rows.n_rows)


def chat_stage_starts(chat_start, knowledge_rows, progress, cfg):
    """Whether the chat stage begins now: at once without knowledge data, else when the knowledge stage has
    had its share (--pretrain_fraction) of the steps or of the time."""
    return chat_start is None and (knowledge_rows is None or progress >= cfg.pretrain_fraction)


def train_step(model, optimizers, stage, step, progress, cfg, rank, world_size, device, ctx, scaler=None):
    """One optimizer step: grad_accum micro-batches of the stage's rows forward and backward, clip, step.
    Returns (loss, lr). `progress` (0 to 1, from Budget) sets the learning rate.
    Under DDP, gradients are all-reduced only on the last micro-batch (no_sync before it). Under float16
    the scaler multiplies the loss so that small gradients do not round to zero, and skips a step whose
    gradients overflowed; for bfloat16 and float32 it is switched off and changes nothing."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    lr = get_lr(step, progress, cfg)
    for group in (group for optimizer in optimizers for group in optimizer.param_groups):
        group["lr"] = lr
    # Curriculum: while the data is new, every token teaches English; after that, the replies teach answering.
    stage_step = step - stage.first_step
    all_tokens = stage_step * cfg.grad_accum * world_size * cfg.batch_size < stage.all_tokens_rows
    step_loss = 0.0
    for micro in range(cfg.grad_accum):
        rows = training_rows(stage_step, micro, cfg, rank, world_size, stage.rows.n_rows)
        x, y = stage.rows.get(rows, loss_on="all" if all_tokens else None)
        x, y = x.to(device), y.to(device)
        sync = world_size == 1 or micro == cfg.grad_accum - 1
        with (nullcontext() if sync else model.no_sync()), ctx:
            _, loss = model(x, y)
        scaler.scale(loss / cfg.grad_accum).backward()
        step_loss += loss.item() / cfg.grad_accum
    if cfg.grad_clip > 0:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    for optimizer in optimizers:
        scaler.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    scaler.update()
    return step_loss, lr


@dataclass
class Run:
    """What the parts of one training run share: its configs, where it runs, and its data."""
    cfg: TrainConfig
    model_config: GPTConfig
    device: str
    dtype: str
    rank: int = 0
    world_size: int = 1
    data: PreparedData = None

    @property
    def master(self):
        return self.rank == 0

    def log(self, *args):
        if self.master:
            print(*args)


def setup_run(cfg, model_config):
    """Check the flags, pick the device, find the checkpoint to resume and prepare the data. Returns
    (run, checkpoint dict or None, its path or None)."""
    check_train_config(cfg)
    check_model_config(model_config)
    check_out_dir(cfg.out_dir)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    rank, world_size, device = setup_distributed(device)
    resume_path = resolve_resume(cfg)
    ckpt = load_checkpoint(resume_path)[2] if resume_path else None
    if ckpt is not None and "optimizers" not in ckpt:
        raise UserError(f"--resume: {resume_path} holds weights only (a release model): it cannot be resumed")
    resumed_tokenizer = None
    if ckpt is not None:  # a resumed run continues the checkpoint's architecture, tokenizer and budget
        model_config = model_config_from(ckpt["model_config"])
        if not cfg.max_minutes and ckpt["train_config"].get("max_minutes"):
            for name in ("max_minutes", "max_steps", "decay_fraction"):
                setattr(cfg, name, ckpt["train_config"][name])
        resumed_tokenizer = ckpt["tokenizer"] | {"dir": str(resume_path.parent)}
    run = Run(cfg, model_config, device, dtype, rank, world_size)
    run.data = prepare_data(cfg, model_config.vocab_size, rank, world_size, run.log, resumed_tokenizer)
    if ckpt is not None and ckpt["texts_sha256"] != run.data.texts["sha256"]:
        raise UserError(f"--resume: {resume_path} was trained on other data than {cfg.texts}; "
                        f"use the same --data and --texts to continue it")
    model_config.vocab_size = run.data.tokenizer.get_vocab_size()
    return run, ckpt, resume_path


def build_model(run, ckpt, resume_path, size_note=""):
    """The model (uncompiled: what is saved and evaluated), its optimizers, the float16 loss scaler (off
    for other dtypes) and the step to start at."""
    torch.manual_seed(run.cfg.seed)
    model = GPT(run.model_config).to(run.device)
    optimizers = configure_optimizers(model, run.cfg, run.device)
    scaler = torch.amp.GradScaler(run.device.split(":")[0], enabled=run.dtype == "float16")
    step = restore_training_state(ckpt, model, optimizers, scaler, resume_path) if ckpt else 0
    size_note = "the checkpoint's" if ckpt else size_note
    run.log(f"model: {run.model_config.n_layer} x {run.model_config.n_embd} ({model.num_params() / 1e6:.2f}M "
            f"parameters), {size_note}: {asdict(run.model_config)}, batch {run.cfg.batch_size}")
    return model, optimizers, scaler, step


def wrap_for_training(model, run, compile_model):
    """torch.compile and DDP wrap the model that the training step runs; the raw one stays for saving."""
    if compile_model:
        model = torch.compile(model)
    if run.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model


def should_compile(run):
    if run.cfg.compile and run.device == "mps":
        run.log("torch.compile is not used on MPS: it has not been measured to work there")
        return False
    if run.cfg.compile:
        run.log("compiling the model (about 40 s the first time; --no-compile skips it)")
    return run.cfg.compile


def train_step_or_fall_back(trained, model, run, optimizers, scaler, stage, step, progress, ctx):
    """train_step on the compiled model. If compilation fails (no working C++ compiler, an unsupported
    platform), say so in one line and take the step again without it. Returns (loss, lr, trained model)."""
    args = (optimizers, stage, step, progress, run.cfg, run.rank, run.world_size, run.device, ctx, scaler)
    if (trained.module if run.world_size > 1 else trained) is model:  # not compiled: nothing to fall back from
        return (*train_step(trained, *args), trained)
    rng = rng_state()
    try:
        return (*train_step(trained, *args), trained)
    except torch._dynamo.exc.TorchDynamoException as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
        run.log(f"torch.compile failed ({reason}); training without it (--no-compile skips the attempt)")
        set_rng_state(rng)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        trained = wrap_for_training(model, run, compile_model=False)
        return (*train_step(trained, *args), trained)


def training_loop(run, model, optimizers, scaler, step, last_eval, chat_start, budget, stop):
    """Each step in order: (stage switch) -> evaluate -> checkpoint -> train step -> log.
    Returns (last step, saved path)."""
    cfg, master = run.cfg, run.master
    trained = wrap_for_training(model, run, should_compile(run))
    chat_rows, knowledge_rows, val_rows = packed_splits(run.data, run.model_config, cfg)
    byte_lengths = torch.from_numpy(token_byte_lengths(run.data.tokenizer)).to(run.device)
    ctx = autocast_context(run.device, run.dtype)
    metrics_path = Path(cfg.out_dir) / "metrics.jsonl"
    tokens_per_step = cfg.batch_size * cfg.grad_accum * run.world_size * run.model_config.block_size
    bar = Progress(cfg, step, tokens_per_step, budget, enabled=master)
    first_step, saved = step, None
    try:
        while True:
            progress, stop_requested = max_over_ranks([budget.progress(step), float(stop.requested)],
                                                      run.world_size, run.device)
            last_step, stopping = progress >= 1.0, stop_requested > 0
            if chat_stage_starts(chat_start, knowledge_rows, progress, cfg):
                chat_start = step
                if knowledge_rows is not None:
                    bar.write(f"step {step}: the knowledge stage ends, the chat stage begins")
            stage = current_stage(chat_rows, knowledge_rows, cfg, chat_start)
            eval_started = budget.clock()
            if step % cfg.eval_interval == 0 or last_step or stopping:
                val_loss, val_bpb = evaluate(model, val_rows, byte_lengths, cfg, ctx, run.device)
                last_eval = {"val_loss": val_loss, "val_bpb": val_bpb}
                if master:
                    write_metrics(metrics_path, {"step": step, **last_eval, "elapsed_s": round(budget.elapsed(), 1)})
                bar.write(f"step {step}: val loss {val_loss:.4f}, val bpb {val_bpb:.4f}")
            if master and step > first_step and (step % cfg.save_interval == 0 or last_step or stopping):
                state = checkpoint_state(model, optimizers, scaler, run.model_config, cfg, run.data, step,
                                         last_eval, budget.elapsed(), chat_start)
                saved = save_checkpoint(state, cfg.out_dir, cfg.keep_last)
            if last_step or stopping:
                break
            if step % cfg.eval_interval == 0:  # the final evaluation and checkpoint will take about as long
                budget.reserve_s = budget.clock() - eval_started

            step_started = time.time()
            loss, lr, trained = train_step_or_fall_back(trained, model, run, optimizers, scaler, stage, step,
                                                        progress, ctx)
            if not math.isfinite(loss):  # a diverged run stops here instead of spending its budget on NaN
                last_good = f"{saved} holds the last good weights" if saved else "no checkpoint was saved yet"
                raise UserError(f"the training loss is {loss} at step {step + 1}: the run diverged "
                                f"({last_good}); try a lower --lr or --dtype float32")
            step += 1
            tok_per_s = bar.update(step, time.time() - step_started, loss, lr)
            if master and step % cfg.log_interval == 0:
                write_metrics(metrics_path, {"step": step, "stage": stage.name, "train_loss": loss, "lr": lr,
                                             "tok_per_s": round(tok_per_s or 0),
                                             "elapsed_s": round(budget.elapsed(), 1)})
    finally:  # an error mid-run must not print on the bar's line
        bar.close()
    return step, saved


def train(cfg, model_config, size_note="", clock=time.monotonic):
    """One training run, from flags to checkpoints; returns the exit status (130 after Ctrl-C)."""
    run, ckpt, resume_path = setup_run(cfg, model_config)
    model, optimizers, scaler, step = build_model(run, ckpt, resume_path, size_note)
    run.log(f"training on {run.device} ({run.dtype}, {run.world_size} process{'es' * (run.world_size > 1)})"
            + (f", resuming from {resume_path} at step {step}" if ckpt else "")
            + (f", for {cfg.max_minutes:g} minutes: the schedule follows the clock" if cfg.max_minutes else ""))
    budget = Budget(cfg, spent_s=(ckpt or {}).get("elapsed_s", 0.0), clock=clock)
    with StopRequest() as stop:
        last_eval = {key: (ckpt or {}).get(key) for key in ("val_loss", "val_bpb")}
        chat_start = ckpt.get("chat_start_step", 0) if ckpt else None  # older checkpoints had one stage
        end_step, saved = training_loop(run, model, optimizers, scaler, step, last_eval, chat_start, budget, stop)
    if run.master:
        plot_metrics(Path(cfg.out_dir) / "metrics.jsonl", Path(cfg.out_dir) / "loss.png")
        if saved:
            run.log(f"saved {saved}; loss curve in {Path(cfg.out_dir) / 'loss.png'}")
    if run.world_size > 1:
        torch.distributed.destroy_process_group()
    if stop.requested:
        run.log("interrupted: checkpoint saved; continue with --resume")
        return 130
    if cfg.max_minutes:
        run.log(f"the {cfg.max_minutes:g}-minute budget ended at step {end_step}, after "
                f"{format_minutes(budget.elapsed())}")
    return 0


# -----------------------------------------------------------------------------
# Command line: every GPTConfig and TrainConfig field is a flag of the same name.


def positive_or_zero(kind):
    def parse(text):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative: {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def build_parser():
    parser = argparse.ArgumentParser(description="Train TinyGPT, a small chat GPT, on OASST-style data.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for config_class in (GPTConfig, TrainConfig):
        group = parser.add_argument_group(config_class.__name__)
        for f in dataclasses.fields(config_class):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs = {"default": default, "help": f.metadata["help"]}
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            if isinstance(default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif isinstance(default, list):
                kwargs["nargs"] = "+"
            elif f.name == "resume":
                kwargs.update(nargs="?", const="latest")
            elif isinstance(default, (int, float)):
                kwargs["type"] = positive_or_zero(type(default))
            group.add_argument(f"--{f.name}", **kwargs)
    parser.add_argument("--recipe", choices=list(RECIPES), default="default",
                        help="a named set of defaults: 'seed' is the original project's configuration")
    parser.add_argument("--depth", type=positive_or_zero(int), default=0,
                        help="model size in one number: N blocks of 64*N dims (in 128-dim heads), with the context "
                             "and batch to match (0: the size measured best for the device and --max_minutes)")
    parser.add_argument("--release", metavar="RUN", default="",
                        help="do not train: make the newest checkpoint of RUN (a directory or file) the release "
                             "model, bf16 weights without optimizer state, in ckpt/release/")
    return parser


def explicit_flags(argv):
    """The names of the flags given on the command line (not filled in from a default)."""
    parser, unset = build_parser(), object()
    parser.set_defaults(**{name: unset for name in vars(parser.parse_args([]))})
    return {name for name, value in vars(parser.parse_args(argv)).items() if value is not unset}


def parse_args(argv=None):
    """The flags, then the recipe's defaults, then the size dial's, each only where nothing more specific
    was given. args.size_note says how the size was chosen."""
    parser = build_parser()
    recipe = parser.parse_known_args(argv)[0].recipe
    parser.set_defaults(**RECIPES[recipe])
    args = parser.parse_args(argv)
    given = explicit_flags(argv) | set(RECIPES[recipe])
    if args.max_minutes and "max_steps" not in given:
        args.max_steps = 0  # the budget alone ends the run
    if args.max_minutes and "decay_fraction" not in given:
        args.decay_fraction = BUDGET_DECAY_FRACTION
    device_type = pick_device(args.device).split(":")[0]
    depth = args.depth or auto_depth(device_type, args.max_minutes)
    size = size_for_depth(depth, device_type)
    for name, value in size.items():
        if name not in given:
            setattr(args, name, value)
    budget = f" and a {args.max_minutes:g}-minute budget" if args.max_minutes else ""
    how = "from --depth" if args.depth else f"chosen for {device_type}{budget}; --depth overrides"
    flags = ", ".join(f"--{name}" for name in size if name in given)
    args.size_note = "as given" if {"n_layer", "n_head", "n_embd"} <= given and not args.depth else \
        f"depth {depth}, {how}" + (f" ({flags} as given)" if flags else "")
    return args


def configs_from_args(args):
    values = vars(args)
    model_config = GPTConfig(**{f.name: values[f.name] for f in dataclasses.fields(GPTConfig)})
    train_config = TrainConfig(**{f.name: values[f.name] for f in dataclasses.fields(TrainConfig)})
    return model_config, train_config


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.release:
            path = write_release(args.release, RELEASE_DIR)
            print(f"release model: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
            return 0
        model_config, train_config = configs_from_args(args)
        return train(train_config, model_config, args.size_note)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted before a checkpoint could be saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    keep_freed_memory()
    sys.exit(main())
