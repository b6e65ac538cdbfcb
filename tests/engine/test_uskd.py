"""USKD: its terms against a float64 reference written from the paper's equations, the weak classifier's
place (block int(0.5 x depth) - 1, outside the model's state, in trivit's checkpoints) and its gradients."""
from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import tiny_overrides
from trivit.config import ConfigError, load
from trivit.engine.config import OptimConfig, TrainConfig, USKDConfig
from trivit.engine.metrics import read_metrics
from trivit.engine.objectives.losses import smoothed_targets
from trivit.engine.objectives.uskd import SelfDistiller, label_distribution, uskd_terms, weak_block, zipf_weights
from trivit.engine.trainer import Trainer
from trivit.sparse import Tapped, create_vit

STUDENT = [[2.0, 0.5, -1.0, 0.0, 1.2], [0.1, 0.2, 0.3, -0.4, 1.5], [-0.3, 1.1, 0.4, 0.9, 0.0]]
WEAK = [[0.0, -1.0, 2.0, 1.0, 0.5], [1.0, 0.0, -0.5, 2.5, 0.3], [0.7, -0.2, 1.9, 0.1, 1.4]]
LABELS = [[0.0, 1.0, 0.0, 0.0, 0.0],  # a hard label
          [0.6, 0.0, 0.0, 0.0, 0.4],  # mixup of classes 0 and 4
          [0.0, 0.0, 0.0, 1.0, 0.0]]


def softmax(values):
    exps = [math.exp(v - max(values)) for v in values]
    return [e / sum(exps) for e in exps]


def zipf(order, counted):
    """1/k for the k-th class of ``order`` (1-based), over the classes in ``counted``, renormalised."""
    weights = {c: 1.0 / (k + 1) for k, c in enumerate(order) if c in counted}
    total = sum(weights.values())
    return {c: w / total for c, w in weights.items()}


def uskd_reference(students, weaks, labels, ranking):
    """Per sample (target term, non-target term), from the paper's definitions, in float64 Python."""
    tops = [sorted(range(len(y)), key=lambda c: -y[c])[:2] for y in labels]
    probs = [softmax(s) for s in students]
    counted = [[(p[top[col]] ** 2) for p, top, y in zip(probs, tops, labels) if y[top[col]] > 0] for col in range(2)]
    mean_sq = [sum(values) / len(values) for values in counted]  # over the samples whose column counts
    result = []
    for s, w, y, top, p in zip(students, weaks, labels, tops, probs):
        targets = [c for c in top if y[c] > 0]
        target_term = -sum((p[c] ** 2 + y[c] - mean_sq[col]) * math.log(p[c])
                           for col, c in enumerate(top) if y[c] > 0)
        q = softmax(w)
        rest = [c for c in range(len(s)) if c not in targets]
        if ranking == "paper":  # normalised non-target probabilities of both, ranked among the non-targets
            score = {c: q[c] / (1 - sum(q[t] for t in targets)) + p[c] / (1 - sum(p[t] for t in targets)) for c in rest}
            order = sorted(rest, key=lambda c: -score[c])
        else:  # the authors' code: log-probabilities of the student, every class ranked
            log_p = [math.log(v) for v in p]
            q_t, log_p_t = sum(q[t] for t in targets), sum(log_p[t] for t in targets)
            score = {c: q[c] / (1 - q_t + 1e-6) + log_p[c] / (1 - log_p_t + 1e-6) for c in range(len(s))}
            order = sorted(range(len(s)), key=lambda c: -score[c])
        z = zipf(order, rest)
        s_rest = softmax([s[c] for c in rest])
        result.append((target_term, -sum(z[c] * math.log(v) for c, v in zip(rest, s_rest))))
    return result


