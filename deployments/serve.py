"""The deployments, served by one long-running process (a local process "worker" in Prefect's terms):

    python -m deployments.serve          # with PREFECT_API_URL pointing at your server

- train-new-style: the new-style form (flows/new_style.py).
- stylize-bucket: stylises a bucket on a schedule; the cron schedule below is an inactive example whose
  parameters name an example bucket: activate it (or add your own) in the UI or with `prefect deployment`.
- retry-failed: re-runs what an earlier stylize-bucket run left missing.

`serve` is used rather than a work pool and `prefect deploy`, because it needs no pool, no worker type and no
code storage: the flows run in this process's environment, which already has torch and the models' store.
"""

from __future__ import annotations

import sys

from prefect import get_client, serve
from prefect.schedules import Cron
from prefect.settings import get_current_settings

from flows.new_style import train_new_style
from flows.retry_failed import retry_failed
from flows.stylize_bucket import stylize_bucket
from tasks.training_tasks import ensure_gpu_limit

EXAMPLE_SCHEDULE = Cron(
    "0 2 * * *", timezone="UTC", active=False,
    parameters={"source": "gs://example-bucket/photos", "destination": "gs://example-bucket/stylised/starry",
                "models": ["starry-night"]},
)


def deployments() -> list:
    return [
        train_new_style.to_deployment(
            name="train-style", description="Train a new style model from a style image and a photo set.",
            tags=["stylize"]),
        stylize_bucket.to_deployment(
            name="stylize-bucket", description="Stylise every image of a bucket with one or more models.",
            schedules=[EXAMPLE_SCHEDULE], tags=["stylize"]),
        retry_failed.to_deployment(
            name="retry-failed", description="Redo only what an earlier stylize-bucket run left missing.",
            tags=["stylize"]),
    ]


def main() -> int:
    api = get_current_settings().api.url
    if not api:  # Prefect would serve against a temporary server of this process's own, which no UI shows
        print("deployments.serve: error: PREFECT_API_URL is not set; set it to your Prefect server's API (e.g. "
              "http://127.0.0.1:4200/api after `prefect server start`)", file=sys.stderr)
        return 2
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        print(f"deployments.serve: error: no Prefect server answers at {api} ({problem}); start it (`prefect server "
              "start`) or correct PREFECT_API_URL", file=sys.stderr)
        return 2
    ensure_gpu_limit()
    serve(*deployments())
    return 0


if __name__ == "__main__":
    sys.exit(main())
