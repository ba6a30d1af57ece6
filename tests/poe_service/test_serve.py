"""`poe-service serve` as a real process on an ephemeral loopback port, driven by the real `edge-runtime fetch`.

A small stdlib proxy between the two plays the hostile network: it cuts transfers
and goes away, tampers with manifests and fragments, and replays old answers
(helpers in ``serving.py``; abuse limits, signed fused models and expiry in
``test_serve_abuse.py``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.manifest import MANIFEST_NAME, read_manifest
from edge_runtime.signing import load_public_key, verify_document

from .serving import QUERY, _complete_files, _run, fetch_cli, fetch_json, make_keys, proxy_to, running


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    """Two key pairs made by `poe-service keygen`: the server's and a stranger's."""
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def server(tiny_fragments, keys, tmp_path_factory):
    with running(tiny_fragments[0], tmp_path_factory.mktemp("server"), keys[0]) as srv:
        yield srv


# --------------------------------------------------------------------------- tests

def test_keygen_writes_a_private_key_only_its_owner_reads(keys):
    private, _ = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in Path(f"{private}.pub").read_bytes()
    again = _run("poe_service", "keygen", "--out", private)
    assert again.returncode == 2 and "refusing to replace a signing key" in again.stderr


def test_catalog_openapi_and_a_signed_query(server, keys, tiny_fragments):
    manifest = read_manifest(tiny_fragments[0])
    status, _, body = server.request("GET", "/v1/pool")
    catalog = json.loads(body)
    assert status == 200 and catalog["pool_id"] == manifest.pool_id and catalog["signed"]
    assert set(catalog["tasks"]) == set(manifest.tasks) and catalog["formats"] == ["onnx", "tflite"]
    experts = [f for v in catalog["variants"] for f in v["fragments"] if f["role"] == "expert"]
    assert all(f["bytes"] > 0 and 0 <= f["accuracy"] <= 1 for f in experts)
    paths = json.loads(server.request("GET", "/openapi.json")[2])["paths"]
    assert {"/v1/pool", "/v1/query", "/v1/fused", "/v1/fragments/{sha256}"} <= set(paths)

    status, headers, body = server.request("POST", "/v1/query", json.dumps(QUERY).encode(),
                                           {"Content-Type": "application/json"})
    assert status == 200, body
    payload = verify_document(json.loads(body), load_public_key(f"{keys[0]}.pub"))
    assert payload["version"] == catalog["version"] >= 1
    assert sorted(f["id"] for f in payload["fragments"]) == [
        "expert.footwear.tflite.int8", "expert.tops.tflite.int8", "library.tflite.int8"]


def test_second_query_downloads_only_the_added_expert_and_the_bundle_runs(server, keys, tmp_path):
    bundle, pub = tmp_path / "device", Path(f"{keys[0]}.pub")
    first = fetch_json(server.url, bundle, "footwear", pub)
    assert sorted(f["id"] for f in first["fetched"]) == ["expert.footwear.tflite.int8", "library.tflite.int8"]
    assert first["reused"] == [] and first["signed"]
    second = fetch_json(server.url, bundle, "footwear,tops", pub)
    assert [f["id"] for f in second["fetched"]] == ["expert.tops.tflite.int8"]
    assert second["reused_bytes"] == first["fetched_bytes"] > 0
    assert second["fetched_bytes"] == second["fetched"][0]["bytes"]
    assert fetch_json(server.url, bundle, "footwear,tops", pub)["fetched"] == []  # third time: nothing to fetch
    blobs = sorted(p.name for p in (bundle / "blobs").iterdir())
    assert blobs == sorted(f["sha256"] for f in first["fetched"] + second["fetched"])
    images = tmp_path / "images.npy"
    np.save(images, np.random.default_rng(0).integers(0, 255, (3, 28, 28, 1), dtype=np.uint8))
    done = _run("edge_runtime", "run", "--bundle", bundle, "--tasks", "footwear,tops", images, "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["predictions"]) == 3


def test_fragments_are_content_addressed_with_etag_and_range(server, tiny_fragments):
    frag = read_manifest(tiny_fragments[0]).fragment("library", "onnx", "fp32")
    data = (tiny_fragments[0] / frag.file).read_bytes()
    path = f"/v1/fragments/{frag.sha256}"
    status, headers, body = server.request("GET", path)
    assert (status, body, headers["etag"]) == (200, data, f'"{frag.sha256}"')
    assert server.request("GET", path, headers={"If-None-Match": f'"{frag.sha256}"'})[0] == 304
    status, headers, body = server.request("GET", path, headers={"Range": "bytes=10-19"})
    assert (status, body, headers["content-range"]) == (206, data[10:20], f"bytes 10-19/{len(data)}")
    assert server.request("GET", path, headers={"Range": "bytes=-5"})[2] == data[-5:]
    status, headers, body = server.request("GET", path, headers={"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(data)}" and "error" in json.loads(body)
    status, headers, body = server.request("HEAD", path)
    assert status == 200 and int(headers["content-length"]) == len(data) and body == b""
    for bad, code in ((frag.sha256.upper(), 400), ("0" * 64, 404), ("..%2F..%2Fmanifest.json", 404),
                      ("../../manifest.json", 404), ("%2e%2e%2fmanifest.json", 404), ("..", 400),
                      (frag.file.replace("/", "%2F"), 404)):
        status, headers, body = server.request("GET", f"/v1/fragments/{bad}")
        assert status == code and headers["content-type"] == "application/json", (bad, body)
        assert json.loads(body)["error"]


@pytest.mark.parametrize("body, code, message", [
    (b"", 400, "empty request body"),
    (b"{not json", 400, "not valid JSON"),
    (b"[1]", 400, "must be a JSON object"),
    (json.dumps({"tasks": ["nosuch"]}).encode(), 400, "unknown task 'nosuch'"),
    (json.dumps({"tasks": ["../etc"]}).encode(), 400, "invalid task name"),
    (json.dumps({"tasks": []}).encode(), 400, "no tasks given"),
    (json.dumps({"tasks": ["tops", "tops"]}).encode(), 400, "duplicate task 'tops'"),
    (json.dumps({"tasks": [3]}).encode(), 400, "task names must be strings"),
    (json.dumps({"format": "tflite"}).encode(), 400, "'tasks' is missing"),
    (json.dumps({"tasks": ["tops"], "format": "tflite", "precision": "int4"}).encode(), 400, "unknown precision"),
    (json.dumps({"tasks": ["tops"], "colour": 1}).encode(), 400, "unknown field"),
    (json.dumps({"tasks": ["tops"] * 5000}).encode(), 413, "larger than the limit"),
    (b"[" * 8000 + b"]" * 8000, 400, "nested too deeply"),
    (b'{"tasks": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    (b'{"tasks": NaN}', 400, "NaN is not a valid JSON number"),
    (b'{"tasks": ["tops"], "format": 1e999}', 400, "out of range"),
])
def test_bad_requests_get_a_4xx_json_body(server, body, code, message):
    for endpoint in ("/v1/query", "/v1/fused"):
        status, headers, answer = server.request("POST", endpoint, body, {"Content-Type": "application/json"})
        error = json.loads(answer)
        assert status == code and headers["content-type"] == "application/json", answer
        assert message in error["error"] and isinstance(error["valid"], list)
        if "unknown task" in message:
            assert error["valid"] == ["bags", "bottoms", "footwear", "tops"]
    assert "Traceback" not in server.log.read_text()


def test_unknown_task_from_the_device_is_one_line_exit_2(server, keys, tmp_path):
    done = fetch_cli(server.url, tmp_path / "b", "tops,nosuch", "--public-key", f"{keys[0]}.pub")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "HTTP 400: unknown task 'nosuch' (valid: bags, bottoms, footwear, tops)" in done.stderr
    assert _complete_files(tmp_path / "b") == []


def test_fused_model_is_built_once_per_query_and_runs(server):
    import onnxruntime as ort

    request = json.dumps({"tasks": ["tops", "footwear"]}).encode()
    status, headers, model = server.request("POST", "/v1/fused", request)
    assert status == 200 and headers["x-class-ids"] == "0,2,4,5,6,7,9"
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: np.zeros((2, 1, 28, 28), np.float32)})[0]
    assert out.shape == (2, 7)
    cached = list((server.log.parent / "cache" / "fused").glob("*.onnx"))
    assert len(cached) == 1
    again = server.request("POST", "/v1/fused", request)
    assert again[2] == model and list((server.log.parent / "cache" / "fused").glob("*.onnx")) == cached
    assert server.request("POST", "/v1/fused", json.dumps({"tasks": ["tops"], "precision": "fp8"}).encode())[0] == 400


def test_wrong_key_or_unsigned_manifests_are_refused_unless_insecure(server, keys, tiny_fragments, tmp_path):
    bundle = tmp_path / "device"
    done = fetch_cli(server.url, bundle, "tops", "--public-key", f"{keys[1]}.pub")
    assert done.returncode == 2 and "signed by key" in done.stderr and _complete_files(bundle) == []
    with running(tiny_fragments[0], tmp_path / "unsigned", key=None) as unsigned:
        done = fetch_cli(unsigned.url, bundle, "tops", "--public-key", f"{keys[0]}.pub")
        assert done.returncode == 2 and "unsigned" in done.stderr and _complete_files(bundle) == []
        done = fetch_cli(unsigned.url, bundle, "tops", "--insecure")
        assert done.returncode == 0 and "--insecure" in done.stderr and "UNSIGNED" in done.stdout


def test_tampered_manifest_or_fragment_is_refused_and_nothing_becomes_visible(server, keys, tmp_path):
    pub, bundle = f"{keys[0]}.pub", tmp_path / "device"

    def more_classes(doc):
        doc["payload"]["fragments"][0]["bytes"] += 1
        return doc

    with proxy_to(server) as proxy:
        proxy.edit_answer = more_classes
        done = fetch_cli(proxy.url, bundle, "tops", "--public-key", pub)
        assert done.returncode == 2 and "signature does not verify" in done.stderr
        assert _complete_files(bundle) == []
        proxy.edit_answer, proxy.edit_blob = None, lambda data: data[:-1] + bytes([data[-1] ^ 1])
        done = fetch_cli(proxy.url, bundle, "tops", "--public-key", pub)
        assert done.returncode == 2 and "sha256 does not match the signed manifest" in done.stderr
        assert _complete_files(bundle) == [] and not list((bundle / "blobs").glob("*.partial"))


def test_server_gone_mid_transfer_then_the_download_resumes_with_range(server, keys, tmp_path):
    pub, bundle = f"{keys[0]}.pub", tmp_path / "device"
    with proxy_to(server) as proxy:
        proxy.cut_blobs = 1
        done = fetch_cli(proxy.url, bundle, "tops", "--public-key", pub, "--retries", "0")
    assert done.returncode == 2 and "cut off" in done.stderr and "the next fetch resumes" in done.stderr
    partials = list((bundle / "blobs").glob("*.partial"))
    assert len(partials) == 1 and _complete_files(bundle) == []  # half a file, never under its final name
    cut_at = partials[0].stat().st_size
    assert cut_at > 0
    with proxy_to(server) as proxy:  # the server is back (on another port)
        report = fetch_json(proxy.url, bundle, "tops", pub)
    assert proxy.ranges == [f"bytes={cut_at}-"]
    resumed = [f for f in report["fetched"] if f["resumed_from"]]
    assert len(resumed) == 1 and resumed[0]["resumed_from"] == cut_at
    assert resumed[0]["downloaded"] == resumed[0]["bytes"] - cut_at
    assert not list((bundle / "blobs").glob("*.partial"))


def _reexported(src: Path, dest: Path, change_library: bool) -> Path:
    """A copy of the fragments as a new export would give: a new tool note, or (``change_library``) a different
    tflite int8 library with its experts re-linked to it."""
    shutil.copytree(src, dest)
    raw = json.loads((dest / MANIFEST_NAME).read_text())
    raw["tools"]["note"] = dest.name
    if change_library:
        lib = next(f for f in raw["fragments"] if f["id"] == "library.tflite.int8")
        path = dest / lib["file"]
        path.write_bytes(path.read_bytes() + b"\0" * 16)
        old, lib["sha256"], lib["bytes"] = lib["sha256"], hashlib.sha256(path.read_bytes()).hexdigest(), \
            path.stat().st_size
        for f in raw["fragments"]:
            if f.get("library_sha256") == old:
                f["library_sha256"] = lib["sha256"]
    (dest / MANIFEST_NAME).write_text(json.dumps(raw))
    return dest


def test_versions_only_increase_and_rollback_and_mix_and_match_are_refused(tiny_fragments, keys, tmp_path):
    key, pub, bundle, versions = keys[0], f"{keys[0]}.pub", tmp_path / "device", tmp_path / "versions.json"
    with running(tiny_fragments[0], tmp_path / "a", key, versions) as a:
        v1 = a.version()
        old_answer = json.loads(a.request("POST", "/v1/query", json.dumps(QUERY).encode())[2])
    with running(tiny_fragments[0], tmp_path / "a2", key, versions) as again:
        assert again.version() == v1  # a restart with the same fragments keeps the version
    newer = _reexported(tiny_fragments[0], tmp_path / "frag-v2", change_library=False)
    with running(newer, tmp_path / "b", key, versions) as b:
        assert b.version() == v1 + 1
        assert fetch_json(b.url, bundle, "footwear,tops", pub)["version"] == v1 + 1
        with proxy_to(b) as replay:  # an attacker replays the older, correctly signed answer
            replay.edit_answer = lambda _: old_answer
            done = fetch_cli(replay.url, bundle, "footwear,tops", "--public-key", pub)
        assert done.returncode == 2, done.stderr
        assert f"rollback refused: the server offers manifest version {v1}, older than version {v1 + 1}" \
            in done.stderr
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file() and p.name != ".fetch.lock"}
    other = _reexported(tiny_fragments[0], tmp_path / "frag-v3", change_library=True)
    with running(other, tmp_path / "c", key, versions) as c:
        assert c.version() == v1 + 2
        done = fetch_cli(c.url, bundle, "footwear,tops,bags", "--public-key", pub)
    assert done.returncode == 2 and "mix and match refused" in done.stderr and "library" in done.stderr
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file() and p.name != ".fetch.lock"} == before


def test_server_refuses_a_corrupt_fragment_directory(tiny_fragments, keys, tmp_path):
    bad = shutil.copytree(tiny_fragments[0], tmp_path / "frag")
    target = bad / read_manifest(bad).fragment("expert", "onnx", "int8", "bags").file
    target.write_bytes(target.read_bytes()[:-3])
    done = _run("poe_service", "serve", "--fragments", bad, "--port", "0", "--key", keys[0],
                "--version-file", tmp_path / "v.json")
    assert done.returncode == 2 and "refusing to serve" in done.stderr and "expert.bags.onnx.int8" in done.stderr
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--fragments", "/nonexistent/frag"], "manifest.json not found: --fragments must be a fragment directory"),
    (["--key", "/etc/hostname"], "--key: /etc/hostname is not an unencrypted PEM private key"),
    (["--port", "70000"], "--port must be 0 (any free port) to 65535"),
    (["--max-header-bytes", "10"], "--max-header-bytes must be >= 1024"),
    (["--request-timeout", "0"], "--request-timeout > 0"),
    (["--manifest-ttl", "0"], "--manifest-ttl must be at least 1 second"),
    (["--max-concurrency", "0"], "--keep-alive and --max-concurrency must be at least 1"),
])
def test_serve_bad_arguments_are_one_line_exit_2(tiny_fragments, args, message):
    done = _run("poe_service", "serve", "--fragments", tiny_fragments[0], "--port", "0", *args)
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_405_answers_carry_allow(server):
    for method, path, allow in (("GET", "/v1/query", "POST"), ("POST", "/v1/pool", "GET"),
                                ("PUT", "/v1/fused", "POST")):
        status, headers, body = server.request(method, path)
        assert status == 405 and headers["allow"] == allow, (method, path, headers)
        assert json.loads(body)["valid"] == [allow]


def test_insecure_is_refused_for_a_bundle_that_trusts_a_key(server, keys, tmp_path):
    bundle = tmp_path / "device"
    fetch_json(server.url, bundle, "tops", f"{keys[0]}.pub")
    done = fetch_cli(server.url, bundle, "tops,bags", "--insecure")
    assert done.returncode == 2 and "--insecure refused" in done.stderr and done.stderr.count("\n") == 1
    done = fetch_cli(server.url, bundle, "tops,bags", "--public-key", f"{keys[1]}.pub")
    assert done.returncode == 2 and "trusts key" in done.stderr


def test_a_narrower_or_other_variant_fetch_keeps_earlier_experts_verifiable(server, keys, tmp_path):
    pub, bundle = f"{keys[0]}.pub", tmp_path / "device"
    fetch_json(server.url, bundle, "footwear,tops", pub)
    narrower = fetch_json(server.url, bundle, "bags", pub)
    assert narrower["dropped"] == []
    fetch_json(server.url, bundle, "tops", pub, "--format", "onnx", "--precision", "fp32")
    held = sorted(f.id for f in read_manifest(bundle).fragments)
    assert "expert.footwear.tflite.int8" in held and "expert.bags.tflite.int8" in held and \
        "expert.tops.onnx.fp32" in held
    done = _run("edge_runtime", "verify", bundle)
    assert done.returncode == 0, done.stderr
    earlier = json.loads((bundle / "signed_earlier.json").read_text())["documents"]
    assert len(earlier) == 2  # the footwear,tops and the bags answers still vouch for their experts
    raw = json.loads((bundle / "signed_earlier.json").read_text())
    raw["documents"][0]["payload"]["class_names"][0] = "edited"
    (bundle / "signed_earlier.json").write_text(json.dumps(raw))
    done = _run("edge_runtime", "verify", bundle)
    assert done.returncode == 2 and "signature does not verify" in done.stderr
