#!/bin/bash
# The fine-tune of LOG.md 2026-12-04 (not shipped): the release's step 3 command, from the reading release 6cc19c8, on
# the second teacher run's answers. It ran with --reading_answers left at its default, both; the next try adds
# --reading_answers teacher (step 3's own mix).
set -eu
cd "$(dirname "$0")/../.."
D=../shared/data
mkdir -p runs/step2
for f in latest tinygpt.pt tokenizer-8193-2218dc9cbf.json; do git show 6cc19c8:ckpt/release/$f > runs/step2/$f; done
exec python newgpt.py --data $D/oasst/oasst1_en_train.texts.jsonl.gz $D/oasst/oasst_en_100.trees.jsonl.gz \
    $D/oasst/guanaco_llama2_1k.train.jsonl.gz $D/extra/dolly15k_en.jsonl.gz \
    --val_data $D/oasst/oasst1_en_validation.messages.jsonl.gz \
    --knowledge $D/knowledge:8 --teacher bench/results/teacher_answers_more.jsonl.gz:8 --init_from runs/step2 \
    --max_minutes 40 --lr 3e-4 --min_lr 3e-5 --warmup_steps 50 --all_tokens_epochs 0 \
    --out_dir runs/taught3 --texts runs/taught3_texts.json "$@"
