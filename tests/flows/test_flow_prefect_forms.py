"""What a user meets in the Prefect UI's Custom run form: every parameter of every served deployment has
a description (from the flow's Google-style "Args:" docstring), and a run name the user typed is kept."""

from __future__ import annotations

import pytest
from prefect import flow

from flows.context import typed_run_name


def _deployments():
    from flows.deployments import deployments

    return deployments()


def test_every_deployment_parameter_has_a_description():
    missing = {
        d.name: [name for name, prop in d._parameter_openapi_schema.properties.items() if not prop.get("description")]
        for d in _deployments()
    }
    assert all(d._parameter_openapi_schema.properties for d in _deployments())
    assert not {name: params for name, params in missing.items() if params}, (
        "parameters without a description (add them to the flow's docstring under 'Args:')"
    )


@flow(name="named-by-recipe", flow_run_name=lambda: typed_run_name("smoke-0123abcd"), persist_result=False)
def _named(x: int = 1) -> str:
    from prefect.runtime import flow_run

    return flow_run.name


def _run_with_name(name: str | None) -> str:
    """Create a flow run through the Prefect client (as the UI's form does), run it, read its name back."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    with get_client(sync_client=True) as client:
        created = client.create_flow_run(_named, name=name, parameters={"x": 2})
        assert run_flow(_named, flow_run=created, parameters={"x": 2}) == client.read_flow_run(created.id).name
        return client.read_flow_run(created.id).name


@pytest.mark.parametrize("typed", ["nightly check by hand", "smoke-v2 retry", "Ablation_W4"])
def test_a_typed_run_name_is_kept(prefect_harness, typed):
    assert _run_with_name(typed) == typed


@pytest.mark.parametrize("generated", [None, "crimson-otter", "alpha7-andromedae", "omega-ceti-nebula"])
def test_a_generated_run_name_is_replaced(prefect_harness, generated):
    """Prefect's own names (the server's slug, the form's prefill) give way to the flow's descriptive name."""
    assert _run_with_name(generated) == "smoke-0123abcd"


def test_the_served_flows_keep_a_typed_run_name(monkeypatch):
    """Every deployed flow with a run-name rule leaves a name the user typed as it is."""
    from prefect.runtime import flow_run

    monkeypatch.setattr(flow_run, "name", "Nightly by hand", raising=False)
    for d in _deployments():
        from prefect.flows import load_flow_from_entrypoint

        f = load_flow_from_entrypoint(d.entrypoint)
        if f.flow_run_name is None:
            continue
        monkeypatch.setattr(flow_run, "parameters", {**f.to_deployment(name="x").parameters, **(d.parameters or {})},
                            raising=False)
        assert callable(f.flow_run_name), f"{f.name}: a template name would replace the typed one"
        assert f.flow_run_name() == "Nightly by hand", f.name
