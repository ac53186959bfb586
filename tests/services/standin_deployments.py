"""A stand-in for flows.deployments: one tiny flow with a nightly cron schedule (explicit time zone),
so the serving process can be tested before and independently of the real deployments."""

from prefect import flow
from prefect.schedules import Cron

STANDIN_CRON = "0 3 * * *"
STANDIN_TZ = "Europe/Berlin"


@flow(name="standin-nightly")
def standin_nightly(label: str = "nightly") -> str:
    return label


def deployments() -> list:
    return [
        standin_nightly.to_deployment(
            name="standin-nightly-eval",
            schedules=[Cron(STANDIN_CRON, timezone=STANDIN_TZ)],
            tags=["test"],
        )
    ]
