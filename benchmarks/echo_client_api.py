"""The job scenario's trainer for setups A, B and D: NVFlare's Client API, returning each model it
receives unchanged. NVFlare ships it into the job as ``custom/echo_client_api.py``; for D, its
imports name ``flare_agent_async.client`` instead, and nothing else changes."""

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

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
