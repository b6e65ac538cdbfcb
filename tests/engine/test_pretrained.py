"""Starting from weights (model.init_from): timm files and trivit runs, adapted as timm adapts them,
and layer-wise learning-rate decay."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from tests.conftest import tiny_overrides
from trivit.config import load
from trivit.engine.config import TrainConfig
from trivit.engine.metrics import read_metrics
from trivit.engine.model.pretrained import init_from
from trivit.engine.optim import build_optimizer, build_scheduler, peak_group_lr
from trivit.engine.trainer import Trainer
from trivit.sparse import create_vit, set_keep_rates

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)


def timm_source(tmp_path, name="source.safetensors", wrap=None, **changes):
    torch.manual_seed(1)
    model = timm.create_model("deit_tiny_patch16_224", **{**SMALL, "num_classes": 4, **changes}).eval()
    state = model.state_dict()
    path = tmp_path / name
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({wrap: state} if wrap else state, path)
    return model, path


def trivit_model(sparsity=None, **changes):
    torch.manual_seed(2)
    return create_vit("deit_tiny_patch16_224", sparsity, **{**SMALL, "num_classes": 4, **changes}).eval()


@pytest.mark.parametrize("name, wrap", [("w.safetensors", None), ("w.pth", None), ("w.pth", "state_dict"),
                                        ("w.bin", "model")])
def test_timm_weights_load_and_give_timms_logits(tmp_path, name, wrap):
    source, path = timm_source(tmp_path, name, wrap)
    model = trivit_model({"tokens": {"keep_rate": 0.7}})
    record = init_from(model, str(path), "deit_tiny_patch16_224", {})
    assert record == {"init_from": f"weights file {path}", "init_changes": []}
    images = torch.randn(2, 3, 32, 32)
    set_keep_rates(model, 1.0, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(images), source(images), rtol=0, atol=1e-5)


def test_another_number_of_classes_reinitialises_the_head_only(tmp_path):
    source, path = timm_source(tmp_path)
    model = trivit_model(num_classes=7)
    head_before = model.head.weight.clone()
    record = init_from(model, str(path), "deit_tiny_patch16_224", {})
    assert record["init_changes"] == ["re-initialised the head: 4 classes in the source, 7 here"]
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_a_distilled_deit_loads_timms_weights_and_reinitialises_both_heads(tmp_path):
    """deit_*_distilled: the distillation token and its position loaded; both classifiers re-initialised."""
    torch.manual_seed(1)
    name = "deit_tiny_distilled_patch16_224"
    source = timm.create_model(name, **{**SMALL, "num_classes": 4}).eval()
    save_file(source.state_dict(), str(tmp_path / "distilled.safetensors"))
    model = create_vit(name, **{**SMALL, "num_classes": 7})
    heads_before = model.head.weight.clone(), model.head_dist.weight.clone()
    record = init_from(model, str(tmp_path / "distilled.safetensors"), name, {})
    assert record["init_changes"] == ["re-initialised the head: 4 classes in the source, 7 here"]
    assert torch.equal(model.head.weight, heads_before[0]) and torch.equal(model.head_dist.weight, heads_before[1])
    assert torch.equal(model.dist_token, source.dist_token) and torch.equal(model.pos_embed, source.pos_embed)


def test_another_image_size_resamples_the_position_embedding_as_timm_does(tmp_path):
    source, path = timm_source(tmp_path)
    model = trivit_model(img_size=48)
    record = init_from(model, str(path), "deit_tiny_patch16_224", {})
    assert record["init_changes"] == ["resampled pos_embed from [1, 17, 32] to [1, 37, 32]"]
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=1e-6)


def test_another_number_of_channels_adapts_the_patch_embedding(tmp_path):
    source, path = timm_source(tmp_path)
    model = trivit_model(in_chans=1)
    record = init_from(model, str(path), "deit_tiny_patch16_224", {})
    assert record["init_changes"] == ["adapted the patch embedding from 3 to 1 input channels"]
    expected = source.patch_embed.proj.weight.detach().sum(dim=1, keepdim=True)  # timm: RGB summed into one channel
    torch.testing.assert_close(model.patch_embed.proj.weight.detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("changes, message", [
    ({"embed_dim": 64, "num_heads": 2}, r"'cls_token' has shape \[1, 1, 64\] in the weights but \[1, 1, 32\] here"),
    ({"depth": 3}, r"the weights hold 'blocks\.2\.[\w.]+' \(shape \[[\d, ]+\]\), which this model has not"),
])
def test_another_architecture_is_an_error_naming_the_key_and_shapes(tmp_path, changes, message):
    _, path = timm_source(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        init_from(trivit_model(), str(path), "deit_tiny_patch16_224", {})


def test_timm_weights_that_are_not_cached_name_the_file_to_provide(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    with pytest.raises(FileNotFoundError, match=r"not in the local cache .*timm/deit_tiny_patch16_224.fb_in1k.*"
                                                r"model.init_from=PATH"):
        init_from(trivit_model(), "timm", "deit_tiny_patch16_224.fb_in1k", {})
    _, path = timm_source(tmp_path)
    record = init_from(trivit_model(), "timm", "deit_tiny_patch16_224", {"pretrained_cfg_overlay": {"file": str(path)}})
    assert record["init_from"] == f"timm's pretrained deit_tiny_patch16_224 ({path})"


def test_missing_source_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="model.init_from: no such file or folder 'nope.safetensors'"):
        init_from(trivit_model(), "nope.safetensors", "deit_tiny_patch16_224", {})


def test_a_run_started_from_another_run_has_its_weights_at_step_0_and_its_own_schedule(tiny_shards, tmp_path):
    common = {"schedule.max_steps": "3", "optim.ema_decay": "null"}
    Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path / "source", **common))).train()
    source = load_file(tmp_path / "source" / "model.safetensors")
    fresh = Trainer(load(TrainConfig, None, tiny_overrides(
        tiny_shards, tmp_path / "tuned", **common, **{"model.init_from": str(tmp_path / "source")})))
    assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in source.items())
    assert fresh.step == 0
    fresh.train()
    scratch = Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path / "scratch", **common)))
    scratch.train()
    tuned, baseline = read_metrics(tmp_path / "tuned"), read_metrics(tmp_path / "scratch")
    assert tuned[0]["step"] == 0 and tuned[0]["init_from"].startswith("trivit checkpoint ")
    assert tuned[0]["init_from"].endswith("step_00000003")
    assert [r["lr"] for r in tuned[1:]] == [r["lr"] for r in baseline], "its own LR schedule from step 0"
    assert tuned[1]["loss"] < baseline[0]["loss"], "starts from the trained weights"


def test_layer_decay_scales_each_layers_learning_rate():
    model = trivit_model()
    config = load(TrainConfig, None, ["optim.layer_decay=0.5", "optim.lr=1e-3", "schedule.warmup_epochs=0",
                                      "schedule.epochs=10"])
    optimizer = build_optimizer(model, config.optim, 512)
    build_scheduler(optimizer, config.schedule).step(0)
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    # depth 2: embeddings 0.5^3, blocks.0 0.5^2, blocks.1 0.5, head and final norm 1
    assert scale_of[id(model.pos_embed)] == pytest.approx(0.125)
    assert scale_of[id(model.blocks[0].attn.qkv.weight)] == pytest.approx(0.25)
    assert scale_of[id(model.blocks[1].mlp.fc1.weight)] == pytest.approx(0.5)
    assert scale_of[id(model.head.weight)] == pytest.approx(1.0)
    lrs = {g["lr_scale"]: g["lr"] for g in optimizer.param_groups}
    assert lrs[0.25] == pytest.approx(0.25e-3) and peak_group_lr(optimizer) == pytest.approx(1e-3)
