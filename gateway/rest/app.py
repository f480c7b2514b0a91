"""The Flask application factory."""

from __future__ import annotations

import functools
import re
import time
from pathlib import Path

from flask import Flask, Response, g, request, send_from_directory
from flask_cors import CORS
from werkzeug.exceptions import RequestEntityTooLarge

from gateway.config import Settings
from gateway.core.access import log_access, started_at
from gateway.core.dataplane import DataPlane, new_request_id
from gateway.core.tokens import Tokens
from gateway.rest import errors, routes
from gateway.rest.exchange import QUEUED_KEY
from gateway.rest.requests import SETTINGS_KEY
from gateway.rest.responses import EXPOSED_HEADERS, REQUEST_ID_HEADER, SERVER_METHODS

# Open when tokens are required: the browser page itself (its calls carry the token).
_OPEN = frozenset({"minimal.page", "static"})


def _method_label() -> str:
    """The method and route of a request that matched a route; "-" for any other, whose method
    token (any the client likes, for a 404 or 405) must not become a label value."""
    rule = request.url_rule
    return f"{request.method} {_route(rule.rule)}" if rule is not None else "-"


@functools.lru_cache(maxsize=64)
def _route(rule: str) -> str:
    # "<model_name:model>" is "<model>" in labels, as in the routes' documentation.
    return re.sub(r"<(?:\w+:)?(\w+)>", r"<\1>", rule)


class _App(Flask):
    def send_static_file(self, filename: str) -> Response:
        """The page and its script, whole: always 200, as the API document says. Werkzeug's
        conditional answers gave 206 to a Range and 416, with the code of a 400, to one past
        the end; the files are a few KB."""
        assert self.static_folder is not None
        return send_from_directory(self.static_folder, filename, conditional=False)


def create_app(settings: Settings, dataplane: DataPlane, tokens: Tokens | None = None) -> Flask:
    app = _App("gateway", static_folder=str(Path(__file__).parent / "static"))
    # Werkzeug answers 413 from Content-Length before reading, and cuts a chunked body off there.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[routes.DATAPLANE_KEY] = dataplane
    app.extensions[SETTINGS_KEY] = settings

    @app.before_request
    def _assign_request_id() -> None:
        # From arrival: the wait for a thread in cheroot's queue is the request's time too.
        g.received = request.environ.get(QUEUED_KEY, time.monotonic())
        g.started = started_at(g.received)
        g.request_id = new_request_id(request.headers.get(REQUEST_ID_HEADER))
        g.deadline = dataplane.deadline(since=g.received)
        # Every route about a model has a `model` value ("" for the default one): its label in
        # the access record and the metrics, also for a request refused before the route runs.
        if request.view_args is not None and "model" in request.view_args:
            g.model = request.view_args["model"]

    if tokens is not None:
        required = tokens

        @app.before_request
        def _authenticate() -> None:
            # Once the request has its id, so that a refusal is logged with it; before the size
            # check, which told a caller without a token the gateway's --max-request-bytes.
            # Probes, metrics and the API document answer anyone, as a load balancer or a
            # scraper asks; a preflight carries no credentials, by the Fetch standard.
            endpoint = request.endpoint or ""
            if request.method == "OPTIONS" or endpoint in _OPEN or endpoint.startswith("probes."):
                return
            if request.url_rule is not None:  # an unknown route stays a 404
                required.check(request.headers.get("Authorization"))

    @app.before_request
    def _refuse_bodies_too_large() -> None:
        # On every route, also those that never read a body (or do not exist: before
        # routing's 404), so that the server does not read it out.
        if (request.content_length or 0) > settings.max_request_bytes:
            raise RequestEntityTooLarge()
        if request.content_length is None:
            # Werkzeug's stream for a chunked body raises 413 on a read at its limit, before it
            # can know the body has ended: a body of exactly the cap was refused. The chunked
            # reader (gateway.rest.framing) keeps the exact cap.
            request.max_content_length = settings.max_request_bytes + 1

    @app.before_request
    def _about_the_server() -> Response | None:
        # `OPTIONS *` asks what the server as a whole supports (RFC 9110 9.3.7); it has no
        # route, and was answered 404. (cheroot gives its path as "/*", as for `OPTIONS /*`.)
        if request.method == "OPTIONS" and request.environ.get("REQUEST_URI") == "*":
            return Response(status=200, headers={"Allow": SERVER_METHODS})
        return None

    @app.after_request
    def _return_request_id(response: Response) -> Response:
        if "request_id" in g:
            response.headers[REQUEST_ID_HEADER] = g.request_id
            log_access(
                request_id=g.request_id,
                protocol="http",
                method=_method_label(),
                model=dataplane.registry.label(g.model) if "model" in g else "",
                images=g.get("images", 0),
                status=str(response.status_code),
                # What was read, not what was declared: a refused body was mostly not read.
                bytes_in=getattr(request.environ.get("wsgi.input"), "bytes_read", 0),
                bytes_out=_bytes_out(response),
                started=g.started,
                error=g.get("error", ""),
            )
        return response

    if settings.cors_origin:
        # Registered before flask-cors's own hook, so that it runs after it (Flask runs them
        # last first): flask-cors adds a Vary header of its own when several origins are
        # allowed, and a preflight's answer had two.
        @app.after_request
        def vary_by_origin(response: Response) -> Response:
            # Whether the CORS headers are sent depends on the request's Origin; flask-cors says
            # so (Vary: Origin) only when several origins are allowed, so a shared cache could
            # hand one origin's answer to another.
            if "*" not in settings.cors_origin:
                response.vary.add("Origin")
            return response

        # Preflight answered by flask-cors; X-Request-ID readable by the page's script.
        CORS(
            app,
            origins=_literal_origins(settings.cors_origin),
            methods=["GET", "POST"],
            allow_headers=["Content-Type", REQUEST_ID_HEADER, "Authorization"],
            expose_headers=list(EXPOSED_HEADERS),
            max_age=600,
        )

    app.url_map.converters["model_name"] = routes.ModelName
    # The server merges runs of slashes itself (gateway.rest.exchange.origin_form); Werkzeug's
    # own merging answered with a redirect in HTML.
    app.url_map.merge_slashes = False
    app.register_blueprint(routes.probes)
    app.register_blueprint(routes.v1)
    app.register_blueprint(routes.minimal)
    errors.register(app)
    return app


def _bytes_out(response: Response) -> int:
    """The body bytes the answer sends: none for HEAD; a file's (the page, its script) from
    its Content-Length, which Werkzeug cannot count from a body it streams."""
    if request.method == "HEAD":
        return 0
    return response.calculate_content_length() or response.content_length or 0


def _literal_origins(origins: tuple[str, ...]) -> list[str | re.Pattern[str]]:
    """The allowed origins as flask-cors should match them: each as written (any case), "*"
    for any. flask-cors takes a string holding `*`, `[`, `(`, `?` and the like for a regular
    expression, matched at the start of the Origin only: `https://*.example.com` allowed
    `https://xexample.com.attacker.net` and not `https://app.example.com`, and an IPv6 origin
    (`http://[::1]:8080`) allowed `http://1:8080` and not itself. The server's own answers
    (gateway.rest.exchange.cors_headers) compare them as written too."""
    return [o if o == "*" else re.compile(re.escape(o) + r"\Z", re.IGNORECASE) for o in origins]
