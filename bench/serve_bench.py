"""`mtl-edge bench serve`: a bounded loopback load on `mtl-edge serve`, batching off and on.

Each round of a mode (rounds run in A B B A order against drifts in the machine's load) uses a
fresh server process (`mtl-edge serve --port 0`, its own gallery file) is seeded
with `seed_classes` classes, warmed up, then loaded for `duration_s` by `clients` concurrent
predict clients (one photo per request, back to back) and one enroll client that adds a new
class of `enroll_images` photos every `enroll_interval_s` (a fixed cadence, so both modes carry
the same enrollment work). Every request is bounded by the deadline and a timeout; the load
only ever targets 127.0.0.1.

Per mode: predict throughput, p50 / p90 / p99 latency, enroll latency, errors by status, the
classes acknowledged (201) and how many of them the gallery file lacks after the server stops
("classes lost"), images per backend run (from the server's Prometheus metrics over the load
window), stage means, top-1 agreement of the predictions with the photos' true classes, and the
CPU seconds of server and load generator (they share the machine's cores).

Before the rounds, the backend alone (`backend_ceiling`: same backend, precision and threads, in
this process, no server) is timed per image at batch 1 and at `max_batch`: the most that
batching can save inside the backend, and so the bound on the served throughput ratio.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtl_edge.errors import ConfigError, DatasetError
from mtl_edge.serve.server import LISTENING

if TYPE_CHECKING:
    from mtl_edge.bundle import Bundle

log = logging.getLogger(__name__)

TOKEN = "bench-serve-token-0123456789"
STAGES = ("decode", "queue", "extract", "head", "commit")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class ServeBenchConfig:
    bundle: Path
    images: Path | None = None  # class folders of real photos; None: synthetic images
    backend: str = "onnxruntime-cpu"
    precision: str = "int8"
    threads: int | None = None
    clients: int = 16
    duration_s: float = 30.0
    warmup_s: float = 3.0
    enroll_interval_s: float = 2.0
    enroll_images: int = 3
    seed_classes: int = 4
    shots: int = 5
    max_batch: int = 16
    max_delay_ms: float = 2.0
    modes: tuple[str, ...] = ("off", "on")
    rounds: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.clients, self.rounds, self.shots, self.enroll_images) < 1 or (
            self.duration_s <= 0 or self.seed_classes < 2
        ):
            raise ConfigError(
                "bench serve: need --clients, --rounds, --shots >= 1, --duration > 0 and "
                "--seed-classes >= 2"
            )
        bad = [m for m in self.modes if m not in ("off", "on")]
        if bad or not self.modes:
            raise ConfigError(f"--modes {','.join(self.modes)}: use off, on or off,on")


@dataclass
class Photos:
    """Encoded photos: per seed class, `shots` to enroll and the rest as queries; more classes
    (or synthetic ones) feed the enroll client."""

    seed: list[tuple[str, list[bytes]]]
    queries: list[tuple[int, bytes]]  # (index of the seed class, photo)
    extra: list[list[bytes]]
    source: str


def _synthetic(n: int, rng: np.random.Generator, size: int = 84) -> list[bytes]:
    from PIL import Image

    base = rng.integers(0, 256, size=3)
    out = []
    for _ in range(n):
        arr = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def load_photos(cfg: ServeBenchConfig, per_class: int = 25) -> Photos:
    """Photos from `cfg.images` (sorted class folders), else synthetic ones.

    Raises:
        DatasetError: too few class folders or photos.
    """
    rng = np.random.default_rng(cfg.seed)
    if cfg.images is None:
        classes = [_synthetic(per_class, rng) for _ in range(cfg.seed_classes + 8)]
        names = [f"synthetic-{i}" for i in range(len(classes))]
        source = "synthetic (random colour + noise JPEGs, 84x84)"
    else:
        folders = (
            sorted(p for p in cfg.images.iterdir() if p.is_dir()) if cfg.images.is_dir() else []
        )
        if len(folders) < cfg.seed_classes + 1:
            raise DatasetError(
                f"--images {cfg.images}: needs more than {cfg.seed_classes} class folders "
                "(--seed-classes)"
            )
        classes, names = [], []
        for folder in folders:
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if len(files) < cfg.shots + 1:
                raise DatasetError(f"{folder}: needs more than {cfg.shots} photos (--shots)")
            classes.append([p.read_bytes() for p in files[:per_class]])
            names.append(folder.name)
        source = f"{cfg.images} ({len(folders)} class folders)"
    seed = [(names[i], classes[i][: cfg.shots]) for i in range(cfg.seed_classes)]
    queries = [(i, q) for i in range(cfg.seed_classes) for q in classes[i][cfg.shots :]]
    return Photos(seed, queries, classes[cfg.seed_classes :], source)


# ------------------------------------------------------------------------- server


def start_server(cfg: ServeBenchConfig, mode: str, gallery: Path) -> tuple[subprocess.Popen, str]:
    """`mtl-edge serve` on 127.0.0.1, a free port; returns the process and its URL."""
    args = [sys.executable, "-m", "mtl_edge.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
    args += ["--bundle", str(cfg.bundle), "--gallery", str(gallery), "--backend", cfg.backend]
    args += ["--precision", cfg.precision, "--max-batch", str(cfg.max_batch)]
    args += ["--max-delay-ms", str(cfg.max_delay_ms), "--max-queue", str(4 * cfg.clients + 64)]
    args += ["--batching" if mode == "on" else "--no-batching"]
    if cfg.threads is not None:
        args += ["--threads", str(cfg.threads)]
    env = {**os.environ, "MTL_EDGE_SERVE_TOKEN": TOKEN}
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        match = re.match(re.escape(LISTENING) + r"(\S+)", line)
        if match:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, match.group(1)
    proc.wait()
    raise ConfigError("bench serve: the server did not start:\n" + "".join(seen[-20:]))


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a running process (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def window_sums(before: dict, after: dict) -> dict[str, float]:
    """Backend runs, images and stage seconds / counts between two scrapes."""

    def delta(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    sums = {
        "backend_runs": delta("mtl_edge_batch_size_count"),
        "backend_images": delta("mtl_edge_batch_size_sum"),
    }
    for stage in STAGES:
        key = (("stage", stage),)
        sums[f"{stage}_s"] = delta("mtl_edge_stage_seconds_sum", key)
        sums[f"{stage}_n"] = delta("mtl_edge_stage_seconds_count", key)
    return sums


# --------------------------------------------------------------------------- load


async def _load(url: str, cfg: ServeBenchConfig, photos: Photos, mode: str, seconds: float,
                record: bool) -> dict[str, Any]:  # fmt: skip
    """Run the clients for `seconds`; the requests' outcomes when `record`."""
    import httpx

    headers = {"Authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(
        max_connections=cfg.clients + 2, max_keepalive_connections=cfg.clients + 2
    )
    rng = np.random.default_rng(cfg.seed + (1 if mode == "on" else 0))
    predicts: list[tuple[float, int, bool]] = []  # (latency s, status, top-1 correct)
    enrolls: list[tuple[float, int, str]] = []
    names = [n for n, _ in photos.seed]
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as client:

        async def predictor(c: int) -> None:
            order = rng.permutation(len(photos.queries))
            i = c
            while time.perf_counter() < deadline:
                truth, data = photos.queries[int(order[i % len(order)])]
                i += cfg.clients
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        "/v1/predict", files=[("files", ("q.jpg", data, "image/jpeg"))]
                    )
                    status = r.status_code
                    label = r.json()["predictions"][0]["label"] if status == 200 else None
                except httpx.HTTPError:
                    status, label = -1, None
                if record:
                    predicts.append((time.perf_counter() - t0, status, label == names[truth]))

        async def enroller() -> None:
            n = 0
            while time.perf_counter() < deadline:
                images = photos.extra[n % len(photos.extra)][: cfg.enroll_images]
                name = f"load-{mode}-{'w' if not record else 'm'}{n}"
                n += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        f"/v1/classes/{name}/images",
                        files=[
                            ("files", (f"{k}.jpg", d, "image/jpeg")) for k, d in enumerate(images)
                        ],
                        headers=headers,
                    )
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                if record:
                    enrolls.append((time.perf_counter() - t0, status, name))
                await asyncio.sleep(max(0.0, cfg.enroll_interval_s - (time.perf_counter() - t0)))

        start = time.perf_counter()
        tasks = [predictor(c) for c in range(cfg.clients)]
        if cfg.enroll_interval_s > 0:
            tasks.append(enroller())
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {"predicts": predicts, "enrolls": enrolls, "elapsed_s": elapsed}


