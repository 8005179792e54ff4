"""The HTTP tests run on every store backend: the `config` fixture's store is SQLite, then
PostgreSQL (on the throwaway cluster, see tests/postgres.py). A test about SQLite itself (its
file, its locks, its rows read with sqlite3) is marked `sqlite_only`."""

from __future__ import annotations

import pytest

BACKENDS = ["sqlite", "postgresql"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_backend" not in metafunc.fixturenames:
        return
    only = metafunc.definition.get_closest_marker("sqlite_only")
    metafunc.parametrize("store_backend", ["sqlite"] if only else BACKENDS, indirect=True)
