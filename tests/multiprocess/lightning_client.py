"""A Lightning DDP trainer of two ranks under torchrun, for the tests: the example's model with
an epoch so long that it trains until the task is aborted; each rank records what happened in
``<records>/rank<N>.jsonl``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import flare_agent_async.client.lightning as flare

sys.path.insert(0, str(Path(__file__).parent.parent.parent / "examples"))
from lightning_trainer import Classifier


class Record(L.Callback):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.file = path.open("a", buffering=1)

    def write(self, event: str, **fields: Any) -> None:
        self.file.write(json.dumps({"event": event, **fields}) + "\n")

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == 1:
            self.write("training")


def main() -> None:
    records = Path(sys.argv[1])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    record = Record(records / f"rank{trainer.global_rank}.jsonl")
    trainer.callbacks.append(record)
    flare.patch(trainer)
    x = torch.randn(200_000, 8)  # an epoch far longer than the test waits
    data = DataLoader(TensorDataset(x, (x.sum(dim=1) > 0).long()), batch_size=2)
    model = Classifier()
    while flare.is_running():
        trainer.fit(model, data)
        record.write("fit_done", steps=trainer.global_step)
    record.write("end")
    flare.shutdown()


if __name__ == "__main__":
    main()
