"""Real data in: any map-style Dataset in DataSplits, and the local-data specs (imagefolder:,
torchvision:, npz:, safetensors:) built on the fly from tiny files."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

import netshrink as ns
from netshrink import ArrayDataset, DataError, DataSplits, UnknownNameError


def _image_tree(root, classes=("cat", "dog", "owl"), per_class=10, size=(12, 10), mode="RGB"):
    """A tiny ImageFolder tree: one folder per class, PNGs whose colour depends on the class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            base = np.full((size[1], size[0], 3), 60 * c, dtype=np.uint8)
            pixels = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            (image.convert("L") if mode == "L" else image).save(folder / f"{i}.png")
    return root


# -- DataSplits over any map-style Dataset ------------------------------------------------


class _Squares(Dataset):
    """A map-style dataset that is not a TensorDataset (no ``.tensors``)."""

    def __len__(self):
        return 30

    def __getitem__(self, i):
        return torch.full((2, 4, 4), float(i)), i % 3


def test_datasplits_accepts_any_map_style_dataset():
    data = DataSplits("squares", _Squares(), _Squares(), _Squares(), num_classes=3)
    assert data.input_shape == (2, 4, 4)
    assert data.model_options() == {"num_classes": 3, "in_chans": 2, "input_size": 4}
    batches = list(data.loader("test", batch_size=8, limit=10))
    assert sum(len(y) for _, y in batches) == 10
    x, y = data.batch("val", 5)
    assert x.shape == (5, 2, 4, 4) and y.tolist() == [0, 1, 2, 0, 1]
    ctx = ns.CompressionContext(data=data)
    assert ctx.example_input(2).shape == (2, 2, 4, 4)
    assert ctx.evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 3))) >= 0


def test_datasplits_refuses_an_iterable_dataset():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(2), 0

    with pytest.raises(DataError, match="map-style"):
        DataSplits("stream", Stream(), _Squares(), _Squares(), num_classes=3)


def test_array_dataset_normalises_lazily_per_batch():
    images = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8)
    mean, std = ArrayDataset.channel_stats(images)
    ds = ArrayDataset(images, torch.arange(20) % 2, mean=mean, std=std)
    x, y = ds[-1]
    expected = (images[-1].float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(
        std
    ).view(3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-5) and int(y) == 1
    batch = ds.__getitems__([0, 5, 19])
    assert torch.allclose(batch[2][0], x)
    assert ds.inputs.dtype == torch.uint8  # stored compact
    with pytest.raises(IndexError):
        ds[20]


# -- imagefolder: -------------------------------------------------------------------------


def test_imagefolder_loads_a_tree_made_on_the_fly(tmp_path):
    root = _image_tree(tmp_path / "pets")
    data = ns.datasets.load(f"imagefolder:{root}")
    assert data.num_classes == 3 and data.extra["classes"] == ["cat", "dog", "owl"]
    assert len(data.train) + len(data.val) + len(data.test) == 30
    assert len(data.val) == 3 and len(data.test) == 3
    assert data.input_shape == (3, 10, 10)  # the shorter side, centre-cropped
    x, y = next(iter(data.loader("train", batch_size=32)))
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 10, 10)
    assert abs(float(x.mean())) < 0.5  # normalised with the training statistics
    assert set(y.tolist()) == {0, 1, 2}
    assert data.name.startswith("imagefolder:pets@")
    # Same tree, same name; other options, another name (reference models are keyed by it).
    assert ns.datasets.load(f"imagefolder:{root}").name == data.name
    small = ns.datasets.load(f"imagefolder:{root}?size=8&channels=1")
    assert small.input_shape == (1, 8, 8) and small.name != data.name


