"""Retry failed batches: stylise again only what a previous stylize-bucket run left missing.

    find the earlier run's parameters (from the destination, or from a flow run) -> stylize-bucket again

Images whose outputs and manifest rows exist are skipped (status ``skipped``), so only the images of shards
that failed (storage errors) are processed; images that are not decodable keep their ``error`` rows.
Storage options are never recorded (they may hold credentials): give them again if the run needed them.
"""

from __future__ import annotations

from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client

from flows.stylize_bucket import stylize_bucket
from tasks.secrets import StorageSecrets
from tasks.stylize_tasks import recorded_run


@flow(name="retry-failed")
def retry_failed(destination: str | None = None, flow_run_id: str | None = None,
                 storage_options: StorageSecrets | dict | None = None, retries: int = 3) -> dict:
    """Re-run the stylize-bucket run that wrote ``destination`` (or the flow run ``flow_run_id``) for what is missing."""
    if flow_run_id:
        with get_client(sync_client=True) as client:
            parameters = dict(client.read_flow_run(UUID(flow_run_id)).parameters)
        parameters["storage_options"] = storage_options  # Prefect holds only "**********" for them
    elif destination:
        parameters = {**recorded_run(destination, storage_options), "destination": destination,
                      "storage_options": storage_options}
    else:
        raise ValueError("give the destination of an earlier run, or its flow run id")
    parameters["retries"] = retries
    get_run_logger().info("retrying %s -> %s", parameters["source"], parameters["destination"])
    return stylize_bucket(**parameters)
