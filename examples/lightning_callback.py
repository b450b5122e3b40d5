"""Curvature of a Lightning image classifier trained on dict batches from a DataModule: one callback, no download.

The batches are `{"image": …, "label": …}` dicts, as most DataModules and HF datasets yield; the callback reads
them by their target key, takes the module's own loss through `curvature_loss`, and chooses its cadence from the
run's length.
"""

import sys

import lightning.pytorch as pl
import torch
from torch import nn

from curvopt.integrations.lightning import CurvatureCallback


class Shapes(pl.LightningDataModule):
    """16×16 grey images of 4 classes (a bright bar in one of four places), 10 % of the labels noisy."""

    def setup(self, stage=None):
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 4, (1024,), generator=g)
        images = 0.5 * torch.randn(1024, 1, 16, 16, generator=g)
        for i, c in enumerate(labels.tolist()):
            images[i, 0, 4 * c : 4 * c + 4, :] += 1.0
        noisy = torch.rand(1024, generator=g) < 0.1
        labels[noisy] = torch.randint(0, 4, (int(noisy.sum()),), generator=g)
        self.train_rows = [{"image": images[i], "label": labels[i]} for i in range(896)]
        self.val_rows = [{"image": images[i], "label": labels[i]} for i in range(896, 1024)]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_rows, batch_size=32, shuffle=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_rows, batch_size=128)


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(8 * 8 * 8, 4),
        )

    def forward(self, image):
        return self.net(image)

    def curvature_loss(self, outputs, targets):  # the training loss on the outputs: what the callback estimates
        return nn.functional.cross_entropy(outputs, targets)

    def training_step(self, batch, batch_idx):
        loss = self.curvature_loss(self(batch["image"]), batch["label"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.curvature_loss(self(batch["image"]), batch["label"]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


root = sys.argv[1] if len(sys.argv) > 1 else "runs/lightning"
torch.manual_seed(0)
curvature = CurvatureCallback(probes=4)  # dict batches read by their "label" key; the module's curvature_loss
trainer = pl.Trainer(
    max_epochs=3,
    accelerator="cpu",
    default_root_dir=root,
    callbacks=[curvature],
    enable_progress_bar=False,
    logger=pl.loggers.CSVLogger(root),
)
trainer.fit(Classifier(), datamodule=Shapes())

print(curvature.wrapper.last_estimate.summary())
print("alarms:", curvature.wrapper.alarms, "| curvature log:", f"{root}/curvature.jsonl")
