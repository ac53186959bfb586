import time

import pytest

from mlflow_store import tracking as T


def test_parent_and_child_runs_visible_through_client(tracking_uri, tmp_path):
    recipe = {"name": "tiny", "spi": {"iterations": 2, "betas": [1.0, 2.0]}, "seed": 0}
    parent = T.start_experiment_run(tracking_uri, "tiny", recipe, "d1g3st", "abc123")
    client = T.client_for(tracking_uri)

    run = client.get_run(parent)
    assert run.data.params["spi.iterations"] == "2"
    assert run.data.params["spi.betas"] == "[1.0, 2.0]"
    assert run.data.tags[T.TAG_DIGEST] == "d1g3st"
    assert run.data.tags[T.TAG_CODE_VERSION] == "abc123"

    exp = client.get_experiment_by_name("tiny")
    assert exp.artifact_location == (tmp_path / "work" / "mlartifacts").resolve().as_uri()

    art = tmp_path / "out"
    art.mkdir()
    (art / "samples.jsonl").write_text('{"x": 1}\n')
    children = {}
    for system, iteration in [("spi", 1), ("spi", 2), ("bon", 0)]:
        child = T.find_or_create_child_run(tracking_uri, parent, system, iteration)
        T.log_metrics(tracking_uri, child, {"mean_reward": 0.1 * iteration, "win_rate": 40.0 + iteration})
        T.log_metrics(tracking_uri, child, {"loss": 0.5}, step=3)
        uri = T.log_artifacts(tracking_uri, child, art, "samples")
        assert uri.startswith((tmp_path / "work" / "mlartifacts").resolve().as_uri())
        T.finish_run(tracking_uri, child)
        children[(system, iteration)] = child
    T.finish_run(tracking_uri, parent)

    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.`spi.system` = 'spi'",
    )
    assert {r.info.run_id for r in found} == {children[("spi", 1)], children[("spi", 2)]}
    for r in found:
        assert r.data.metrics["win_rate"] == 40.0 + int(r.data.tags["spi.iteration"])
        assert r.info.status == "FINISHED"
        assert [a.path for a in client.list_artifacts(r.info.run_id, "samples")] == ["samples/samples.jsonl"]
    assert client.get_metric_history(children[("bon", 0)], "loss")[0].step == 3
    listed = T.child_runs(tracking_uri, parent)
    assert sorted((c["system"], c["iteration"]) for c in listed) == [("bon", 0), ("spi", 1), ("spi", 2)]
    back = T.download_artifacts(tracking_uri, children[("bon", 0)], "samples", tmp_path / "dl")
    assert (back / "samples.jsonl").read_text() == '{"x": 1}\n'
    assert not (tmp_path / "mlruns").exists()


def test_child_run_is_idempotent(tracking_uri):
    parent = T.start_experiment_run(tracking_uri, "idem", {"a": 1}, "dig", "v")
    first = T.find_or_create_child_run(tracking_uri, parent, "spi", 1)
    again = T.find_or_create_child_run(tracking_uri, parent, "spi", 1)
    other = T.find_or_create_child_run(tracking_uri, parent, "spi", 2)
    assert first == again != other
    # another parent run of the same experiment has its own children
    parent2 = T.start_experiment_run(tracking_uri, "idem", {"a": 1}, "dig", "v")
    assert T.find_or_create_child_run(tracking_uri, parent2, "spi", 1) != first
    assert T.find_experiment_run(tracking_uri, "idem", "dig") == parent2
    assert T.find_experiment_run(tracking_uri, "idem", "nope") is None
    assert len(T.child_runs(tracking_uri, parent)) == 2


def test_child_run_idempotent_across_threads(tracking_uri):
    from concurrent.futures import ThreadPoolExecutor

    parent = T.start_experiment_run(tracking_uri, "threads", {"a": 1}, "dig", "v")
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda _: T.find_or_create_child_run(tracking_uri, parent, "bon", 0), range(8)))
    assert len(set(ids)) == 1


def test_rerun_params_are_not_rejected(tracking_uri):
    parent = T.start_experiment_run(tracking_uri, "p", {"a": {"b": 1}}, "dig", "v")
    T.log_params(tracking_uri, parent, {"a.b": 1})  # same value again: fine
    assert T.client_for(tracking_uri).get_run(parent).data.params == {"a.b": "1"}


def test_flatten_params():
    flat = T.flatten_params({"a": {"b": {"c": 1}, "d": None}, "e": [1, {"f": 2}], "g h": "x", "empty": {}})
    assert flat == {"a.b.c": "1", "a.d": "None", "e": '[1, {"f": 2}]', "g h": "x", "empty": "{}"}


