"""HTTP routes. Each one reads the request (rest.requests), calls the core, writes JSON."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.routing import PathConverter

from gateway import metrics
from gateway.config import published_limits
from gateway.core.dataplane import DataPlane
from gateway.rest import requests as http_requests
from gateway.rest.errors import PartError
from gateway.rest.openapi import SPEC
from gateway.rest.responses import batch_json, infer_json, model_json

v1 = Blueprint("v1", __name__, url_prefix="/v1")
# The routes a plain Flask server doing `jsonify(img.shape)` offers, on the default model, so its
# clients switch to the gateway without changing a line.
minimal = Blueprint("minimal", __name__)

DATAPLANE_KEY = "image_gateway.dataplane"


# One segment of a model name in a path: not empty, without "/" or "%2F". ("." and ".." are
# no model's name, but a client sends them as %2E: they are answered model_not_found, as over
# gRPC.)
_SEGMENT = r"(?:(?!%2[Ff])[^/])+"


class ModelName(PathConverter):
    """Where a model name may stand in a route: slashes included ("org/model"), sent as they are
    or as %2F, which cheroot leaves encoded in the path it hands over (to keep "a%2Fb" apart
    from "a/b"; model names cannot hold a "%2F" of their own, gateway.models.base). It only
    matches: the name is read from the path as sent (`_name_as_sent`)."""

    # Only what a name can be (gateway.models.base): segments between "/" (or "%2F"), none
    # empty, and never ending in "/infer", the infer route's path, where GET must
    # be 405 and OPTIONS must not offer GET. Anything else is no route (404): "shape/infer/"
    # was taken for a name, and a POST there answered 405 offering GET.
    regex = (
        rf"{_SEGMENT}(?:(?:/|%2[Ff]){_SEGMENT})*"
        r"(?<!/infer)(?<!%2[Ff]infer)"
    )


@v1.url_value_preprocessor
def _name_as_sent(endpoint: str | None, values: dict[str, Any] | None) -> None:
    """The model a path names, its segments decoded once, as the client and anything in between
    (a proxy, an access rule) read them: "org%2Fm" is "org/m", and "org%252Fm" or
    "org%25%32%46m" is "org%2Fm", which no model is.

    Not from the path the route matched (PATH_INFO): cheroot has decoded it once already,
    keeping only %2F as it came, so there a "%2F" is either a slash sent as %2F or one decoded
    from "%252F" (or "%25%32%46", "%%32F", ...), and reading it as "/" decoded those twice. The
    path as sent (REQUEST_URI, in origin form: gateway.rest.exchange) has the same "/" between
    the same segments, as decoding makes none, so the name is the same segments of it. Runs
    before every before_request, so the access record and the metrics label this name too."""
    rule = request.url_rule
    if values is None or rule is None or "model" not in values or "<" not in rule.rule:
        return  # the default model's routes
    before, _, after = rule.rule.partition("<")
    segments = urlsplit(request.environ["REQUEST_URI"]).path.split("/")
    spelt = "/".join(segments[before.count("/") : len(segments) - after.count("/")])
    # As Werkzeug reads a path's bytes: UTF-8, anything else replaced.
    values["model"] = unquote_to_bytes(spelt.encode("latin-1")).decode("utf-8", "replace")


def dataplane() -> DataPlane:
    plane: DataPlane = current_app.extensions[DATAPLANE_KEY]
    return plane


# Probes for load balancers and Kubernetes, outside /v1: they describe the process, not the API.
probes = Blueprint("probes", __name__)


@probes.get("/healthz")
def live() -> tuple[Response, int]:
    """Live: the process answers, and no model call of it has hung (one process; a worker of
    several is replaced instead). Stays 200 while draining, so a drain is not a crash."""
    unhealthy = dataplane().unhealthy
    if unhealthy is not None:
        return jsonify({"status": "hung", "reason": unhealthy}), 503
    return jsonify({"status": "ok"}), 200


@probes.get("/readyz")
def ready() -> tuple[Response, int]:
    """Ready: models loaded (they load before the server listens) and not draining."""
    if dataplane().admission.draining:
        return jsonify({"status": "draining"}), 503
    return jsonify({"status": "ready", "models": dataplane().registry.names()}), 200


@probes.get("/openapi.json")
def openapi() -> Response:
    return jsonify(SPEC)


@probes.get("/metrics")
def prometheus() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


@v1.get("/limits")
def limits() -> Response:
    """The limits in force, named as in the gRPC Limits message."""
    return jsonify(asdict(published_limits(current_app.extensions[http_requests.SETTINGS_KEY])))


@v1.get("/models")
def list_models() -> Response:
    return jsonify({"models": [model_json(m) for m in dataplane().list_models()]})


@v1.get("/models/<model_name:model>")
def get_model(model: str) -> Response:
    return jsonify(model_json(dataplane().get_model(model)))


@v1.post("/infer", defaults={"model": ""})
@v1.post("/models/<model_name:model>/infer")
def infer(model: str) -> Response:
    dataplane().model(model)  # an unknown model fails before its body is read
    if http_requests.is_multipart():
        return jsonify(batch_json(dataplane().infer(http_requests.multipart_request(model))))
    return jsonify(infer_json(dataplane().infer_one(http_requests.single_image_request(model))))


@minimal.get("/")
def page() -> Response:
    """The browser page: choose or drop images, pick a model, see each result."""
    return current_app.send_static_file("index.html")


@minimal.post("/", defaults={"model": ""})
def infer_bare(model: str) -> Response:
    response = dataplane().infer_one(http_requests.single_image_request(model))
    return jsonify(response.results[0].output)


@minimal.post("/multi", defaults={"model": ""})
def infer_multi_bare(model: str) -> Response:
    response = dataplane().infer(http_requests.multipart_request(model))
    for index, result in enumerate(response.results):
        if result.error is not None:
            raise PartError(result.name, index, result.error.error, result.error.message)
    return jsonify([result.output for result in response.results])
