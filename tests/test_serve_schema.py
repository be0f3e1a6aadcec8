"""Issue 19: Schemathesis against the service's published OpenAPI schema (bounded number of cases per
operation), with Schemathesis' default checks: no 500s, status codes / content types / bodies as
documented, and (service with a token) every operation refuses missing or invalid authentication."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")
from hypothesis import HealthCheck, settings  # noqa: E402

from test_serve import TOKEN, build_store, serve_config  # noqa: E402

from anymc3d.serve import create_app  # noqa: E402
from anymc3d.serve.service import load_engines  # noqa: E402

BOUND = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    store = build_store(tmp_path_factory.mktemp("schema"))
    return store, load_engines(serve_config(store))


def _schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def open_schema(engines):
    app = create_app(serve_config(engines[0]), engines=engines[1])
    yield _schema(app)
    app.state.workers.close(), app.state.results.close()


@pytest.fixture(scope="module")
def token_schema(engines):
    app = create_app(serve_config(engines[0], token=TOKEN), engines=engines[1])
    yield _schema(app)
    app.state.workers.close(), app.state.results.close()


open_api = schemathesis.pytest.from_fixture("open_schema")
token_api = schemathesis.pytest.from_fixture("token_schema")


def _excluded(case) -> list:
    # A schema-valid multipart body is (almost) never a readable medical volume: 400 / 422 are the documented
    # answers for those, so "schema-valid data must be accepted" does not apply to the upload.
    from schemathesis.checks import positive_data_acceptance

    return [positive_data_acceptance] if case.path == "/v1/predict" else []


@open_api.parametrize()
@BOUND
def test_openapi_open_service(case):
    case.call_and_validate(excluded_checks=_excluded(case))


@token_api.parametrize()
@BOUND
def test_openapi_token_service(case):
    case.call_and_validate(excluded_checks=_excluded(case))
