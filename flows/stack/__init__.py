"""The local service stack behind ``spi up``, ``spi down`` and ``spi status``.

    plan.py       what to start: services, ports, database URLs, environment (no side effects)
    process.py    start, observe and stop the processes; the state file <home>/services.json
    health.py     HTTP health checks and the Prefect API's deployments
    commands.py   the three commands and their arguments (``python -m flows.stack up|down|status``)
    temporary.py  the Prefect API of ``spi run``: configured, the stack's, or a temporary server that
                  dies with the command

``spi up`` starts, each bound to 127.0.0.1 and detached in its own process group:

    prefect-server   ``prefect server start`` (API + UI), database <home>/prefect/prefect.db or --prefect-db
    mlflow-server    ``mlflow server`` (tracking + model registry on one database: --db, default
                     sqlite:///<home>/mlflow.db; artifacts proxied to <home>/mlartifacts)
    serve            ``python -m flows.serve``: registers the deployments of flows.deployments with the
                     Prefect server and runs their flow runs (health: the runner's webserver)
"""
