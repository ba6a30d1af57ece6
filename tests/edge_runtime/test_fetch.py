"""Device-side pieces of over-the-air fetch against a real (stdlib) HTTP server that misbehaves on purpose:
resumable downloads, verification before anything is visible, signatures, rollback and mix-and-match rules."""

from __future__ import annotations

import hashlib
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge_runtime.download import DeadlineError, DownloadError, RetryPolicy, download_blob, request_json, verified_blob
from edge_runtime.fetch import FetchConfig, FetchError, check_update
from edge_runtime.manifest import ManifestError, check_name, check_sha256
from edge_runtime.signing import (SignatureError, canonical_json, check_not_expired, format_expiry, key_id,
                                  sign_document, signed_headers, verify_document, verify_signed_bytes)

from ..conftest import serving_in_thread

DATA = bytes(range(256)) * 400  # 102,400 bytes
SHA = hashlib.sha256(DATA).hexdigest()
FAST = RetryPolicy(retries=3, timeout=5.0, backoff=0.01)


class FaultServer(ThreadingHTTPServer):
    """Serves ``DATA`` at /blob; ``cut_first`` requests stop after half the body and drop the connection,
    ``corrupt`` flips a byte, ``ignore_range`` answers ranges with the whole file, ``status`` forces an error."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.cut_first, self.corrupt, self.ignore_range, self.status = 0, False, False, None
        self.cut_at: int | None = None  # drop the connection after this many body bytes (first request only)
        self.drip: float | None = None  # seconds between single bytes
        self.json_body: bytes | None = None
        self.requests: list[dict[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        srv: FaultServer = self.server  # type: ignore[assignment]
        srv.requests.append(dict(self.headers))
        if srv.status:
            self.send_response(srv.status)
            body = b'{"error": "forced", "valid": ["x"]}'
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path == "/json":
            body = srv.json_body or b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        data = bytearray(DATA)
        if srv.corrupt:
            data[1000] ^= 0xFF
        start, status = 0, 200
        wanted = self.headers.get("Range")
        if wanted and not srv.ignore_range:
            start, status = int(wanted.split("=")[1].rstrip("-")), 206
        body = bytes(data[start:])
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if srv.drip is not None:
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(srv.drip)
            return
        if srv.cut_at is not None:
            self.wfile.write(body[:srv.cut_at])
            self.wfile.flush()
            srv.cut_at = None
            self.close_connection = True
            return
        if srv.cut_first > 0:
            srv.cut_first -= 1
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


def fault_server():
    return serving_in_thread(FaultServer())


def _visible(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir()) if store.exists() else []


def test_interrupted_download_resumes_with_range(tmp_path):
    with fault_server() as srv:
        srv.cut_first = 1
        got = download_blob(f"{srv.url}/blob", tmp_path, SHA, len(DATA), FAST)
    assert got.path.read_bytes() == DATA
    assert srv.requests[1]["Range"] == f"bytes={len(DATA) // 2}-"
    assert got.downloaded == len(DATA)  # half in the cut try, the rest in the resumed one
    assert _visible(tmp_path) == [SHA]


def test_partial_left_by_an_earlier_run_is_resumed(tmp_path):
    (tmp_path / f"{SHA}.partial").write_bytes(DATA[:30000])
    with fault_server() as srv:
        got = download_blob(f"{srv.url}/blob", tmp_path, SHA, len(DATA), FAST)
    assert (got.resumed_from, got.downloaded) == (30000, len(DATA) - 30000)
    assert srv.requests[0]["Range"] == "bytes=30000-"
    assert got.path.read_bytes() == DATA


def test_a_corrupt_partial_from_an_earlier_run_is_discarded_and_downloaded_again(tmp_path):
    (tmp_path / f"{SHA}.partial").write_bytes(b"x" * 30000)
    with fault_server() as srv:
        got = download_blob(f"{srv.url}/blob", tmp_path, SHA, len(DATA), FAST)
    assert got.path.read_bytes() == DATA and "Range" not in srv.requests[-1]
    assert _visible(tmp_path) == [SHA]


def test_server_ignoring_range_restarts_from_zero_and_nothing_counts_as_resumed(tmp_path):
    (tmp_path / f"{SHA}.partial").write_bytes(DATA[:30000])
    with fault_server() as srv:
        srv.ignore_range = True
        got = download_blob(f"{srv.url}/blob", tmp_path, SHA, len(DATA), FAST)
    assert got.path.read_bytes() == DATA
    assert (got.resumed_from, got.downloaded) == (0, len(DATA))  # the 30,000 bytes came over the wire again


def test_a_cut_keeps_every_byte_that_arrived_not_whole_64k_chunks(tmp_path):
    with fault_server() as srv:
        srv.cut_at = 12000
        with pytest.raises(DownloadError, match="cut off after 12000 of"):
            download_blob(f"{srv.url}/blob", tmp_path, SHA, len(DATA), RetryPolicy(retries=0, timeout=5))
        assert (tmp_path / f"{SHA}.partial").stat().st_size == 12000
        got = download_blob(f"{srv.url}/blob", tmp_path, SHA, len(DATA), FAST)
    assert srv.requests[-1]["Range"] == "bytes=12000-"
    assert (got.resumed_from, got.downloaded) == (12000, len(DATA) - 12000)
    assert got.path.read_bytes() == DATA


def test_a_stale_partial_that_breaks_the_hash_is_restarted_from_zero_once(tmp_path):
    stale = bytearray(DATA[:30000])
    stale[5] ^= 1  # right length, wrong bytes: only the final sha256 can tell
    (tmp_path / f"{SHA}.partial").write_bytes(bytes(stale))
    with fault_server() as srv:
        got = download_blob(f"{srv.url}/blob", tmp_path, SHA, len(DATA), FAST)
    assert [r.get("Range") for r in srv.requests] == ["bytes=30000-", None]
    assert got.path.read_bytes() == DATA and got.resumed_from == 0
    assert got.downloaded == len(DATA) - 30000 + len(DATA)


def test_a_dripping_server_is_cut_by_the_minimum_rate(tmp_path):
    with fault_server() as srv:
        srv.drip = 0.05  # 20 bytes/s: never silent long enough for a read timeout
        start = time.monotonic()
        with pytest.raises(DownloadError, match=r"bytes/s over the last 0.5 s, below the minimum of 1,000"):
            download_blob(f"{srv.url}/blob", tmp_path, SHA, len(DATA),
                          RetryPolicy(retries=1, timeout=5, backoff=0.01, min_rate=1000, rate_window=0.5))
        assert time.monotonic() - start < 3
    assert _visible(tmp_path) == [f"{SHA}.partial"]  # what arrived is kept for the next fetch


def test_the_deadline_bounds_the_whole_download(tmp_path):
    with fault_server() as srv:
        srv.drip = 0.05
        start = time.monotonic()
        policy = RetryPolicy(retries=5, timeout=5, min_rate=0, deadline_at=time.monotonic() + 1.0)
        with pytest.raises(DeadlineError, match="deadline"):
            download_blob(f"{srv.url}/blob", tmp_path, SHA, len(DATA), policy)
        assert time.monotonic() - start < 2.5


@pytest.mark.parametrize("body, message", [
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b'{"n": ' + b"7" * 5000 + b"}", "not valid JSON"),
    (b'{"n": NaN}', "NaN is not a valid JSON number"),
    (b'{"n": 1e999}', "out of range"),
])
def test_hostile_json_answers_are_one_line_errors(body, message):
    with fault_server() as srv:
        srv.json_body = body
        with pytest.raises(DownloadError, match=message) as info:
            request_json(f"{srv.url}/json", policy=FAST)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_corrupted_download_never_becomes_visible(tmp_path):
    with fault_server() as srv:
        srv.corrupt = True
        with pytest.raises(DownloadError, match="sha256 does not match"):
            download_blob(f"{srv.url}/blob", tmp_path, SHA, len(DATA), FAST)
    assert _visible(tmp_path) == []


def test_server_that_keeps_cutting_off_leaves_only_a_partial(tmp_path):
    with fault_server() as srv:
        srv.cut_first = 100
        with pytest.raises(DownloadError, match="failed after 4 tries.*cut off.*next fetch resumes"):
            download_blob(f"{srv.url}/blob", tmp_path, SHA, len(DATA), FAST)
    assert _visible(tmp_path) == [f"{SHA}.partial"]  # never under the final name
    assert verified_blob(tmp_path, SHA, len(DATA)) is None


def test_4xx_is_final_and_names_the_servers_reason(tmp_path):
    with fault_server() as srv:
        srv.status = 404
        with pytest.raises(DownloadError, match=r"HTTP 404: forced \(valid: x\)"):
            download_blob(f"{srv.url}/blob", tmp_path, SHA, len(DATA), FAST)
        assert len(srv.requests) == 1


def test_5xx_is_retried_then_reported(tmp_path):
    with fault_server() as srv:
        srv.status = 503
        with pytest.raises(DownloadError, match="failed after 4 tries: HTTP 503"):
            request_json(f"{srv.url}/json", policy=FAST)
        assert len(srv.requests) == 4
        srv.status = None
        assert request_json(f"{srv.url}/json", policy=FAST) == {"ok": True}


def test_server_gone_is_a_clear_error(tmp_path):
    with fault_server() as srv:
        url = srv.url
    with pytest.raises(DownloadError, match="cannot reach"):
        download_blob(f"{url}/blob", tmp_path, SHA, len(DATA), RetryPolicy(retries=1, timeout=2, backoff=0.01))
    assert _visible(tmp_path) == []


# --------------------------------------------------------------------------- signatures

@pytest.fixture(scope="module")
def keys():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()


def test_signature_round_trip_and_tampering(keys):
    mine, other = keys
    doc = sign_document({"version": 3, "b": [1, 2], "a": "é"}, mine)
    assert doc["key_id"] == key_id(mine.public_key())
    assert verify_document(doc, mine.public_key()) == {"version": 3, "b": [1, 2], "a": "é"}
    tampered = {**doc, "payload": {**doc["payload"], "version": 4}}
    with pytest.raises(SignatureError, match="does not verify"):
        verify_document(tampered, mine.public_key())
    with pytest.raises(SignatureError, match="signed by key"):
        verify_document(doc, other.public_key())
    with pytest.raises(SignatureError, match="malformed"):
        verify_document({**doc, "signature": "not base64!"}, mine.public_key())
    unsigned = sign_document({"version": 1}, None)
    with pytest.raises(SignatureError, match="unsigned"):
        verify_document(unsigned, mine.public_key())
    assert verify_document(unsigned, None, insecure=True) == {"version": 1}
    assert canonical_json({"b": 1, "a": [1.5, "x"]}) == b'{"a":[1.5,"x"],"b":1}'


def test_fetch_config_rejects_bad_input(tmp_path):
    with pytest.raises(SignatureError, match="--public-key"):
        FetchConfig(server="http://127.0.0.1:1", tasks=("tops",), bundle=str(tmp_path))
    with pytest.raises(FetchError, match="http:// or https://"):
        FetchConfig(server="file:///etc", tasks=("tops",), bundle=str(tmp_path), insecure=True)
    with pytest.raises(ManifestError, match="invalid task name '../etc'"):
        FetchConfig(server="http://h", tasks="tops,../etc", bundle=str(tmp_path), insecure=True)
    for bad in ({"deadline": 0}, {"min_rate": -1}, {"timeout": 0}):
        with pytest.raises(FetchError, match="--deadline and --timeout must be > 0"):
            FetchConfig(server="http://h", tasks="tops", bundle=str(tmp_path), insecure=True, **bad)
    policy = FetchConfig(server="http://h", tasks="tops", bundle=str(tmp_path), insecure=True, min_rate=5).policy(7.0)
    assert (policy.min_rate, policy.deadline_at, policy.rate_window) == (5, 7.0, 10.0)


def test_names_and_digests_that_could_leave_a_directory_are_refused():
    for bad in ("../x", "a/b", "..", ".hidden", "a\\b", ""):
        with pytest.raises(ManifestError, match="invalid task name"):
            check_name("task name", bad)
    with pytest.raises(ManifestError, match="64 lowercase hex"):
        check_sha256("blob", SHA.upper())
    with pytest.raises(ManifestError, match="64 lowercase hex"):
        check_sha256("blob", "../" + SHA[3:])


class _Lib:
    format, precision, sha256 = "tflite", "int8", "a" * 64


class _Manifest:
    pool_id = "p1"


def test_rollback_and_mix_and_match_rules():
    held = {"version": 5, "pool_id": "p1", "libraries": {"tflite.int8": "a" * 64}, "key_id": "k1"}
    check_update(held, 5, _Manifest(), _Lib(), "k1")  # same version again: fine (e.g. another query)
    check_update(held, 6, _Manifest(), _Lib(), "k1")
    with pytest.raises(FetchError, match="rollback refused: .* version 4, older than version 5"):
        check_update(held, 4, _Manifest(), _Lib(), "k1")
    with pytest.raises(FetchError, match="mix and match refused: .* library"):
        check_update({**held, "libraries": {"tflite.int8": "b" * 64}}, 6, _Manifest(), _Lib(), "k1")
    with pytest.raises(FetchError, match="mix and match refused: the bundle holds pool p0"):
        check_update({**held, "pool_id": "p0"}, 6, _Manifest(), _Lib(), "k1")
    with pytest.raises(FetchError, match="signed by key"):
        check_update(held, 6, _Manifest(), _Lib(), "k2")


def test_expiry_is_checked_against_the_clock():
    now = time.time()
    check_not_expired({"expires": format_expiry(now + 60)}, now)
    with pytest.raises(SignatureError, match="expired at .*--allow-expired"):
        check_not_expired({"expires": format_expiry(now - 1)}, now)
    with pytest.raises(SignatureError, match="no expiry"):
        check_not_expired({}, now)
    with pytest.raises(SignatureError, match="not an ISO-8601 UTC time"):
        check_not_expired({"expires": "tomorrow"}, now)


def test_signed_bytes_verify_and_tampering_is_caught(keys):
    mine, other = keys
    data = b"fused model bytes"
    payload = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "tasks": ["tops"]}
    headers = signed_headers(payload, mine)
    assert verify_signed_bytes(data, headers, mine.public_key()) == payload
    with pytest.raises(SignatureError, match="do not match the sha256"):
        verify_signed_bytes(data + b"!", headers, mine.public_key())
    with pytest.raises(SignatureError, match="signed by key"):
        verify_signed_bytes(data, headers, other.public_key())
    with pytest.raises(SignatureError, match="no X-Signature header"):
        verify_signed_bytes(data, {k: v for k, v in headers.items() if k != "X-Signature"}, mine.public_key())


def test_a_damaged_fetch_state_is_one_line_not_a_traceback(tmp_path):
    from edge_runtime.fetch import read_state

    (tmp_path / "fetch_state.json").write_bytes(b"[" * 100000)
    with pytest.raises(FetchError, match="nested too deeply.*start over"):
        read_state(tmp_path)
