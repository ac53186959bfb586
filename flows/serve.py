"""The serving process: ``python -m flows.serve`` (started by ``spi up`` and by docker/compose.yaml).

It registers every deployment returned by ``flows.deployments.deployments()`` with the Prefect API
named by PREFECT_API_URL and runs their flow runs (started from the UI, by a schedule or by
``prefect deployment run``) as subprocesses. Edit flows/deployments.py to change what is served:
names, parameters, schedules, tags.

Schedules survive a restart of this process: Prefect's ``serve`` pauses every served deployment on
shutdown by default (``pause_on_shutdown=True``), and a later ``serve`` does not unpause it, so a
nightly schedule would silently stop after the first restart. Here shutdown leaves the deployments
as they are; a schedule that a user paused in the UI stays paused, one that was active stays active,
and runs that fell due while this process was down are picked up when it is back.

Health: with PREFECT_RUNNER_SERVER_ENABLE=true (``spi up`` sets it) the runner answers
GET http://PREFECT_RUNNER_SERVER_HOST:PREFECT_RUNNER_SERVER_PORT/health.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from flows.stack.plan import SERVICE_ENV

for _key, _value in SERVICE_ENV.items():  # before prefect is imported: it reads settings at import
    os.environ.setdefault(_key, _value)


def load_deployments(module_name: str) -> list:
    """``module.deployments()``; a clear error when the module or the function is missing."""
    module = importlib.import_module(module_name)
    factory = getattr(module, "deployments", None)
    if not callable(factory):
        raise SystemExit(
            f"{module_name} has no deployments() function returning flow.to_deployment(...) objects"
        )
    deployments = list(factory())
    if not deployments:
        raise SystemExit(f"{module_name}.deployments() returned no deployments: nothing to serve")
    return deployments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--module", default="flows.deployments", help="module with deployments() (default %(default)s)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="most flow runs executed at once (default: no limit)"
    )
    args = parser.parse_args(argv)

    if not os.environ.get("PREFECT_API_URL"):
        print(
            "warning: PREFECT_API_URL is not set; serving against Prefect's default (temporary) API",
            file=sys.stderr,
        )
    deployments = load_deployments(args.module)

    from prefect import serve

    for d in deployments:
        schedules = ", ".join(
            f"{getattr(s.schedule, 'cron', None) or s.schedule} ({getattr(s.schedule, 'timezone', None) or 'UTC'})"
            for s in (d.schedules or [])
        )
        print(
            f"serving {d.flow_name}/{d.name}" + (f" on schedule {schedules}" if schedules else ""), flush=True
        )
    serve(*deployments, pause_on_shutdown=False, limit=args.limit, print_starting_message=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