def _latency(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "mean_ms": None}
    ms = 1e3 * np.asarray(values)
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def _wait_healthy(c: Any) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if c.get("/v1/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise ConfigError("bench serve: the server did not answer /v1/health in 120 s")


def run_round(cfg: ServeBenchConfig, mode: str, photos: Photos, gallery: Path) -> dict[str, Any]:
    """One server on a fresh gallery, seeded, warmed up, loaded, stopped: the raw outcomes."""
    import httpx

    from mtl_edge.gallery import Gallery

    for stale in gallery.parent.glob(gallery.name + "*"):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    proc, url = start_server(cfg, mode, gallery)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            _wait_healthy(c)
            for name, images in photos.seed:
                files = [("files", (f"{k}.jpg", d, "image/jpeg")) for k, d in enumerate(images)]
                r = c.post(f"/v1/classes/{name}/images", files=files, headers=headers)
                if r.status_code != 201:
                    raise ConfigError(f"bench serve: seeding {name!r} failed: {r.text}")
            asyncio.run(_load(url, cfg, photos, mode, cfg.warmup_s, record=False))
            before = scrape(c.get("/metrics").text)
            cpu0, client0 = cpu_seconds(proc.pid), time.process_time()
            load = asyncio.run(_load(url, cfg, photos, mode, cfg.duration_s, record=True))
            load["server_cpu_s"] = cpu_seconds(proc.pid) - cpu0
            load["client_cpu_s"] = time.process_time() - client0
            load["window"] = window_sums(before, scrape(c.get("/metrics").text))
    finally:
        stop_server(proc)
    saved = set(Gallery.load(gallery).class_names)  # what a restart would serve
    acknowledged = [n for n, _ in photos.seed]
    acknowledged += [name for _, status, name in load["enrolls"] if status == 201]
    load["acknowledged"] = len(acknowledged)
    load["lost"] = sorted(n for n in acknowledged if n not in saved)
    return load


def summarize(mode: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's rounds pooled: requests over summed time, percentiles over all requests."""
    predicts = [p for r in rounds for p in r["predicts"]]
    enrolls = [e for r in rounds for e in r["enrolls"]]
    elapsed = sum(r["elapsed_s"] for r in rounds)
    ok = [(lat, correct) for lat, status, correct in predicts if status == 200]
    statuses: dict[str, int] = {}
    for _, status, _ in predicts + enrolls:
        if status not in (200, 201):
            statuses[str(status)] = statuses.get(str(status), 0) + 1
    window = {k: sum(r["window"][k] for r in rounds) for k in rounds[0]["window"]}
    server_cpu = sum(r["server_cpu_s"] for r in rounds)
    runs = window["backend_runs"]
    return {
        "mode": mode,
        "batching": mode == "on",
        "rounds": len(rounds),
        "elapsed_s": elapsed,
        "predict": {
            "requests": len(predicts),
            "ok": len(ok),
            "throughput_rps": len(ok) / elapsed,
            "per_server_cpu_s": len(ok) / server_cpu if server_cpu > 0 else None,
            "top1_agreement": float(np.mean([c for _, c in ok])) if ok else None,
            **_latency([lat for lat, _ in ok]),
        },
        "enroll": {
            "requests": len(enrolls),
            "ok": sum(1 for _, status, _ in enrolls if status == 201),
            **_latency([lat for lat, status, _ in enrolls if status == 201]),
        },
        "errors": sum(statuses.values()),
        "errors_by_status": statuses,
        "classes_acknowledged": sum(r["acknowledged"] for r in rounds),
        "classes_lost": sum(len(r["lost"]) for r in rounds),
        "lost": [n for r in rounds for n in r["lost"]],
        "server_cpu_s": server_cpu,
        "client_cpu_s": sum(r["client_cpu_s"] for r in rounds),
        "backend_runs": int(runs),
        "images_per_run": window["backend_images"] / runs if runs else None,
        "stage_mean_ms": {
            s: 1e3 * window[f"{s}_s"] / window[f"{s}_n"] if window[f"{s}_n"] else None
            for s in STAGES
        },
        "per_round": [
            {
                "throughput_rps": sum(1 for _, st, _ in r["predicts"] if st == 200)
                / r["elapsed_s"],
                "server_cpu_s": r["server_cpu_s"],
                "images_per_run": r["window"]["backend_images"] / r["window"]["backend_runs"]
                if r["window"]["backend_runs"]
                else None,
            }
            for r in rounds
        ],
    }


def order_of(modes: tuple[str, ...], rounds: int) -> list[str]:
    """Modes in A B B A ... order, so that a drift in the machine's load hits both alike."""
    out: list[str] = []
    for i in range(rounds):
        out += list(modes) if i % 2 == 0 else list(reversed(modes))
    return out


def backend_ceiling(
    cfg: ServeBenchConfig, bundle: Bundle, photos: Photos, rounds: int = 5
) -> dict[str, Any]:
    """Per-image backend time at batch 1 and at `cfg.max_batch` (medians over interleaved
    rounds of about 32 images each), and their ratio: what batching can save in the backend."""
    from mtl_edge.backends.select import create_backend
    from mtl_edge.preprocess import decode_image, preprocess_image

    pre = bundle.preprocess
    queries = [d for _, d in photos.queries[: cfg.max_batch]]
    arrays = [preprocess_image(decode_image(d, pre.color_mode), pre) for d in queries]
    batch = np.stack([arrays[i % len(arrays)] for i in range(cfg.max_batch)])
    extractor = create_backend(cfg.backend, bundle, cfg.precision, cfg.threads, cfg.max_batch)
    per_image: dict[int, list[float]] = {1: [], cfg.max_batch: []}
    for size in per_image:
        extractor.extract(batch[:size])  # warm-up
    for _ in range(rounds):
        for size in per_image:
            runs = max(1, 32 // size)
            start = time.perf_counter()
            for _ in range(runs):
                extractor.extract(batch[:size])
            per_image[size].append((time.perf_counter() - start) / (runs * size))
    one, many = (1e3 * float(np.median(per_image[k])) for k in (1, cfg.max_batch))
    return {
        "batch": cfg.max_batch,
        "batch1_ms_per_image": one,
        "batched_ms_per_image": many,
        "ratio": one / many,
        "threads": cfg.threads,
    }


def run_serve_bench(cfg: ServeBenchConfig, workdir: Path) -> dict[str, Any]:
    """Every mode of `cfg.modes`, `cfg.rounds` times each, with a pause between runs (thread
    pools spin after a run); the ratio of batched to unbatched throughput when both ran."""
    from mtl_edge.bundle import Bundle

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    bundle = Bundle.load(cfg.bundle)
    photos = load_photos(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    ceiling = backend_ceiling(cfg, bundle, photos)
    raw: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.modes}
    for i, mode in enumerate(order_of(cfg.modes, cfg.rounds)):
        if i:
            time.sleep(2.0)
        log.info("bench serve: batching %s, round %d", mode, len(raw[mode]) + 1)
        raw[mode].append(run_round(cfg, mode, photos, workdir / f"serve-{mode}.gallery"))
    modes = [summarize(m, raw[m]) for m in cfg.modes]
    by = {m["mode"]: m for m in modes}
    result: dict[str, Any] = {
        "bundle": {"path": str(cfg.bundle), "backbone": bundle.backbone_name,
                   "model_id": bundle.model_id, "variants": sorted(bundle.variants)},
        "images": photos.source,
        "order": order_of(cfg.modes, cfg.rounds),
        "modes": modes,
        "backend_ceiling": ceiling,
    }  # fmt: skip
    if "on" in by and "off" in by:
        off, on = by["off"]["predict"], by["on"]["predict"]
        result["throughput_ratio_on_off"] = on["throughput_rps"] / off["throughput_rps"]
        if on["per_server_cpu_s"] and off["per_server_cpu_s"]:
            result["cpu_efficiency_ratio_on_off"] = on["per_server_cpu_s"] / off["per_server_cpu_s"]
        if on["p50_ms"] and off["p50_ms"]:
            result["p50_ratio_on_off"] = on["p50_ms"] / off["p50_ms"]
            result["p99_ratio_on_off"] = on["p99_ms"] / off["p99_ms"]
    result["goal"] = {
        "zero_errors": all(m["errors"] == 0 for m in modes),
        "zero_classes_lost": all(m["classes_lost"] == 0 for m in modes),
        "batched_2x": result.get("throughput_ratio_on_off", 0.0) >= 2.0,
    }
    return result
