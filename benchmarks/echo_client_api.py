"""The job scenario's trainer for setup D: the same script as NVFlare's Client API echo
(``echo_nvflare_client_api.py``) on ``flare_agent_async.client``, launched by `AgentExecutor`,
whose environment configures it."""

import flare_agent_async.client as flare
from flare_agent_async.client import FLModel, ParamsType

flare.init()
while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    flare.send(
        FLModel(
            params=model.params, params_type=ParamsType.FULL, meta={"NUM_STEPS_CURRENT_ROUND": 1}
        )
    )
    # Let go of the model before asking for the next one, as every trainer of the scenario does:
    # the trainer's peak RSS is then the library's, not this loop variable's.
    del model
