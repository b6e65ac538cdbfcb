"""DCAL in the trainer: the uncertainty-weighted objective against hand-worked numbers, exact resume,
the export (backbone for timm, GLCA branch beside it), starting from it, and the refused settings."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from trivit.cli import main
from trivit.config import ConfigError, load
from trivit.engine.compile import compiled_graphs
from trivit.engine.config import DistillConfig, TrainConfig
from trivit.engine.metrics import read_metrics
from trivit.engine.model.build import create_model
from trivit.engine.model.pretrained import init_from
from trivit.engine.objectives.base import Objective
from trivit.engine.objectives.dcal import DualCrossAttentionObjective, uncertainty_weighted
from trivit.engine.objectives.distill import Distiller, nkd_loss
from trivit.engine.trainer import Trainer
from trivit.sparse.dcal import DCALConfig, DCALOutputs

DCAL = {"model.dcal.glca_top_r": "0.25", "model.dcal.pwca": "true"}


def test_uncertainty_weighting_is_the_papers_formula():
    """1/2 sum_k (exp(-w_k) L_k + w_k): with L = (1, 2, 3), w = (0, ln 2, -ln 2): 1/2 (1 + 1 + ln 2 + 6 - ln 2) = 4."""
    log_vars = torch.tensor([0.0, math.log(2), -math.log(2)], requires_grad=True)
    total = uncertainty_weighted([torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)], log_vars, torch.tensor(1.0))
    assert total.item() == pytest.approx(4.0)
    total.backward()  # d/dw_k = 1/2 (1 - exp(-w_k) L_k): 1/2 (1 - 1), 1/2 (1 - 2/2), 1/2 (1 - 2 x 3)
    torch.testing.assert_close(log_vars.grad, torch.tensor([0.0, 0.0, -2.5]))


def test_the_objective_weights_each_branchs_per_sample_losses():
    logits, glca, pwca = (torch.randn(4, 3, generator=torch.Generator().manual_seed(s)) for s in range(3))
    targets = torch.eye(3)[[0, 2, 1, 1]]
    weights = torch.tensor([0.1, 0.2, 0.3, 0.15])  # the example level's, over the rank batch
    log_vars = torch.tensor([0.3, -0.2, 0.5])
    label_losses = -(targets * logits.log_softmax(-1)).sum(-1)
    objective = DualCrossAttentionObjective(Objective(), DCALConfig(glca_top_r=0.1, pwca=True), seed=0,
                                            device=torch.device("cpu"))
    loss = objective.loss(label_losses, DCALOutputs(logits, glca, pwca, log_vars), None, targets, weights)
    expected = 0.0
    for branch, w in zip((logits, glca, pwca), log_vars.tolist()):
        for i in range(4):
            ce = -math.log(branch[i].softmax(-1)[targets[i].argmax()].item())
            expected += 0.5 * (math.exp(-w) * ce * weights[i].item() + w * weights[i].item())
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_a_distillation_objective_applies_to_the_self_attention_term():
    """NKD inside DCAL: the self-attention branch's term is the distiller's per-sample objective."""
    logits, glca = (torch.randn(4, 3, generator=torch.Generator().manual_seed(s)) for s in range(2))
    teacher_logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    targets = torch.eye(3)[[0, 2, 1, 1]]
    weights = torch.full((4,), 0.25)
    label_losses = -(targets * logits.log_softmax(-1)).sum(-1)
    config = DistillConfig(loss="nkd", teacher="identity", alpha=0.5, gamma=1.5, lambda_=1.0)
    inner = Distiller(config, torch.nn.Identity(), None)  # the "images" are the teacher's logits
    objective = DualCrossAttentionObjective(inner, DCALConfig(glca_top_r=0.1), seed=0, device=torch.device("cpu"))
    log_vars = torch.tensor([0.4, -0.3])
    loss = objective.loss(label_losses, DCALOutputs(logits, glca, None, log_vars), teacher_logits, targets, weights)
    distilled = 0.5 * label_losses + 0.5 * nkd_loss(logits, teacher_logits, targets.argmax(-1), 1.5, 1.0)
    glca_losses = -(targets * glca.log_softmax(-1)).sum(-1)
    expected = 0.5 * (math.exp(-0.4) * (distilled * weights).sum() + 0.4
                      + math.exp(0.3) * (glca_losses * weights).sum() - 0.3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def train(shards, run_dir, **extra):
    trainer = Trainer(load(TrainConfig, None, tiny_overrides(shards, run_dir, **dict(DCAL, **extra))))
    return trainer, trainer.train()


def test_a_dcal_run_compiles_resumes_exactly_and_exports_the_backbone_and_the_glca_branch(tiny_shards, tmp_path):
    """The interrupted run is compiled (aot_eager: the graphs inductor would get) and the uninterrupted one
    eager: the same losses, bit for bit."""
    common = {"schedule.max_steps": "6", "checkpoint.every_steps": "3"}
    compiled = {"engine.compile": "true", "engine.compile_backend": "aot_eager"}
    train(tiny_shards, tmp_path / "full", **common)
    graphs_before = compiled_graphs()  # dynamo counts the graphs of the whole process
    train(tiny_shards, tmp_path / "split", **dict(common, **compiled, **{"schedule.max_steps": "3"}))
    trainer, last = train(tiny_shards, tmp_path / "split", **common, **compiled)
    full = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "split")}
    assert sorted(full) == list(range(1, 7)) and all(split[s] == full[s] for s in range(1, 7)), (full, split)
    graphs = last["compiled_graphs"] - graphs_before
    assert 0 < graphs <= 4, f"{graphs} graphs: one for training and a few for evaluation per run, no graph breaks"

    backbone = load_file(tmp_path / "split" / "model.safetensors")
    assert not any(key.startswith("dcal") for key in backbone)
    timm.create_model("deit_tiny_patch16_224", num_classes=4, img_size=16, patch_size=4, in_chans=1, embed_dim=32,
                      depth=2, num_heads=2).load_state_dict(backbone)  # strict: timm's state_dict exactly
    glca = load_file(tmp_path / "split" / "glca.safetensors")
    model = trainer.model
    assert glca.keys() == {f"{part}.{key}" for part in ("block", "norm", "head")
                           for key in getattr(model.dcal.glca, part).state_dict()}
    assert torch.equal(glca["head.weight"], model.dcal.glca.head.weight.detach())

    config = load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path / "next", **DCAL))
    restarted = create_model(config, 4, None)
    record = init_from(restarted, str(tmp_path / "split" / "model.safetensors"), "deit_tiny_patch16_224", {})
    assert "loaded the GLCA branch from the weights" in record["init_changes"]
    images = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(restarted.eval()(images), model.eval()(images))

    final = [r for r in read_metrics(tmp_path / "split") if "eval_top1" in r][-1]
    assert main(["eval", str(tmp_path / "split"), "--keep-rates", "1.0", "--repeats", "1",
                 "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())[0]["top1"] == final["eval_top1"]
    assert main(["eval", str(tmp_path / "split"), "--keep-rates", "0.5"]) == 2

    plain = create_model(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path / "plain")), 4, None)
    record = init_from(plain, str(tmp_path / "split" / "model.safetensors"), "deit_tiny_patch16_224", {})
    assert any("not used" in change for change in record["init_changes"])
    fresh = create_model(config, 4, None)
    record = init_from(fresh, str(tmp_path / "split"), "deit_tiny_patch16_224", {})
    assert "loaded DCAL's uncertainty weights from the weights" in record["init_changes"]


def test_a_timm_start_copies_the_last_block_norm_and_head_into_the_glca_branch(tiny_shards, tmp_path,
                                                                              tiny_teacher_file):
    config = load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path / "run", **DCAL))
    model = create_model(config, 4, None)
    record = init_from(model, str(tiny_teacher_file), "deit_tiny_patch16_224", {})
    assert any("copy of the last block" in change for change in record["init_changes"])
    glca = model.dcal.glca
    for mine, theirs in ((glca.block, model.blocks[-1]), (glca.norm, model.norm), (glca.head, model.head)):
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))


@pytest.mark.parametrize("overrides, key", [
    ({"sparsity.tokens.keep_rate": "0.5"}, "sparsity.tokens.keep_rate"),
    ({"sparsity.attention.keep_rate": "0.5", "sparsity.tokens.locations": "[0]"}, "sparsity.attention.keep_rate"),
    ({"data.batch_size": "2", "engine.grad_accum_steps": "2", "data.mixup": "0", "data.cutmix": "0"},
     "model.dcal.pwca"),
])
def test_settings_dcal_cannot_compose_with_are_refused_at_start_up(overrides, key, tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path, **dict(DCAL, **overrides))))