def test_code_version_is_a_string():
    version = T.code_version()
    assert isinstance(version, str) and version


def test_unreachable_http_uri_fails_fast():
    start = time.monotonic()
    with pytest.raises(T.TrackingURIError, match=r"http://127\.0\.0\.1:1"):
        T.start_experiment_run("http://127.0.0.1:1", "x", {}, "d", "v")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("uri", ["", "mlflow.db", "foo://bar", "http://"])
def test_malformed_uri_names_the_uri(uri):
    with pytest.raises(T.TrackingURIError) as info:
        T.client_for(uri)
    assert repr(uri) in str(info.value)


def test_unusable_sqlite_path_names_the_uri():
    uri = "sqlite:////proc/definitely/not/here.db"
    with pytest.raises(T.TrackingURIError, match="proc/definitely"):
        T.client_for(uri)


def test_new_sqlite_databases_start_from_one_migrated_template(tmp_path, monkeypatch):
    """The first new database builds the per-version template (MLflow's migrations run once); later
    ones are copies at the same schema revision, fully usable; an existing database is never replaced."""
    import sqlite3

    import mlflow

    monkeypatch.setenv("SPI_CACHE_DIR", str(tmp_path / "cache"))

    def revision(path):
        with sqlite3.connect(path) as db:
            return db.execute("select version_num from alembic_version").fetchone()[0]

    first = tmp_path / "a" / "mlflow.db"
    T.client_for(f"sqlite:///{first}")
    template = tmp_path / "cache" / "mlflow" / f"empty-{mlflow.__version__}.db"
    assert template.exists() and revision(template) == revision(first)
    second = tmp_path / "b" / "mlflow.db"
    client = T.client_for(f"sqlite:///{second}")
    assert revision(second) == revision(template)
    run_id = T.start_experiment_run(f"sqlite:///{second}", "exp", {"a": 1}, "digest", "code")
    assert client.get_run(run_id).data.params["a"] == "1"
    before = second.read_bytes()
    T._new_sqlite_from_template(second)
    assert second.read_bytes() == before


def test_experiments_are_of_the_runs_kind(tracking_uri):
    """MLflow 3's experiment kind: ours hold runs (custom_model_development), set when created and on an
    older experiment that has none; a kind a user chose is kept."""
    client = T.client_for(tracking_uri)
    new = T.get_or_create_experiment(tracking_uri, "kind-new")
    assert client.get_experiment(new).tags[T.TAG_EXPERIMENT_KIND] == "custom_model_development"
    old = client.create_experiment("kind-old")
    assert T.TAG_EXPERIMENT_KIND not in client.get_experiment(old).tags
    assert T.get_or_create_experiment(tracking_uri, "kind-old") == old
    assert client.get_experiment(old).tags[T.TAG_EXPERIMENT_KIND] == "custom_model_development"
    chosen = client.create_experiment("kind-chosen", tags={T.TAG_EXPERIMENT_KIND: "genai_development"})
    T.get_or_create_experiment(tracking_uri, "kind-chosen")
    assert client.get_experiment(chosen).tags[T.TAG_EXPERIMENT_KIND] == "genai_development"


def test_child_runs_span_the_times_they_are_given(tracking_uri):
    """A child run logged after its stages still starts and ends when they ran (ms precision)."""
    parent = T.start_experiment_run(tracking_uri, "times", {"a": 1}, "dig", "v", tags={T.TAG_OVERRIDES: '{"seed": 7}'})
    client = T.client_for(tracking_uri)
    assert client.get_run(parent).data.tags[T.TAG_OVERRIDES] == '{"seed": 7}'
    started, ended = time.time() - 3600.0, time.time() - 1800.25
    child = T.find_or_create_child_run(tracking_uri, parent, "spi", 1, start_time=started)
    T.finish_run(tracking_uri, child, end_time=ended)
    info = client.get_run(child).info
    assert (info.start_time, info.end_time) == (int(started * 1000), int(ended * 1000))
    assert info.status == "FINISHED"
    unset = T.find_or_create_child_run(tracking_uri, parent, "spi", 2)  # no times given: now
    assert abs(client.get_run(unset).info.start_time - time.time() * 1000) < 60_000


def test_ui_url_opens_the_runs_view_of_a_server_only():
    assert T.ui_url("http://127.0.0.1:5000/", "3") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert T.ui_url("http://h:1", "3", "abc").endswith("/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert T.ui_url("sqlite:////tmp/mlflow.db", "3") is None
