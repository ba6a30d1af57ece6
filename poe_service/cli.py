"""``poe-service``: make the signing key pair (``keygen``) and run the query service (``serve``).

Errors caused by input print one line and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from edge_runtime.cli_errors import missing_extra, run_command

from poe_service.errors import ServiceError
from poe_service.queries import DEFAULT_MANIFEST_TTL, DEFAULT_MAX_BODY  # numpy and the standard library only

PROG = "poe-service"


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog=PROG, description="Pool of Experts query service: signed per-query "
                                                          "manifests, fragments and fused models over HTTP")
    root.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = root.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="make the Ed25519 key pair that signs served manifests (KEY, KEY.pub)")
    k.add_argument("--out", required=True, help="private key file to write (mode 0600); the public key goes to "
                                                "OUT.pub for the devices")
    k.add_argument("--overwrite", action="store_true",
                   help="replace an existing key (devices must get the new .pub)")
    p = sub.add_parser("serve", help="realtime query service: catalog, signed per-query manifests, fragments, "
                                     "fused models (HTTP)")
    p.add_argument("--fragments", required=True, help="fragment directory (poe-convert export)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--key", help="Ed25519 private key from `poe-service keygen` (without it manifests are unsigned)")
    p.add_argument("--version-file", help="manifest version counter (default KEY.version.json); bumped whenever "
                                          "the fragment set changes, so versions only increase")
    p.add_argument("--cache-dir", help="where fused per-query models are cached (default FRAGMENTS.serve-cache)")
    p.add_argument("--port-file", help="write the bound port here once listening (for scripts and tests)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY,
                   help=f"largest accepted request body (default {DEFAULT_MAX_BODY}; more: 413)")
    p.add_argument("--manifest-ttl", type=float, default=DEFAULT_MANIFEST_TTL, metavar="SECONDS",
                   help="signed manifests expire this long after they are signed; devices' fetch refuses expired "
                        f"ones, so a captured old answer cannot be replayed (default {DEFAULT_MANIFEST_TTL:g}: a day)")
    limits = p.add_argument_group("limits per client (abuse)")
    limits.add_argument("--max-header-bytes", type=int, default=32 * 1024,
                        help="largest request line + headers (default 32768; more: 431, connection closed)")
    limits.add_argument("--max-headers", type=int, default=100, help="most header fields (default 100; more: 431)")
    limits.add_argument("--request-timeout", type=float, default=20.0, metavar="SECONDS",
                        help="a request must arrive whole within this time from its first byte (default 20; "
                             "else 408, connection closed)")
    limits.add_argument("--keep-alive", type=int, default=15, metavar="SECONDS",
                        help="idle keep-alive connections are closed after this (default 15)")
    limits.add_argument("--max-concurrency", type=int, default=256,
                        help="connections or requests in flight beyond this are answered 503 (default 256)")
    return root


def cmd_keygen(args: argparse.Namespace) -> int:
    from poe_service.keys import generate_keypair

    private, public, kid = generate_keypair(args.out, overwrite=args.overwrite)
    print(f"private key {private} (mode 0600, keep it on the server); public key {public} (give it to the "
          f"devices: edge-runtime fetch --public-key {public}); key id {kid}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from poe_service.server import ServeConfig, serve

    serve(ServeConfig(fragments=args.fragments, host=args.host, port=args.port, key=args.key,
                      version_file=args.version_file, cache_dir=args.cache_dir, port_file=args.port_file,
                      max_body_bytes=args.max_body_bytes, manifest_ttl=args.manifest_ttl,
                      max_header_bytes=args.max_header_bytes, max_headers=args.max_headers,
                      request_timeout=args.request_timeout, keep_alive=args.keep_alive,
                      max_concurrency=args.max_concurrency))
    return 0


COMMANDS = {"keygen": cmd_keygen, "serve": cmd_serve}
NEEDS = {"keygen": ("cryptography",), "serve": ("fastapi", "uvicorn", "cryptography", "onnx")}  # onnx: /v1/fused


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    missing = missing_extra(PROG, "serve", NEEDS[args.command])
    if missing is not None:
        return missing
    return run_command(PROG, COMMANDS[args.command], args, errors=(ServiceError, OSError))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
