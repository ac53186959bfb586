"""The experiment flow end to end on tiny models: MLflow runs, registry, store rows, summary,
caching (rerun and a changed setting). Promotion and the evaluate flow: test_flow_experiment_models.py."""

import json
from pathlib import Path

import pytest
import torch

from tests.flows.conftest import TINY, run_cli

NAME = "tiny-value"


def _mtimes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_summary_json(experiment):
    workdir, summary, _ = experiment
    assert summary["tracking_uri"] == f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    matched = {name for name in summary["systems"] if name.startswith("best-of-n:")}
    assert set(summary["systems"]) == {"base-greedy", "base-sampled", "spi-1", "spi-2"} | matched
    assert 1 <= len(matched) <= 2
    assert summary["systems"]["base-sampled"]["iteration"] is None
    # base-greedy wrote the references: judged against itself it ties, and its decode ran once
    assert summary["systems"]["base-greedy"]["win_rate"] == pytest.approx(50.0)
    decodes = [p for p in (workdir / "tiny" / "eval").glob("base-greedy-*.json") if p.name.count(".") == 1]
    assert len(decodes) == 1
    assert summary["systems"]["spi-2"]["iteration"] == 2
    for row in summary["systems"].values():
        assert set(row) == {
            "iteration",
            "mean_reward",
            "win_rate",
            "length_controlled_winrate",
            "policy_tokens",
        }
        assert 0.0 <= row["win_rate"] <= 100.0
        assert row["policy_tokens"] > 0
    # spi-k searches W*K rows: it runs more policy tokens than plain sampling
    assert summary["systems"]["spi-1"]["policy_tokens"] > summary["systems"]["base-sampled"]["policy_tokens"]
    # the judge is not the reward model, and both are named
    assert summary["judge"].startswith("length") and summary["reward_model"].startswith(
        "hf-classifier:tiny-reward"
    )
    assert all(state == "computed" for state in summary["stages"].values())
    assert {"iteration-1/rollouts", "iteration-2/value", "eval/references", "eval/judge-spi-2"} <= set(
        summary["stages"]
    )


