"""Storage credentials for a run root: from the environment (what fsspec/s3fs read by
themselves: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...) or from a Prefect
Secret block named in the config (storage.secret_block). Only the block's name is ever a flow
parameter or saved; its value is read inside the process that opens the files and is never
logged, returned or written."""

from __future__ import annotations

from typing import Any

from storage.config import RunConfig


def storage_options(cfg: RunConfig) -> dict[str, Any]:
    """fsspec storage options for the run root: {} (environment) or the Secret block's JSON."""
    name = cfg.storage.secret_block
    if not name:
        return {}
    # Prefect (~2 s to import) only when a Secret block is named: `d3s repair` and the
    # single-stage commands (`d3s teachers ROOT`, ...) otherwise run without it.
    from prefect.blocks.system import Secret

    try:
        block = Secret.load(name)
        assert isinstance(block, Secret)  # called synchronously (typed Secret | Coroutine)
        value = block.get()
    except ValueError as e:
        raise ValueError(f"storage.secret_block: no Prefect Secret block named {name!r}") from e
    if not isinstance(value, dict):
        raise ValueError(
            f"storage.secret_block: the Secret block {name!r} must hold a JSON object of fsspec "
            "storage options (for S3: key, secret, token, endpoint_url)"
        )
    return value
