"""
Export a TinyGPT checkpoint to Hugging Face transformers: a folder that AutoModelForCausalLM and
AutoTokenizer load without trust_remote_code, with a chat template that gives the ids our chat gives.

    python export_hf.py                                       # newest in ckpt/ (else the release) -> hf_model/
    python export_hf.py --ckpt ckpt/gpt_step6800.pt --out hf_model/ --force --dtype bfloat16

Our default architecture is GPT-NeoX, in its sequential-residual form: pre-norm LayerNorm blocks, RoPE in
the rotate-half layout over the whole head (partial_rotary_factor 1), ReLU^2 (hidden_act "relu2"), tied
input/output embeddings, no attention biases. NeoX's MLP and LayerNorm always have biases; ours are
written as zeros. The seed recipe (learned positions, GELU, biases) is GPT-2. Only two layouts differ:
NeoX fuses q, k and v per head, and GPT-2's Conv1D stores each matrix transposed.

This is the only file that imports transformers; the model, the chat format and checkpoint loading come from
newgpt.py, the sampling defaults from engine.py.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from engine import SamplingConfig
from data import split_weight
from newgpt import ROLE_TOKENS, ROPE_BASE, SPECIAL_TOKENS, model_from_checkpoint
from retrieval import source_files
from runtime import UserError, chosen_checkpoint

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which our blocks use
END_TOKEN, BOS_TOKEN, PAD_TOKEN = "<|end|>", "<|bos|>", "<|pad|>"
HF_ACTIVATIONS = {"relu2": "relu2", "gelu": "gelu_pytorch_tanh"}  # ours uses F.gelu(approximate="tanh")

# -----------------------------------------------------------------------------
# Configs: our GPTConfig in each class's own words


def special_ids(tokenizer):
    """The ids HF needs by name: bos, eos (our end-of-turn, where generation stops) and pad."""
    return {name: tokenizer.token_to_id(token) for name, token in
            (("bos", BOS_TOKEN), ("eos", END_TOKEN), ("pad", PAD_TOKEN))}


def neox_config(config, ids):
    from transformers import GPTNeoXConfig
    return GPTNeoXConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, intermediate_size=4 * config.n_embd,
        hidden_act=HF_ACTIVATIONS[config.mlp_act], max_position_embeddings=config.block_size,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE, "partial_rotary_factor": 1.0},
        use_parallel_residual=False, attention_bias=config.bias, tie_word_embeddings=True,
        layer_norm_eps=LAYER_NORM_EPS, attention_dropout=config.dropout, hidden_dropout=config.dropout,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])


def gpt2_config(config, ids):
    from transformers import GPT2Config
    return GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, activation_function=HF_ACTIVATIONS[config.mlp_act], resid_pdrop=config.dropout,
        embd_pdrop=config.dropout, attn_pdrop=config.dropout, layer_norm_epsilon=LAYER_NORM_EPS,
        tie_word_embeddings=True, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])


# -----------------------------------------------------------------------------
# Weights: our state_dict renamed, and rearranged where the layouts differ


def per_head_qkv(w, n_head):
    """Our c_attn rows are [all q | all k | all v]; NeoX's are [q | k | v] of head 0, then of head 1, ...
    Works for the weight (3C, C) and the bias (3C,)."""
    return w.view(3, n_head, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)  # (nh, 3, hs, ...) flattened


def neox_state_dict(model):
    c, sd = model.config, model.state_dict()

    def bias(name, size):  # NeoX's MLP and LayerNorm always have biases: ours, or zeros
        return sd.get(name, torch.zeros(size))

    out = {"gpt_neox.embed_in.weight": sd["transformer.wte.weight"], "lm_head.weight": sd["lm_head.weight"],
           "gpt_neox.final_layer_norm.weight": sd["transformer.ln_f.weight"],
           "gpt_neox.final_layer_norm.bias": bias("transformer.ln_f.bias", c.n_embd)}
    for i in range(c.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"gpt_neox.layers.{i}."
        out |= {
            theirs + "input_layernorm.weight": sd[ours + "ln_1.weight"],
            theirs + "input_layernorm.bias": bias(ours + "ln_1.bias", c.n_embd),
            theirs + "post_attention_layernorm.weight": sd[ours + "ln_2.weight"],
            theirs + "post_attention_layernorm.bias": bias(ours + "ln_2.bias", c.n_embd),
            theirs + "attention.query_key_value.weight": per_head_qkv(sd[ours + "attn.c_attn.weight"], c.n_head),
            theirs + "attention.dense.weight": sd[ours + "attn.c_proj.weight"],
            theirs + "mlp.dense_h_to_4h.weight": sd[ours + "mlp.c_fc.weight"],
            theirs + "mlp.dense_h_to_4h.bias": bias(ours + "mlp.c_fc.bias", 4 * c.n_embd),
            theirs + "mlp.dense_4h_to_h.weight": sd[ours + "mlp.c_proj.weight"],
            theirs + "mlp.dense_4h_to_h.bias": bias(ours + "mlp.c_proj.bias", c.n_embd),
        }
        if c.bias:
            out[theirs + "attention.query_key_value.bias"] = per_head_qkv(sd[ours + "attn.c_attn.bias"], c.n_head)
            out[theirs + "attention.dense.bias"] = sd[ours + "attn.c_proj.bias"]
    return out


def gpt2_state_dict(model, expected_keys):
    """GPT-2's names are ours (nanoGPT kept them); its Conv1D weights are (in, out), the transpose of a
    Linear's, and every Linear and LayerNorm has a bias (zeros where ours has none)."""
    sd = model.state_dict()
    out = {}
    for name in expected_keys:
        if name in sd:
            is_conv1d = name.startswith("transformer.h.") and name.endswith(("c_attn.weight", "c_proj.weight",
                                                                              "c_fc.weight"))
            out[name] = sd[name].t() if is_conv1d else sd[name]
        elif name.endswith(".bias"):
            out[name] = torch.zeros(sd[name.removesuffix(".bias") + ".weight"].shape[0])
    return out


