#!/usr/bin/env bash
# LoRA variants on the CPU recipe's setting: SmolLM2-135M, LoRA r=8 all-linear on the top 12 layers,
# 8 records per packed step, lr 2e-3 cosine, 8 steps, eval loss on the first 32 dev records. Same seed / data.
cd /work/main
run() {
  name=$1; shift
  .venv/bin/python -m adgen train --config smollm2-135m --model smollm2-135m --train-data ../shared/adgen/train.json \
    --eval-data ../shared/adgen/dev.json --output-dir /root/work-runs/variants/$name --overwrite --no-progress \
    max_samples=400 max_eval_samples=32 max_length=640 batching=packed batch_size=8 grad_accum=1 max_steps=8 \
    lr=2e-3 warmup_steps=1 top_layers=12 lora.r=8 lora.alpha=16 lora.target_modules=all-linear eval_every=0 \
    save_every=0 plot=false precision=auto "$@" > /root/work-runs/variants/$name.log 2>&1
  python3 -c "import json;s=json.load(open('/root/work-runs/variants/$name/summary.json'));print('$name', s['final_eval_loss'], s['final_train_loss'], s['train_time_s'], s['tokens_per_s'])"
}
run default
run lora_plus lora.plus_lr_ratio=16
run pissa lora.init=pissa_niter_4
run olora lora.init=olora
run neftune neftune_alpha=5
