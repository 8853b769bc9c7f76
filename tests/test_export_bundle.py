"""export_checkpoint -> bundle: manifest round trip, variants, tamper detection, atomic writes,
bad checkpoints (through the API; test_export_cli.py covers the same through the CLI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from model_fixtures import FEATURE_DIM, TINY, randomize, tiny_checkpoint

from mtl_edge.bundle import Bundle
from mtl_edge.data.synthetic import make_synthetic_split, write_class_folders
from mtl_edge.errors import BundleError, ConfigError, MtlEdgeError
from mtl_edge.export import api
from mtl_edge.export.check import check_bundle
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.preprocess import Preprocess
from mtl_edge.train.backbones import create_backbone
from mtl_edge.train.checkpoint import backbone_state, deploy_section, save_checkpoint
from mtl_edge.train.ss import convert_to_ss


def export(ckpt: Path, out: Path, **kwargs: Any) -> tuple[Bundle, dict[str, Any]]:
    kwargs.setdefault("parity_episodes", 50)
    kwargs.setdefault("quant_episodes", 600)
    return api.export_checkpoint(ckpt, out, **kwargs)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Bundle, dict[str, Any]]:
    """A meta checkpoint exported with INT8 (both variants) and FP16."""
    root = tmp_path_factory.mktemp("full")
    ckpt = tiny_checkpoint(root / "meta.pt")
    calib = write_class_folders(make_synthetic_split(4, 8, 24, seed=9), root / "calib")
    bundle, report = export(ckpt, root / "bundle", int8=True, calib=calib, fp16=True)
    return ckpt, bundle, report


def test_manifest_round_trip(full: tuple[Path, Bundle, dict[str, Any]]) -> None:
    ckpt, bundle, _ = full
    loaded = Bundle.load(bundle.root)
    m = loaded.manifest
    assert m["backbone"] == {
        "name": "resnet12",
        "args": {"in_channels": 3, **TINY, "slope": 0.1, "bias": True, "ss_shortcut": True},
        "feature_dim": FEATURE_DIM,
        "input_name": "images",
        "output_name": "features",
        "input_shape": [3, 20, 20],
        "opset": 20,
    }
    assert loaded.preprocess.size == 20
    assert set(loaded.variants) == {"fp32", "int8", "int8-cpu", "fp16"}
    assert loaded.variants["int8"]["target"] == "tensorrt"
    assert loaded.variants["int8-cpu"]["target"] == "onnxruntime-cpu"
    prov = m["provenance"]
    from mtl_edge.atomicio import sha256_file

    assert prov["checkpoint_sha256"] == sha256_file(ckpt)
    assert prov["split_fingerprint"] == "abc123"
    assert prov["training_seed"] == 7 and prov["dataset"] == "synthetic"
    assert prov["stage"] == "meta" and prov["created"].endswith("Z")
    assert m["metrics"]["val_acc"] == pytest.approx(50.0)
    assert m["parity"]["pass"] and m["parity"]["real"]["episodes"]["identical_episodes"] == 50
    for name in ("int8", "int8-cpu"):
        q = m["quantization"][name]
        assert q["qdq"]["convs_with_qdq"] == q["qdq"]["convs"] == 16
        for head in ("mtl", "centroid"):  # the bundle's own head and the centroid head
            assert q["accuracy"]["5way_1shot"][head]["episodes"] == 600
            assert q["accuracy"]["5way_5shot"][head]["episodes"] == 600
    assert m["quantization"]["int8-cpu"]["onnxruntime_cpu_kernels"]["quantized"] == 16
    fp16 = m["variants"]["fp16"]["check"]["accuracy"]
    assert fp16["cosine_min"] > 0.999 and fp16["5way_5shot"]["mtl"]["episodes"] == 600


def test_meta_init_stored(full: tuple[Path, Bundle, dict[str, Any]]) -> None:
    ckpt, bundle, _ = full
    head = bundle.head
    assert head.init == "meta"
    weight, bias = bundle.meta_init()  # type: ignore[misc]
    fc = torch.load(ckpt, weights_only=True)["deploy"]["fc_init"]
    np.testing.assert_array_equal(weight, fc["weight"].numpy())
    np.testing.assert_array_equal(bias, fc["bias"].numpy())
    assert bundle.manifest["head"]["meta_init"]["ways"] == 5


def test_check_bundle_passes(full: tuple[Path, Bundle, dict[str, Any]]) -> None:
    result = check_bundle(full[1].root)
    assert result["pass"]
    assert set(result["variants"]) == {"fp32", "int8", "int8-cpu", "fp16"}
    assert result["variants"]["fp32"]["max_abs"] == 0.0


def test_check_bundle_uses_real_images_when_given(
    full: tuple[Path, Bundle, dict[str, Any]], class_folders: Path
) -> None:
    synthetic = check_bundle(full[1].root)
    real = check_bundle(full[1].root, data=class_folders / "train")
    assert synthetic["images"] == {"kind": "synthetic", "count": 20}
    assert real["images"]["kind"] == "real" and real["images"]["count"] == 20
    assert real["pass"] and set(real["variants"]) == set(synthetic["variants"])
    # other images, other feature differences: the real images were the ones compared
    assert real["variants"]["int8"]["cosine_min"] != synthetic["variants"]["int8"]["cosine_min"]


def test_check_bundle_catches_a_wrong_variant(
    full: tuple[Path, Bundle, dict[str, Any]], tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(full[1].root, copy)
    other, _ = export(tiny_checkpoint(tmp_path / "other.pt", seed=11), tmp_path / "other")
    bundle = Bundle.load(copy)
    bundle.add_files({"backbone.fp16.onnx": other.variant_path("fp32")}, {})
    result = check_bundle(copy)
    assert not result["pass"] and not result["variants"]["fp16"]["pass"]


def test_tampered_bundle_is_refused(
    full: tuple[Path, Bundle, dict[str, Any]], tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(full[1].root, copy)
    data = bytearray((copy / "backbone.int8.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "backbone.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.load(copy)
    with pytest.raises(BundleError, match="sha256"):
        check_bundle(copy)
    (copy / "head_init_bias.npy").unlink()
    with pytest.raises(BundleError):
        Bundle.load(copy)


def test_pretrain_checkpoint_has_no_meta_init(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "pre.pt", meta_stage=False)
    bundle, report = export(ckpt, tmp_path / "b")
    assert bundle.head.init == "zeros" and bundle.meta_init() is None
    assert not (tmp_path / "b" / "head_init_weight.npy").exists()
    assert set(bundle.variants) == {"fp32"}
    assert report["fold"]["max_abs"] <= 1e-5
    with pytest.raises(MtlEdgeError, match="meta-learned FC init"):
        export(ckpt, tmp_path / "c", head={"init": "meta"})


def test_head_overrides(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    bundle, _ = export(ckpt, tmp_path / "b", head={"steps": 20, "lr": 0.5, "normalize": True})
    assert (bundle.head.steps, bundle.head.lr, bundle.head.normalize) == (20, 0.5, True)


def test_existing_out_refused_then_forced(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MtlEdgeError, match="already exists"):
        export(ckpt, out)
    assert (out / "keep.txt").read_text() == "mine"
    bundle, _ = export(ckpt, out, force=True)
    assert not (out / "keep.txt").exists() and bundle.root == out


def test_failure_mid_export_leaves_no_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mtl_edge import bundle as bundle_mod

    ckpt = tiny_checkpoint(tmp_path / "m.pt")

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    # Fail while the staging folder is being filled: nothing may appear under the final name.
    monkeypatch.setattr(bundle_mod, "atomic_write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        export(ckpt, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def _bad(tmp_path: Path, **overrides: Any) -> Path:
    return tiny_checkpoint(tmp_path / "bad.pt", **overrides)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: (p / "x.pt").write_bytes(b"not a torch file") and p / "x.pt", "not a readable"),
        (lambda p: torch.save({"a": 1}, p / "x.pt") or p / "x.pt", "not an mtl-edge checkpoint"),
        (lambda p: p / "missing.pt", "no such checkpoint"),
        (lambda p: _bad(p, state_dict=None), "'state_dict' is not a dict"),
        (lambda p: _bad(p, deploy=[]), "'deploy' is not a dict"),
        (lambda p: _bad(p, version=1), "checkpoint version 1"),
        (lambda p: _bad(p, model="resnet999"), "'resnet999' is unknown"),
        (lambda p: _bad(p, preprocess={"size": -3}), "bad preprocess"),
    ],
)
def test_bad_checkpoints(tmp_path: Path, make: Any, message: str) -> None:
    ckpt = make(tmp_path)
    with pytest.raises(MtlEdgeError, match=message):
        export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_extra_and_nonfinite_weights(tmp_path: Path) -> None:
    state = torch.load(tiny_checkpoint(tmp_path / "ok.pt"), weights_only=True)["state_dict"]
    key = "blocks.0.conv1.conv.ss_scale"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(MtlEdgeError, match=rf"missing keys {key}"):
        export(_bad(tmp_path, state_dict=missing), tmp_path / "o")
    extra = dict(state, **{"classifier.weight": torch.zeros(3, 16)})
    with pytest.raises(MtlEdgeError, match=r"unexpected keys classifier\.weight"):
        export(_bad(tmp_path, state_dict=extra), tmp_path / "o")
    var = "blocks.0.conv1.bn.running_var"
    nan = dict(state, **{var: torch.full_like(state[var], float("nan"))})
    with pytest.raises(MtlEdgeError, match=rf"non-finite weights .* {var}"):
        export(_bad(tmp_path, state_dict=nan), tmp_path / "o")
    shape = dict(state, **{"blocks.0.conv1.conv.ss_shift": torch.zeros(3)})
    with pytest.raises(MtlEdgeError, match="do not fit"):
        export(_bad(tmp_path, state_dict=shape), tmp_path / "o")
    bad_fc = {"weight": torch.zeros(5), "bias": torch.zeros(5)}
    deploy = deploy_section(HeadRecipe(init="meta"), {"kind": "mtl"})
    with pytest.raises(MtlEdgeError, match="fc_init"):
        export(_bad(tmp_path, deploy=deploy | {"fc_init": bad_fc}), tmp_path / "o")


def test_int8_needs_calibration_images(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m.pt", config={})
    with pytest.raises(MtlEdgeError, match="--calib"):
        export(ckpt, tmp_path / "o", int8=True)
    with pytest.raises(MtlEdgeError, match="no such folder"):
        export(ckpt, tmp_path / "o", int8=True, calib=tmp_path / "nowhere")


def test_int8_calibrates_on_the_config_split(tmp_path: Path) -> None:
    """Without --calib, the training split named in the checkpoint config is used."""
    options = {"size": 24, "per_class": 4, "train_classes": 5}
    config = {"data": {"kind": "synthetic", "options": options}}
    ckpt = tiny_checkpoint(tmp_path / "m.pt", config=config)
    bundle, report = export(ckpt, tmp_path / "o", int8=True, quant_episodes=20)
    assert report["quantization"]["calibration_data"] == "synthetic/train"
    assert report["quantization"]["int8"]["settings"]["calibration_images"] == 20
    assert "int8-cpu" in bundle.variants


def test_a_cpu_only_int8_export_writes_only_the_u8s8_variant(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m.pt", config={})
    calib = write_class_folders(make_synthetic_split(3, 6, 24, seed=9), tmp_path / "calib")
    bundle, report = export(
        ckpt, tmp_path / "o", int8=True, calib=calib, int8_variants=("int8-cpu",),
        quant_episodes=10,
    )  # fmt: skip
    assert set(bundle.variants) == {"fp32", "int8-cpu"}
    assert "int8" not in report["quantization"] and "int8-cpu" in report["quantization"]
    assert not (bundle.root / "backbone.int8.onnx").exists()
    with pytest.raises(ConfigError, match="--int8-variants"):
        export(ckpt, tmp_path / "p", int8=True, calib=calib, int8_variants=("int4",))


def test_unknown_option_is_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="unknown options"):
        api.export_checkpoint(tmp_path / "x.pt", tmp_path / "o", colour="red")


def test_tensorrt_unavailable_says_so_before_work(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001
        pass
    else:
        pytest.skip("TensorRT is installed here")
    from mtl_edge.errors import UnavailableError

    with pytest.raises(UnavailableError) as info:
        export(tiny_checkpoint(tmp_path / "m.pt"), tmp_path / "o", tensorrt=True)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()


def test_manifest_is_plain_json(full: tuple[Path, Bundle, dict[str, Any]]) -> None:
    text = (full[1].root / "manifest.json").read_text()
    assert json.loads(text)["schema"] == "mtl-edge.bundle"
    assert "NaN" not in text and "Infinity" not in text


def _checkpoint_of(model: torch.nn.Module, name: str, pre: Preprocess, path: Path) -> Path:
    return save_checkpoint(
        path,
        {
            "model": name,
            "model_args": dict(model.model_args),
            "state_dict": backbone_state(model),
            "stage": "meta",
            "preprocess": pre.to_dict(),
            "config": {},
            "metrics": {},
            "deploy": deploy_section(HeadRecipe(), {"kind": "mtl"}),
        },
    )


def test_one_channel_conv4(tmp_path: Path) -> None:
    """A conv4 with one input channel at 28x28, like Omniglot, with SS convs."""
    model = randomize(convert_to_ss(create_backbone("conv4", in_channels=1), shortcut=True))
    pre = Preprocess(size=28, color_mode="L", mean=(0.0,), std=(1.0,))
    ckpt = _checkpoint_of(model, "conv4", pre, tmp_path / "conv4.pt")
    bundle, report = api.export_checkpoint(ckpt, tmp_path / "b", parity_episodes=50)
    assert bundle.backbone_name == "conv4"
    assert bundle.manifest["backbone"]["input_shape"] == [1, 28, 28]
    assert bundle.feature_dim == model.feature_dim
    assert report["parity"]["pass"]


def test_head_recipe_is_the_deploy_section(tmp_path: Path) -> None:
    head = HeadRecipe(steps=40, lr=0.05, init="zeros", weight_decay=0.001, loss="tf")
    ckpt = tiny_checkpoint(tmp_path / "m.pt", deploy=deploy_section(head, {"kind": "mtl"}))
    bundle, _ = export(ckpt, tmp_path / "b")
    assert bundle.head == head  # as written at training time, loss reduction included


@pytest.mark.slow
def test_real_size_resnet12_wide_parity(tmp_path: Path) -> None:
    """The one real-size export: ResNet-12-wide with SS at 84 x 84, FP32 only, must pass the
    parity thresholds (max abs 1e-4, cosine 0.9999 at batch 1/7/32, 200 identical episodes)."""
    torch.manual_seed(0)
    model = randomize(convert_to_ss(create_backbone("resnet12-wide"), shortcut=True))
    ckpt = _checkpoint_of(model, "resnet12-wide", Preprocess(size=84), tmp_path / "r12w.pt")
    bundle, report = api.export_checkpoint(ckpt, tmp_path / "b")
    parity = report["parity"]
    assert parity["max_abs"] <= 1e-4 and parity["cosine_min"] >= 0.9999
    assert parity["real"]["episodes"]["identical_episodes"] == 200
    assert bundle.feature_dim == 640