@pytest.mark.parametrize("ranking", ["paper", "code"])
def test_uskd_terms_match_the_papers_equations(ranking):
    target, non_target = uskd_terms(torch.tensor(STUDENT), torch.tensor(WEAK), torch.tensor(LABELS), ranking)
    expected = torch.tensor(uskd_reference(STUDENT, WEAK, LABELS, ranking), dtype=torch.float64)
    torch.testing.assert_close(target.double(), expected[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(non_target.double(), expected[:, 1], rtol=0, atol=1e-6)


def test_the_two_rankings_differ_where_the_weak_classifier_disagrees():
    paper = uskd_reference(STUDENT, WEAK, LABELS, "paper")
    code = uskd_reference(STUDENT, WEAK, LABELS, "code")
    assert any(abs(a[1] - b[1]) > 1e-3 for a, b in zip(paper, code))


def test_zipf_weights_by_hand():
    """Scores rank classes 3, 1, 2 after the target 0: weights 1, 1/2, 1/3 renormalised = 6/11, 3/11, 2/11."""
    scores = torch.tensor([[float("-inf"), 0.5, 0.1, 0.9]])
    is_target = torch.tensor([[True, False, False, False]])
    torch.testing.assert_close(zipf_weights(scores, is_target), torch.tensor([[0.0, 3 / 11, 2 / 11, 6 / 11]]))


def test_label_distribution_undoes_smoothing_and_keeps_the_mix():
    smoothed = smoothed_targets(torch.tensor([2, 0]), 5, 0.1)
    torch.testing.assert_close(label_distribution(smoothed, 0.1), torch.eye(5)[[2, 0]])
    mixed = 0.7 * smoothed[0] + 0.3 * smoothed[1]  # timm's Mixup: the smoothed one-hots mixed by lambda
    expected = 0.7 * torch.eye(5)[2] + 0.3 * torch.eye(5)[0]
    torch.testing.assert_close(label_distribution(mixed[None], 0.1), expected[None])


def tiny_self_distiller(depth=4, **config) -> tuple[SelfDistiller, torch.nn.Module]:
    torch.manual_seed(0)
    model = create_vit("deit_tiny_patch16_224", None, num_classes=5, img_size=16, patch_size=4, in_chans=1, embed_dim=8,
                       depth=depth, num_heads=2)
    return SelfDistiller(USKDConfig(**config), model, 5, 0.1, OptimConfig(lr=1e-3), 16, torch.device("cpu")), model


def test_the_objective_is_ce_plus_the_weighted_terms_and_the_weak_loss():
    """With label smoothing 0.1 in the targets: CE + alpha L_t + beta L_nt + mu x CE(W f, 0.9 y + 0.1 / K)."""
    distiller, model = tiny_self_distiller(alpha=0.7, beta=0.2, mu=0.05)
    features = torch.randn(3, 8)
    targets = torch.tensor(LABELS) * 0.9 + 0.02  # (1 - 0.1) y + 0.1 / 5
    label_losses = torch.tensor([0.3, 0.4, 0.5])
    got = distiller.objective(label_losses, torch.tensor(STUDENT), torch.zeros(3, 1), targets, Tapped(cls_output=features))
    weak = (features.double() @ distiller.head.weight.double().T + distiller.head.bias.double()).tolist()
    terms = uskd_reference(STUDENT, weak, LABELS, "paper")
    expected = []
    for label, (t, n), w, y in zip(label_losses.tolist(), terms, weak, LABELS):
        weak_ce = -sum((0.9 * yc + 0.02) * math.log(qc) for yc, qc in zip(y, softmax(w)))
        expected.append(label + 0.7 * t + 0.2 * n + 0.05 * weak_ce)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5)


def test_the_weak_classifier_gets_the_gradients_of_one_graph():
    """The model's loss (weak head detached) plus the separate backward of the head's own loss give the
    gradients of the whole objective differentiated at once, for the backbone and the head alike."""
    distiller, model = tiny_self_distiller()
    images, targets = torch.randn(3, 1, 16, 16), torch.tensor(LABELS) * 0.9 + 0.02
    weights = torch.tensor([0.5, 1.0, 0.25])

    def forward():
        logits, tapped = model(images, taps=distiller.taps)
        return logits, (-(targets * logits.log_softmax(-1)).sum(-1)), tapped

    logits, label_losses, tapped = forward()
    distiller.loss(label_losses, logits, images, targets, weights, tapped).backward()
    distiller.backward()
    split = {n: p.grad.clone() for n, p in model.named_parameters()}
    split_head = [p.grad.clone() for p in distiller.head.parameters()]
    model.zero_grad(), distiller.zero_grad()

    logits, label_losses, tapped = forward()
    features, labels = tapped.cls_output, label_distribution(targets, 0.1)
    weak = distiller.head(features)
    target, non_target = uskd_terms(logits, weak.detach(), labels)
    weak_ce = -((0.9 * labels + 0.02) * weak.log_softmax(-1)).sum(-1)
    ((label_losses + target + 0.1 * non_target + 0.005 * weak_ce) * weights).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(split[name], p.grad, msg=name)
    for got, p in zip(split_head, distiller.head.parameters()):
        torch.testing.assert_close(got, p.grad)
    assert split_head[0].abs().max() > 0


def test_the_weak_classifier_reads_the_cls_of_block_half_depth_minus_one():
    assert [weak_block(d) for d in (2, 4, 12, 24)] == [0, 1, 5, 11]
    distiller, model = tiny_self_distiller(depth=4)
    images = torch.randn(2, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        tapped = model(images, taps=distiller.taps)[1].cls_output
        intermediates = model.forward_intermediates(images, indices=[1], norm=False, output_fmt="NLC",
                                                    return_prefix_tokens=True, intermediates_only=True)
    _, prefix = intermediates[0]  # (patch tokens, prefix tokens)
    torch.testing.assert_close(tapped, prefix[:, 0])


def test_uskd_refuses_a_teacher_and_a_teachers_alpha():
    with pytest.raises(ConfigError, match="distill.teacher.*loss soft, hard or nkd"):
        load(TrainConfig, None, ["distill.loss=uskd", "distill.teacher=runs/x"])
    with pytest.raises(ConfigError, match="distill.uskd.alpha"):
        load(TrainConfig, None, ["distill.loss=uskd", "distill.alpha=0.5"])
    with pytest.raises(ValueError, match="the model has 1 block.*at least 2 blocks"):
        tiny_self_distiller(depth=1)
    model = create_vit("deit_tiny_patch16_224", {"semantic": {"num_tokens": 4}}, num_classes=5, img_size=16,
                       patch_size=4, in_chans=1, embed_dim=8, depth=6, num_heads=2)
    with pytest.raises(ConfigError, match="semantic tokens with head 'gap' drop"):
        SelfDistiller(USKDConfig(), model, 5, 0.1, OptimConfig(lr=1e-3), 16, torch.device("cpu"))


def test_uskd_trains_a_weak_classifier_outside_the_model_and_resumes_it_exactly(tiny_shards, tmp_path):
    """The weak classifier moves, stays out of the model's state_dict, and (with its optimizer) is in the
    checkpoint: stopping at step 4 and resuming gives the uninterrupted run's losses to step 8, bit for bit."""
    common = {"distill.loss": "uskd", "distill.uskd.beta": "0.5", "distill.uskd.mu": "0.5"}
    whole = Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path / "whole", **common,
                                                           **{"schedule.max_steps": "8"})))
    start = whole.objective.head.weight.detach().clone()
    whole.train()
    assert (whole.objective.head.weight - start).abs().max() > 1e-4
    assert not any("weak" in key or key.startswith("head.") and key not in ("head.weight", "head.bias")
                   for key in whole.model.state_dict())
    assert whole.model.state_dict().keys() == Trainer(load(TrainConfig, None, tiny_overrides(
        tiny_shards, tmp_path / "plain"))).model.state_dict().keys()

    for steps in ("4", "8"):
        Trainer(load(TrainConfig, None, tiny_overrides(tiny_shards, tmp_path / "resumed", **common,
                                                       **{"schedule.max_steps": steps}))).train()
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "step_00000008" / "trainer.pt", weights_only=False)
    assert set(state["objective"]) == {"weak_classifier", "optimizer"}
    losses = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "whole") if "loss" in r]
    resumed = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    assert resumed == losses and len(losses) == 8