def to_hf_model(model, ids):
    """Our GPT -> the equivalent transformers model (GPTNeoXForCausalLM or GPT2LMHeadModel), in memory, with
    a generation config that stops at end-of-turn (ids: special_ids(tokenizer)) and samples as our chat does."""
    from transformers import GenerationConfig, GPT2LMHeadModel, GPTNeoXForCausalLM
    if model.config.pos_encoding == "rope":
        hf_model = GPTNeoXForCausalLM(neox_config(model.config, ids))
        weights = neox_state_dict(model)
    else:
        hf_model = GPT2LMHeadModel(gpt2_config(model.config, ids))
        weights = gpt2_state_dict(model, hf_model.state_dict().keys())
    hf_model.load_state_dict(weights, strict=True)
    hf_model.tie_weights()
    sampling = SamplingConfig()
    hf_model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"], do_sample=True,
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
        min_p=sampling.min_p or None, repetition_penalty=sampling.repetition_penalty,
        no_repeat_ngram_size=sampling.no_repeat_ngram_size, max_new_tokens=sampling.max_new_tokens)
    return hf_model.eval()


# The chat's sampling options that transformers' GenerationConfig has no equivalent for.
NOT_IN_TRANSFORMERS = ("frequency_penalty", "presence_penalty", "dry_multiplier", "context_weight")


def sampling_differences():
    """What the model card says about sampling: the chat's defaults that transformers applies, and how."""
    sampling = SamplingConfig()
    off = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "no_repeat_ngram_size": 0}
    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size")
    applied = ", ".join(f"{name.replace('_', ' ')} {getattr(sampling, name)}" for name in names
                        if getattr(sampling, name) != off.get(name))
    missing = [f"{name.replace('_', ' ')} {getattr(sampling, name)}" for name in NOT_IN_TRANSFORMERS
               if getattr(sampling, name)]
    note = (f" The chat also applies {', '.join(missing)} (DRY: base {sampling.dry_base}, allowed length "
            f"{sampling.dry_allowed_length}), which transformers does not have." if missing else "")
    return (f"{applied} (transformers applies the repetition penalty to the whole context, the TinyGPT chat to "
            f"its last {sampling.repetition_window} tokens).{note}")


@torch.no_grad()
def greedy_generate(hf_model, prompt_ids, max_new_tokens):
    """transformers' own generate, greedy: the new ids, up to and including the model's eos (end-of-turn) if
    it has one. generate fills every option left None from the model's sampling defaults, so greedy
    decoding must name the neutral values; top-k 50 is transformers' own default."""
    from transformers import GenerationConfig
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, repetition_penalty=1.0,
                              temperature=1.0, top_k=50, top_p=1.0)
    prompt = torch.tensor([prompt_ids], device=hf_model.device)
    output = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    return output[0, len(prompt_ids):].tolist()


# -----------------------------------------------------------------------------
# Tokenizer and chat template


