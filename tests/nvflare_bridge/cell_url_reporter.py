"""Job custom code for the tests: writes the URL of the cell agents attach to, at START_RUN."""

import os

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent


class CellURLReporter(FLComponent):
    """Writes ``<run dir>/cell_url.txt``: the root URL of this client's cell network."""

    def handle_event(self, event_type, fl_ctx):
        if event_type != EventType.START_RUN:
            return
        engine = fl_ctx.get_engine()
        url = engine.get_cell().core_cell.root_url
        run_dir = engine.get_workspace().get_run_dir(fl_ctx.get_job_id())
        path = os.path.join(run_dir, "cell_url.txt")
        with open(path + ".partial", "w") as file:
            file.write(url)
        os.replace(path + ".partial", path)
