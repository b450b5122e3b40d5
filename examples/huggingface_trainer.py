"""Fine-tune a GPT-2 with the Hugging Face Trainer and watch its curvature: one callback, no download.

The model is built from a config and trained on Python's own documentation (bytes); bf16 where the CPU has it,
logs to W&B (offline without an account) and TensorBoard. No `every=`: a 40-step run chooses its own cadence.
"""

import sys
from pydoc_data.topics import topics  # Python's own documentation: text to train on, no download

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from curvopt.integrations.huggingface import CurvatureCallback

output_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/hf-gpt2"
text = torch.tensor(list(" ".join(topics.values()).encode("utf-8")[: 320 * 32]))
rows = [{"input_ids": row, "labels": row} for row in text.reshape(320, 32)]  # bytes; the model shifts the labels
train_set, eval_set = rows[:256], rows[256:]
model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=4))

curvature = CurvatureCallback(probes=4)  # the model's own loss and optimizer; the cadence from max_steps
args = TrainingArguments(
    output_dir=output_dir,
    max_steps=40,
    per_device_train_batch_size=16,
    learning_rate=1e-3,
    logging_steps=10,
    eval_strategy="steps",
    eval_steps=20,
    save_steps=40,
    use_cpu=True,
    bf16=torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    report_to=["wandb", "tensorboard"],
    disable_tqdm=True,
)
Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, callbacks=[curvature]).train()

print(curvature.wrapper.last_estimate.summary())  # per-layer traces, GN traces, GN-Gap (computed in float32)
print("alarms:", curvature.wrapper.alarms, "| curvature log:", f"{output_dir}/curvature.jsonl")