def chat_template():
    """Jinja for newgpt.render_conversations' layout: <|bos|>, then <|role|> content <|end|> per turn, then
    <|assistant|> to ask for a reply. Like the chat, it strips each message and skips empty ones. Passages
    given as apply_chat_template(..., documents=[{"title", "text"}]) (transformers' convention for retrieval)
    become a context turn after the last user message, numbered as retrieval.format_passages numbers them."""
    roles = " ".join(f"{json.dumps(role)}: {json.dumps(token)}," for role, token in ROLE_TOKENS.items())
    return ("{%- set role_tokens = {" + roles + "} -%}"
            "{{- bos_token -}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] not in role_tokens -%}"
            "{{- raise_exception('roles are ' + (role_tokens | list | join(', ')) + ', not ' + message['role']) -}}"
            "{%- endif -%}"
            "{%- set content = message['content'] | trim -%}"
            "{%- if content -%}{{- role_tokens[message['role']] + content + eos_token -}}{%- endif -%}"
            "{%- if documents and loop.last and message['role'] == 'user' -%}"
            "{{- role_tokens['context'] -}}"
            "{%- for document in documents -%}"
            "{{- '[' ~ loop.index ~ '] ' -}}"
            "{%- if document['title'] -%}{{- document['title'] | trim ~ '\n' -}}{%- endif -%}"
            "{{- document['text'] | trim -}}{%- if not loop.last -%}{{- '\n\n' -}}{%- endif -%}"
            "{%- endfor -%}"
            "{{- eos_token -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- role_tokens['assistant'] -}}{%- endif -%}")


def to_hf_tokenizer(tokenizer, block_size):
    """Our byte-level BPE as a PreTrainedTokenizerFast. The chat template writes special tokens as text, so
    here they are read as special tokens wherever they appear (the chat itself never does that)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer.from_str(tokenizer.to_str())
    backend.encode_special_tokens = False
    roles = [t for t in SPECIAL_TOKENS if t not in (BOS_TOKEN, END_TOKEN, PAD_TOKEN)]
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=END_TOKEN,
                                   pad_token=PAD_TOKEN, extra_special_tokens=roles, chat_template=chat_template(),
                                   model_max_length=block_size, clean_up_tokenization_spaces=False)


# -----------------------------------------------------------------------------
# Model card

# What each known source is and the terms it comes under (from ../shared/data/*/SOURCE.md and the
# datasets' cards), matched by a piece of its path.
SOURCE_LICENCES = [
    ("guanaco", "openassistant-guanaco (best-rated OASST1 paths)", "Apache-2.0"),
    ("oasst", "OpenAssistant Conversations (OASST1/OASST2)", "Apache-2.0"),
    ("dolly", "databricks-dolly-15k (Databricks, Inc.)",
     "CC BY-SA 3.0: attribution required, and derived works share alike"),
    ("enwiki", "lead sections of English Wikipedia articles (2015), (c) Wikipedia contributors", "CC BY-SA 3.0"),
    ("wiki_vital", "Wikipedia's Level-4 vital articles, (c) Wikipedia contributors", "CC BY-SA 4.0"),
    ("wordnet", "WordNet 3.0, (c) 2006 Princeton University", "the WordNet 3.0 licence (its notice is below)"),
    ("factbook", "the CIA World Factbook", "public domain (a US Government work)"),
]

# The WordNet licence asks for its notice on all copies, modifications included.
WORDNET_NOTICE = """WordNet Release 3.0. This software and database is being provided to you, the LICENSEE, by Princeton
University under the following license. By obtaining, using and/or copying this software and database, you
agree that you have read, understood, and will comply with these terms and conditions.: Permission to use,
copy, modify and distribute this software and database and its documentation for any purpose and without fee
or royalty is hereby granted, provided that you agree to comply with the following copyright notice and
statements, including the disclaimer, and that the same appear on ALL copies of the software, database and
documentation, including modifications that you make for internal use or for distribution. WordNet 3.0
Copyright 2006 by Princeton University. All rights reserved. THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS"
AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT
NOT LIMITATION, PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT- ABILITY OR FITNESS
FOR ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT
INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS. The name of Princeton University or
Princeton may not be used in advertising or publicity pertaining to distribution of the software and/or
database. Title to copyright in this software, database and any associated documentation shall at all times
remain with Princeton University and LICENSEE agrees to preserve same."""


def describe_source(spec, stage):
    source, weight = split_weight(spec)
    label = f"`{Path(source).name}` ({stage}{f', weight {weight:g}' if weight != 1 else ''})"
    for key, name, licence in SOURCE_LICENCES:
        if key in source.lower():
            return f"{label}: {name}, {licence}"
    return f"{label}: licence not known to export_hf.py; check the source's own terms"


def recorded_val_bpb(ckpt, run_dir):
    """The checkpoint's val bits per byte; checkpoints written before it was stored have it in the run's
    metrics log."""
    if ckpt.get("val_bpb") is not None:
        return ckpt["val_bpb"]
    metrics = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return next((r["val_bpb"] for r in reversed(records) if r.get("step") == ckpt["step"] and "val_bpb" in r), None)


def model_card(ckpt, hf_model, model, run_dir, out):
    config, train = model.config, ckpt["train_config"]
    bpb = recorded_val_bpb(ckpt, run_dir)
    knowledge = [split_weight(train["knowledge"])[0]] if train.get("knowledge") else []
    if knowledge and Path(knowledge[0]).exists():  # a folder: name each file, so that each licence shows
        knowledge = [str(f) for f in source_files(knowledge[0])]
    all_sources = train.get("pretrain_data", []) + train["data"] + knowledge
    sources = "\n".join([f"- {describe_source(s, 'knowledge stage')}" for s in train.get("pretrain_data", [])] +
                        [f"- {describe_source(s, 'chat stage')}" for s in train["data"]] +
                        [f"- {describe_source(s, 'passages and reading questions')}" for s in knowledge])
    notice = f"\n\n{WORDNET_NOTICE}" if any("wordnet" in s.lower() for s in all_sources) else ""
    validation = ", ".join(f"`{Path(s).name}`" for s in train.get("val_data") or []) or "about 2% of the trees"
    return f"""# TinyGPT {config.n_layer} x {config.n_embd}

