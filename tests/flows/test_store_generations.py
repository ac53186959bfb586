"""The generations rows of a decode carry each model's tokens per instruction, the weak-to-strong pair's too."""

import json

from flows.records import store_generations_task
from mlflow_store.store import Store


def test_a_decodes_compute_is_stored_per_instruction(tmp_path):
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({
        "outputs": [{"instruction": f"q{i}", "output": f"a{i}", "reward": 0.5} for i in range(2)],
        "compute": {"policy_tokens": 100, "value_tokens": 0, "reward_tokens": 60, "w2s_tokens": 40,
                    "seconds_decode": 3.0},
    }))
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps({"judge": "length", "annotations": [
        {"index": i, "instruction": f"q{i}", "reference": "r", "output": f"a{i}", "preference": 1.5} for i in range(2)]}))
    url = f"sqlite:///{tmp_path / 'store.db'}"
    assert store_generations_task.fn(url, "run", "weak-to-strong", 0, str(outputs), str(annotations), "rm") == 4
    with Store(url) as store:
        rows = store.rows("generations", system="weak-to-strong")
    assert [(r["policy_tokens"], r["reward_tokens"], r["w2s_tokens"], r["seconds"]) for r in rows] == [(50, 30, 20, 1.5)] * 2