def test_budget_matched_best_of_n_and_the_report(experiment):
    """Best-of-N at each spi-k's generated tokens (training amortised), paired differences, plots and
    examples in the report, the plots logged beside it in MLflow."""
    from mlflow_store import tracking

    workdir, summary, full = experiment
    rows = full["systems"]
    for k in (1, 2):
        spi = rows[f"spi-{k}"]
        (name, bon), = [(n, r) for n, r in rows.items() if f"spi-{k}" in (r.get("matches") or "").split(", ")]
        assert int(name.split(":")[1]) > 4  # more rows than the search's W*K: training costs tokens
        per_leaf = spi["generated_tokens"] / (6 * 4)
        assert abs(bon["generated_tokens_per_instruction"] - spi["generated_tokens_per_instruction"]) <= per_leaf
        assert spi["training_generated_tokens"] > 0 and bon["training_generated_tokens"] == 0
    assert rows["spi-2"]["training_generated_tokens"] > rows["spi-1"]["training_generated_tokens"]
    pairs = {(p["system"], p["against"]) for p in full["paired"]}
    assert ("spi-1", max(("base-greedy", "base-sampled"), key=lambda n: rows[n]["win_rate"])) in pairs
    assert all(-100 <= p["ci_low"] <= p["mean_difference"] <= p["ci_high"] <= 100 for p in full["paired"])
    text = Path(full["report"]).read_text()
    for heading in ("## Paired differences", "## Value fits", "## Plots", "## Examples"):
        assert heading in text
    plots = sorted(Path(full["report"]).parent.glob(f"report-{full['digest'][:12]}-plots/*.png"))
    assert [p.name for p in plots] == ["win-rate-vs-compute.png", "win-rate-vs-iteration.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    client = tracking.client_for(summary["tracking_uri"])
    logged = {a.path for a in client.list_artifacts(summary["experiment_run_id"], f"report/{plots[0].parent.name}")}
    assert logged == {f"report/{plots[0].parent.name}/{p.name}" for p in plots}


def test_mlflow_runs_metrics_and_artifacts(experiment):
    from mlflow_store import tracking

    _, summary, _ = experiment
    uri, run_id = summary["tracking_uri"], summary["experiment_run_id"]
    client = tracking.client_for(uri)
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.TAG_ROLE] == "experiment"
    assert parent.data.params["search.width"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "spi_win_rate")] == [1, 2]
    assert {a.path for a in client.list_artifacts(run_id, "report")} >= {
        "report/" + Path(summary["report"]).name
    }

    children = {(c["system"], c["iteration"]): c for c in tracking.child_runs(uri, run_id)}
    matched = {(name, 0) for name in summary["systems"] if name.startswith("best-of-n:")}
    assert set(children) == {("base-greedy", 0), ("base-sampled", 0), ("spi", 1), ("spi", 2)} | matched
    spi1 = children[("spi", 1)]
    for key in (
        "win_rate",
        "win_rate_ci_low",
        "win_rate_ci_high",
        "mean_reward",
        "policy_tokens",
        "rollout_reward_mean",
        "rollout_reward_best_mean",
        "value_final_loss",
        "value_holdout_mse",
        "seconds_rollouts",
        "seconds_labels",
        "seconds_value",
        "seconds_decode",
        "forward_tokens_per_instruction",  # the compute the report charges, by model
        "value_fit_tokens_per_instruction",
        "reward_tokens_per_instruction",
        "training_forward_tokens",
        "labels_reward_tokens",
        "value_forward_tokens",
    ):
        assert key in spi1["metrics"], key
    # a policy-head value: the fit forwards the policy over its examples, nothing backward; labels use
    # the reward model's tokens
    assert spi1["metrics"]["value_forward_tokens"] > 0 and spi1["metrics"]["value_backward_tokens"] == 0
    assert spi1["metrics"]["labels_reward_tokens"] > 0
    assert spi1["metrics"]["forward_tokens_per_instruction"] > spi1["metrics"]["generated_tokens_per_instruction"]
    assert (
        spi1["metrics"]["win_rate_ci_low"]
        <= spi1["metrics"]["win_rate"]
        <= spi1["metrics"]["win_rate_ci_high"]
    )
    assert spi1["metrics"]["win_rate"] == pytest.approx(summary["systems"]["spi-1"]["win_rate"])
    names = {a.path for a in client.list_artifacts(spi1["run_id"])}
    assert {"generations", "judge_annotations", "rollouts", "labels"} <= names
    # the guided policy spi-1 is the run's logged MLflow Model (pyfunc), not a folder of its artifacts
    [logged] = client.get_run(spi1["run_id"]).outputs.model_outputs
    assert client.get_logged_model(logged.model_id).tags["spi.system"] == "spi-1"
    assert "rollouts" not in {a.path for a in client.list_artifacts(children[("base-sampled", 0)]["run_id"])}
    run = client.get_run(spi1["run_id"])
    assert (
        run.data.tags["spi.judge"] == summary["judge"]
        and run.data.tags["spi.reward_model"] == summary["reward_model"]
    )


def test_child_runs_carry_their_systems_params_and_stage_times(experiment):
    """Compare in the MLflow UI lists what each system is (W, K, L, N, guide, V_i with digest and beta,
    iteration); a child run spans the stages it describes, as recorded beside their outputs."""
    from mlflow_store import tracking

    workdir, summary, full = experiment
    uri = summary["tracking_uri"]
    client = tracking.client_for(uri)
    children = {(c["system"], c["iteration"]): c["run_id"] for c in tracking.child_runs(uri, summary["experiment_run_id"])}
    spi2 = client.get_run(children[("spi", 2)])
    p = spi2.data.params
    assert (p["search.W"], p["search.K"], p["search.L"], p["search.N"]) == ("2", "2", "4", "4")
    assert (p["system"], p["iteration"], p["guide"]) == ("spi-2", "2", "1*V_1 + 0.5*V_2")
    assert (p["values.V_1.beta"], p["values.V_2.beta"]) == ("1.0", "2.0")
    from spi.stagefiles import output_digest

    folder, digest = p["values.V_2"].split("@")
    assert output_digest(workdir / "tiny" / "iteration-2" / folder) == digest  # V_2 as fitted, by content
    greedy = client.get_run(children[("base-greedy", 0)]).data.params
    assert (greedy["search.W"], greedy["search.K"], greedy["sampling.temperature"]) == ("1", "1", "0.0")
    assert greedy["iteration"] == "none (baseline)" and greedy["values.count"] == "0"
    bon = next(n for n in summary["systems"] if n.startswith("best-of-n:"))
    bon_params = client.get_run(children[(bon, 0)]).data.params
    assert bon_params["search.N"] == bon.split(":")[1] and bon_params["matches_tokens_of"].startswith("spi-")

    def ran(pattern):  # (start, end) in ms of a stage, from the sidecar its task wrote
        meta = json.loads(next((workdir / "tiny").glob(pattern + ".stage.json")).read_text())
        return int(meta["started_at"] * 1000), int(meta["ended_at"] * 1000)

    info = spi2.info
    assert info.start_time == ran("iteration-2/rollouts-*.jsonl")[0]
    assert info.end_time == max(ran("eval/judge-spi-2-*.json")[1], ran("eval/spi-2-*.json")[1])
    sampled = client.get_run(children[("base-sampled", 0)]).info
    assert (sampled.start_time, sampled.end_time) == (ran("eval/base-sampled-*.json")[0],
                                                      ran("eval/judge-base-sampled-*.json")[1])
    assert sampled.end_time - sampled.start_time >= 1  # the stages' duration, not the logging's


