"""scripts/bench's options: every mode's options parse together (the retention and the
PostgreSQL modes each added a --rounds, and argparse refused the second: the bench did not
start)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DRIVER = Path(__file__).resolve().parents[2] / "scripts" / "bench_support" / "driver.py"


def driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_driver", DRIVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_driver", module)
    spec.loader.exec_module(module)
    return module


def test_rounds_defaults_to_one_run_of_each_store_and_two_pairs_with_retention() -> None:
    bench = driver()
    assert bench.parse_args([]).rounds == 1
    assert bench.parse_args(["--retention"]).rounds == 2
    assert bench.parse_args(["--store", "both", "--rounds", "3"]).rounds == 3
    assert bench.parse_args(["--retention", "--rounds", "4"]).rounds == 4


def test_the_kannel_row_is_on_unless_no_kannel() -> None:
    bench = driver()
    assert bench.parse_args([]).kannel is True
    assert bench.parse_args(["--no-kannel", "--store", "postgresql"]).kannel is False
