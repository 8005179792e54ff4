"""The OpenAPI document against the implementation: same routes, and a schema-driven fuzz run.

The fuzz run (schemathesis) sends generated requests, valid and invalid per the document, to a
real gateway on a loopback port and checks every answer: never a 5xx, only documented status
codes, bodies and headers matching their schemas, invalid input refused, auth enforced.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway import app as gateway_app
from gateway import webapp
from gateway.admin.openapi import document
from gateway.config import Config
from gateway.service import Management

TOKEN = "fuzz-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ACCOUNT = "sms-fuzz-1"
LOGIN = "fuzzer"
# Per operation; the whole file stays well under a minute on 2 cores. A deeper run:
# ADMIN_FUZZ_EXAMPLES=500 ADMIN_FUZZ_RANDOM=1 pytest tests/http/test_openapi.py
MAX_EXAMPLES = int(os.environ.get("ADMIN_FUZZ_EXAMPLES", "25"))
# Fixed examples by default, so that a CI run fails for a change, not for a dice roll.
DERANDOMIZE = os.environ.get("ADMIN_FUZZ_RANDOM", "") != "1"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def spec_operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in spec["paths"].items()
            for method in item if method in METHODS}


def app_operations(app: web.Application) -> set[tuple[str, str]]:
    found = set()
    for route in app.router.routes():
        if route.resource is not None and route.resource.canonical.startswith("/1.0/"):
            # The document names the path parameter {id}; aiohttp keeps any regex in it.
            path = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route.resource.canonical)
            found.add((route.method, path))
    return found


def test_every_route_is_documented_and_every_documented_route_exists(config: Config) -> None:
    app = webapp.create_app(gateway_app.build(config))
    assert app_operations(app) == spec_operations(document())


def test_split_public_listener_routes_are_documented_without_security(config: Config) -> None:
    config = config.replace({"admin.host": "127.0.0.1"})
    public = app_operations(webapp.create_app(gateway_app.build(config)))
    assert public == {("GET", "/1.0/sms/ptts")}
    spec = document()
    for method, path in public:
        assert spec["paths"][path][method.lower()]["security"] == []


def test_document_is_well_formed() -> None:
    spec = document()
    assert spec["openapi"].startswith("3.0")
    operation_ids = []
    for path, item in spec["paths"].items():
        declared = set(re.findall(r"\{(\w+)\}", path))
        for method, operation in item.items():
            if method not in METHODS:
                continue
            operation_ids.append(operation["operationId"])
            params = [*item.get("parameters", []), *operation.get("parameters", [])]
            assert {p["name"] for p in params if p["in"] == "path"} == declared, path
            codes = set(operation["responses"])
            assert any(c.startswith("2") for c in codes), (method, path)
            if operation.get("security") != []:
                assert {"400", "401", "404"} <= codes, (method, path)
    assert len(operation_ids) == len(set(operation_ids))
    # Every $ref points at a schema that exists.
    refs = re.findall(r'"#/components/schemas/(\w+)"', str(spec).replace("'", '"'))
    assert refs and set(refs) <= set(spec["components"]["schemas"])


def test_public_routes_need_no_token_and_all_others_do(live: str) -> None:
    spec = document()
    for method, path in sorted(spec_operations(spec)):
        url = live + path.format(account=ACCOUNT, login=LOGIN, sender="FUZZ", id=1)
        params = {"ptt": "4"} if path.endswith("/ptts") else None
        resp = requests.request(method, url, params=params, timeout=10)
        if spec["paths"][path][method.lower()].get("security") == []:
            assert resp.status_code == 200, (method, path)
        else:
            assert resp.status_code == 401, (method, path)
            assert resp.json()["message"]


# -- the fuzz run -------------------------------------------------------------------------

class LiveGateway:
    """A gateway on a loopback port, served from its own thread and event loop.

    schemathesis makes blocking HTTP calls, which must not run on the loop serving them.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    def start(self) -> str:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=60)

    async def _start(self) -> str:
        gateway = gateway_app.build(self.config)
        self.runner = web.AppRunner(webapp.create_app(gateway), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        manage = Management(gateway.store, self.config, gateway.clock)
        await manage.create_account(ACCOUNT, 1000)
        await manage.add_sender(ACCOUNT, "FUZZ")
        await manage.create_user(ACCOUNT, LOGIN, "fuzzpass1")
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=60)
        self.loop.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = Config().replace({
        "store.path": str(Path(tmp_path_factory.mktemp("fuzz")) / "gateway.sqlite3"),
        "admin.token": TOKEN,
        "server.allow_private_ips": True,
        "log.level": "warning",
        # The fuzzer sends wrong tokens by design (ignored_auth) from one address: locked
        # out, every later case would only meet 429. The lockout has tests of its own.
        "security.max_failures": 1_000_000,
    })
    server = LiveGateway(config)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


schema = schemathesis.openapi.from_dict(document())
schema.config.generation.update(max_examples=MAX_EXAMPLES, database="none")


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
    # Random names almost never exist; half the cases aim at the seeded account and user so
    # that the handlers behind the 404 get fuzzed too.
    if not path_parameters:
        return st.just(path_parameters)
    known = dict(path_parameters)
    if "account" in known:
        known["account"] = ACCOUNT
    if "login" in known:
        known["login"] = LOGIN
    return st.sampled_from([path_parameters, known])


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance, negative_data_rejection,
          ignored_auth]


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
          derandomize=DERANDOMIZE, suppress_health_check=list(HealthCheck))
def test_fuzz_admin_api(case: Any, live: str) -> None:
    case.call_and_validate(base_url=live, headers=AUTH, checks=CHECKS, timeout=30)

