"""``poe-service serve``: the query service over HTTP (FastAPI + uvicorn), loopback unless told otherwise.

Endpoints (OpenAPI at ``/openapi.json``, docs at ``/docs``):

- ``GET /v1/pool``: catalog - tasks, classes, per-fragment bytes and measured accuracies, variants;
- ``POST /v1/query``: ``{"tasks": [...], "format": "tflite", "precision": "int8"}`` -> signed manifest;
- ``POST /v1/fused``: ``{"tasks": [...], "precision": "fp32"}`` -> one fused ONNX model, cached per query;
- ``GET``/``HEAD /v1/fragments/{sha256}``: content-addressed bytes with ETag (304) and Range (206, 416).

Every 4xx answer is JSON ``{"error": "...", "valid": [...]}`` (405 also carries ``Allow``).  Abuse limits
(head size and header count -> 431, request deadline -> 408, concurrency -> 503, keep-alive) are uvicorn
settings where uvicorn has one and :mod:`poe_service.http_guard` where it has none.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations (``Request``) at
# run time, and they are imported inside ``create_app`` so that the CLI does not pay for FastAPI on every call.
import hashlib
import os
import re
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from edge_runtime.atomic_io import atomic_write_bytes
from edge_runtime.manifest import MANIFEST_NAME, PRECISIONS

from poe_service.errors import ServiceError
from poe_service.keys import VersionCounter, default_version_file
from poe_service.queries import (DEFAULT_FORMAT, DEFAULT_MANIFEST_TTL, DEFAULT_MAX_BODY, DEFAULT_PRECISION,
                                 FUSED_PRECISIONS, RequestError, QueryService)

JSON = "application/json"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
Log = Callable[[str], None]


@dataclass(frozen=True)
class ServeConfig:
    """What ``poe-service serve`` serves, where, and with which key and version counter."""

    fragments: str
    host: str = "127.0.0.1"
    port: int = 8000
    key: Optional[str] = None
    version_file: Optional[str] = None
    cache_dir: Optional[str] = None
    port_file: Optional[str] = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    manifest_ttl: float = DEFAULT_MANIFEST_TTL
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    request_timeout: float = 20.0
    keep_alive: int = 15
    max_concurrency: int = 256

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ServiceError(f"--port must be 0 (any free port) to 65535, got {self.port}")
        if self.max_body_bytes < 64:
            raise ServiceError(f"--max-body-bytes must be at least 64, got {self.max_body_bytes}")
        if not self.manifest_ttl >= 1:
            raise ServiceError(f"--manifest-ttl must be at least 1 second, got {self.manifest_ttl}")
        if self.keep_alive < 1 or self.max_concurrency < 1:
            raise ServiceError(f"--keep-alive and --max-concurrency must be at least 1, got {self.keep_alive} and "
                               f"{self.max_concurrency}")
        self.limits()  # checks the head limits and the timeout

    def limits(self) -> "HttpLimits":
        from poe_service.limits import HttpLimits

        return HttpLimits(self.max_header_bytes, self.max_headers, self.request_timeout)

    def resolved_cache_dir(self) -> Path:
        """Default: ``<fragments>.serve-cache`` beside the fragment directory (never inside it)."""
        path = Path(self.fragments).resolve()
        return Path(self.cache_dir) if self.cache_dir else path.parent / f"{path.name}.serve-cache"


def _query_schema(fused: bool) -> Dict[str, Any]:
    precisions = list(FUSED_PRECISIONS if fused else PRECISIONS)
    properties: Dict[str, Any] = {
        "tasks": {"oneOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1},
                            {"type": "string", "description": "comma list"}],
                  "description": "primitive tasks, e.g. [\"footwear\", \"tops\"] (GET /v1/pool lists them)"},
        "precision": {"type": "string", "enum": precisions,
                      "default": "fp32" if fused else DEFAULT_PRECISION}}
    if not fused:
        properties["format"] = {"type": "string", "enum": ["tflite", "onnx"], "default": DEFAULT_FORMAT}
    return {"requestBody": {"required": True, "content": {JSON: {"schema": {
        "type": "object", "required": ["tasks"], "additionalProperties": False, "properties": properties}}}}}


def _errors(*codes: int) -> Dict[Any, Any]:
    """OpenAPI entries for the JSON error body every 4xx answer carries."""
    schema = {"type": "object", "required": ["error", "valid"],
              "properties": {"error": {"type": "string", "description": "what was wrong"},
                             "valid": {"type": "array", "items": {"type": "string"},
                                       "description": "the valid choices, where there are any"}}}
    return {code: {"description": "bad request (JSON error body)", "content": {JSON: {"schema": schema}}}
            for code in codes}


def parse_range(header: str, size: int) -> Optional[Tuple[int, int]]:
    """``(start, end)`` inclusive for one ``bytes=`` range, or None when unsatisfiable or malformed (-> 416)."""
    match = _RANGE.match(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # suffix: the last N bytes
        n = int(last)
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    return (start, end) if start < size and start <= end else None


def _etag_matches(header: str, etag: str) -> bool:
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def create_app(service: QueryService, max_body_bytes: int = DEFAULT_MAX_BODY) -> Any:
    """The FastAPI application around one :class:`QueryService`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    app = FastAPI(title="Pool of Experts query service", version=str(service.version),
                  description=__doc__.split("\n\n", 1)[0])

    def error(status: int, message: str, valid: Optional[List[str]] = None,
              headers: Optional[Dict[str, str]] = None) -> Response:
        return Response(RequestError(message, valid or []).to_json_bytes(), status_code=status, media_type=JSON,
                        headers=headers)

    @app.exception_handler(RequestError)
    async def _query_error(_: Request, exc: RequestError):
        return error(exc.status, str(exc), exc.valid)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error(404, f"no such endpoint {request.method} {request.url.path}",
                         ["GET /v1/pool", "POST /v1/query", "POST /v1/fused", "GET /v1/fragments/{sha256}",
                          "GET /openapi.json"])
        headers = dict(exc.headers or {})  # 405 carries Allow (RFC 9110 15.5.6)
        valid = [m.strip() for m in headers.get("Allow", "").split(",") if m.strip()]
        return error(exc.status_code, f"{request.method} not allowed on {request.url.path}" if exc.status_code == 405
                     else str(exc.detail), valid, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return error(400, f"bad request: {exc.errors()[0].get('msg') if exc.errors() else exc}")

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            raise RequestError(f"request body of {length} bytes is larger than the limit of {max_body_bytes}",
                             status=413)
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    raise RequestError(f"request body is larger than the limit of {max_body_bytes} bytes",
                                       status=413)
        except ClientDisconnect:  # e.g. closed by --request-timeout: nobody is left to answer, and no traceback
            raise RequestError("the client went away before sending the whole body", status=400) from None
        return bytes(body)

    @app.get("/v1/pool", summary="Catalog: tasks, classes, fragments with bytes and measured accuracies",
             responses=_errors(404))
    async def pool() -> Response:
        return Response(service.catalog_bytes, media_type=JSON)

    @app.post("/v1/query", summary="Signed per-query manifest naming only the fragments the query needs",
              openapi_extra=_query_schema(fused=False), responses=_errors(400, 413))
    async def query(request: Request) -> Response:
        return Response(service.answer(service.parse_query(await read_body(request))), media_type=JSON)

    @app.post("/v1/fused", summary="One ONNX model for the query (library + experts fused), cached per query",
              openapi_extra=_query_schema(fused=True), response_class=Response, responses=_errors(400, 404, 413))
    async def fused(request: Request) -> Response:
        q = service.parse_query(await read_body(request), fused=True)
        data, headers = await run_in_threadpool(service.fused, q)
        return Response(data, media_type="application/octet-stream", headers=headers)

    async def fragment(sha256: str, request: Request) -> Response:
        data = service.blob(sha256)
        size, etag = len(data), f'"{sha256}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "public, max-age=31536000, immutable"}
        if _etag_matches(request.headers.get("if-none-match", ""), etag):
            return Response(status_code=304, headers=headers)
        status, body = 200, data
        wanted = request.headers.get("range")
        if wanted is not None:
            span = parse_range(wanted, size)
            if span is None:
                return error(416, f"range {wanted!r} is not satisfiable for {size} bytes; use bytes=START-[END]",
                             headers={"Content-Range": f"bytes */{size}"})
            status, body = 206, data[span[0]:span[1] + 1]
            headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
        if request.method == "HEAD":
            return Response(status_code=status, headers={**headers, "Content-Length": str(len(body))},
                            media_type="application/octet-stream")
        return Response(body, status_code=status, headers=headers, media_type="application/octet-stream")

    for method in ("get", "head"):
        getattr(app, method)("/v1/fragments/{sha256}", response_class=Response, operation_id=f"{method}_fragment",
                             summary="Content-addressed fragment bytes (ETag, If-None-Match, Range)",
                             responses=_errors(400, 404, 416))(fragment)
    return app


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), so the bound port is known before the server starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ServiceError(f"--host {host!r} does not resolve: {exc}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small JSON answers go out at once (p99)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServiceError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def open_service(cfg: ServeConfig) -> QueryService:
    """The verified service with its signing key and the version for the fragment set it serves."""
    from edge_runtime.signing import SignatureError, load_private_key

    try:
        private_key = load_private_key(cfg.key) if cfg.key else None
    except (SignatureError, OSError) as exc:
        raise ServiceError(f"--key: {exc}") from None
    if cfg.key:
        check_key_mode(cfg.key)
    manifest = Path(cfg.fragments) / MANIFEST_NAME
    if not manifest.is_file():
        raise ServiceError(f"{manifest} not found: --fragments must be a fragment directory "
                               "(poe-convert export writes one)")
    version_file = cfg.version_file or (default_version_file(cfg.key) if cfg.key else None)
    version = 1
    if version_file:
        version = VersionCounter(Path(version_file)).version_for(hashlib.sha256(manifest.read_bytes()).hexdigest())
    return QueryService(cfg.fragments, private_key, version, cfg.resolved_cache_dir(), cfg.manifest_ttl,
                        key_file=cfg.key)


def check_key_mode(key: str) -> None:
    """Refuse a private key that group or others may read: whoever reads it can sign for the whole fleet."""
    try:
        mode = os.stat(key).st_mode
    except OSError as exc:
        raise ServiceError(f"--key: cannot read {key}: {exc.strerror}") from None
    if mode & 0o077:
        raise ServiceError(f"--key: {key} is readable by others (mode {stat.S_IMODE(mode):04o}); run "
                           f"`chmod 600 {key}` (and consider the key leaked if others could read it)")


def uvicorn_config(app: Any, cfg: ServeConfig, log: Log) -> Any:
    """uvicorn's own limits (concurrency, keep-alive, h11 head size), plus the guarded httptools protocol for
    what uvicorn has no setting for (see :mod:`poe_service.http_guard`)."""
    import uvicorn

    http: Any = "h11"
    try:
        from poe_service.http_guard import guarded_protocol

        http = guarded_protocol(cfg.limits())
    except ImportError:  # no httptools: h11 bounds the head; header count and request deadline are not enforced
        log("warning: httptools is not installed: using h11 (slower); only the head size limit applies "
            "(pip install httptools)")
    return uvicorn.Config(app, http=http, log_level="warning", access_log=False, lifespan="off",
                          timeout_keep_alive=cfg.keep_alive, limit_concurrency=cfg.max_concurrency,
                          h11_max_incomplete_event_size=cfg.max_header_bytes)


def serve(cfg: ServeConfig, log: Log = lambda m: print(m, file=sys.stderr, flush=True)) -> None:
    """Verify the fragments, bind, write ``--port-file``, then serve until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise ServiceError("serving needs the 'serve' extra: pip install 'pool-of-experts-edge[serve]'") from None
    service = open_service(cfg)
    app = create_app(service, cfg.max_body_bytes)
    sock = _bind(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    if cfg.port_file:
        atomic_write_bytes(cfg.port_file, f"{port}\n".encode())
    if service.key_id is None:
        log("warning: no --key: manifests are UNSIGNED and devices will refuse them unless --insecure")
    log(f"serving pool {service.manifest.pool_id} (manifest version {service.version}, "
        f"{len(service.blobs)} fragments verified, key {service.key_id[:16] if service.key_id else 'none'}) "
        f"on http://{cfg.host}:{port}")
    uvicorn.Server(uvicorn_config(app, cfg, log)).run(sockets=[sock])
