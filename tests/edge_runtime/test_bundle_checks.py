"""`edge-runtime verify`, the checks `Runtime.open` makes before loading, and a corpus of malformed bundles.

Every malformed bundle is a copy of the tiny export with one change, made here."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from edge_runtime import Runtime
from edge_runtime.atomic_io import atomic_write_bytes, sha256_file
from edge_runtime.manifest import MANIFEST_NAME, ManifestError, read_manifest, write_manifest
from edge_runtime.selection import select
from edge_runtime.verify import verify_bundle

from ..conftest import ROOT, run_cli_env
from .test_runtime import _edit_manifest as _edit


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "edge_runtime", *map(str, args)], capture_output=True, text=True,
                          env=run_cli_env(), cwd=ROOT, timeout=300, input=stdin)


@pytest.fixture
def bundle(tiny_fragments, tmp_path):
    dest = tmp_path / "bundle"
    shutil.copytree(tiny_fragments[0], dest)
    return dest


def _frag(raw, fid):
    return next(f for f in raw["fragments"] if f["id"] == fid)


MALFORMED = [
    ("fragments_string", lambda r: r.update(fragments="library.tflite.int8"), "manifest.fragments must be a list"),
    ("tasks_list", lambda r: r.update(tasks=["tops"]), "manifest.tasks must be an object, got list"),
    ("inputs_null", lambda r: _frag(r, "expert.tops.tflite.int8").update(inputs=None),
     r"manifest.fragments\[\d+\].inputs must be a list, got null"),
    ("schema_null", lambda r: r.update(schema_version=None), "schema_version must be an integer, got null"),
    ("schema_1_5", lambda r: r.update(schema_version=1.5), "schema_version must be an integer, got 1.5"),
    ("bytes_bool", lambda r: _frag(r, "library.tflite.int8").update(bytes=True), "bytes must be an integer, got bool"),
    ("class_names_mixed", lambda r: r.update(class_names=[*r["class_names"][:-1], 7]),
     r"class_names\[9\] must be a string"),
    ("mean_string", lambda r: r["preprocessing"].update(mean=["0.5"]), r"mean\[0\] must be a number, got string"),
]


@pytest.mark.parametrize("name,change,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_wrong_json_types_are_named_not_tracebacks(bundle, name, change, message):
    _edit(bundle, change)
    with pytest.raises(ManifestError, match=message):
        Runtime.open(bundle, "tops")
    report = verify_bundle(bundle)
    assert not report.ok and report.manifest == "invalid" and len(report.problems) == 1


def test_nan_or_infinite_numbers_are_refused(bundle):
    text = (bundle / MANIFEST_NAME).read_text()
    for bad in ("NaN", "Infinity"):
        (bundle / MANIFEST_NAME).write_text(re.sub(r'"mean": \[[^\]]*\]', f'"mean": [{bad}]', text, count=1))
        with pytest.raises(ManifestError, match=f"{bad} is not a valid JSON number"):
            Runtime.open(bundle, "tops")
    (bundle / MANIFEST_NAME).write_text(text)
    with pytest.raises(ManifestError, match="finite mean"):  # Python callers building one are refused too
        replace(read_manifest(bundle).preprocessing, mean=(float("nan"),))


def test_verify_passes_a_good_bundle_and_lists_every_problem(bundle):
    good = _cli("verify", bundle)
    assert good.returncode == 0 and good.stdout.startswith(f"{bundle}: ok: manifest and "), good.stderr
    manifest = read_manifest(bundle)
    files = {f.id: bundle / f.file for f in manifest.fragments}
    files["expert.tops.onnx.int8"].unlink()
    data = bytearray(files["library.tflite.int8"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files["library.tflite.int8"].write_bytes(bytes(data))
    bad = _cli("verify", bundle)
    assert bad.returncode == 2 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert any("expert.tops.onnx.int8" in l and "is missing" in l for l in lines)
    assert any("library.tflite.int8" in l and "does not match its manifest checksum" in l for l in lines)
    assert sum("its library 'library.tflite.int8' is checksum mismatch" in l for l in lines) == 4  # its 4 experts
    report = json.loads(_cli("verify", bundle, "--json").stdout)
    assert report["ok"] is False and report["fragments"]["expert.tops.onnx.int8"] == "missing"
    assert report["fragments"]["library.tflite.int8"] == "checksum mismatch" and len(report["problems"]) == 6
    info = _cli("info", "--bundle", bundle)  # info is a self-check too: never exit 0 on a damaged bundle
    assert info.returncode == 2 and "2 fragment(s) fail their checks" in info.stderr
    info_json = _cli("info", "--bundle", bundle, "--json")
    assert info_json.returncode == 2 and json.loads(info_json.stdout)["ok"] is False


def _corrupt_but_matching(bundle, fid, corrupt):
    """Damage a fragment's bytes and rewrite its manifest entry so the checksum matches the damage."""
    manifest = read_manifest(bundle)
    frag = next(f for f in manifest.fragments if f.id == fid)
    path = bundle / frag.file
    path.write_bytes(corrupt(path.read_bytes()))
    fixed = replace(frag, sha256=sha256_file(path), bytes=path.stat().st_size)
    libraries = {f.id: fixed if f.id == fid else f for f in manifest.fragments}
    if frag.role == "library":  # its experts name the library by sha256
        libraries = {k: replace(f, library_sha256=fixed.sha256) if f.role == "expert" and f.format == frag.format
                     and f.precision == frag.precision else f for k, f in libraries.items()}
    write_manifest(bundle, replace(manifest, fragments=tuple(libraries.values())))


