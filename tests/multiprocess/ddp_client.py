"""A Client API trainer of two ranks under torchrun, for the tests: it records what each rank
sees (a JSON line per event in ``<records>/rank<N>.jsonl``) and trains with DDP on gloo.

Modes: ``train`` trains each task for a few steps; ``slow`` trains until the task is aborted
(checking every step); ``fail`` makes rank 0's ``receive`` raise (a bad argument), as any error
of rank 0 inside a call every rank makes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import flare_agent_async.client as flare


def main() -> None:
    mode, records = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    log = (records / f"rank{rank}.jsonl").open("a", buffering=1)

    def record(event: str, **fields: object) -> None:
        log.write(json.dumps({"event": event, **fields}) + "\n")

    flare.init(params_exchange_format="pytorch")
    # the helper for agents' trainers: rank 0's value on every rank
    shared = flare.share({"from": rank, "w": torch.arange(3.0)} if rank == 0 else None)
    record("shared", value={"from": shared["from"], "w": shared["w"].tolist()})
    model = torch.nn.Linear(3, 1)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(rank)  # each rank its own data: DDP averages the gradients
    inputs = torch.randn(16, 3)
    targets = inputs.sum(dim=1, keepdim=True)
    try:
        if mode == "fail":  # every rank calls receive; rank 0's raises inside (a bad timeout)
            flare.receive(timeout="soon" if rank == 0 else None)  # type: ignore[arg-type]
        while flare.is_running():
            received = flare.receive()
            assert received is not None
            record(
                "received",
                task=flare.get_task_name(),
                round=received.current_round,
                weights={key: value.tolist() for key, value in received.params.items()},
            )
            model.load_state_dict(received.params)
            steps = 0
            while mode == "slow" or steps < 5:
                if flare.is_aborted():
                    record("aborted", steps=steps)
                    break
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(ddp(inputs), targets).backward()
                optimizer.step()
                steps += 1
                if steps == 1:
                    record("training")
            else:
                state = {key: value.detach().clone() for key, value in model.state_dict().items()}
                record("trained", weights={key: value.tolist() for key, value in state.items()})
                flare.send(flare.FLModel(params=state, meta={"NUM_STEPS_CURRENT_ROUND": steps}))
    except Exception as exc:
        record("error", type=type(exc).__name__, message=str(exc))
        raise
    record("end")
    flare.shutdown()
    dist.barrier()  # every rank is done with the group before any tears it down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
