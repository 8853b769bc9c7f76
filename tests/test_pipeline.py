"""The pipeline runner: stage order, done markers, resume after a failed stage (same result),
stages.json records, the report, recipe overrides and one-line errors.

The machinery is driven by small real stages (a linear classifier trained on the device-resident
synthetic split, nearest-centroid episodes over its logits), so "same result after resume" is
checked on numbers that depend on the training. The end-to-end run of the real stages on the tiny
recipe is at the bottom; it skips while the training stack's functions are not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_edge.data.episodes import EpisodeSampler
from mtl_edge.data.registry import open_split
from mtl_edge.errors import ConfigError, MtlEdgeError, UnavailableError
from mtl_edge.preprocess import Preprocess
from mtl_edge.train.gpu_data import DeviceDataset, make_generator
from mtl_edge.train.pipeline import (
    STAGES,
    Recipe,
    StageContext,
    StageResult,
    apply_overrides,
    load_recipe,
    markdown_table,
    parse_stages,
    plot_curves,
    read_stages,
    run_pipeline,
)

REPO = Path(__file__).resolve().parents[1]
CFG = Preprocess(size=16)


def _data(split: str) -> DeviceDataset:
    s = open_split(
        "synthetic",
        None,
        split,
        size=16,
        per_class=8,
        train_classes=4,
        val_classes=2,
        test_classes=3,
    )
    return DeviceDataset.from_split(s, CFG, device="cpu", workers=1, progress=False)


class ToyStages:
    """pretrain / meta train a linear model (checkpoint every step, resumable), metatest scores
    nearest-centroid episodes on its outputs; `calls` counts how often each stage ran."""

    def __init__(self, fail_in: str | None = None, steps: int = 6) -> None:
        self.calls: dict[str, int] = {}
        self.fail_in = fail_in
        self.steps = steps

    def _train(self, ctx: StageContext, init: Path | None) -> StageResult:
        data = _data("train")
        torch.manual_seed(0)
        model = torch.nn.Linear(3 * 16 * 16, 4)
        if init is not None:
            model.load_state_dict(torch.load(init, weights_only=True)["model"])
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        gen, step = make_generator(1, "cpu"), 0
        last = ctx.dir / "last.pt"
        if ctx.resume and last.is_file():
            state = torch.load(last, weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            step = state["step"]
        metrics = ctx.dir / "metrics.jsonl"
        with metrics.open("a") as f:
            while step < self.steps:
                x, y = next(data.batches(8, gen))
                loss = torch.nn.functional.cross_entropy(model(x.flatten(1)), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                state = {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "gen": gen.get_state(),
                    "step": step,
                }
                torch.save(state, last)
                f.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
        return StageResult(
            {"checkpoint": f"{ctx.name}/last.pt"},
            images=8 * self.steps,
            train_flops=1e6,
            metrics_files=[f"{ctx.name}/metrics.jsonl"],
        )

    def __call__(self, name: str):
        def fn(ctx: StageContext) -> StageResult:
            self.calls[name] = self.calls.get(name, 0) + 1
            if name == self.fail_in:
                raise MtlEdgeError(f"{name}: simulated loss of the machine")
            if name == "pretrain":
                return self._train(ctx, None)
            if name == "meta":
                return self._train(ctx, ctx.run / ctx.output("pretrain", "checkpoint"))
            if name == "metatest":
                return self._metatest(ctx)
            return StageResult({"note": name})

        return fn

    def _metatest(self, ctx: StageContext) -> StageResult:
        model = torch.nn.Linear(3 * 16 * 16, 4)
        state = torch.load(ctx.run / ctx.output("meta", "checkpoint"), weights_only=True)
        model.load_state_dict(state["model"])
        data = _data("test")
        sampler = EpisodeSampler(data_indices(data), ways=3, shots=1, queries=3, seed=5)
        accs = []
        with torch.no_grad():
            for ep in sampler.episodes(10):
                s, sl, q, ql = data.episode(ep)
                fs, fq = model(s.flatten(1)), model(q.flatten(1))
                centroids = torch.stack([fs[sl == c].mean(0) for c in range(3)])
                pred = torch.cdist(fq, centroids).argmin(1)
                accs.append((pred == ql).float().mean().item() * 100)
        row = {
            "model": "toy",
            "head": "centroid",
            "precision": "torch-fp32",
            "shots": 1,
            "mean": float(np.mean(accs)),
            "ci95": 1.96 * float(np.std(accs)) / np.sqrt(10),
            "episodes": 10,
            "weight_sum": model.weight.sum().item(),
        }
        return StageResult({"accuracy": [row]}, images=len(accs) * 12)


def data_indices(data: DeviceDataset) -> list[np.ndarray]:
    labels = data.labels.numpy()
    return [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]


def _recipe(tmp_path: Path, extra: str = "") -> Recipe:
    path = tmp_path / "recipe.toml"
    path.write_text(
        f'[pipeline]\nepisodes = 10\nflops_reference = false\n{extra}\n[data]\nkind = "synthetic"\n'
    )
    return load_recipe(path)


def _fns(toy: ToyStages) -> dict:
    return {name: toy(name) for name in STAGES}


def test_full_run_records_every_stage_and_the_report(tmp_path: Path) -> None:
    toy = ToyStages()
    record = run_pipeline(_recipe(tmp_path), tmp_path / "run", stage_fns=_fns(toy))
    assert list(record["stages"]) == list(STAGES)
    assert toy.calls == dict.fromkeys(STAGES, 1)
    for name, e in record["stages"].items():
        assert e["status"] == "done" and e["wall_s"] >= 0 and e["peak_memory_bytes"] > 0, name
        assert (tmp_path / "run" / name / "done.json").is_file()
    assert record["stages"]["pretrain"]["images"] == 48
    assert record["stages"]["pretrain"]["achieved_flops_per_s"] > 0
    assert read_stages(tmp_path / "run") == json.loads(json.dumps(record))
    report = tmp_path / "run" / "report"
    rows = json.loads((report / "accuracy.json").read_text())
    assert [r["head"] for r in rows] == ["centroid"] and 0 <= rows[0]["mean"] <= 100
    assert "| toy | centroid | torch-fp32 | 1 |" in (report / "accuracy.md").read_text()
    assert (report / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| pretrain | done |" in (report / "stages.md").read_text()


def test_resume_after_a_failed_stage_gives_the_same_result(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    straight = run_pipeline(
        recipe, tmp_path / "a", stages="pretrain,meta,metatest", stage_fns=_fns(ToyStages())
    )
    assert straight["stages"]["metatest"]["status"] == "done"

    broken = ToyStages(fail_in="metatest")
    with pytest.raises(MtlEdgeError, match="simulated"):
        run_pipeline(recipe, tmp_path / "b", stage_fns=_fns(broken))
    rec = read_stages(tmp_path / "b")
    assert rec["stages"]["metatest"]["status"] == "failed"
    assert "simulated" in rec["stages"]["metatest"]["error"]
    assert rec["stages"]["meta"]["status"] == "done"
    assert "export" not in rec["stages"]
    assert "| meta | done |" in (tmp_path / "b" / "report" / "stages.md").read_text()

    with pytest.raises(MtlEdgeError, match="--resume"):
        run_pipeline(recipe, tmp_path / "b", stage_fns=_fns(ToyStages()))
    again = ToyStages()
    run_pipeline(
        recipe, tmp_path / "b", stages="pretrain,meta,metatest", resume=True, stage_fns=_fns(again)
    )
    assert again.calls == {"metatest": 1}
    a = json.loads((tmp_path / "a" / "report" / "accuracy.json").read_text())
    b = json.loads((tmp_path / "b" / "report" / "accuracy.json").read_text())
    assert a == b


def test_unfinished_stage_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    run_pipeline(recipe, tmp_path / "a", stages="pretrain", stage_fns=_fns(ToyStages(steps=6)))
    # A stage killed after 3 of 6 steps: its checkpoint is there, its done marker is not.
    run_pipeline(recipe, tmp_path / "b", stages="pretrain", stage_fns=_fns(ToyStages(steps=3)))
    (tmp_path / "b" / "pretrain" / "done.json").unlink()
    run_pipeline(
        recipe, tmp_path / "b", stages="pretrain", resume=True, stage_fns=_fns(ToyStages(steps=6))
    )
    wa = torch.load(tmp_path / "a" / "pretrain" / "last.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "pretrain" / "last.pt", weights_only=True)
    assert wb["step"] == 6
    for key, value in wa["model"].items():
        assert torch.equal(value, wb["model"][key]), key


def test_a_stage_needs_its_predecessor(tmp_path: Path) -> None:
    with pytest.raises(MtlEdgeError, match="stage 'meta' needs 'checkpoint' from stage 'pretrain'"):
        run_pipeline(
            _recipe(tmp_path), tmp_path / "run", stages="meta", stage_fns=_fns(ToyStages())
        )


def test_missing_training_module_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    from mtl_edge.train import pipeline

    def missing(name: str):
        raise ModuleNotFoundError(name="mtl_edge.train.nothing")

    monkeypatch.setattr(pipeline, "import_module", missing)
    with pytest.raises(UnavailableError, match="stage 'pretrain' needs mtl_edge.train.pretrain"):
        run_pipeline(_recipe(tmp_path), tmp_path / "run", stages="pretrain")
    assert read_stages(tmp_path / "run")["stages"]["pretrain"]["status"] == "failed"


def test_recipe_overrides_and_errors(tmp_path: Path) -> None:
    doc = apply_overrides(
        {"pretrain": {"epochs": 1}},
        ["pretrain.epochs=3", "data.kind=shards", "pipeline.shots=[1]", "x.name=plain"],
    )
    assert doc == {
        "pretrain": {"epochs": 3},
        "data": {"kind": "shards"},
        "pipeline": {"shots": [1]},
        "x": {"name": "plain"},
    }
    recipe = _recipe(tmp_path)
    assert recipe.settings.episodes == 10 and "pipeline" not in recipe.training
    over = load_recipe(recipe.path, ["pipeline.shots=[1]", "pipeline.queries=5"])
    assert over.settings.shots == (1,) and over.settings.queries == 5
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="unknown key"):
        _recipe(tmp_path, "bogus = 1")
    with pytest.raises(ConfigError, match="no such recipe"):
        load_recipe(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("[pipeline\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(tmp_path / "bad.toml")
    assert parse_stages("bench,pretrain") == ["pretrain", "bench"]
    assert parse_stages(None) == list(STAGES)
    with pytest.raises(ConfigError, match="--stages"):
        parse_stages("pretrain,deploy")


def test_report_helpers(tmp_path: Path) -> None:
    md = markdown_table(
        [
            {
                "model": "m",
                "head": "logreg",
                "precision": "int8-cpu",
                "shots": 5,
                "mean": 75.123,
                "ci95": 0.456,
                "episodes": 2000,
            }
        ]
    )
    assert "| m | logreg | int8-cpu | 5 | 75.12 ± 0.46 | 2000 |" in md
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"note": "text only"}\n{torn')
    assert not plot_curves({"x": empty}, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_tiny_recipe_is_a_valid_pipeline_recipe() -> None:
    recipe = load_recipe(REPO / "recipes" / "pipeline-tiny.toml")
    assert recipe.settings.episodes <= 200
    assert recipe.training


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path: Path) -> None:
    for module in ("pretrain", "meta_train", "metatest"):
        pytest.importorskip(f"mtl_edge.train.{module}")
    pytest.importorskip("mtl_edge.bench.accuracy")
    recipe = REPO / "recipes" / "pipeline-tiny.toml"
    record = run_pipeline(recipe, tmp_path / "run")
    assert all(e["status"] == "done" for e in record["stages"].values())
    rows = json.loads((tmp_path / "run" / "report" / "accuracy.json").read_text())
    assert {r["precision"] for r in rows} >= {"torch-fp32", "fp32", "int8-cpu"}
    # Resume: a second run with --resume skips every stage and gives the same table.
    run_pipeline(recipe, tmp_path / "run", resume=True)
    assert json.loads((tmp_path / "run" / "report" / "accuracy.json").read_text()) == rows


def test_cli_runs_and_resumes(tmp_path: Path, monkeypatch) -> None:
    import typer
    from typer.testing import CliRunner

    from mtl_edge.train import pipeline
    from mtl_edge.train.pipeline_cli import register

    toy = ToyStages()
    monkeypatch.setattr(pipeline, "STAGE_FNS", _fns(toy))
    app = typer.Typer()
    register(app)
    app.command(name="unused")(lambda: None)  # a second command keeps "pipeline" a subcommand
    recipe = _recipe(tmp_path).path
    args = ["pipeline", "--recipe", str(recipe), "--out", str(tmp_path / "run")]
    first = CliRunner().invoke(app, [*args, "--stages", "pretrain", "--set", "pipeline.seed=3"])
    assert first.exit_code == 0, first.output
    assert "pretrain: done" in first.output
    other = CliRunner().invoke(app, [*args, "--resume"])
    assert isinstance(other.exception, MtlEdgeError) and "another recipe" in str(other.exception)
    second = CliRunner().invoke(app, [*args, "--resume", "--json", "--set", "pipeline.seed=3"])
    assert second.exit_code == 0, second.output
    record = json.loads(second.output)
    assert record["settings"]["seed"] == 3 and list(record["stages"]) == list(STAGES)
    assert toy.calls["pretrain"] == 1
    bad = CliRunner().invoke(app, [*args, "--stages", "deploy"])
    assert isinstance(bad.exception, ConfigError)


# ---------------------------------------------------------------------------------------------
# scripts/gpu: send -> unpack on the device -> pack results -> restore
# ---------------------------------------------------------------------------------------------


def _sh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, **env}, cwd=REPO, timeout=120
    )


def test_gpu_scripts_send_unpack_in_several_calls(tmp_path: Path) -> None:
    from mtl_edge.data.shards import pack_split

    split = open_split("synthetic", None, "train", size=16, per_class=6, train_classes=4)
    pack_split(split, tmp_path / "shards" / "train", max_mib=0.02)
    n = len(json.loads((tmp_path / "shards" / "train" / "index.json").read_text())["shards"])
    assert n >= 2
    env = {"MTL_EDGE_CACHE": str(tmp_path / "cache"), "PYTHON": sys.executable}
    send, cache = tmp_path / "send", tmp_path / "cache"
    for i in range(n):
        sent = _sh(
            "scripts/gpu/send.sh", str(tmp_path / "shards" / "train"), str(i), str(send), env=env
        )
        assert sent.returncode == 0, sent.stderr
        assert len(list((send / "train").glob("*.tar"))) == 1
        got = _sh("scripts/gpu/run_stage.sh", "unpack", str(send), env=env)
        assert got.returncode == 0, got.stderr
        state = "complete" if i == n - 1 else "incomplete"
        assert f"train: {i + 1}/{n} shards, sha256 ok, {state}" in got.stdout
    assert (
        _sh(
            "scripts/gpu/send.sh", str(tmp_path / "shards" / "train"), str(n), str(send), env=env
        ).returncode
        == 3
    )
    back = open_split("shards", cache, "train")
    assert back.labels.tolist() == split.labels.tolist()
    # A shard corrupted on the way is refused with its name.
    tar = next((send / "train").glob("*.tar"))
    tar.write_bytes(tar.read_bytes()[:-600] + b"x" * 600)
    bad = _sh("scripts/gpu/run_stage.sh", "unpack", str(send), env=env)
    assert bad.returncode != 0 and tar.name in bad.stderr and "sha256" in bad.stderr


def _pack_fixture(run: Path, meta_done: bool) -> Path:
    """A run: pretrain finished in an earlier call; meta wrote three checkpoints in this one."""
    (run / "pretrain").mkdir(parents=True)
    (run / "meta").mkdir()
    big = os.urandom(3 * 2**20)

    def put(rel: str, data: bytes, when: float) -> None:
        (run / rel).write_bytes(data)
        os.utime(run / rel, (when, when))

    put("pretrain/last.pt", big, 1000)
    put("pretrain/done.json", b'{"outputs": {"checkpoint": "pretrain/last.pt"}}', 1000)
    put("meta/epoch1.pt", big, 3000)
    put("meta/best.pt", big, 3001)
    put("meta/last.pt", big, 3002)
    put("meta/metrics.jsonl", b'{"step": 1}\n', 3000)
    put("stages.json", b"{}", 3000)
    if meta_done:
        put("meta/done.json", b'{"outputs": {"checkpoint": "meta/best.pt"}}', 3003)
    since = run.parent / "since"
    since.touch()
    os.utime(since, (2000, 2000))
    return since


@pytest.mark.parametrize(
    ("meta_done", "sent"),
    [
        (True, ["meta/best.pt", "meta/done.json"]),
        (False, ["meta/best.pt", "meta/last.pt"]),
    ],
    ids=["finished-stage", "unfinished-stage"],
)
def test_gpu_scripts_pack_and_restore(tmp_path: Path, meta_done: bool, sent: list[str]) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    since = _pack_fixture(run, meta_done)
    # Results of at most 7 x 1 MiB: room for two of the three 3 MiB checkpoints.
    env = {"OUT": str(out), "PYTHON": sys.executable, "PART_MIB": "1", "MAX_PARTS": "7"}
    packed = _sh("scripts/gpu/run_stage.sh", "pack", str(run), str(since), env=env)
    assert packed.returncode == 0, packed.stderr
    assert ("epoch1.pt does not fit" in packed.stderr) is (not meta_done)
    assert (out / "MANIFEST").is_file() and len(list(out.glob("run-*.tar.part*"))) <= 7
    restored = tmp_path / "restored"
    got = _sh("scripts/gpu/restore.sh", str(out), str(restored), env=env)
    assert got.returncode == 0, got.stderr
    files = sorted(str(p.relative_to(restored)) for p in restored.rglob("*") if p.is_file())
    assert files == sorted([*sent, "meta/metrics.jsonl", "pretrain/done.json", "stages.json"])
    assert (restored / "meta" / "best.pt").read_bytes() == (run / "meta" / "best.pt").read_bytes()
    part = next(out.glob("run-*.tar.part*"))
    part.write_bytes(part.read_bytes()[:-10] + b"0" * 10)
    refused = _sh("scripts/gpu/restore.sh", str(out), str(tmp_path / "again"), env=env)
    assert refused.returncode == 1 and "sha256 differs" in refused.stderr


def test_loader_check_cli(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from mtl_edge.train.pipeline_cli import register

    app = typer.Typer()
    register(app)
    args = [
        "loader-check",
        "--backbone",
        "conv4",
        "--size",
        "16",
        "-o",
        "size=16",
        "-o",
        "per_class=8",
        "-o",
        "train_classes=4",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "lc.json"),
        "--json",
    ]
    got = CliRunner().invoke(app, args)
    assert got.exit_code == 0, got.output
    result = json.loads(got.output)
    assert result == json.loads((tmp_path / "lc.json").read_text())
    assert result["loader_images_per_s"] > 0 and result["synthetic_images_per_s"] > 0
    assert result["ratio"] == pytest.approx(
        result["loader_images_per_s"] / result["synthetic_images_per_s"]
    )
    bad = CliRunner().invoke(app, ["loader-check", "-o", "novalue"])
    assert isinstance(bad.exception, ConfigError)


# ---------------------------------------------------------------------------------------------
# The real metatest and export stages on a small checkpoint
# ---------------------------------------------------------------------------------------------


def _conv4_checkpoint(path: Path, config: dict) -> Path:
    from mtl_edge.train.backbones import create_backbone

    torch.manual_seed(0)
    model = create_backbone("conv4", in_channels=3, width=8)
    torch.save(
        {
            "format": "mtl-edge.checkpoint",
            "version": 1,
            "model": "conv4",
            "model_args": dict(model.model_args),
            "state_dict": model.state_dict(),
            "stage": "pretrain",
            "preprocess": Preprocess(size=16).to_dict(),
            "config": config,
            "metrics": {},
        },
        path,
    )
    return path


@pytest.mark.slow
def test_metatest_and_export_stages_on_a_checkpoint(tmp_path: Path) -> None:
    from mtl_edge.train import pipeline
    from mtl_edge.train.checkpoint import load_checkpoint

    def train_stage(ctx: StageContext) -> StageResult:
        _conv4_checkpoint(ctx.dir / "best.pt", ctx.recipe.training)
        return StageResult({"checkpoint": f"{ctx.name}/best.pt"}, images=10)

    path = tmp_path / "recipe.toml"
    path.write_text(
        "[pipeline]\nepisodes = 20\nqueries = 3\nshots = [1, 2]\nft_episodes = 2\n"
        "flops_reference = false\nheads = ['mtl', 'centroid', 'logreg', 'ft']\n"
        "[data]\nkind = 'synthetic'\n"
        "options = { size = 16, per_class = 6, train_classes = 4, val_classes = 2, "
        "test_classes = 5 }\n"
    )
    fns = dict(pipeline.STAGE_FNS, pretrain=train_stage, meta=train_stage)
    record = run_pipeline(
        load_recipe(path), tmp_path / "run", "pretrain,meta,metatest,export", stage_fns=fns
    )
    assert record["stages"]["meta"]["train_flops"] is None
    rows = json.loads((tmp_path / "run" / "report" / "accuracy.json").read_text())
    got = {(r["head"], r["shots"]): r for r in rows}
    assert set(got) == {(h, s) for h in ("mtl", "centroid", "logreg", "finetune") for s in (1, 2)}
    assert got[("centroid", 1)]["episodes"] == 20 and got[("finetune", 2)]["episodes"] == 2
    assert all(0 <= r["mean"] <= 100 for r in rows)
    # Same seed, same episodes: the centroid head equals a direct meta_test on the same split.
    from mtl_edge.train.metatest import meta_test

    model = load_checkpoint(tmp_path / "run" / "meta" / "best.pt").model
    split = open_split(
        "synthetic",
        None,
        "test",
        size=16,
        per_class=6,
        train_classes=4,
        val_classes=2,
        test_classes=5,
    )
    direct = meta_test(
        model.eval(),
        split,
        Preprocess(size=16),
        ways=5,
        shots_list=[1],
        episodes=20,
        queries=3,
        seed=0,
        heads=["centroid"],
    )
    assert direct["results"]["1"]["centroid"]["mean"] == pytest.approx(
        got[("centroid", 1)]["mean"], abs=1e-6
    )
    done = json.loads((tmp_path / "run" / "export" / "done.json").read_text())
    from mtl_edge.bundle import Bundle

    bundle = Bundle.load(tmp_path / "run" / done["outputs"]["bundle"])
    assert {"int8", "int8-cpu"} <= set(bundle.manifest["variants"])


def test_collect_results_copies_no_weights(tmp_path: Path) -> None:
    import shutil

    repo = tmp_path / "repo"
    (repo / "scripts" / "gpu").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "gpu" / "collect_results.sh", repo / "scripts" / "gpu")
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "export" / "bundle").mkdir(parents=True)
    (run / "stages.json").write_text("{}")
    (run / "report" / "accuracy.md").write_text("| table |\n")
    (run / "export" / "bundle" / "manifest.json").write_text("{}")
    (run / "export" / "bundle" / "backbone.onnx").write_bytes(b"weights")
    (run / "meta").mkdir()
    (run / "meta" / "best.pt").write_bytes(b"weights")
    got = subprocess.run(
        ["scripts/gpu/collect_results.sh", str(run), "test"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 0, got.stderr
    (dest,) = (repo / "bench" / "results").iterdir()
    assert dest.name.endswith("-test")
    assert sorted(p.name for p in dest.iterdir()) == [
        "accuracy.md",
        "bundle-manifest.json",
        "stages.json",
    ]
    missing = subprocess.run(
        ["scripts/gpu/collect_results.sh", str(tmp_path)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "stages.json" in missing.stderr


def test_interrupt_is_recorded_as_resumable(tmp_path: Path) -> None:
    def interrupted(ctx: StageContext) -> StageResult:
        raise KeyboardInterrupt

    fns = dict(_fns(ToyStages()), meta=interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_recipe(tmp_path), tmp_path / "run", "pretrain,meta", stage_fns=fns)
    stages = read_stages(tmp_path / "run")["stages"]
    assert stages["pretrain"]["status"] == "done" and stages["meta"]["status"] == "interrupted"
