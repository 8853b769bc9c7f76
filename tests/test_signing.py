"""Optional Ed25519 bundle signing: sign, verify, refuse tampered / unsigned / foreign bundles,
through the API and the CLI, and one line with exit code 2 where `cryptography` is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from device_fixtures import make_bundle, make_class_folders, tiny_onnx_bytes
from hostile import edit_manifest, rehash

from mtl_edge.bundle import Bundle
from mtl_edge.errors import BundleError, ConfigError

pytest.importorskip("cryptography")

from mtl_edge.signing import generate_keypair, sign_bundle, verify_bundle  # noqa: E402


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "key.pem", tmp_path / "key.pub"
    generate_keypair(private, public)
    return private, public


@pytest.fixture
def signed(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    bundle = make_bundle(tmp_path / "bundle", extra_variants=("int8-cpu",)).root
    sign_bundle(bundle, keys[0])
    return bundle


def test_signed_bundle_verifies_with_its_key(signed: Path, keys) -> None:
    bundle = Bundle.load(signed, trusted_key=keys[1])
    assert (
        verify_bundle(bundle, keys[1])
        == json.loads((signed / "signature.json").read_text())["key_id"]
    )
    assert (keys[0].stat().st_mode & 0o777) == 0o600


def test_tampered_signed_bundle_is_refused(signed: Path, keys) -> None:
    # a consistent tamper: new weights, their hash updated in the manifest
    rehash(signed, "backbone.int8-cpu.onnx", tiny_onnx_bytes(seed=9))
    Bundle.load(signed)  # hashes agree with the manifest ...
    with pytest.raises(BundleError, match="changed after signing"):
        Bundle.load(signed, trusted_key=keys[1])  # ... but the signature does not


def test_edited_manifest_field_breaks_the_signature(signed: Path, keys) -> None:
    edit_manifest(signed, lambda m: m["head"].update(steps=7))
    with pytest.raises(BundleError, match="changed after signing"):
        Bundle.load(signed, trusted_key=keys[1])


def test_other_key_unsigned_and_garbage_signature(signed: Path, keys, tmp_path: Path) -> None:
    other_private, other_public = tmp_path / "o.pem", tmp_path / "o.pub"
    generate_keypair(other_private, other_public)
    with pytest.raises(BundleError, match="not by the trusted key"):
        Bundle.load(signed, trusted_key=other_public)
    sign_bundle(signed, other_private)  # re-signed by an attacker's key: still refused
    with pytest.raises(BundleError, match="not by the trusted key"):
        Bundle.load(signed, trusted_key=keys[1])
    (signed / "signature.json").write_text('{"schema": "mtl-edge.signature", "version": 1}')
    with pytest.raises(BundleError, match="algorithm"):
        Bundle.load(signed, trusted_key=keys[1])
    (signed / "signature.json").unlink()
    with pytest.raises(BundleError, match="not signed"):
        Bundle.load(signed, trusted_key=keys[1])


def test_bad_key_files(signed: Path, keys, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM or OpenSSH public key"):
        Bundle.load(signed, trusted_key=garbage)
    with pytest.raises(ConfigError, match="private key"):
        sign_bundle(signed, keys[1])  # a public key where the private one is needed


def test_engines_built_on_the_device_keep_the_signature(signed: Path, keys) -> None:
    bundle = Bundle.load(signed)
    entry = {"file": "engines/fp32-x.plan", "variant": "fp32"}
    bundle.add_files({"engines/fp32-x.plan": b"plan"}, {"engines": [entry]})
    Bundle.load(signed, trusted_key=keys[1])


def _cli(*args: str | Path, prelude: str = "") -> subprocess.CompletedProcess[str]:
    code = f"{prelude}\nfrom mtl_edge.cli import main\nmain({[str(a) for a in args]!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_require_signature_on_the_device_commands(signed: Path, keys, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    photos = make_class_folders(tmp_path / "photos", ("red", "green"), per_class=2)
    common = ("-b", signed, "-g", tmp_path / "g", "--backend", "onnxruntime-cpu")
    ok = _cli("enroll", *common, "--from-folder", photos, "--require-signature", keys[1])
    assert ok.returncode == 0, ok.stderr
    rehash(signed, "backbone.onnx", tiny_onnx_bytes(seed=3))
    refused = _cli("predict", *common, photos / "red" / "0.jpg", "--require-signature", keys[1])
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "changed after signing" in refused.stderr and "Traceback" not in refused.stderr
    refused = _cli(
        "gallery", "reextract", tmp_path / "g", "-b", signed, "--require-signature", keys[1]
    )
    assert refused.returncode == 1 and "changed after signing" in refused.stderr


def test_without_cryptography_signing_is_one_line_with_exit_2(signed: Path, keys) -> None:
    blocked = "import sys; sys.modules['cryptography'] = None"
    result = _cli(
        "predict", "-b", signed, "-g", "x", "q.jpg", "--require-signature", keys[1],
        prelude=blocked,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "pip install 'mtl-edge[sign]'" in result.stderr
    info = _cli("info", "--json", prelude=blocked)
    assert json.loads(info.stdout)["signing"]["available"] is False


def test_export_sign_writes_a_verifiable_signature(keys, tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    from model_fixtures import tiny_checkpoint

    from mtl_edge.cli import main

    ckpt = tiny_checkpoint(tmp_path / "meta.pt")
    out = tmp_path / "bundle"
    with pytest.raises(SystemExit) as bad:
        main(["export", str(ckpt), "--out", str(out), "--sign", str(keys[1])])
    assert bad.value.code == 1 and not out.exists()  # a public key: refused before exporting
    with pytest.raises(SystemExit) as done:
        main(["export", str(ckpt), "--out", str(out), "--sign", str(keys[0]), "--json"])
    assert done.value.code in (0, None)
    doc = json.loads(capsys.readouterr().out)
    assert doc["report"]["signature"]["key_id"]
    Bundle.load(out, trusted_key=keys[1])
