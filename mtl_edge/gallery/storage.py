"""The gallery file: format, checksum, validation on load, atomic save, `.prev`, lock, restore.

A gallery is one file (schema "mtl-edge.gallery", version 2; version 1 is still read): a zip of
uncompressed (stored) members

    gallery.json          classes (name, count, optional source paths + sha256), the bundle's
                          model_id and variant, head recipe, threshold, generation counter
    features.npy          stored features of shape (M, D), float16 or float32
    labels.npy            int32 class index of each row, shape (M,)
    head_weight.npy       fitted head (ways, D) float32 and head_bias.npy (ways,)
    meta_init_*.npy       the bundle's meta-learned head init, when it has one
    CHECKSUM              sha256 over every other member (name and bytes), in a fixed order

Reading trusts nothing: the file must be a regular file of at most MAX_GALLERY_BYTES; the zip
directory is checked before any member is read (known names only, each once, stored, not
encrypted, sizes within the file and within their limits); arrays are parsed without trusting
their headers (`mtl_edge.npyfile`); then `validate.build_gallery` checks every field.

Safety: every save writes a temporary sibling, fsyncs it and renames it over the file
(`mtl_edge.atomicio.atomic_write`), so a crash leaves the old gallery or the new one. Before the
rename the current file is hard-linked to `<name>.prev` (the previous generation). A damaged
file fails with a message that names the `.prev` copy and the restore command. `edit_gallery`
holds `mtl_edge.atomicio.file_lock(<name>.lock)` around the whole load-modify-save, so two
processes enrolling into one gallery never lose each other's classes. `restore_previous` keeps
the file it replaces under a unique name and refuses a healthy gallery unless forced.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from mtl_edge.atomicio import atomic_write, file_lock, fsync_dir
from mtl_edge.errors import GalleryError, one_line, shown
from mtl_edge.gallery.calibration import DEFAULT_REJECTION
from mtl_edge.gallery.state import Gallery, now
from mtl_edge.gallery.validate import Invalid, build_gallery
from mtl_edge.jsonfile import parse_json
from mtl_edge.npyfile import npy_bytes
from mtl_edge.safefile import read_regular

GALLERY_SCHEMA = "mtl-edge.gallery"
GALLERY_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: Seconds to pause halfway through writing a gallery: a test hook that lets a crash test kill
#: the process mid-save. Unset in normal use.
SAVE_PAUSE_ENV = "MTL_EDGE_GALLERY_SAVE_PAUSE"
MAX_GALLERY_BYTES = 1 << 30
MAX_DOC_BYTES = 64 << 20
#: The only members a gallery may hold.
MEMBERS = (
    "gallery.json",
    "features.npy",
    "labels.npy",
    "head_weight.npy",
    "head_bias.npy",
    "meta_init_weight.npy",
    "meta_init_bias.npy",
    "CHECKSUM",
)
_MAX_EXTRACT_VERSION = 63
_CHECKSUM_RE = re.compile(rb"^[0-9a-f]{64}\n?$")


class _Corrupt(Exception):
    """Internal: the file's bytes are damaged; `load` turns it into a GalleryError."""


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def prev_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def members_checksum(members: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(members):
        h.update(name.encode() + b"\0" + len(members[name]).to_bytes(8, "little"))
        h.update(members[name])
    return h.hexdigest()


# --------------------------------------------------------------------------------- writing


def _members(g: Gallery) -> dict[str, bytes]:
    if g.classes and g.head is None:
        g.fit()
    x = [c.features for c in g.classes.values()]
    features = np.concatenate(x) if x else np.zeros((0, g.feature_dim), g.feature_dtype)
    _, labels = g.features_and_labels()
    members = {
        "features.npy": npy_bytes(features.astype(g.feature_dtype)),
        "labels.npy": npy_bytes(labels.astype(np.int32)),
    }
    if g.head is not None:
        members["head_weight.npy"] = npy_bytes(g.head.weight.astype(np.float32))
        members["head_bias.npy"] = npy_bytes(g.head.bias.astype(np.float32))
    if g.meta_init is not None:
        members["meta_init_weight.npy"] = npy_bytes(g.meta_init[0].astype(np.float32))
        members["meta_init_bias.npy"] = npy_bytes(g.meta_init[1].astype(np.float32))
    doc = {
        "schema": GALLERY_SCHEMA,
        "schema_version": GALLERY_VERSION,
        "model_id": g.model_id,
        "model_id_format": g.model_id_format,
        "variant": g.variant,
        "backbone": g.backbone,
        "feature_dim": g.feature_dim,
        "feature_dtype": g.feature_dtype,
        "recipe": g.recipe.to_dict(),
        "classes": [
            {"name": c.name, "count": len(c.features), "sources": c.sources}
            for c in g.classes.values()
        ],
        "head": None if g.head is None else {"normalize": g.head.normalize, "init": g.head.init},
        "threshold": _threshold_doc(g),
        "generation": g.generation,
        "created": g.created,
        "modified": now(),
    }
    members["gallery.json"] = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode()
    return members


def _threshold_doc(g: Gallery) -> dict[str, object]:
    doc = {"value": g.threshold, "mode": g.threshold_mode, "calibration": g.calibration}
    if g.rejection != DEFAULT_REJECTION:
        # written only when set, so that a "probability" gallery stays readable by mtl-edge
        # versions from before rejection rules
        doc["rejection"] = g.rejection
    return doc


def gallery_bytes(g: Gallery) -> bytes:
    """The gallery file's content (see the module docstring); fits the head if needed."""
    members = _members(g)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(members):
            zf.writestr(name, members[name])
        zf.writestr("CHECKSUM", members_checksum(members) + "\n")
    return buf.getvalue()


def _pause() -> float:
    try:
        return max(0.0, float(os.environ.get(SAVE_PAUSE_ENV, "0") or 0))
    except ValueError:
        return 0.0


def save(g: Gallery, path: Path) -> None:
    """Write atomically, keeping the current file as `<path>.prev`. Call it under the lock."""
    g.generation += 1
    data = gallery_bytes(g)
    _remove_stale_temps(path)
    if path.exists():
        _keep_previous(path)
    pause = _pause()

    def write(f: IO[bytes]) -> None:
        half = len(data) // 2
        f.write(data[:half])
        if pause > 0:
            f.flush()
            time.sleep(pause)
        f.write(data[half:])

    atomic_write(path, write)


def _keep_previous(path: Path) -> None:
    """Make `<path>.prev` the current file (hard link, or a copy where links fail), atomically."""
    prev = prev_path(path)
    if prev.exists() and os.path.samefile(path, prev):
        # Already linked (a save after a crashed one); rename() between two links of one file
        # would do nothing and leave the temporary name behind.
        return
    tmp = path.with_name(f".{prev.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, prev)
    fsync_dir(path.parent)


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files a crashed save left behind (safe: the caller holds the lock)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


# --------------------------------------------------------------------------------- reading


def _read_members(data: bytes) -> dict[str, bytes]:
    """The members of a gallery zip, its directory checked before any member is read."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - zipfile raises many types on damaged bytes
        raise _Corrupt(f"not a readable gallery file ({type(e).__name__}: {one_line(e)})") from None
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        unknown = sorted(set(names) - set(MEMBERS))
        if unknown or len(names) != len(set(names)):
            name = shown(unknown[0]) if unknown else "a repeated name"
            raise _Corrupt(f"unexpected member {name}")
        total = 0
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise _Corrupt(
                    f"member {info.filename} is compressed (method {info.compress_type}); the "
                    "format stores members uncompressed"
                )
            if info.flag_bits & 0x1:
                raise _Corrupt(f"member {info.filename} is marked encrypted")
            if info.extract_version > _MAX_EXTRACT_VERSION:
                raise _Corrupt(f"member {info.filename} needs zip version {info.extract_version}")
            limit = 128 if info.filename == "CHECKSUM" else MAX_DOC_BYTES
            if info.file_size != info.compress_size or (
                info.filename in ("CHECKSUM", "gallery.json") and info.file_size > limit
            ):
                raise _Corrupt(f"member {info.filename} has an impossible size")
            total += info.file_size
        if total > len(data):
            raise _Corrupt("its members are larger than the file")
        try:
            return {i.filename: zf.read(i) for i in infos}
        except Exception as e:  # noqa: BLE001 - zipfile: bad CRC, bad local header, EOF, ...
            raise _Corrupt(f"a member is damaged ({type(e).__name__}: {one_line(e)})") from None


def parse(data: bytes, name: str = "<gallery>") -> Gallery:
    """Parse and validate a gallery file's content.

    Raises:
        GalleryError: not a gallery, damaged, invalid, or of another format version (the
            message starts with `name`).
    """
    try:
        return _parse(data, name)
    except _Corrupt as e:
        raise GalleryError(f"{name}: corrupt gallery ({e})") from None
    except Invalid as e:
        raise GalleryError(f"{name}: invalid gallery ({e})") from None


def _parse(data: bytes, name: str) -> Gallery:
    if len(data) > MAX_GALLERY_BYTES:
        raise _Corrupt(f"{len(data)} bytes, over the limit of {MAX_GALLERY_BYTES}")
    members = _read_members(data)
    stored = members.pop("CHECKSUM", b"")
    if not _CHECKSUM_RE.match(stored):
        raise _Corrupt("no valid CHECKSUM member")
    if members_checksum(members) != stored.decode().strip():
        raise _Corrupt("checksum mismatch: the file was modified or damaged")
    if "gallery.json" not in members:
        raise _Corrupt("no gallery.json member")
    try:
        doc = parse_json(members["gallery.json"])
    except ValueError as e:
        raise Invalid(f"bad gallery.json ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != GALLERY_SCHEMA:
        raise GalleryError(f"{name}: not an mtl-edge gallery")
    version = doc.get("schema_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise GalleryError(
            f"{name}: gallery format version {shown(version)}, this mtl-edge reads "
            f"{READABLE_VERSIONS[0]}-{READABLE_VERSIONS[-1]}; upgrade mtl-edge or re-enroll"
        )
    return build_gallery(doc, members)


def _restore_hint(path: Path) -> str:
    prev = prev_path(path)
    try:
        parse(read_regular(prev, MAX_GALLERY_BYTES, GalleryError, ""))
    except GalleryError:
        return "no good previous copy exists; re-enroll the classes"
    return f"the previous good copy is {prev}: restore it with `mtl-edge gallery restore {path}`"


def load(path: Path, model_id: str | None = None, variant: str | None = None) -> Gallery:
    """Read and validate a gallery file.

    Args:
        model_id: when given, refuse a gallery built with another bundle.
        variant: when given, refuse a gallery whose features another variant extracted.

    Raises:
        GalleryError: missing, not a regular file, damaged or invalid (names the .prev copy and
            how to restore it), or built with another model or variant.
    """
    data = read_regular(
        path,
        MAX_GALLERY_BYTES,
        GalleryError,
        "--gallery takes a gallery file",
        missing=f"no such gallery; create it with `mtl-edge enroll --gallery {path} ...`",
    )
    try:
        gallery = _parse(data, str(path))
    except _Corrupt as e:
        raise GalleryError(f"{path}: corrupt gallery ({e}); {_restore_hint(path)}") from None
    except Invalid as e:
        raise GalleryError(f"{path}: invalid gallery ({e}); {_restore_hint(path)}") from None
    reextract = f"`mtl-edge gallery reextract {path} --bundle BUNDLE`"
    if model_id is not None and gallery.model_id != model_id:
        if gallery.model_id_format < 2:
            raise GalleryError(
                f"{path}: made by an older mtl-edge, which identified bundles differently; "
                f"re-extract its stored images with {reextract} (or re-enroll)"
            )
        raise GalleryError(
            f"{path}: built with another model (model_id {gallery.model_id[:12]}, this "
            f"bundle's is {model_id[:12]}); use the bundle it was built with, or re-extract "
            f"its stored images with {reextract}"
        )
    if variant is not None:
        require_variant(gallery, variant, path)
    return gallery


def require_variant(gallery: Gallery, variant: str, path: Path) -> None:
    """Refuse features of `variant` for a gallery whose stored ones another variant made."""
    if gallery.variant not in (None, variant):
        raise GalleryError(
            f"{path}: its features come from the {gallery.variant!r} variant, this run uses "
            f"{variant!r}; pass --precision {gallery.variant}, or re-extract it with "
            f"`mtl-edge gallery reextract {path} --bundle BUNDLE --precision {variant}`"
        )


@contextlib.contextmanager
def edit_gallery(
    path: str | Path,
    new: Gallery | None = None,
    model_id: str | None = None,
    timeout_s: float = 60.0,
    variant: str | None = None,
) -> Iterator[Gallery]:
    """Lock, load (or start from `new` when the file does not exist), yield, refit, save.

    An exception inside the block saves nothing. The head is refitted before saving when the
    block changed the classes.

    Raises:
        GalleryError: no file and no `new`, or the file is damaged, invalid, or from another
            model or variant.
    """
    path = Path(path)
    with file_lock(lock_path(path), timeout_s=timeout_s):
        if os.path.lexists(path):
            gallery = load(path, model_id, variant)
        elif new is not None:
            gallery = new
        else:
            raise GalleryError(f"{path}: no such gallery")
        yield gallery
        if gallery.classes and gallery.head is None:
            gallery.fit()
        save(gallery, path)


def _set_aside(path: Path, tag: str) -> Path:
    """Keep the file at `path` under a new, unique name beside it (never overwriting one)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        aside = path.with_name(f"{path.name}.{tag}-{stamp}-{time.time_ns() % 10**9:09d}-{n}")
        try:
            os.link(path, aside)
            return aside
        except FileExistsError:
            continue
        except OSError:  # no hard links here (FAT): reserve the name, then move the file
            try:
                os.close(os.open(aside, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                continue
            os.replace(path, aside)
            return aside
    raise GalleryError(f"{path}: cannot find a free name to keep the current file; clean up")


def restore_previous(path: str | Path, force: bool = False) -> Path:
    """Put `<path>.prev` back in place of a damaged gallery; the replaced file is kept aside.

    Args:
        force: also replace a gallery that loads fine (rolling it back one generation).

    Returns:
        where the replaced file is kept (`<path>.damaged-...` or `<path>.replaced-...`, a
        unique name), or the path itself if there was no file.

    Raises:
        GalleryError: no previous copy, it is damaged too, or the gallery is healthy and not
            `force`.
    """
    path = Path(path)
    prev = prev_path(path)
    with file_lock(lock_path(path)):
        data = read_regular(
            prev, MAX_GALLERY_BYTES, GalleryError, "", missing="no previous copy to restore"
        )
        try:
            previous = parse(data, str(prev))
        except GalleryError as e:
            raise GalleryError(f"{prev}: the previous copy is damaged too ({e})") from None
        if not os.path.lexists(path):
            atomic_write(path, lambda f: f.write(data))
            return path
        if not path.is_file() or path.is_symlink():
            raise GalleryError(f"{path}: is not a regular file; move it away, then restore")
        try:
            current = load(path)
        except GalleryError:
            tag = "damaged"
        else:
            if not force:
                raise GalleryError(
                    f"{path}: is healthy (generation {current.generation}, {len(current)} "
                    f"classes); restoring would roll it back to generation "
                    f"{previous.generation}; pass --force to do it anyway"
                )
            tag = "replaced"
        aside = _set_aside(path, tag)
        atomic_write(path, lambda f: f.write(data))
        return aside
