"""Distillation: the losses against float64 references written from the papers' equations, and a
teacher in the trainer (frozen, outside the optimizer and the checkpoints)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import TINY_TEACHER_KWARGS, tiny_overrides
from trivit.config import ConfigError, load
from trivit.engine.config import DistillConfig, TrainConfig
from trivit.engine.metrics import read_metrics
from trivit.engine.objectives.distill import Distiller, hard_distillation, nkd_loss, soft_distillation
from trivit.engine.trainer import Trainer

STUDENT = [[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, -0.4]]
TEACHER = [[1.0, 1.5, -0.5, 0.2], [-1.0, 2.0, 0.0, 0.5]]


def softmax(values):
    exps = [math.exp(v - max(values)) for v in values]
    return [e / sum(exps) for e in exps]


def nkd_reference(student, teacher, target, gamma, lam):
    """NKD for one sample, from the paper: -T_t log S_t - gamma lam^2 sum_{i != t} T^_i log S^_i, where T^ and
    S^ are softmaxes over the non-target logits / lam (the target removed first)."""
    t_prob, s_prob = softmax(teacher), softmax(student)
    rest = [i for i in range(len(student)) if i != target]
    t_hat = softmax([teacher[i] / lam for i in rest])
    s_hat = softmax([student[i] / lam for i in rest])
    non_target = sum(t * math.log(s) for t, s in zip(t_hat, s_hat))
    return -t_prob[target] * math.log(s_prob[target]) - gamma * lam ** 2 * non_target


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.5, 2.0), (0.0, 1.0)])
def test_nkd_matches_the_papers_equation(gamma, lam):
    targets = [1, 3]
    got = nkd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(targets), gamma, lam)
    expected = [nkd_reference(s, t, c, gamma, lam) for s, t, c in zip(STUDENT, TEACHER, targets)]
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_nkd_with_gamma_0_is_its_target_term():
    got = nkd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor([0, 2]), 0.0, 1.0)
    expected = [-softmax(t)[c] * math.log(softmax(s)[c]) for s, t, c in zip(STUDENT, TEACHER, [0, 2])]
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-7)


def test_under_mixup_nkd_takes_the_largest_soft_label_as_the_target():
    """A mixed, smoothed soft label: 0.6 of class 2 and 0.4 of class 0 (+ smoothing) -> t = 2."""
    soft = torch.tensor([[0.4 * 0.9 + 0.025, 0.025, 0.6 * 0.9 + 0.025, 0.025]] * 2)
    distiller = Distiller(DistillConfig(loss="nkd", teacher="t", alpha=1.0), lambda images: torch.tensor(TEACHER),
                          None)
    got = distiller.objective(torch.zeros(2), torch.tensor(STUDENT), torch.zeros(2, 1), soft)
    expected = [nkd_reference(s, t, 2, 1.0, 1.0) for s, t in zip(STUDENT, TEACHER)]
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_soft_distillation_is_deits_term_and_vanishes_for_the_teacher_itself():
    tau = 3.0
    got = soft_distillation(torch.tensor(STUDENT), torch.tensor(TEACHER), tau)
    expected = []
    for s, t in zip(STUDENT, TEACHER):
        p, q = softmax([v / tau for v in t]), softmax([v / tau for v in s])
        expected.append(tau ** 2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / len(s))
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)
    student = torch.tensor(STUDENT, requires_grad=True)
    same = soft_distillation(student, student.detach().clone(), tau)
    same.sum().backward()
    assert same.abs().max() < 1e-7 and student.grad.abs().max() < 1e-7


def test_hard_distillation_is_cross_entropy_to_the_teachers_top_class():
    got = hard_distillation(torch.tensor(STUDENT), torch.tensor(TEACHER))
    expected = [-math.log(softmax(s)[1]) for s in STUDENT]  # both teacher rows peak at class 1
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_the_objective_weights_label_loss_and_term_by_alpha():
    distiller = Distiller(DistillConfig(loss="hard", teacher="t", alpha=0.25), lambda images: torch.tensor(TEACHER),
                          None)
    label = torch.tensor([1.0, 2.0])
    got = distiller.objective(label, torch.tensor(STUDENT), torch.zeros(2, 1), torch.eye(4)[:2])
    term = hard_distillation(torch.tensor(STUDENT), torch.tensor(TEACHER))
    torch.testing.assert_close(got, 0.75 * label + 0.25 * term)


def test_a_loss_without_teacher_is_refused():
    with pytest.raises(ConfigError, match="distill.loss='nkd' needs a teacher"):
        load(TrainConfig, None, ["distill.loss=nkd"])


def test_a_teacher_trains_the_student_and_stays_out_of_its_state(tiny_shards, tmp_path, tiny_teacher_file):
    common = {"schedule.max_steps": "4", "optim.ema_decay": "null"}
    plain = Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path / "plain", **common)))
    plain.train()
    taught = Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path / "nkd", **common, **{
        "distill.loss": "nkd", "distill.teacher": "deit_tiny_patch16_224", "distill.teacher_weights": str(tiny_teacher_file),
        "distill.teacher_kwargs": TINY_TEACHER_KWARGS})))
    teacher = taught.objective.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    taught.train()
    assert not teacher.training and all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    optimised = {id(p) for group in taught.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert taught.model.state_dict().keys() == plain.model.state_dict().keys(), "the teacher is not in the model"
    losses = [r["loss"] for r in read_metrics(tmp_path / "nkd")]
    baseline = [r["loss"] for r in read_metrics(tmp_path / "plain")]
    assert len(losses) == 4 and losses != baseline and all(math.isfinite(v) for v in losses)


def test_a_teacher_of_other_classes_is_refused(tiny_shards, tmp_path, tiny_teacher_file):
    with pytest.raises(ValueError, match="classifies 4 classes, the student 7"):
        Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path, **{
            "model.num_classes": "7", "distill.loss": "soft", "distill.teacher": "deit_tiny_patch16_224",
            "distill.teacher_weights": str(tiny_teacher_file), "distill.teacher_kwargs": TINY_TEACHER_KWARGS})))


def test_a_distilled_deit_trains_its_distillation_head_on_the_teacher_and_predicts_with_both(
        tiny_shards, tmp_path, tiny_teacher_file):
    """DeiT's hard distillation with deit_*_distilled: (1 - alpha) CE(class head, labels) + alpha CE(distillation
    head, teacher's argmax), and the mean of the two heads as the prediction the example level scores."""
    trainer = Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path, **{
        "model.name": "deit_tiny_distilled_patch16_224", "data.mixup": "0", "data.cutmix": "0",
        "model.drop_path_rate": "0", "distill.loss": "hard", "distill.alpha": "0.3",
        "distill.teacher": "deit_tiny_patch16_224", "distill.teacher_weights": str(tiny_teacher_file),
        "distill.teacher_kwargs": TINY_TEACHER_KWARGS})))
    model, teacher = trainer.model, trainer.objective.teacher
    torch.manual_seed(0)
    images, labels = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    model.train()
    loss, predicted, _, _, _ = trainer._micro_batch_loss(images, labels, torch.arange(6), torch.arange(6), 6)
    class_logits, distillation_logits = model(images)
    smoothed = torch.nn.functional.cross_entropy(class_logits, labels, label_smoothing=0.1, reduction="none")
    taught = torch.nn.functional.cross_entropy(distillation_logits, teacher(images).argmax(-1), reduction="none")
    torch.testing.assert_close(loss, (0.7 * smoothed + 0.3 * taught).mean())
    torch.testing.assert_close(predicted, (class_logits + distillation_logits) / 2)


def test_uskd_is_refused_for_a_distilled_deit(tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match="distillation token needs a teacher"):
        Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path, **{
            "model.name": "deit_tiny_distilled_patch16_224", "distill.loss": "uskd"})))


def test_a_teachers_alpha_without_a_teacher_is_refused_but_older_configs_load():
    """Configs written before alpha became null without a teacher hold its old default 0.5: they still load."""
    assert load(TrainConfig, None, ["distill.alpha=0.5"]).distill.alpha is None
    with pytest.raises(ConfigError, match="distill.alpha.*it weighs a teacher's term"):
        load(TrainConfig, None, ["distill.alpha=0.3"])
