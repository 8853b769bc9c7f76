"""Optional Ed25519 signatures of model bundles, through the `cryptography` package.

For bundles shipped to devices that someone else can reach: the workstation signs the bundle's
`model_id` (which covers the whole manifest and every file hash, `mtl_edge.manifest`) with its
private key (`mtl-edge export ... --sign KEY`), and the device, given the trusted public key
(`--require-signature KEY.pub`), refuses a bundle that is unsigned, signed by another key, or
changed after signing. The signature lives in `signature.json` beside the manifest:

    {"schema": "mtl-edge.signature", "version": 1, "algorithm": "ed25519",
     "model_id": <hex>, "public_key": <hex of the 32 raw bytes>, "signature": <hex>}

The signed message is `b"mtl-edge.bundle.v1:" + model_id`. Keys are PEM (PKCS#8 private,
SubjectPublicKeyInfo public) or OpenSSH files; `openssl genpkey -algorithm ed25519` makes one.
`cryptography` is imported only here and only when signing is used, so the plain `[cpu]`
install works without it; asking for signing there is one line with exit code 2.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtl_edge.atomicio import atomic_write_bytes, atomic_write_json
from mtl_edge.errors import BundleError, ConfigError, UnavailableError
from mtl_edge.jsonfile import read_json_document
from mtl_edge.manifest import SIGNATURE
from mtl_edge.safefile import read_regular

if TYPE_CHECKING:
    from mtl_edge.bundle import Bundle

SIGNATURE_SCHEMA = "mtl-edge.signature"
SIGNATURE_VERSION = 1
MESSAGE_PREFIX = b"mtl-edge.bundle.v1:"
MAX_KEY_BYTES = 64 * 1024


def _crypto() -> Any:
    """(ed25519 module, serialization module, the errors a key loader raises on a file of
    another kind), or UnavailableError (exit 2) when `cryptography` is missing."""
    try:
        from cryptography import exceptions
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise UnavailableError(
            "bundle signing needs the 'cryptography' package, which is not installed here; "
            "pip install 'mtl-edge[sign]'"
        ) from None
    return ed25519, serialization, (ValueError, exceptions.UnsupportedAlgorithm)


def signing_available() -> str | None:
    """None when signing works here, else the reason (for `mtl-edge info`)."""
    try:
        _crypto()
    except UnavailableError as e:
        return str(e)
    return None


def _raw_public(key: Any) -> bytes:
    _, serialization, _ = _crypto()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(raw_public: bytes) -> str:
    """A short name of a public key: the first 16 hex digits of sha256 of its raw bytes."""
    return hashlib.sha256(raw_public).hexdigest()[:16]


def load_private_key(path: str | Path) -> Any:
    """The Ed25519 private key in a PEM (PKCS#8) or OpenSSH file (not password protected).

    Raises:
        ConfigError: missing, unreadable, encrypted, or not an Ed25519 private key.
        UnavailableError: `cryptography` is not installed.
    """
    ed25519, serialization, errors = _crypto()
    fix = "give an Ed25519 private key (openssl genpkey -algorithm ed25519 -out KEY)"
    data = read_regular(path, MAX_KEY_BYTES, ConfigError, fix)
    loaders = (serialization.load_pem_private_key, serialization.load_ssh_private_key)
    for load in loaders:
        try:
            key = load(data, password=None)
        except TypeError:
            raise ConfigError(f"{path}: the key is password protected; {fix}") from None
        except errors:
            continue
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key
        raise ConfigError(f"{path}: not an Ed25519 key ({type(key).__name__}); {fix}")
    raise ConfigError(f"{path}: not a PEM or OpenSSH private key; {fix}")


def load_public_key(path: str | Path) -> Any:
    """The Ed25519 public key in a PEM or OpenSSH (`ssh-ed25519 ...`) file.

    Raises:
        ConfigError: missing, unreadable or not an Ed25519 public key.
        UnavailableError: `cryptography` is not installed.
    """
    ed25519, serialization, errors = _crypto()
    fix = "give the Ed25519 public key the bundles are signed with (PEM or ssh-ed25519)"
    data = read_regular(path, MAX_KEY_BYTES, ConfigError, fix)
    for load in (serialization.load_pem_public_key, serialization.load_ssh_public_key):
        try:
            key = load(data)
        except errors:
            continue
        if isinstance(key, ed25519.Ed25519PublicKey):
            return key
        raise ConfigError(f"{path}: not an Ed25519 key ({type(key).__name__}); {fix}")
    raise ConfigError(f"{path}: not a PEM or OpenSSH public key; {fix}")


def generate_keypair(private_path: str | Path, public_path: str | Path) -> str:
    """Write a new Ed25519 key pair as PEM files (private one readable by the owner only).

    Returns:
        the public key's `key_id`.
    """
    ed25519, serialization, _ = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write_bytes(private_path, private)
    Path(private_path).chmod(0o600)
    atomic_write_bytes(public_path, public)
    return key_id(_raw_public(key.public_key()))


def sign_bundle(path: str | Path, key: str | Path) -> dict[str, Any]:
    """Sign an already written bundle folder with the private key file `key`.

    The bundle is loaded and verified first (every hash), then `signature.json` is written
    atomically; signing again replaces it.

    Returns:
        the signature document.
    """
    from mtl_edge.bundle import Bundle

    private = load_private_key(key)
    bundle = Bundle.load(path)
    model_id = bundle.model_id
    raw = _raw_public(private.public_key())
    doc = {
        "schema": SIGNATURE_SCHEMA,
        "version": SIGNATURE_VERSION,
        "algorithm": "ed25519",
        "model_id": model_id,
        "public_key": raw.hex(),
        "key_id": key_id(raw),
        "signature": private.sign(MESSAGE_PREFIX + model_id.encode()).hex(),
    }
    atomic_write_json(bundle.root / SIGNATURE, doc)
    return doc


def _hex(doc: dict[str, Any], field: str, size: int, path: Path) -> bytes:
    value = doc.get(field)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise BundleError(f"{path}: {field} is not {size} bytes of hex; sign the bundle again")
    return raw


def verify_bundle(bundle: Bundle, trusted_key: str | Path) -> str:
    """Check that `bundle` (already hash-verified) carries a valid signature by `trusted_key`.

    Returns:
        the signing key's `key_id`.

    Raises:
        BundleError: unsigned, signed by another key, or changed after signing.
        ConfigError: the trusted key file is not an Ed25519 public key.
        UnavailableError: `cryptography` is not installed.
    """
    trusted = load_public_key(trusted_key)  # UnavailableError first when cryptography is absent
    from cryptography.exceptions import InvalidSignature

    path = bundle.root / SIGNATURE
    doc = read_json_document(
        path,
        BundleError,
        what="bundle signature",
        schema=SIGNATURE_SCHEMA,
        version=SIGNATURE_VERSION,
        missing="missing: the bundle is not signed; sign it with `mtl-edge export ... --sign "
        "KEY`, or drop --require-signature",
        fix="sign the bundle again",
        max_bytes=MAX_KEY_BYTES,
    )
    if doc.get("algorithm") != "ed25519":
        raise BundleError(f"{path}: algorithm {str(doc.get('algorithm'))[:20]!r}, not ed25519")
    raw = _hex(doc, "public_key", 32, path)
    signature = _hex(doc, "signature", 64, path)
    trusted_raw = _raw_public(trusted)
    if raw != trusted_raw:
        raise BundleError(
            f"{path}: signed by key {key_id(raw)}, not by the trusted key {key_id(trusted_raw)} "
            f"({trusted_key}); get the bundle from its publisher or trust the right key"
        )
    model_id = bundle.model_id
    try:
        trusted.verify(signature, MESSAGE_PREFIX + model_id.encode())
    except InvalidSignature:
        raise BundleError(
            f"{path}: the signature does not match this bundle (model_id {model_id[:12]}): it "
            "was changed after signing; copy the bundle again from its publisher"
        ) from None
    return key_id(raw)