def _flip_that_raises(bundle, fid, wanted):
    """A one-byte flip of the fragment that makes its real interpreter raise ``wanted`` (searched, since a
    re-exported pool need not be byte-identical)."""
    import contextlib
    import io

    from edge_runtime.loading import trial_input
    from edge_runtime.runners import OnnxRunner, TFLiteRunner

    frag = next(f for f in read_manifest(bundle).fragments if f.id == fid)
    data = (bundle / frag.file).read_bytes()
    for pos in np.random.default_rng(0).permutation(len(data))[:3000]:
        damaged = bytearray(data)
        damaged[pos] ^= 0xFF
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                runner = (TFLiteRunner if frag.format == "tflite" else OnnxRunner)(bytes(damaged), frag)
                runner.run_raw(trial_input(frag))
        except Exception as exc:  # noqa: BLE001 - looking for one particular interpreter failure
            if type(exc).__name__ == wanted:
                return lambda _: bytes(damaged)
    pytest.fail(f"no one-byte flip of {fid} raises {wanted}")


CORRUPTIONS = [("expert.tops.tflite.int8", "ai_edge_litert", "int8", "RuntimeError"),  # XNNPACK
               ("library.tflite.int8", "ai_edge_litert", "int8", "ValueError"),
               ("expert.tops.onnx.int8", "onnxruntime", "int8", "InvalidArgument"),
               ("library.onnx.fp32", "onnxruntime", "fp32", "InvalidProtobuf")]


@pytest.mark.parametrize("fid,backend,precision,raised", CORRUPTIONS, ids=[c[3] for c in CORRUPTIONS])
def test_corrupt_fragment_with_a_matching_checksum_is_one_line(bundle, fid, backend, precision, raised):
    _corrupt_but_matching(bundle, fid, _flip_that_raises(bundle, fid, raised))
    assert verify_bundle(bundle).ok  # verify checks integrity without loading; open is what loads
    with pytest.raises(ManifestError, match=f"fragment {fid!r} matches its checksum but {backend} cannot run it "
                                            f"\\({raised}: "):
        Runtime.open(bundle, "tops", backend=backend, precision=precision)
    images = bundle.parent / "x.npy"
    np.save(images, np.zeros((1, 28, 28, 1), np.uint8))
    out = _cli("run", "--bundle", bundle, "--tasks", "tops", "--backend", backend, "--precision", precision,
               "--json", images)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and f"fragment {fid!r} matches its checksum" in out.stderr
    error = json.loads(out.stdout)  # nothing else on stdout: no "EP Error" banner
    assert error["exit"] == 2 and error["type"] == "ManifestError" and fid in error["error"]


