"""Benchmarks of the library: decoding arms side by side (``decode``), value fitting (``fit``), the
bfloat16 CPU kernels (``bf16``, ``python -m spi.bench.bf16``).

Plain functions returning JSON-ready dicts; the ``spi bench`` command (flows.bench) only parses
arguments and prints. Nothing here imports prefect or mlflow.
"""
