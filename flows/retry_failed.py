"""Retry failed batches: stylise again only what a previous stylize-bucket run left missing.

    find the earlier run's parameters (from the destination, or from a flow run) -> stylize-bucket again

Images whose outputs and manifest rows exist are skipped (status ``skipped``), so only the images of shards
that failed (storage errors) are processed; images that are not decodable keep their ``error`` rows.
Storage options are never recorded (they may hold credentials): give them again if the run needed them, or name
the Prefect Secret block that holds them (a run given a block name records that name, and its retry reuses it).
"""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from pydantic import Field

from flows.stylize_bucket import stylize_bucket
from tasks.secrets import StorageSecrets, with_secret_block
from tasks.stylize_tasks import recorded_run


@flow(name="retry-failed")
def retry_failed(destination: str | None = None, flow_run_id: str | None = None,
                 storage_options: StorageSecrets | dict | None = None, storage_secret_block: str | None = None,
                 retries: Annotated[int, Field(ge=0, le=100)] = 3) -> dict:
    """Re-run the stylize-bucket run that wrote ``destination`` (or the flow run ``flow_run_id``) for what is missing."""
    storage_options = with_secret_block(storage_options, storage_secret_block)
    if flow_run_id:
        try:
            run_id = UUID(flow_run_id)
        except ValueError:
            raise ValueError(f"{flow_run_id!r} is not a flow run id (a UUID)") from None
        with get_client(sync_client=True) as client:
            try:
                run = client.read_flow_run(run_id)
            except ObjectNotFound:
                raise ValueError(f"no flow run {flow_run_id} on this Prefect server") from None
            flow_name = client.read_flow(run.flow_id).name
        if flow_name != "stylize-bucket":
            raise ValueError(f"flow run {flow_run_id} is a run of {flow_name!r}, not of 'stylize-bucket'")
        parameters = dict(run.parameters)
    elif destination:
        parameters = {**recorded_run(destination, storage_options), "destination": destination}
    else:
        raise ValueError("give the destination of an earlier run, or its flow run id")
    # Prefect holds only "**********" for hidden options: the ones given here (and the run's block, if it named one)
    parameters["storage_options"] = storage_options
    parameters["storage_secret_block"] = storage_secret_block or parameters.get("storage_secret_block")
    parameters["retries"] = retries
    get_run_logger().info("retrying %s -> %s", parameters["source"], parameters["destination"])
    return stylize_bucket(**parameters)
