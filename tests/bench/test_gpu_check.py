"""The prepared GPU check runs end to end in its reduced mode (tiny shapes, CPU)."""

import json

from spi.bench.gpu_check import GPU_ARMS, CheckConfig, check_smoke, main


def test_reduced_gpu_check_prints_the_benchmark_ratios_and_a_moving_value_loss(tmp_path, capsys):
    out = tmp_path / "check.json"
    result = main(["--reduced", "--out", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["value_fit"]["losses"] == result["value_fit"]["losses"]
    arms = result["decode"]["arms"]
    assert list(arms) == GPU_ARMS
    assert arms["sampling"]["ratio_to_sampling"] == 1.0
    assert all(a["generated_tokens"] == 2 * 4 * 8 for a in arms.values())  # fixed length: EOS masked
    assert arms["cbs_cached_value"]["value_tokens"] > 0
    assert "x sampl" in printed and "cbs_cached_value" in printed  # the CPU benchmark's table
    fit = result["value_fit"]
    assert fit["model"] == "random:tiny:2" and fit["loss_moved"]
    assert fit["losses"][-1] < fit["losses"][0]
    assert "loss" in printed and result["config"]["device"] == "cpu"


def test_the_smoke_step_records_why_a_backend_cannot_run(tmp_path, monkeypatch):
    from spi import backends

    monkeypatch.setattr(backends, "vllm_unavailable_reason", lambda require_gpu=True: "no GPU in this test")
    lines = []
    result = check_smoke(CheckConfig.reduced(), str(tmp_path), log=lines.append, backends=("vllm",))
    assert result == {"vllm": {"skipped": "no GPU in this test"}}
    assert lines == ["smoke experiment on vllm: skipped (no GPU in this test)"]
