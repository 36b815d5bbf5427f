"""A Client API trainer of several processes: PyTorch DDP, on the CPU (gloo) or on GPUs (nccl).

Every rank runs this same loop; rank 0 talks to the site, and the others get what it gets: the
same model, the same end of the job, the same abort. Launch it with torchrun; under NVFlare,
AgentExecutor launches torchrun::

    AgentExecutor(launch="{python} -m torch.distributed.run --standalone --nproc-per-node 2 "
                         "custom/ddp_trainer.py")

or, with a recipe, ``command="python3 -m torch.distributed.run --standalone --nproc-per-node 2"``
and ``use_agent_executor(recipe)``. Standalone, against a site: set ``FLARE_AGENT_URL``,
``FLARE_AGENT_SITE_NAME`` and ``FLARE_AGENT_ID``, then
``torchrun --standalone --nproc-per-node 2 examples/ddp_trainer.py``.
"""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import flare_agent_async.client as flare

STEPS = 10


def shard(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of a two-class problem (a noisy linear boundary)."""
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(512, 8, generator=generator)
    y = x[:, :4].sum(dim=1) - x[:, 4:].sum(dim=1) + torch.randn(512, generator=generator) > 0
    return x, y.long()


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy over every rank's data (the same number on every rank)."""
    with torch.no_grad():
        counts = torch.tensor(
            [(model(x).argmax(dim=1) == y).sum().item(), len(y)], dtype=torch.float64
        )
    dist.all_reduce(counts)
    return float(counts[0] / counts[1])


def main() -> None:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts rank 0's)
    model = torch.nn.Linear(8, 2)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.02)
    x, y = shard(dist.get_rank())
    flare.init()
    while flare.is_running():
        task = flare.receive()
        if task.params:
            model.load_state_dict(
                {key: torch.as_tensor(value) for key, value in task.params.items()}
            )
        score = accuracy(model, x, y)
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": score}))
            continue
        for _ in range(STEPS):
            if flare.is_aborted():  # a collective: every rank stops at the same step
                break
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            optimizer.step()
        else:
            weights = {
                key: value.detach().cpu().numpy() for key, value in model.state_dict().items()
            }
            flare.send(
                flare.FLModel(
                    params=weights,
                    metrics={"accuracy": score},  # the global model's, before this round
                    meta={"NUM_STEPS_CURRENT_ROUND": STEPS},
                )
            )
    flare.shutdown()
    dist.barrier()  # every rank is done with the group before any tears it down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
