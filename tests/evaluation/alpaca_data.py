"""Where the evaluation tests find the AlpacaEval data (SPI_ALPACA_DATA, set by tests/conftest.py), and a skip marker for
tests that need a part of it."""

import os
from pathlib import Path

import pytest

DATA = Path(os.environ["SPI_ALPACA_DATA"])


def needs(part: str):
    """Skip unless ``DATA / part`` exists."""
    return pytest.mark.skipif(not (DATA / part).exists(),
                              reason=f"AlpacaEval data not found at {DATA} (set SPI_ALPACA_DATA)")