def test_parent_params_and_experiment_kind_are_the_run_as_run(experiment):
    """The parent's params say where the run really wrote (the --workdir given, not the recipe's
    "runs") and the tracking it used; the experiment opens on MLflow's runs view."""
    from mlflow_store import tracking

    workdir, summary, _ = experiment
    client = tracking.client_for(summary["tracking_uri"])
    parent = client.get_run(summary["experiment_run_id"])
    assert parent.data.params["execution.workdir"] == str(workdir.resolve())
    assert parent.data.params["tracking.tracking_uri"] == summary["tracking_uri"]
    assert parent.data.params["tracking.registered_model"] == NAME
    assert json.loads(parent.data.tags[tracking.TAG_OVERRIDES]) == {}
    experiment_ = client.get_experiment(parent.info.experiment_id)
    assert experiment_.tags["mlflow.experimentKind"] == "custom_model_development"


def test_numbers_below_their_sample_size_are_not_available_with_the_reason(experiment):
    """6 instructions: no LC win rate (it needs 30). The table and the report say "n/a (why)"; the child
    run has no LC metric but a tag with the reason."""
    from evaluation.length_control import MIN_LC_INSTRUCTIONS
    from mlflow_store import tracking

    _, summary, full = experiment
    why = f"needs at least {MIN_LC_INSTRUCTIONS} instructions, got 6"
    table = full["table"].splitlines()
    assert "LC win rate" in table[0]
    assert all(f"n/a (a length-controlled win rate {why})" in line for line in table[1:])
    report_text = Path(full["report"]).read_text()
    assert report_text.count(f"n/a (a length-controlled win rate {why})") == len(summary["systems"])
    uri = summary["tracking_uri"]
    children = tracking.child_runs(uri, summary["experiment_run_id"])
    for child in [c for c in children if not c["system"].startswith("evaluate-")]:  # the experiment's systems
        run = tracking.client_for(uri).get_run(child["run_id"])
        assert "length_controlled_winrate" not in run.data.metrics
        assert why in run.data.tags[tracking.TAG_NOT_AVAILABLE + "length_controlled_winrate"]
        assert "win_rate_ci_low" in run.data.metrics  # 6 >= 5: the interval is a number


