"""export_hf.py: the exported folder loads in plain transformers and computes, renders and generates exactly
what TinyGPT does."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

import engine
import export_hf
import newgpt
import retrieval
from conftest import REPO, write_checkpoint

ARCHITECTURES = {  # our options -> the transformers class that must express them
    "default": ({}, "GPTNeoXForCausalLM"),
    "seed recipe": ({"pos_encoding": "learned", "bias": True, "mlp_act": "gelu"}, "GPT2LMHeadModel"),
    "rope with biases and gelu": ({"bias": True, "mlp_act": "gelu"}, "GPTNeoXForCausalLM"),
    "learned positions, relu2, no biases": ({"pos_encoding": "learned"}, "GPT2LMHeadModel"),
}


def random_model(tokenizer, **options):
    """A tiny model whose every weight, biases and LayerNorm gains included, is random: a zero or a one left
    where it was initialised would hide a weight mapped to the wrong place."""
    torch.manual_seed(0)
    config = newgpt.GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=32, n_layer=2, n_head=2, n_embd=32,
                              **options)
    model = newgpt.GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def export_model(model, tokenizer, tmp_path):
    write_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert export_hf.main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    return tmp_path / "hf"


@pytest.fixture(scope="module")
def exported_run(trained_run, tmp_path_factory):
    """The shared tiny training run, exported: a model with learned, peaked predictions for generation."""
    out = tmp_path_factory.mktemp("hf") / "model"
    assert export_hf.main(["--ckpt", str(trained_run), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_exported_logits_equal_ours(architecture, tokenizer, tmp_path):
    options, class_name = ARCHITECTURES[architecture]
    model = random_model(tokenizer, **options)
    hf_model = AutoModelForCausalLM.from_pretrained(export_model(model, tokenizer, tmp_path)).eval()
    assert type(hf_model).__name__ == class_name
    assert hf_model.get_output_embeddings().weight is hf_model.get_input_embeddings().weight, "tied embeddings"
    torch.manual_seed(1)
    idx = torch.randint(0, model.config.vocab_size, (3, model.config.block_size))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf_model(idx).logits
    max_diff = (ours - theirs).abs().max().item()
    assert max_diff <= 1e-4, f"{architecture}: logits differ by up to {max_diff:.2e} (logits' scale {ours.std():.2f})"


@pytest.mark.parametrize("system", ["", "You answer in one sentence."])
def test_chat_template_gives_our_renderers_ids(exported_run, trained_run, system):
    model, tokenizer, _ = newgpt.load_checkpoint(trained_run)
    history = [("user", "What is two plus three?"), ("assistant", "Two plus three is 5."),
               ("user", "  And times two?\n"), ("assistant", "Twice 5 is 10. 你好 🙂"), ("user", "Thanks!")]
    answering = engine.Engine(model, tokenizer, "cpu", "float32")
    messages = [{"role": "system", "content": system}] + [{"role": r, "content": c} for r, c in history]
    hf_tokenizer = AutoTokenizer.from_pretrained(exported_run)
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert list(theirs) == answering.render(system, history)
    assert hf_tokenizer.eos_token_id == tokenizer.token_to_id("<|end|>")


def test_chat_template_renders_documents_as_our_passages_block(exported_run, trained_run):
    model, tokenizer, _ = newgpt.load_checkpoint(trained_run)
    answering = engine.Engine(model.eval(), tokenizer, "cpu", "float32")
    passages = [retrieval.Passage("Zembla", "Its capital is Ostrova.", "facts", "facts:0"),
                retrieval.Passage("", "One plus two is three.", "facts", "facts:1")]
    history = [("user", "one plus one?"), ("assistant", "two"), ("user", "What is the capital of Zembla?")]
    ours = answering.render("", history, passages)
    hf_tokenizer = AutoTokenizer.from_pretrained(exported_run)
    messages = [{"role": role, "content": content} for role, content in history]
    documents = [{"title": p.title, "text": p.text} for p in passages]
    theirs = hf_tokenizer.apply_chat_template(messages, documents=documents, add_generation_prompt=True,
                                              return_dict=False)
    assert theirs == ours, "documents= must render into exactly the chat's passages block"


def test_chat_template_refuses_an_unknown_role(exported_run):
    hf_tokenizer = AutoTokenizer.from_pretrained(exported_run)
    with pytest.raises(Exception, match="roles are system, user, assistant, context, not tool"):
        hf_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])


def test_greedy_generate_equals_our_kv_cache_generation(exported_run, trained_run):
    model, tokenizer, _ = newgpt.load_checkpoint(trained_run)
    hf_model = AutoModelForCausalLM.from_pretrained(exported_run)
    end_id = tokenizer.token_to_id("<|end|>")
    assert hf_model.generation_config.eos_token_id == end_id, "HF generation stops at end-of-turn"
    answering = engine.Engine(model.eval(), tokenizer, "cpu", "float32")
    greedy = engine.SamplingConfig(temperature=0.0, repetition_penalty=1.0, dry_multiplier=0.0, max_new_tokens=20)
    for question in ("What is one plus two?", "And times two?"):
        prompt = answering.render("", [("user", question)])
        ours = [t for t, _ in engine.generate(model, engine.Prompt(prompt, stop_ids=(end_id,)), greedy)]
        theirs = export_hf.greedy_generate(hf_model, prompt, max_new_tokens=20)
        assert theirs == ours, f"{question!r}: transformers generated {theirs}, we generated {ours}"


def test_pipeline_answers_a_chat_message_as_our_chat_does(exported_run, trained_run):
    generator = pipeline("text-generation", model=str(exported_run))
    reply = generator([{"role": "user", "content": "What is two plus two?"}], max_new_tokens=12, do_sample=False,
                      repetition_penalty=1.0)
    message = reply[0]["generated_text"][-1]
    model, tokenizer, _ = newgpt.load_checkpoint(trained_run)
    greedy = engine.SamplingConfig(temperature=0.0, repetition_penalty=1.0, dry_multiplier=0.0, max_new_tokens=12)
    answering = engine.Engine(model.eval(), tokenizer, "cpu", "float32")
    turn = answering.prepare("", [], "What is two plus two?", greedy.max_new_tokens)
    expected = "".join(answering.reply(turn, greedy, answering.generator(greedy.seed)))
    assert message["role"] == "assistant" and message["content"] == expected


def run_export(*args):
    return subprocess.run([sys.executable, str(REPO / "export_hf.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_bad_checkpoints_and_a_full_out_dir_give_one_line_errors(trained_run, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((trained_run / "gpt_step0004.pt").read_bytes()[:5000])
    unknown_option = tmp_path / "qk_norm.pt"
    ckpt = torch.load(trained_run / "gpt_step0004.pt", weights_only=True)
    ckpt["model_config"]["qk_norm"] = True
    torch.save(ckpt, unknown_option)
    for path, message in ((corrupt, "is truncated or damaged"), (unknown_option, "uses --qk_norm"),
                          (tmp_path / "missing.pt", "checkpoint not found")):
        result = run_export("--ckpt", path, "--out", tmp_path / "out")
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists(), "nothing is written on error"

    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    refused = run_export("--ckpt", trained_run, "--out", full)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert [p.name for p in full.iterdir()] == ["notes.txt"], "a refused export leaves the folder as it was"
    forced = run_export("--ckpt", trained_run, "--out", full, "--force")
    assert forced.returncode == 0, forced.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in full.iterdir()}
    assert not (full / "notes.txt").exists() and len(list(tmp_path.glob(".full.*"))) == 0, "no staging left"


def test_model_card_describes_this_checkpoint_and_names_each_source_with_its_licence(exported_run, trained_run):
    card = (exported_run / "README.md").read_text()
    model, _, ckpt = newgpt.load_checkpoint(trained_run)
    assert f"{model.num_params() / 1e6:.2f}M parameters" in card and f"Trained for {ckpt['step']:,} steps" in card
    assert f"{ckpt['val_bpb']:.4f} bits per byte" in card
    (source_line,) = [line for line in card.splitlines() if "oasst.jsonl.gz" in line]
    assert "chat stage" in source_line and "Apache-2.0" in source_line, source_line
    assert f'model="{exported_run.name}"' in card and str(exported_run.parent) not in card, \
        "the usage example names the folder, not a path on the exporting machine"


def test_the_exported_generation_config_carries_the_chats_sampling(exported_run):
    config, sampling = GenerationConfig.from_pretrained(exported_run), engine.SamplingConfig()
    assert (config.do_sample, config.temperature, config.top_k, config.top_p, config.repetition_penalty,
            config.no_repeat_ngram_size, config.max_new_tokens) == \
        (True, sampling.temperature, sampling.top_k, sampling.top_p, sampling.repetition_penalty,
         sampling.no_repeat_ngram_size, sampling.max_new_tokens)
    assert config.min_p == (sampling.min_p or None)
