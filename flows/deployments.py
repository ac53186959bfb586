"""Deployable flows for a Prefect server (served by ``spi up`` through :func:`deployments`).

spi-experiment/spi-experiment          run an experiment (recipe + overrides from the UI form); a recipe
                                       with execution.task_runner: dask runs sharded on its Dask
                                       cluster (docs/distributed.md)
evaluate-value-model/evaluate-champion nightly: score models:/<recipe>-value@champion, the promoted
                                       guided policy (spi-k with V_1..V_k)
fit-local-judge/fit-judge              train the local Bradley-Terry judge
promote-value-model/promote            move champion to candidate when it wins by the margin

No default pins a tracking location: each flow resolves MLflow when it runs
(flows.context.resolve_tracking_uri), so under ``spi up`` the serving process's MLFLOW_TRACKING_URI (the
stack's server) is where the experiment tracks and where evaluate and promote find the registry.
"""

from __future__ import annotations

import os

NIGHTLY_CRON = "0 3 * * *"
NIGHTLY_TIMEZONE = os.environ.get("SPI_SCHEDULE_TIMEZONE", "UTC")


def deployments(recipe: str = "smoke", workdir: str = "runs") -> list:
    """``RunnerDeployment`` objects for ``serve(*deployments())``."""
    from prefect.schedules import Cron

    from evaluation.judges import judge_syntaxes
    from flows.experiment import spi_experiment
    from flows.model_flows import evaluate_value_model, fit_local_judge, promote_value_model

    tags = ["spi"]
    return [
        spi_experiment.to_deployment(
            name="spi-experiment",
            tags=tags,
            parameters={"recipe": recipe, "overrides": {}, "workdir": workdir},
            description="An SPI experiment: iterations, baselines, judging, tracking, registry. The judge is "
            f"overrides {{'evaluation': {{'judge': SPEC}}}}, SPEC one of the registered judges: {judge_syntaxes()}.",
        ),
        evaluate_value_model.to_deployment(
            name="evaluate-champion",
            tags=tags,
            parameters={"recipe": recipe, "workdir": workdir, "alias": "champion"},
            schedules=[Cron(NIGHTLY_CRON, timezone=NIGHTLY_TIMEZONE)],
            description="Nightly: score the champion guided policy (spi-k with all its value models) on the recipe's eval set.",
        ),
        fit_local_judge.to_deployment(
            name="fit-judge", tags=tags, description="Train a local Bradley-Terry judge (default text-bt)."
        ),
        promote_value_model.to_deployment(
            name="promote",
            tags=tags,
            parameters={"registered_model": f"{recipe}-value", "workdir": workdir},
            description="Promote the candidate value model when it beats the champion by the margin.",
        ),
    ]
