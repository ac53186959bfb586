"""Where the evaluation tests find ../shared's AlpacaEval data (env SPI_ALPACA_DATA), and a skip marker for
tests that need a part of it."""

import pytest

from evaluation.leaderboard import default_data_dir

DATA = default_data_dir()


def needs(part: str):
    """Skip unless ``DATA / part`` exists."""
    return pytest.mark.skipif(not (DATA / part).exists(),
                              reason=f"AlpacaEval data not found at {DATA} (set SPI_ALPACA_DATA)")
