"""Prefect: the only layer that knows it. Its parts:

flows and their steps
    experiment.py   the experiment flow (iterate, evaluate, track, register, report) and run_plain
    model_flows.py  evaluate a registered guided policy, promote, fit the local judge
    compare.py      every system decoded, judged and reported
    stages.py       each stage as one call: key from spi.stages, then plain / task / sharded
    sharded.py      sharding, a strategy of a stage call (Dask)
    context.py      one run's context: recipe, files, tracking, store, stage runner
    tasks.py        Prefect tasks of the compute stages;  records.py: store, MLflow, registry tasks
    judging.py, report.py   judge specs and the report (library code)
deployments and serving
    deployments.py  what a Prefect server runs;  serve.py: the serving process
the stack
    services.py     spi up / down / status
the CLI
    cli.py          the `spi` command;  commands.py: spi run / promote;  bench.py: spi bench
"""
