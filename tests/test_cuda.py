"""CUDA paths: training (bf16 and fp16 with a loss scaler), resume, evaluation and chat on the GPU, and
checkpoints that move between the GPU and the CPU. Marked `cuda`; they skip without a GPU.
bench/gpu_smoke.sh runs them on a GPU machine together with a short full-size run."""

import json

import pytest
import torch

import chat_with_model as chat
import engine
import newgpt
from conftest import TINY_FLAGS, train_args, train_in_process

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")]

CUDA_FLAGS = [flag if flag != "float32" else "bfloat16" for flag in TINY_FLAGS] + ["--device", "cuda"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_training_resume_and_chat_on_cuda(tmp_path, oasst_file, dtype):
    flags = [*CUDA_FLAGS, "--dtype", dtype, "--dropout", "0.1", "--save_interval", "3", "--keep_last", "0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_in_process(*train_args(oasst_file, straight, *flags, "--max_steps", "6")) == 0
    resumed.mkdir()
    for path in [straight / "gpt_step0003.pt", *straight.glob("tokenizer-*.json")]:
        (resumed / path.name).write_bytes(path.read_bytes())
    assert train_in_process(*train_args(oasst_file, resumed, *flags, "--max_steps", "6", "--resume")) == 0
    end_straight = torch.load(straight / "gpt_step0006.pt", weights_only=True, map_location="cpu")
    end_resumed = torch.load(resumed / "gpt_step0006.pt", weights_only=True, map_location="cpu")
    for name, tensor in end_straight["model"].items():
        assert torch.equal(tensor, end_resumed["model"][name]), f"{name} differs after resume with dropout on CUDA"
    assert "cuda" in end_straight["rng"], "the CUDA generator's state is saved"
    if dtype == "float16":
        assert end_straight["scaler"]["scale"] > 0, "the loss scale is saved"
    losses = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_bpb"] == r["val_bpb"] for r in losses if "val_bpb" in r), "no NaN"

    on_gpu, tokenizer, _ = newgpt.load_checkpoint(straight, "cuda")
    on_cpu, _, _ = newgpt.load_checkpoint(straight, "cpu")
    greedy = engine.SamplingConfig(temperature=0.0, max_new_tokens=8)
    on_the_gpu = engine.Engine(on_gpu.eval(), tokenizer, "cuda", "float32")
    prompt = on_the_gpu.render("", [("user", "What is two plus two?")])
    with on_the_gpu.ctx:
        on_gpu_ids = [t for t, _ in engine.generate(on_gpu, engine.Prompt(prompt), greedy)]
    assert on_gpu_ids == [t for t, _ in engine.generate(on_cpu.eval(), engine.Prompt(prompt), greedy)], \
        "the GPU picks the CPU's tokens"
    sampled = chat.Chat(engine.Engine(on_gpu, tokenizer, "cuda", dtype),
                        engine.SamplingConfig(temperature=1.0, max_new_tokens=8))
    "".join(sampled.stream_reply(sampled.add_user_turn("What is two plus two?")))
    assert sampled.generator.device.type == "cuda" and sampled.last_reply.tokens >= 1, "sampling runs on the GPU"


def test_a_gpu_checkpoint_loads_on_the_cpu_and_computes_the_same(tmp_path, oasst_file):
    out = tmp_path / "ckpt"
    assert train_in_process(*train_args(oasst_file, out, *CUDA_FLAGS, "--dtype", "float32", "--max_steps", "2")) == 0
    on_gpu, _, _ = newgpt.load_checkpoint(out, "cuda")
    on_cpu, _, _ = newgpt.load_checkpoint(out, "cpu")
    idx = torch.randint(0, on_cpu.config.vocab_size, (2, 16))
    with torch.no_grad():
        gpu_logits, cpu_logits = on_gpu.eval()(idx.cuda())[0].cpu(), on_cpu.eval()(idx)[0]
    assert torch.allclose(gpu_logits, cpu_logits, atol=1e-4)
    assert train_in_process(*train_args(oasst_file, out, *TINY_FLAGS, "--max_steps", "3", "--resume")) == 0, \
        "a run started on the GPU continues on the CPU"
