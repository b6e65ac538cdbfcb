"""``trivit shards`` on odd image trees: nothing is dropped without a word, nothing good is overwritten."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trivit.cli import main
from trivit.datasets.config import DataConfig
from trivit.datasets.loaders import eval_loader
from trivit.datasets.shards import read_index
from trivit.datasets.stream import SampleDecoder, expand_urls
from trivit.datasets.transforms import eval_transform


def image(path, value: int = 128, size: int = 8, mode: str = "L", fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8), mode=mode).save(path, format=fmt)


def tree(root, splits=("train", "val"), classes=("a", "b"), per_class: int = 2):
    for split in splits:
        for name in classes:
            for i in range(per_class):
                image(root / split / name / f"{i}.png", value=40 * i)
    return root


def shards(*argv: str, capsys) -> tuple[int, str]:
    try:
        code = main(["shards", *argv, "--quiet"])
    except SystemExit as exited:
        code = exited.code
    return code, capsys.readouterr().err


def test_sixteen_bit_pngs_are_scaled_not_saturated(tmp_path, capsys):
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000 of 65535
    for name in ("a", "b"):
        path = tmp_path / "src" / "train" / name / "deep.png"
        path.parent.mkdir(parents=True)
        Image.fromarray(values).save(path, format="PNG")
        assert Image.open(path).mode == "I;16"
    assert shards(str(tmp_path / "src"), str(tmp_path / "out"), capsys=capsys)[0] == 0
    data = DataConfig(mean=[0.0], std=[1.0], eval_crop_pct=1.0, interpolation="nearest")
    decode = SampleDecoder(eval_transform(data, 8), "L")
    batch = next(iter(eval_loader(expand_urls(str(tmp_path / "out" / "train-000000.tar")), decode, batch_size=2,
                                  rank=0, world_size=1, num_workers=0)))
    expected = torch.from_numpy(np.rint(values / 257.0)).to(torch.uint8)  # the worker's uint8 pixels
    assert torch.equal(batch.images[0, 0], expected)
    assert (batch.images == 255).float().mean() < 0.05, "a plain convert would make almost every pixel white"


def test_a_class_only_under_val_and_unsupported_files_are_listed(tmp_path, capsys):
    root = tree(tmp_path / "src")
    image(root / "val" / "c" / "0.png")
    image(root / "train" / "a" / "old.bmp", fmt="BMP")
    image(root / "train" / "b" / "anim.gif", fmt="GIF")
    code, err = shards(str(root), str(tmp_path / "out"), capsys=capsys)
    assert code == 0
    assert "left out 3 files or folders" in err
    assert f"{root / 'val' / 'c'}: class folder not in the training split (1 files left out" in err
    assert f"{root / 'train' / 'a' / 'old.bmp'}: not a .jpeg/.jpg/.png/.webp file" in err
    assert "anim.gif: not a" in err


@pytest.mark.parametrize("case", ["val_without_classes", "empty_class_folders"])
def test_a_split_without_images_fails_and_writes_nothing(tmp_path, capsys, case):
    root = tree(tmp_path / "src", splits=("train",))
    if case == "val_without_classes":
        image(root / "val" / "loose.png")
        split = "val"
    else:
        for path in (root / "train").rglob("*.png"):
            path.unlink()
        split = "train"
    code, err = shards(str(root), str(tmp_path / "out"), capsys=capsys)
    assert code == 2 and f"{root / split} holds no readable image" in err and "nothing was written" in err
    assert not (tmp_path / "out").exists()


def test_a_good_index_is_never_replaced_by_an_empty_one(tmp_path, capsys):
    root = tree(tmp_path / "src")
    assert shards(str(root), str(tmp_path / "out"), capsys=capsys)[0] == 0
    good = (tmp_path / "out" / "index.json").read_text()
    assert shards(str(root), str(tmp_path / "out"), "--samples-per-shard", "0", capsys=capsys)[0] == 2
    for path in (root / "val").rglob("*.png"):
        path.unlink()
    assert shards(str(root), str(tmp_path / "out"), capsys=capsys)[0] == 2
    assert (tmp_path / "out" / "index.json").read_text() == good
    assert read_index(tmp_path / "out" / "index.json")["splits"]["val"]["total"] == 4


def test_an_output_folder_inside_the_tree_is_refused(tmp_path, capsys):
    root = tree(tmp_path / "src")
    code, err = shards(str(root), str(root / "train" / "shards"), capsys=capsys)
    assert code == 2 and "is inside the image tree" in err and "extra class on the next run" in err
    assert not (root / "train" / "shards").exists()
