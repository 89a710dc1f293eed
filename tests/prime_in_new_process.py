"""Runs the cached priming (as the flows call it) once in a fresh process and prints its final state's name (used by the tests)."""

import json
import sys

from prefect import flow

from tasks.training_tasks import primed_checkpoint


@flow
def prime_once(arguments: dict) -> str:
    return primed_checkpoint(**arguments, return_state=True).name


if __name__ == "__main__":
    print("STATE", prime_once(json.loads(sys.argv[1])))
