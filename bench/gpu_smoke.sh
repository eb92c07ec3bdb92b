#!/usr/bin/env bash
# CUDA smoke test, for anyone with an NVIDIA GPU: the CUDA-marked tests, then the real command line on the GPU.
#   bash bench/gpu_smoke.sh                          # about 3 minutes on one H100
#   DEVICE=cpu STEPS=30 bash bench/gpu_smoke.sh      # the script's own flow, checked on a CPU
# 1. tests/test_cuda.py: tiny runs in bf16 and fp16 (with the loss scaler), exact resume with dropout, chat
#    sampling on the GPU, a GPU checkpoint loaded and resumed on the CPU.
# 2. The size the dial picks for the device, for $STEPS (300) steps (data from ../shared/data if present, else
#    generated fixture conversations), Ctrl-C after the first checkpoint, --resume to the end, one chat answer.
# 3. A run with a $MINUTES-minute budget (1): it must end at the budget, decayed, with a final evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-300}
MINUTES=${MINUTES:-1}
SAVE=$((STEPS / 3))
if [ "$DEVICE" = cuda ]; then
    python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
    python -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
fi

work=$(mktemp -d)
D=../shared/data
if [ -f "$D/extra/dolly15k_en.jsonl.gz" ]; then
    data=("$D/oasst/oasst1_en_train.texts.jsonl.gz" "$D/extra/dolly15k_en.jsonl.gz")
    val=(--val_data "$D/oasst/oasst1_en_validation.messages.jsonl.gz")
else
    python -c "import sys; sys.path.insert(0, 'tests'); import conftest; \
conftest.write_jsonl('$work/oasst.jsonl.gz', conftest.oasst_rows(2000))"
    data=("$work/oasst.jsonl.gz")
    val=()
fi
run=(python newgpt.py --data "${data[@]}" "${val[@]}" --texts "$work/texts.json" --out_dir "$work/ckpt"
     --device "$DEVICE" --max_steps "$STEPS" --save_interval "$SAVE" --eval_interval "$SAVE")

"${run[@]}" > "$work/first.log" 2>&1 &
pid=$!
until [ -f "$work/ckpt/$(printf 'gpt_step%04d.pt' "$SAVE")" ] || ! kill -0 $pid 2>/dev/null; do sleep 1; done
kill -INT $pid || true
status=0; wait $pid || status=$?
tr '\r' '\n' < "$work/first.log" | grep -E "^(data|model|training|compiling|speed|step|saved|interrupted)" || true
echo "first run exit status: $status (130: interrupted and saved)"

"${run[@]}" --resume 2>&1 | tr '\r' '\n' | grep -E "^(training|speed|step|saved)"
python chat_with_model.py --ckpt "$work/ckpt" --device "$DEVICE" --prompt "What is the capital of France?" --show_speed

python newgpt.py --data "${data[@]}" "${val[@]}" --texts "$work/texts.json" --out_dir "$work/budget" \
    --device "$DEVICE" --max_minutes "$MINUTES" 2>&1 | tr '\r' '\n' | grep -E "^(model|training|speed|step|saved|the )"
rm -rf "$work"
