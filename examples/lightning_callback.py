"""Curvature of a Lightning module: one callback, automatic optimization, no download."""

import sys

import lightning.pytorch as pl
import torch
from torch import nn

from curvopt.integrations.lightning import CurvatureCallback


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch  # (inputs, targets): what the callback estimates on
        return self.loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


root = sys.argv[1] if len(sys.argv) > 1 else "runs/lightning"
torch.manual_seed(0)
x = torch.randn(1024, 20)
y = (x[:, :4].argmax(1) + (torch.rand(1024) < 0.1).long()) % 4  # a learnable rule, 10 % noise
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)

curvature = CurvatureCallback(nn.CrossEntropyLoss(), every=8, probes=4)
trainer = pl.Trainer(max_epochs=2, accelerator="cpu", default_root_dir=root, callbacks=[curvature],
                     enable_progress_bar=False, logger=pl.loggers.CSVLogger(root))
trainer.fit(Classifier(), loader)

print(curvature.wrapper.last_estimate.summary())
print("alarms:", curvature.wrapper.alarms, "| curvature log:", f"{root}/curvature.jsonl")
