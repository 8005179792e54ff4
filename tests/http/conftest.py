"""The HTTP tests run on every store backend: the `config` fixture's store is SQLite, then
PostgreSQL (on the throwaway cluster, see tests/postgres.py). A test about SQLite itself (its
file, its locks, its rows read with sqlite3) is marked `sqlite_only`, one about PostgreSQL
alone `postgresql_only`."""

from __future__ import annotations

import pytest

BACKENDS = ["sqlite", "postgresql"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker
    backends = ["sqlite"] if marker("sqlite_only") else \
        ["postgresql"] if marker("postgresql_only") else BACKENDS
    metafunc.parametrize("store_backend", backends, indirect=True)