def test_guided_policies_registered_and_round_trip(experiment, tmp_path):
    """Version k is spi-k as a whole: the base model and V_1..V_k with their betas, each V_i the
    folder the experiment fitted (same scores after the round trip through the registry)."""
    from mlflow_store.registry import get_version, load_registered_value_model
    from spi.models import CausalLM
    from spi.systems import read_guided_policy
    from spi.value import load_value_model

    workdir, summary, full = experiment
    uri = summary["tracking_uri"]
    assert get_version(uri, NAME, "candidate").version == 2
    champion = get_version(uri, NAME, "champion")
    # version 1 became champion (no champion yet); version 2 replaced it iff the lower bound of the
    # paired interval of spi-2 - spi-1 on the same instructions exceeds the margin 0
    rates = {k: summary["systems"][f"spi-{k}"]["win_rate"] for k in (1, 2)}
    gate = get_version(uri, NAME, 2).tags
    assert gate["spi.promotion.champion_version"] == "1" and gate["spi.promotion.n_instructions"] == "6"
    ci_low = float(gate["spi.promotion.ci_low"])
    assert ci_low <= float(gate["spi.promotion.mean_difference"]) == pytest.approx(rates[2] - rates[1])
    assert champion.version == (2 if ci_low > 0 else 1)
    assert float(champion.tags["win_rate"]) == pytest.approx(rates[champion.version])
    assert float(get_version(uri, NAME, 1).tags["win_rate"]) == pytest.approx(rates[1])
    assert "spi.promotion" in get_version(uri, NAME, 2).tags

    system, value_dirs, meta = read_guided_policy(load_registered_value_model(NAME, 2, uri, tmp_path / "dl"))
    assert system == "spi-2" and meta["base_model"] == "tiny-llama"
    assert [(v["beta"], v["weight"]) for v in meta["values"]] == [(1.0, 1.0), (2.0, 0.5)]
    policy = CausalLM.load("tiny-llama")
    sequences = [[1, 5, 9, 200, 17], [3, 4], [100, 101, 102, 103, 104, 105, 106]]
    pad = policy.tokenizer.pad_token_id
    for k, folder in enumerate(value_dirs, 1):
        original = next(p for p in (workdir / "tiny" / f"iteration-{k}").glob("value-*") if p.is_dir())
        with torch.no_grad():
            before = load_value_model(original).score_sequences(sequences, pad, policy.model)
            after = load_value_model(folder).score_sequences(sequences, pad, policy.model)
        assert torch.equal(before, after)
        assert before.abs().sum() > 0  # a fitted head, not the zero initialisation


def test_store_rows(experiment):
    from mlflow_store.store import Store

    _, summary, full = experiment
    store = Store(full["store_url"])
    try:
        # 2 iterations x 4 prompts x (W*K = 4) leaves, each with a reward
        assert store.count("rollouts") == 32
        assert store.count("rewards", reward_model=full["reward_model"]) == 32
        assert store.count("value_datasets", run_key=f"tiny:{full['digest']}") == 2
        assert store.count("generations") == len(summary["systems"]) * 6
        assert store.count("judgements", judge=full["judge"]) >= 6
        rows = {(r["system"], r["iteration"]): r for r in store.compare_runs(judge=full["judge"])}
        matched = {(name, 0) for name in summary["systems"] if name.startswith("best-of-n:")}
        assert set(rows) == {("base-greedy", 0), ("base-sampled", 0), ("spi-1", 1), ("spi-2", 2)} | matched
        assert rows[("spi-1", 1)]["win_rate"] == pytest.approx(summary["systems"]["spi-1"]["win_rate"])
    finally:
        store.close()


def test_prefect_artifacts(experiment):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["tiny-iterations", "tiny-comparison", "tiny-report"])
            )
        )
    kinds = {a.key: a.type for a in arts}
    assert kinds == {"tiny-iterations": "table", "tiny-comparison": "table", "tiny-report": "markdown"}
    with get_client(sync_client=True) as client:
        progress = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tiny-progress"]))
        )
    assert progress and all(a.type == "progress" for a in progress)
    assert max(float(a.data) for a in progress) == 100.0


def test_rerun_is_cached_and_resumes_the_same_parent_run(experiment, tmp_path):
    from mlflow_store import tracking

    workdir, summary, _ = experiment
    before = _mtimes(workdir / "tiny")
    out = tmp_path / "again.json"
    assert run_cli("run", TINY, "--workdir", workdir, "--summary-json", out) == 0
    again = json.loads(out.read_text())
    assert set(again["stages"].values()) == {"cached"}
    assert again["experiment_run_id"] == summary["experiment_run_id"]
    assert again["systems"] == summary["systems"]
    after = _mtimes(workdir / "tiny")
    assert {k: v for k, v in after.items() if k in before and not k.startswith(("report-", "summary-"))} == {
        k: v for k, v in before.items() if not k.startswith(("report-", "summary-"))
    }
    client = tracking.client_for(summary["tracking_uri"])
    exp = client.get_experiment_by_name("tiny")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`spi.role` = 'experiment'")
    assert len(parents) == 1
    assert len(tracking.child_runs(summary["tracking_uri"], summary["experiment_run_id"])) == len(summary["systems"])


