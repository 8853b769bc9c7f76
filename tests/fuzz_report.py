"""The fuzz figures of issue 15: inputs tried, clean errors, tracebacks, hangs, peak memory,
classes lost. A bounded run anyone can repeat (not collected by pytest):

    .venv/bin/python tests/fuzz_report.py --examples 2000 --crash-rounds 320 --out report.json

Each fuzz target runs the properties of tests/fuzz_strategies.py in its own process (its peak
RSS is that target's peak memory); a watchdog counts a hang when a process makes no progress
for --hang-s seconds. Then the named bombs of the issue run one per process, and the kill -9
rounds of tests/test_gallery_crash.py count the classes lost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("images", "manifest-edits", "manifest-bytes", "gallery-bytes", "gallery-crafted")
BOMBS = (
    "png-1x1000000",
    "png-1x65000",
    "png-64mp",
    "fifo-image",
    "fifo-manifest",
    "manifest-steps-1e9",
    "gallery-deflate-4gib",
    "gallery-stored-claims-2gib",
)


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the
    process that started it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker(target: str, examples: int) -> None:
    """Run one fuzz target; print a progress line per 50 inputs and a JSON summary last."""
    sys.path.insert(0, str(HERE))
    import fuzz_strategies as fs
    from device_fixtures import make_bundle
    from hypothesis import HealthCheck, given, settings

    counts: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    slowest = 0.0
    tmp = Path(tempfile.mkdtemp(prefix="mtl-fuzz."))
    root = make_bundle(tmp / "bundle", meta_ways=3).root
    manifest = json.loads((root / "manifest.json").read_text())
    strategies = {
        "images": (fs.image_bytes, fs.check_image),
        "manifest-edits": (fs.edited_document(manifest), lambda d: fs.check_manifest(root, d)),
        "manifest-bytes": (
            fs.mutated_bytes((root / "manifest.json").read_bytes()),
            lambda d: fs.check_manifest(root, d),
        ),
        "gallery-bytes": (fs.mutated_bytes(fs.seed_gallery()), fs.check_gallery),
        "gallery-crafted": (fs.crafted_gallery(fs.seed_gallery()), fs.check_gallery),
    }
    strategy, check = strategies[target]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(value) -> None:
        nonlocal slowest
        t0 = time.perf_counter()
        try:
            counts[check(value)] += 1
        except Exception as e:  # noqa: BLE001 - counting contract violations is the point
            counts["traceback"] += 1
            kinds[f"{type(e).__name__}: {str(e)[:80]}"] += 1
            traceback.print_exc(limit=3, file=sys.stdout)
        slowest = max(slowest, time.perf_counter() - t0)
        if sum(counts.values()) % 50 == 0:
            print("progress", sum(counts.values()), flush=True)

    run()
    summary = {
        "tried": sum(counts.values()),
        "used": counts["ok"],
        "clean_errors": counts["refused"],
        "tracebacks": counts["traceback"],
        "traceback_kinds": dict(kinds),
        "slowest_input_s": round(slowest, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    print("summary " + json.dumps(summary), flush=True)


def _prepare_bomb(name: str, tmp: Path) -> Path:
    """Write the named hostile input under `tmp` (in the supervising process, so that making it
    does not count in the measured process's memory)."""
    sys.path.insert(0, str(HERE))
    from device_fixtures import make_bundle
    from hostile import edit_manifest, png_bytes

    path = tmp / name
    if name.startswith("png-"):
        sizes = {"png-1x1000000": (1, 1_000_000), "png-1x65000": (1, 65_000)}
        width, height = sizes.get(name, (8000, 8000))
        path.write_bytes(png_bytes(width, height, "RGB" if width > 1 else "L"))
    elif name == "fifo-image":
        os.mkfifo(path)
    elif name.startswith("manifest") or name == "fifo-manifest":
        root = make_bundle(path).root
        if name == "fifo-manifest":
            (root / "manifest.json").unlink()
            os.mkfifo(root / "manifest.json")
        else:
            edit_manifest(root, lambda m: m["head"].update(steps=1e9))
    else:
        path = _zip_bomb(tmp, name)
    return path


def _bomb(name: str, path: Path) -> None:
    """Use one prepared hostile input the way the device does; print the outcome as JSON."""
    from mtl_edge.bundle import Bundle
    from mtl_edge.errors import MtlEdgeError
    from mtl_edge.gallery import Gallery
    from mtl_edge.preprocess import Preprocess, decode_image, preprocess_image

    cfg = Preprocess(size=84)
    base_rss = _peak_rss_mb()
    if name.startswith(("png-", "fifo-image")):
        action = lambda: str(preprocess_image(decode_image(path), cfg).shape)  # noqa: E731
    elif name.startswith(("manifest", "fifo-manifest")):
        action = lambda: str(Bundle.load(path).head)  # noqa: E731
    else:
        action = lambda: f"{len(Gallery.load(path))} classes"  # noqa: E731
    t0 = time.perf_counter()
    try:
        outcome = f"used: {action()}"
    except MtlEdgeError as e:
        outcome = f"refused: {str(e)[:160]}"
    except Exception as e:  # noqa: BLE001 - counting contract violations is the point
        outcome = f"TRACEBACK {type(e).__name__}: {e}"
    summary = {
        "outcome": outcome,
        "seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_growth_mb": round(_peak_rss_mb() - base_rss, 1),
    }
    print("summary " + json.dumps(summary), flush=True)


def _zip_bomb(tmp: Path, name: str) -> Path:
    """A gallery zip holding a 4 GiB deflated member (about 4 MB), or a stored member whose
    directory entry claims 2 GiB."""
    import struct
    import zipfile

    path = tmp / f"{name}.gallery"
    if name == "gallery-deflate-4gib":
        info = zipfile.ZipInfo("features.npy")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zipfile.ZipFile(path, "w") as zf, zf.open(info, "w", force_zip64=True) as f:
            block = bytes(1 << 24)
            for _ in range(256):
                f.write(block)
        return path
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("features.npy", b"x" * 1000)
        zf.writestr("CHECKSUM", "0" * 64)
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")
    data[central + 20 : central + 28] = struct.pack("<II", 1 << 31, 1 << 31)
    path.write_bytes(bytes(data))
    return path


def _supervise(args: list[str], hang_s: float) -> tuple[dict, int, bool]:
    """Run this script with `args`; (its summary, stray stderr lines, whether it hung)."""
    import threading

    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=HERE.parent,
        )
        lines: list[str] = []
        last = [time.monotonic()]

        def read() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.append(line)
                last[0] = time.monotonic()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        hung = False
        while proc.poll() is None:
            if time.monotonic() - last[0] > hang_s:
                proc.kill()
                hung = True
            time.sleep(0.05)
        reader.join(timeout=10)
        err.seek(0)
        stray = [line for line in err.read().splitlines() if line.strip()]
    summary: dict = {}
    for line in lines:
        if line.startswith("summary "):
            summary = json.loads(line[len("summary ") :])
    return summary, len(stray), hung


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="inputs per fuzz target")
    parser.add_argument("--crash-rounds", type=int, default=100, help="kill -9 rounds")
    parser.add_argument("--hang-s", type=float, default=60.0, help="no progress for this long")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--bomb", help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args.worker, args.examples)
    if args.bomb:
        return _bomb(args.bomb, args.input)
    import platform

    import numpy
    import PIL

    report: dict = {
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "numpy": numpy.__version__,
        "examples_per_target": args.examples,
        "fuzz": {},
        "bombs": {},
    }
    t0 = time.perf_counter()
    for target in TARGETS:
        summary, stray, hung = _supervise(
            ["--worker", target, "--examples", str(args.examples)], args.hang_s
        )
        summary.update(stray_stderr_lines=stray, hangs=int(hung))
        report["fuzz"][target] = summary
        print(target, json.dumps(summary), flush=True)
    with tempfile.TemporaryDirectory(prefix="mtl-bombs.") as folder:
        for bomb in BOMBS:
            path = _prepare_bomb(bomb, Path(folder))
            summary, stray, hung = _supervise(["--bomb", bomb, "--input", str(path)], args.hang_s)
            summary.update(stray_stderr_lines=stray, hangs=int(hung))
            report["bombs"][bomb] = summary
            print(bomb, json.dumps(summary), flush=True)
    sys.path.insert(0, str(HERE))
    from test_gallery_crash import crash_rounds

    with tempfile.TemporaryDirectory(prefix="mtl-crash.") as folder:
        t1 = time.perf_counter()
        crash = crash_rounds(Path(folder), args.crash_rounds)
        crash["seconds"] = round(time.perf_counter() - t1, 1)
    report["kill_9"] = crash
    print("kill_9", json.dumps(crash), flush=True)
    fuzz = report["fuzz"].values()
    report["totals"] = {
        "inputs_tried": sum(f.get("tried", 0) for f in fuzz),
        "clean_errors": sum(f.get("clean_errors", 0) for f in fuzz),
        "used": sum(f.get("used", 0) for f in fuzz),
        "tracebacks": sum(f.get("tracebacks", 0) for f in fuzz),
        "hangs": sum(f.get("hangs", 0) for f in [*fuzz, *report["bombs"].values()]),
        "stray_stderr_lines": sum(f.get("stray_stderr_lines", 0) for f in fuzz),
        "peak_rss_mb": max(f.get("peak_rss_mb", 0) for f in [*fuzz, *report["bombs"].values()]),
        "classes_lost": crash["lost"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print("totals", json.dumps(report["totals"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