A small chat model trained from scratch with TinyGPT's `newgpt.py`, exported for `transformers` as `{type(hf_model).__name__}`.

- {model.num_params() / 1e6:.2f}M parameters: {config.n_layer} blocks, {config.n_head} heads, {config.n_embd} dims, a context
  of {config.block_size} tokens, a byte-level BPE vocabulary of {config.vocab_size}.
- Trained for {ckpt['step']:,} steps. Validation ({validation}):
  {f'{bpb:.4f} bits per byte' if bpb is not None else 'bits per byte not recorded'}, \
{f"{ckpt['val_loss']:.4f}" if ckpt.get('val_loss') is not None else 'no'} nats per reply token.
- A model this size writes fluent, on-topic replies that are often wrong: it holds few facts.

## Use

```python
from transformers import pipeline
chat = pipeline("text-generation", model="{Path(out).name}")  # the path to this folder
print(chat([{{"role": "user", "content": "What is a llama?"}}])[0]["generated_text"][-1]["content"])
```

Generation stops at `<|end|>`, the end of a turn. By default it samples with the TinyGPT chat's settings:
{sampling_differences()}
{READING_NOTE if knowledge else ""}
## Training data

{sources}

The model is derived from these sources, and their terms carry over to it: where a source is CC BY-SA,
credit it and share what you derive from the model under the same licence.{notice}
"""


READING_NOTE = """
The model was trained to answer from passages (TinyGPT's `--knowledge`): pass them as
`tokenizer.apply_chat_template(messages, documents=[{"title": ..., "text": ...}], add_generation_prompt=True)`,
and they go in a `<|context|>` turn after the last user message, numbered [1], [2], ...
"""

# -----------------------------------------------------------------------------
# Export


def check_out_dir(out, force):
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; --out needs a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out}/ is not empty; pass --force to replace it, or choose another --out")


def export(ckpt_path, ckpt, out, force=False, dtype="float32"):
    """Write the HF folder for a checkpoint (its file, and the dict read from it). It is built next to `out`
    and moved into place at the end, so a failed export leaves nothing half-written."""
    out = Path(out)
    check_out_dir(out, force)
    model, tokenizer = model_from_checkpoint(ckpt_path, ckpt)
    run_dir = Path(ckpt_path).parent
    hf_model = to_hf_model(model.eval(), special_ids(tokenizer)).to(getattr(torch, dtype))
    hf_tokenizer = to_hf_tokenizer(tokenizer, model.config.block_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's is 0700: private to this user
    try:
        hf_model.save_pretrained(staging)
        hf_tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(model_card(ckpt, hf_model, model, run_dir, out))
        for written in staging.iterdir():  # safetensors writes its file private (0600); the folder is for sharing
            written.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, hf_model


def build_parser():
    parser = argparse.ArgumentParser(description="Export a TinyGPT checkpoint to a Hugging Face transformers folder.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", help="checkpoint file, or a directory to take the newest from (default: the "
                                       "newest in ckpt/, else the release model in ckpt/release/)")
    parser.add_argument("--out", default="hf_model", help="folder to write (config, weights, tokenizer, README)")
    parser.add_argument("--force", action="store_true", help="replace --out if it is not empty")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights' precision in model.safetensors (bfloat16 halves the file)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        source, ckpt, how = chosen_checkpoint(args.ckpt)
        out, hf_model = export(source, ckpt, args.out, args.force, args.dtype)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/ ({type(hf_model).__name__}) from {source}{how}; load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}) and AutoTokenizer.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
