"""The NVFlare tests run only where the ``nvflare`` extra is installed."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("nvflare") else ["*.py"]