# ---------------------------------------------------------------------------------------------- signed bundles
@pytest.fixture
def signed(tiny_fragments, tmp_path):
    """A bundle as `edge-runtime fetch` leaves it: blobs/, manifest.json, signed_manifest.json, fetch_state.json."""
    from edge_runtime.signing import key_id, sign_document
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    pub = tmp_path / "server.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    source = read_manifest(tiny_fragments[0])
    selection = select(source, "footwear,tops", "tflite", "int8")
    payload = replace(source, fragments=selection.fragments).to_json()
    payload.update(version=3, query={"tasks": ["footwear", "tops"], "format": "tflite", "precision": "int8"},
                   expires="2000-01-01T00:00:00Z")  # long expired: a device keeps running offline
    document = sign_document(payload, key)
    dest = tmp_path / "device"
    (dest / "blobs").mkdir(parents=True)
    for frag in selection.fragments:
        shutil.copy(tiny_fragments[0] / frag.file, dest / "blobs" / frag.sha256)
    write_manifest(dest, replace(source, fragments=tuple(replace(f, file=f"blobs/{f.sha256}")
                                                         for f in selection.fragments)))
    atomic_write_bytes(dest / "signed_manifest.json", json.dumps(document).encode())
    atomic_write_bytes(dest / "fetch_state.json", json.dumps({"version": 3, "pool_id": source.pool_id,
                                                             "key_id": key_id(key.public_key())}).encode())
    return dest, pub, key


def test_signed_bundle_is_rechecked_at_open_but_never_refused_for_expiry(signed):
    dest, pub, _ = signed
    rt = Runtime.open(dest, "tops,footwear", public_key=pub)
    assert rt.authenticity.signature == "verified"
    assert Runtime.open(dest, "tops").authenticity.signature == "not checked (no public key)"
    ok = _cli("verify", dest, "--public-key", pub)
    assert ok.returncode == 0 and "signature verified" in ok.stdout, ok.stderr
    unchecked = _cli("verify", dest)  # a boot-time check passes only what it could check
    assert unchecked.returncode == 2 and "signature was not checked: no public key" in unchecked.stderr
    shutil.copy(pub, dest / "trusted_key.pub")  # or the key is pinned in the bundle
    assert _cli("verify", dest).returncode == 0


def test_edits_after_fetch_are_refused(signed, tiny_fragments):
    dest, pub, key = signed
    original = (dest / MANIFEST_NAME).read_text()

    def swap_names(raw):
        names = raw["class_names"]
        names[5], names[7] = names[7], names[5]

    def foreign_expert(raw):  # another expert's bytes, its entry rewritten to point at this library
        tops, other = _frag(raw, "expert.tops.tflite.int8"), _frag(raw, "expert.footwear.tflite.int8")
        tops.update(sha256=other["sha256"], bytes=other["bytes"], file=other["file"])

    for change, message in [(swap_names, "differs from the signed manifest in class_names"),
                            (foreign_expert, "'expert.tops.tflite.int8' differs from the signed manifest in "
                                             "sha256, bytes")]:
        (dest / MANIFEST_NAME).write_text(original)
        _edit(dest, change)
        with pytest.raises(ManifestError, match=message):
            Runtime.open(dest, "tops,footwear")
        out = _cli("verify", dest, "--public-key", pub)
        assert out.returncode == 2 and message.split(" in ")[0].strip("'") in out.stderr
    # The attacker edits the saved signed manifest the same way: the signature no longer verifies.
    (dest / MANIFEST_NAME).write_text(original)
    _edit(dest, swap_names)
    doc = json.loads((dest / "signed_manifest.json").read_text())
    swap_names(doc["payload"])
    (dest / "signed_manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="signature does not verify"):
        Runtime.open(dest, "tops", public_key=pub)
    doc["signature"] = base64.b64encode(b"\0" * 64).decode()
    doc["key_id"] = "f" * 64
    (dest / "signed_manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="signed by key ffffffffffffffff, but this bundle trusts key"):
        Runtime.open(dest, "tops")


def test_files_are_written_readable_like_any_file(tmp_path, bundle):
    old = os.umask(0o022)
    try:
        write_manifest(tmp_path, read_manifest(bundle))
        atomic_write_bytes(tmp_path / "fused.onnx", b"x")
        assert (tmp_path / MANIFEST_NAME).stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "fused.onnx").stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        atomic_write_bytes(tmp_path / "private.bin", b"x")
        assert (tmp_path / "private.bin").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
