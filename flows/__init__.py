"""flows: see README."""

import os as _os

# Prefect's ephemeral server (`make demo`, `d3s run` without PREFECT_API_URL) migrates a new
# PREFECT_HOME's database on its first start: 25-30 s on 2 busy cores, over Prefect's 20 s
# default, which fails the run before it starts. A user's own setting wins.
_os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
