"""The device-resident dataset: eval-path parity with the device preprocessing, determinism,
augmentation shapes and ranges, episodes, synthetic input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtl_edge.data.episodes import EpisodeSampler
from mtl_edge.data.split import ImageSplit
from mtl_edge.errors import ConfigError
from mtl_edge.preprocess import Preprocess, preprocess_image
from mtl_edge.train.gpu_data import DeviceAugment, DeviceDataset, make_generator


def _jpeg_split(tmp_path: Path, color_mode: str = "RGB", n_classes: int = 3, per: int = 5):
    """Class-labelled JPEGs of different sizes (so decoding resizes and crops)."""
    rng = np.random.default_rng(1)
    paths, labels = [], []
    for c in range(n_classes):
        for i in range(per):
            h, w = int(rng.integers(30, 50)), int(rng.integers(30, 50))
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            path = tmp_path / f"{c}_{i}.jpg"
            Image.fromarray(arr).save(path, quality=90)
            paths.append(path)
            labels.append(c)
    return ImageSplit(
        name="tiny/train",
        class_names=[f"c{c}" for c in range(n_classes)],
        labels=np.asarray(labels, dtype=np.int64),
        paths=paths,
        color_mode=color_mode,
    )


@pytest.mark.parametrize(
    "cfg",
    [
        Preprocess(size=24),
        Preprocess(size=20, color_mode="L", mean=(0.1,), std=(0.5,), invert=True),
    ],
    ids=["rgb", "gray-invert"],
)
def test_eval_path_equals_device_preprocessing(tmp_path: Path, cfg: Preprocess) -> None:
    split = _jpeg_split(tmp_path, color_mode=cfg.color_mode)
    data = DeviceDataset.from_split(split, cfg, device="cpu", workers=1, progress=False)
    assert data.images.shape == (len(split), cfg.channels, cfg.size, cfg.size)
    got = data.eval_batch(np.arange(len(split))).numpy()
    want = np.stack([preprocess_image(split.image(i), cfg) for i in range(len(split))])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def _tiny(channels_last: bool = False, dtype: torch.dtype = torch.float32) -> DeviceDataset:
    gen = make_generator(0, "cpu")
    images = torch.randint(0, 256, (12, 3, 32, 32), generator=gen, dtype=torch.uint8)
    labels = torch.arange(12) % 4
    return DeviceDataset(images, labels, Preprocess(size=28), channels_last, dtype)


def test_augmentation_is_deterministic_per_seed() -> None:
    data = _tiny()
    a = [(x.clone(), y.clone()) for x, y in data.batches(4, make_generator(7, "cpu"))]
    b = list(data.batches(4, make_generator(7, "cpu")))
    c = list(data.batches(4, make_generator(8, "cpu")))
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c, strict=True))


def test_augmented_batches_shape_range_and_variety() -> None:
    data = _tiny()
    gen = make_generator(0, "cpu")
    x = data.augment_batch(np.arange(12), gen)
    assert x.shape == (12, 3, 28, 28) and x.dtype == torch.float32
    mean = torch.tensor(data.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.preprocess.std).view(1, 3, 1, 1)
    pixels = x * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # Two draws of the same images differ (crop/flip/jitter are random) ...
    assert not torch.allclose(x, data.augment_batch(np.arange(12), gen))
    # ... and with every augmentation off the crop is the full image resized, not a copy.
    still = DeviceAugment(
        scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, brightness=0, contrast=0, saturation=0
    )
    full = data.augment_batch(np.arange(12), gen, still)
    resized = torch.nn.functional.interpolate(
        data.images.float() / 255,
        size=28,
        mode="bilinear",
        align_corners=False,
        antialias=False,
    )
    np.testing.assert_allclose((full * std + mean).numpy(), resized.numpy(), atol=1e-4)


def test_flip_only_mirrors_the_image() -> None:
    gen = make_generator(0, "cpu")
    images = torch.randint(0, 256, (64, 3, 28, 28), generator=gen, dtype=torch.uint8)
    data = DeviceDataset(images, torch.zeros(64, dtype=torch.int64), Preprocess(size=28))
    flip = DeviceAugment(
        scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True, brightness=0, contrast=0, saturation=0
    )
    x = data.augment_batch(np.arange(64), gen, flip)
    plain = data.eval_batch(np.arange(64))
    same = [torch.allclose(x[i], plain[i], atol=1e-4) for i in range(64)]
    mirrored = [torch.allclose(x[i], plain[i].flip(-1), atol=1e-4) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 10 < sum(mirrored) < 54


def test_bf16_channels_last_batches() -> None:
    data = _tiny(channels_last=True, dtype=torch.bfloat16)
    x, y = next(data.batches(4, make_generator(0, "cpu")))
    assert x.dtype == torch.bfloat16 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert data.eval_batch([0, 1]).dtype == torch.bfloat16


def test_episode_images_and_labels() -> None:
    data = _tiny()
    split_like = [np.flatnonzero(data.labels.numpy() == c) for c in range(4)]
    ep = EpisodeSampler(split_like, ways=3, shots=1, queries=2, seed=0).episode(0)
    s, sl, q, ql = data.episode(ep)
    assert s.shape == (3, 3, 28, 28) and q.shape == (6, 3, 28, 28)
    assert sl.tolist() == [0, 1, 2] and ql.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(s, data.eval_batch(ep.support))
    s_aug, *_ = data.episode(ep, make_generator(0, "cpu"))
    assert s_aug.shape == s.shape and not torch.equal(s_aug, s)


def test_synthetic_input_keeps_shape_and_labels(tmp_path: Path) -> None:
    split = _jpeg_split(tmp_path)
    cfg = Preprocess(size=24)
    fake = DeviceDataset.from_split(split, cfg, device="cpu", synthetic=True, seed=3)
    real = DeviceDataset.from_split(split, cfg, device="cpu", workers=1, progress=False)
    assert fake.images.shape == real.images.shape
    assert torch.equal(fake.labels, real.labels)
    assert not torch.equal(fake.images, real.images)
    again = DeviceDataset.from_split(split, cfg, device="cpu", synthetic=True, seed=3)
    assert torch.equal(fake.images, again.images)


def test_bad_settings_are_config_errors(tmp_path: Path) -> None:
    split = _jpeg_split(tmp_path)
    with pytest.raises(ConfigError, match="colour mode"):
        DeviceDataset.from_split(
            split, Preprocess(size=24, color_mode="L", mean=(0.5,), std=(0.5,)), device="cpu"
        )
    with pytest.raises(ConfigError, match="augment.scale"):
        DeviceAugment(scale=(0.0, 1.0))
    with pytest.raises(ConfigError, match="batch_size"):
        next(_tiny().batches(0, make_generator(0, "cpu")))


def test_decode_cache_is_reused(tmp_path: Path, monkeypatch) -> None:
    import mtl_edge.data.decode as decode

    split = _jpeg_split(tmp_path)
    cfg = Preprocess(size=24)
    first = DeviceDataset.from_split(
        split, cfg, device="cpu", workers=1, progress=False, cache_dir=tmp_path / "cache"
    )
    assert len(list((tmp_path / "cache").glob("*-24-RGB.npy"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(decode, "decode_split", no_decoding)
    second = DeviceDataset.from_split(split, cfg, device="cpu", cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, second.images)


def test_recipe_augmentation_without_flip_or_jitter() -> None:
    """`[pretrain] flip = false, jitter = 0` (characters): crops only, never a mirror image."""
    from mtl_edge.train.config import load_recipe
    from mtl_edge.train.torchdata import make_augment

    sets = ["pretrain.augment=true", "pretrain.flip=false", "pretrain.jitter=0.0"]
    p = load_recipe("omniglot-cpu", sets).pretrain
    aug = make_augment(p.crop_scale, p.augment, p.flip, p.jitter)
    assert aug is not None and not aug.flip
    assert aug.brightness == aug.contrast == aug.saturation == 0
    assert make_augment(p.crop_scale, False, p.flip, p.jitter) is None
    default = load_recipe(None).pretrain
    assert make_augment(default.crop_scale, True, default.flip, default.jitter) == DeviceAugment(
        scale=default.crop_scale
    )
    with pytest.raises(ConfigError, match="pretrain.jitter"):
        load_recipe("omniglot-cpu", ["pretrain.jitter=1.5"])
