"""The stage runner and the pipeline (`mtl_edge.workflows`): stage order, done markers, resume
after a failed stage (same result), stages.json records, the report, one-line errors.

The machinery is driven by small real stages (a linear classifier trained on the device-resident
synthetic split, nearest-centroid episodes over its logits), so "same result after resume" is
checked on numbers that depend on the training. The end-to-end run of the real stages on the tiny
recipe is at the bottom; it skips while the training stack's functions are not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_edge.bench.run_report import markdown_table, plot_curves
from mtl_edge.data.episodes import EpisodeSampler
from mtl_edge.data.registry import open_split
from mtl_edge.errors import ConfigError, MtlEdgeError
from mtl_edge.preprocess import Preprocess
from mtl_edge.train.config import Recipe, load_recipe
from mtl_edge.train.gpu_data import DeviceDataset, make_generator
from mtl_edge.workflows import pipeline
from mtl_edge.workflows.pipeline import STAGES
from mtl_edge.workflows.stages import StageContext, StageResult, parse_stages, read_stages


def run_pipeline(recipe: Recipe, out: Path, stages=None, resume=False, stage_fns=None):  # noqa: ANN001, ANN201
    return pipeline.run_pipeline(recipe, "test recipe", out, stages, resume, stage_fns)


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
        f"[pipeline]\nflops_reference = false\n{extra}\n[eval]\nepisodes = 10\n"
        '[data]\nkind = "synthetic"\n'
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


def test_stage_names(tmp_path: Path) -> None:
    assert parse_stages("bench,pretrain", STAGES) == ["pretrain", "bench"]
    assert parse_stages(None, STAGES) == list(STAGES)
    with pytest.raises(ConfigError, match="--stages"):
        parse_stages("pretrain,deploy", STAGES)
    with pytest.raises(ConfigError, match="unknown key pipeline.bogus"):
        _recipe(tmp_path, "bogus = 1")


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
    recipe = load_recipe("pipeline-tiny")
    assert recipe.eval.episodes <= 200 and recipe.export.int8


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path: Path) -> None:
    recipe = load_recipe("pipeline-tiny")
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

    from mtl_edge.commands.train import register

    toy = ToyStages()
    monkeypatch.setattr(pipeline, "STAGE_FNS", _fns(toy))
    app = typer.Typer()
    register(app, "train")
    _recipe(tmp_path)
    args = ["train", "pipeline", "--recipe", str(tmp_path / "recipe.toml")]
    args += ["--out", str(tmp_path / "run")]
    first = CliRunner().invoke(app, [*args, "--stages", "pretrain", "--set", "eval.seed=3"])
    assert first.exit_code == 0, first.output
    assert "pretrain: done" in first.output
    other = CliRunner().invoke(app, [*args, "--resume"])
    assert isinstance(other.exception, MtlEdgeError) and "another recipe" in str(other.exception)
    second = CliRunner().invoke(app, [*args, "--resume", "--json", "--set", "eval.seed=3"])
    assert second.exit_code == 0, second.output
    record = json.loads(second.output)
    assert "eval.seed=3" in record["recipe"] and list(record["stages"]) == list(STAGES)
    assert toy.calls["pretrain"] == 1
    bad = CliRunner().invoke(app, [*args, "--stages", "deploy"])
    assert isinstance(bad.exception, ConfigError)


# ---------------------------------------------------------------------------------------------
# The real metatest and export stages on a small checkpoint
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_metatest_and_export_stages_on_a_checkpoint(tmp_path: Path) -> None:
    from model_fixtures import tiny_checkpoint

    from mtl_edge.bundle import Bundle
    from mtl_edge.train.checkpoint import load_checkpoint
    from mtl_edge.train.metatest import meta_test

    options = "{ size = 16, per_class = 6, train_classes = 4, val_classes = 2, test_classes = 5 }"
    path = tmp_path / "recipe.toml"
    path.write_text(
        "[eval]\nepisodes = 20\nqueries = 3\nshots = [1, 2]\nft_episodes = 2\n"
        "heads = ['mtl', 'centroid', 'logreg', 'ft']\n[pipeline]\nflops_reference = false\n"
        f"[data]\nkind = 'synthetic'\noptions = {options}\n"
    )
    recipe = load_recipe(path)

    def train_stage(ctx: StageContext) -> StageResult:
        config = {"data": {"kind": "synthetic", "options": dict(recipe.data.options)}}
        tiny_checkpoint(ctx.dir / "best.pt", size=16, config=config)
        return StageResult({"checkpoint": f"{ctx.name}/best.pt"}, images=10)

    fns = dict(pipeline.STAGE_FNS, pretrain=train_stage, meta=train_stage)
    record = run_pipeline(recipe, tmp_path / "run", "pretrain,meta,metatest,export", stage_fns=fns)
    assert record["stages"]["meta"]["train_flops"] is None
    rows = json.loads((tmp_path / "run" / "report" / "accuracy.json").read_text())
    got = {(r["head"], r["shots"]): r for r in rows}
    assert set(got) == {(h, s) for h in ("mtl", "centroid", "logreg", "finetune") for s in (1, 2)}
    assert got[("centroid", 1)]["episodes"] == 20 and got[("finetune", 2)]["episodes"] == 2
    assert all(0 <= r["mean"] <= 100 for r in rows)
    # Same seed, same episodes: the heads equal a direct meta_test on the same split.
    loaded = load_checkpoint(tmp_path / "run" / "meta" / "best.pt")
    split = open_split("synthetic", None, "test", **recipe.data.options)
    direct = meta_test(
        loaded,
        split,
        recipe.eval.__class__(**{**recipe.eval.__dict__, "heads": ("mtl", "centroid")}),
    )
    for head in ("mtl", "centroid"):
        assert direct["results"]["1"][head]["mean"] == pytest.approx(
            got[(head, 1)]["mean"], abs=1e-6
        )
    done = json.loads((tmp_path / "run" / "export" / "done.json").read_text())
    bundle = Bundle.load(tmp_path / "run" / done["outputs"]["bundle"])
    assert {"int8", "int8-cpu"} <= set(bundle.manifest["variants"])


def test_interrupt_is_recorded_as_resumable(tmp_path: Path) -> None:
    def interrupted(ctx: StageContext) -> StageResult:
        raise KeyboardInterrupt

    fns = dict(_fns(ToyStages()), meta=interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_recipe(tmp_path), tmp_path / "run", "pretrain,meta", stage_fns=fns)
    stages = read_stages(tmp_path / "run")["stages"]
    assert stages["pretrain"]["status"] == "done" and stages["meta"]["status"] == "interrupted"
