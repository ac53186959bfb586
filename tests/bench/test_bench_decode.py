"""`spi bench decode`: runs every arm on tiny models and writes the JSON the issue asks for."""

import argparse
import json
import subprocess
import sys

from flows import bench
from spi.bench.decode import ARMS, DecodeBenchConfig, _subprocess_rss

ARM_KEYS = {"tokens_per_s", "ratio_to_sampling", "ratio_to_hf_generate", "peak_rss_mb", "value_tokens",
            "breakdown_s", "breakdown_fraction", "generated_tokens", "policy_forward_fraction_of_peak"}


def main(argv):
    """`spi bench ...` through this area's own add_commands (flows/cli.py only mounts it)."""
    parser = argparse.ArgumentParser(prog="spi")
    bench.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


PARTS = {"policy_forward", "value_forward", "cache_reorder", "selection", "text_decode", "other"}


def test_bench_decode_writes_every_arm(tmp_path, capsys):
    out = tmp_path / "decode.json"
    rc = main(["bench", "decode", "--model", "tiny-llama", "--prompts", "2", "--width", "2", "--successors", "2",
               "--tokens", "8", "--chunk-length", "4", "--repeats", "1", "--burn-in", "0", "--rss", "sampled",
               "--matmul-size", "256", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {"cores", "threads", "dtype", "torch"} <= set(data["machine"])
    assert data["matmul_peak_gflops"] > 0
    assert set(data["arms"]) == set(ARMS)
    for name, arm in data["arms"].items():
        assert ARM_KEYS <= set(arm), name
        assert PARTS <= set(arm["breakdown_s"]), name
        # every arm generated exactly prompts x rows x tokens (EOS is masked)
        assert arm["generated_tokens"] == 2 * 4 * 8, name
        assert arm["tokens_per_s"] > 0 and arm["peak_rss_mb"] > 0
    arms = data["arms"]
    assert arms["sampling"]["ratio_to_sampling"] == 1.0 and arms["hf_generate"]["ratio_to_hf_generate"] == 1.0
    # scorer accounting: the head reads the policy's hidden state, the others run their own tokens
    assert arms["cbs_head"]["value_tokens"] == 0 and arms["sampling"]["value_tokens"] == 0
    assert 0 < arms["cbs_cached_value"]["value_tokens"] < arms["cbs_reencode"]["value_tokens"]
    # weak-to-strong runs its own pair (tuned and untuned) over the same tokens a cached value model reads
    assert arms["weak_to_strong"]["value_tokens"] == 0
    assert arms["weak_to_strong"]["w2s_tokens"] == 2 * arms["cbs_cached_value"]["value_tokens"]
    assert arms["best_of_n"]["reward_calls"] == 2 * 4
    assert data["batching"]["prompts"] == 8 and data["batching"]["speedup"] > 0
    assert "sampling" in capsys.readouterr().out  # the printed table


def test_peak_rss_in_a_fresh_process():
    config = DecodeBenchConfig(model="tiny-llama", prompts=1, width=1, successors=2, tokens=4, chunk_length=2)
    rss = _subprocess_rss(config, "sampling")
    assert 50 < rss < 4000


def test_spi_bench_imports_neither_prefect_nor_mlflow():
    code = ("import sys, spi.bench.decode, spi.bench.fit, spi.bench.bf16; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow', 'flows')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_fit_reports_both_kinds(tmp_path):
    out = tmp_path / "fit.json"
    assert main(["bench", "fit", "--model", "tiny-llama", "--examples", "8", "--tokens", "6", "--epochs", "1",
                 "--batch-size", "4", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    for kind in ("policy-head", "backbone"):
        assert data["kinds"][kind]["sequences_per_s"] > 0 and data["kinds"][kind]["tokens_per_s"] > 0


def test_bench_bf16_runs_the_kernel_comparison(tmp_path, capsys):
    """`spi bench bf16` runs spi.bench.bf16's comparison: both kernels timed on the same input, the JSON
    names its settings, and the printed table is bf16's."""
    out = tmp_path / "bf16.json"
    assert main(["bench", "bf16", "--model", "tiny-llama", "--rows", "2", "--tokens", "5", "--repeats", "1",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["model"] == "tiny-llama" and data["rows"] == 2 and data["tokens"] == 5
    assert data["native"] > 0 and data["float32"] > 0
    assert data["speedup"] == data["native"] / data["float32"]
    assert 0 <= data["max_logit_difference"] < 0.5
    assert "float32 GEMMs" in capsys.readouterr().out


def test_spi_command_offers_bf16_without_loading_torch():
    """Building the `spi bench` parser imports neither torch nor the models (the CLI starts fast)."""
    code = ("import argparse, sys; from flows import bench; p = argparse.ArgumentParser(); "
            "bench.add_commands(p.add_subparsers()); "
            "bad = [m for m in ('torch', 'transformers', 'spi.models') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