def test_changed_setting_recomputes_only_what_depends_on_it(experiment, tmp_path):
    workdir, summary, _ = experiment
    before = _mtimes(workdir / "tiny")
    out = tmp_path / "epochs.json"
    assert run_cli("run", TINY, "--workdir", workdir, "--set", "value.epochs=4", "--summary-json", out) == 0
    stages = json.loads(out.read_text())["stages"]
    assert stages["iteration-1/rollouts"] == "cached" and stages["iteration-1/labels"] == "cached"
    # stage files are content-addressed: labels are recomputed only if the new V_1's rollouts differ
    # (a slightly different V_1 can select and draw the same leaves)
    rollouts = sorted((workdir / "tiny" / "iteration-2").glob("rollouts-*.jsonl"))
    assert len(rollouts) == 2
    same = rollouts[0].read_text() == rollouts[1].read_text()
    assert stages["iteration-2/labels"] == ("cached" if same else "computed")
    for stage in (
        "iteration-1/value",
        "iteration-2/rollouts",
        "iteration-2/value",
        "eval/decode-spi-1",
        "eval/decode-spi-2",
        "eval/judge-spi-1",
        "eval/judge-spi-2",
    ):
        assert stages[stage] == "computed", stage
    for stage in (
        "eval/eval-set",
        "eval/decode-base-greedy",
        "eval/references",
        "eval/decode-base-sampled",
        "eval/judge-base-sampled",
    ):
        assert stages[stage] == "cached", stage
    after = _mtimes(workdir / "tiny")
    assert all(
        after[k] == v for k, v in before.items() if k.startswith(("iteration-1/rollouts", "eval/base-"))
    )
    # a different recipe digest is a new parent run in the same experiment
    assert json.loads(out.read_text())["experiment_run_id"] != summary["experiment_run_id"]


def test_the_printed_table_says_why_a_number_is_missing():
    """4 judged instructions: the table `spi run` prints has the win rate, and "n/a (why)" for the LC
    win rate and the interval; IFEval rows on 4 prompts say why their interval is missing."""
    from evaluation import ifeval
    from evaluation.ifeval import PromptResult
    from evaluation.ifeval_report import system_metrics
    from evaluation.judging import annotation_metrics
    from flows.compare import format_table, system_row

    anns = [{"index": i, "instruction": f"q{i}", "reference": "r" * 40, "output": "o" * (20 + 9 * i),
             "preference": 1.2 + 0.2 * i} for i in range(4)]
    decoded = {"mean_reward": 0.1, "compute": {"policy_tokens": 40, "generated_tokens": 30}, "seconds": 1.0}
    row = system_row("base-sampled", None, decoded, {"metrics": annotation_metrics(anns, n_boot=100), "seconds": 0.5})
    line = format_table([row]).splitlines()[1]
    assert f"{100 * sum(a['preference'] - 1 for a in anns) / 4:.2f}" in line and "[n/a]" in line
    assert line.endswith("n/a (a length-controlled win rate needs at least 30 instructions, got 4); 95% CI n/a "
                         "(a win-rate interval needs at least 5 instructions, got 4)")
    results = [PromptResult(str(i), ("kind:a",), (i % 2 == 0,), (True,)) for i in range(4)]
    verified = {"system": "spi-1", "iteration": 1, "mean_reward": 0.0, "policy_tokens": 9,
                **system_metrics(ifeval.report(results, n_boot=100))}
    assert format_table([verified]).splitlines()[1].endswith(
        "95% CI n/a (a bootstrap interval over prompts needs at least 5 instructions, got 4)")


def test_parent_params_hide_database_passwords():
    from flows.experiment import _hide_password

    assert _hide_password("postgresql+psycopg://spi:s3cret@db:5432/store") == "postgresql+psycopg://spi:***@db:5432/store"
    assert _hide_password("sqlite:////tmp/runs/store.db") == "sqlite:////tmp/runs/store.db"
    assert _hide_password("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
