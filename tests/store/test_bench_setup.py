"""scripts/bench's store setup against today's rules: when a rule of the management layer
tightens (an allowlist, a callback target), the benchmark must still be able to build its
users, or it stops with a traceback long after the change (it did, for callbacks)."""

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


async def test_the_benchmark_builds_its_users_with_callbacks_to_loopback(
        tmp_path: Path) -> None:
    bench = driver()
    users = await bench.create_users(tmp_path / "bench.sqlite3", 3, receiver_port=9)
    assert [u["login"] for u in users] == ["user1", "user2", "user3"]
