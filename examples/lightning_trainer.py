"""PyTorch Lightning, federated, on several processes: a Lightning DDP trainer patched for the
Client API, as NVFlare's ``nvflare.client.lightning`` with the import line changed.

Launch it with torchrun (every rank started up front, as on a cluster); under NVFlare,
AgentExecutor launches torchrun::

    AgentExecutor(launch="{python} -m torch.distributed.run --standalone --nproc-per-node 2 "
                         "custom/lightning_trainer.py")

Each round, ``validate`` measures the global model (its metrics go back with the result) and
``fit`` trains it for one epoch; an evaluation task sends the metrics only.
"""

import os

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import flare_agent_async.client.lightning as flare  # was: import nvflare.client.lightning


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(8, 2)

    def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: list[torch.Tensor], index: int) -> None:
        x, y = batch
        hits = (self.net(x).argmax(dim=1) == y).float().mean()
        self.log("accuracy", hits, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.02)


def dataset(seed: int) -> TensorDataset:
    """A two-class problem with a noisy linear boundary."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 8, generator=generator)
    y = x[:, :4].sum(dim=1) - x[:, 4:].sum(dim=1) + torch.randn(1024, generator=generator) > 0
    return TensorDataset(x, y.long())


def main() -> None:
    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="auto",
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    flare.patch(trainer)  # rank 0 connects; every rank receives through the process group
    model = Classifier()
    train = DataLoader(dataset(1), batch_size=64, shuffle=True)
    check = DataLoader(dataset(2), batch_size=256)
    while flare.is_running():
        trainer.validate(model, check, verbose=False)
        trainer.fit(model, train)
    flare.shutdown()


if __name__ == "__main__":
    main()