def test_imagefolder_uses_train_val_test_folders(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        _image_tree(tmp_path / split, per_class=n)
    data = ns.datasets.load(f"imagefolder:{tmp_path}")
    assert (len(data.train), len(data.val), len(data.test)) == (18, 6, 9)
    # A test folder may lack a class (labels still follow the training classes) ...
    _image_tree(tmp_path / "t2" / "train", per_class=4)
    _image_tree(tmp_path / "t2" / "test", classes=("dog", "owl"), per_class=2)
    data = ns.datasets.load(f"imagefolder:{tmp_path / 't2'}")
    assert sorted(set(data.test.targets)) == [1, 2]
    # ... but not hold classes the training folder lacks, nor no images at all.
    _image_tree(tmp_path / "t3" / "train", classes=("cat",), per_class=4)
    _image_tree(tmp_path / "t3" / "val", classes=("cat", "eel"), per_class=1)
    with pytest.raises(DataError, match=r"class folders \['eel'\]"):
        ns.datasets.load(f"imagefolder:{tmp_path / 't3'}")


def test_imagefolder_grayscale_images_give_one_channel(tmp_path):
    data = ns.datasets.load(f"imagefolder:{_image_tree(tmp_path / 'g', mode='L')}")
    assert data.input_shape == (1, 10, 10)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "no such folder"),
        (lambda p: p, "no class folders"),
        (lambda p: (p / "cat").mkdir() or p, "valid file"),
    ],
    ids=["missing", "empty", "class-without-images"],
)
def test_imagefolder_refuses_a_missing_or_empty_folder(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        ns.datasets.load(f"imagefolder:{make(tmp_path)}")


def test_imagefolder_refuses_unknown_options(tmp_path):
    with pytest.raises(DataError, match="unknown option"):
        ns.datasets.load(f"imagefolder:{_image_tree(tmp_path / 'x')}?sise=8")


def test_compress_cli_takes_an_imagefolder(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from netshrink.cli import cli

    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    root = _image_tree(tmp_path / "tree", per_class=6, size=(28, 28))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - compressor: magnitude\n    config: {sparsity: 0.5}\n")
    result = CliRunner().invoke(
        cli,
        [
            "compress",
            "zoo:lenet5",
            "--data",
            f"imagefolder:{root}",
            "--recipe",
            str(recipe),
            "--out",
            str(tmp_path / "out"),
            "--no-latency",
        ],
    )
    assert result.exit_code == 0, result.output


# -- npz: and safetensors: ----------------------------------------------------------------


def _arrays(n=40):
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), (np.arange(n) % 4).astype(np.int64)


def test_npz_round_trip(tmp_path):
    x, y = _arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = ns.datasets.load(f"npz:{tmp_path / 'd.npz'}")
    assert data.input_shape == (3, 8, 8)  # channels-last detected and moved first
    assert data.num_classes == 4
    assert (len(data.train), len(data.val), len(data.test)) == (32, 4, 4)
    assert data.train.inputs.dtype == torch.uint8
    # The stored pixels are exactly the file's, in NCHW, with their labels.
    i = int(data.train.targets.argmax())
    row = np.flatnonzero((x == data.train.inputs[i].permute(1, 2, 0).numpy()).all(axis=(1, 2, 3)))
    assert len(row) == 1 and y[row[0]] == int(data.train.targets[i])


def test_npz_with_named_splits_keeps_them(tmp_path):
    x, y = _arrays(30)
    np.savez(tmp_path / "s.npz", x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
    data = ns.datasets.load(f"npz:{tmp_path / 's.npz'}?val_fraction=0.25")
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 10)


def test_npz_refuses_pickled_arrays(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    with pytest.raises(DataError, match="pickled"):
        ns.datasets.load(f"npz:{path}")


def test_npz_errors_name_what_was_expected(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        ns.datasets.load(f"npz:{tmp_path / 'none.npz'}")
    np.savez(tmp_path / "k.npz", images=np.zeros((4, 2)), labels=np.zeros(4, dtype=int))
    with pytest.raises(DataError, match=r"expected arrays 'x' and 'y'.*found \['images'"):
        ns.datasets.load(f"npz:{tmp_path / 'k.npz'}")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        ns.datasets.load(f"npz:{tmp_path / 'bad.npz'}")


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    x = torch.rand(24, 5)  # feature vectors, not images
    y = torch.arange(24) % 3
    save_file(
        {
            "x_train": x[:16],
            "y_train": y[:16],
            "x_val": x[16:20],
            "y_val": y[16:20],
            "x_test": x[20:],
            "y_test": y[20:],
        },
        str(tmp_path / "f.safetensors"),
    )
    data = ns.datasets.load(f"safetensors:{tmp_path / 'f.safetensors'}?normalize=false")
    assert (len(data.train), len(data.val), len(data.test)) == (16, 4, 4)
    assert data.input_shape == (5,)
    xb, yb = data.batch("test", 4)
    assert torch.equal(xb, x[20:]) and torch.equal(yb, y[20:])


# -- torchvision: -------------------------------------------------------------------------


def _write_idx(path, array):
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", {1: 0x0801, 3: 0x0803}[array.ndim]))
        fh.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        fh.write(array.astype(np.uint8).tobytes())


def test_torchvision_dataset_from_a_local_root(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    data = ns.datasets.load(f"torchvision:MNIST?root={tmp_path}")
    assert (len(data.train), len(data.val), len(data.test)) == (45, 5, 20)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    rgb = ns.datasets.load(f"torchvision:MNIST?root={tmp_path}&channels=3&size=32")
    assert rgb.input_shape == (3, 32, 32)


def test_torchvision_missing_root_names_the_expected_files(tmp_path):
    with pytest.raises(DataError, match=r"never downloads.*cifar-10-batches-py/data_batch_1"):
        ns.datasets.load(f"torchvision:CIFAR10?root={tmp_path}")
    with pytest.raises(DataError, match="needs root=PATH"):
        ns.datasets.load("torchvision:CIFAR10")
    with pytest.raises(DataError, match="no dataset class 'CIFAR11'"):
        ns.datasets.load(f"torchvision:CIFAR11?root={tmp_path}")


# -- spec lookup --------------------------------------------------------------------------


def test_dataset_specs_resolve_by_prefix():
    names = ns.datasets.available()
    assert {"imagefolder:", "torchvision:", "npz:", "safetensors:"} <= set(names)
    with pytest.raises(UnknownNameError, match="Did you mean 'imagefolder:'"):
        ns.datasets.load("imagefolder")
    with pytest.raises(UnknownNameError, match="Unknown dataset 'nope:x'"):
        ns.datasets.load("nope:x")


def test_a_plugin_can_claim_a_dataset_prefix():
    from netshrink.registry import register_plugin, unregister_plugin

    calls = []

    class EchoPlugin:
        @ns.hookimpl
        def register_datasets(self, register):
            def load(target, **options):
                calls.append((target, options))
                return DataSplits(f"echo:{target}", _Squares(), _Squares(), _Squares(), 3)

            register("echo:", load, description="echo:TARGET")

    name = register_plugin(EchoPlugin(), name="echo-test")
    try:
        data = ns.datasets.load("echo:some/where?n=3&tag=x", extra=True)
        assert data.name == "echo:some/where"
        assert calls == [("some/where", {"n": 3, "tag": "x", "extra": True})]
    finally:
        unregister_plugin(name)
