"""Curvature of a GPT-2 trained by the Hugging Face Trainer: one callback, no Trainer subclass, no download."""

import sys
from pydoc_data.topics import topics  # Python's own documentation: text to train on, no download

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from curvopt.integrations.huggingface import CurvatureCallback

output_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/hf-gpt2"
text = torch.tensor(list(" ".join(topics.values()).encode("utf-8")[: 256 * 32]))
train_set = [{"input_ids": row, "labels": row} for row in text.reshape(256, 32)]  # bytes; labels shift inside
model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=4))

curvature = CurvatureCallback(every=5, probes=4)  # the model's own loss; the Trainer's model and optimizer
args = TrainingArguments(output_dir=output_dir, max_steps=30, per_device_train_batch_size=16, learning_rate=1e-3,
                         logging_steps=10, save_steps=30, report_to="none", use_cpu=True, disable_tqdm=True)
Trainer(model=model, args=args, train_dataset=train_set, callbacks=[curvature]).train()

print(curvature.wrapper.last_estimate.summary())  # per-layer traces, GN traces, GN-Gap
print("alarms:", curvature.wrapper.alarms, "| curvature log:", f"{output_dir}/curvature.jsonl")
