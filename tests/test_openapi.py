"""The OpenAPI document is valid, served, and true of the running server (schemathesis)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis import checks

from gateway.config import Settings
from gateway.rest.openapi import SPEC
from gateway.serve import Gateway, start

SCHEMA = schemathesis.openapi.from_dict(SPEC)


def test_document_is_valid_openapi_3_1() -> None:
    validate(SPEC)
    assert SPEC["openapi"] == "3.1.0"


def test_document_is_served(gateway: Gateway) -> None:
    assert requests.get(f"{gateway.http_url}/openapi.json", timeout=5).json() == SPEC


def test_every_route_is_documented(gateway: Gateway) -> None:
    documented = set(SPEC["paths"])
    # "<model_name:model>" (a converter's name, then the variable's) is "{model}".
    app_rules = {
        re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for rule in gateway.http.wsgi_app.url_map.iter_rules()
        if rule.endpoint != "static"
    }
    assert app_rules == documented


@pytest.fixture(scope="module")
def served_models() -> Iterator[Gateway]:
    # The built-in models only: the test models include one that fails on purpose (a 500).
    gw = start(Settings(http_port=0, grpc_port=0, model=("shape", "qrcode")))
    yield gw
    gw.stop()


# "Schema-valid data is accepted" cannot hold for an image API: OpenAPI can say a body is
# binary, not that it is a decodable image, nor that a multipart part needs a filename to be
# an image; random bytes are rightly refused with a 4xx. Every other check runs.
_EXCLUDED = [checks.positive_data_acceptance]


@SCHEMA.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms(case: schemathesis.Case[Any], served_models: Gateway) -> None:
    # Every response must match its schema, with a documented status, and never be a 5xx.
    case.call_and_validate(base_url=served_models.http_url, excluded_checks=_EXCLUDED)
