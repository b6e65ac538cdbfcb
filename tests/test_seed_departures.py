"""Where trivit departs from the seed methods' released code (README says why), each measured against a float64
computation written from the authors' code: NKD's loss weighting, USKD's same-class mixup pairs, and the
attention level's exact top-k against the reference's smoothing."""
from __future__ import annotations

import math

import torch

from tests.engine.test_distill import STUDENT, TEACHER, nkd_reference, softmax
from trivit.engine.config import DistillConfig
from trivit.engine.objectives.distill import Distiller
from trivit.engine.objectives.uskd import uskd_terms
from trivit.sparse.attention import build_attention_mask


def test_nkd_at_alpha_half_is_half_the_authors_ce_plus_nkd():
    """The code trains CE + NKD; trivit (1 - alpha) CE + alpha NKD: at alpha 0.5 the same direction, half the size
    (which moves where gradient clipping acts)."""
    targets = [1, 3]
    ce = [-math.log(softmax(s)[t]) for s, t in zip(STUDENT, targets)]
    authors = [c + nkd_reference(s, te, t, 1.0, 1.0) for c, s, te, t in zip(ce, STUDENT, TEACHER, targets)]
    distiller = Distiller(DistillConfig(loss="nkd", teacher="t", alpha=0.5), lambda images: torch.tensor(TEACHER),
                          None)
    got = distiller.objective(torch.tensor(ce), torch.tensor(STUDENT), torch.zeros(2, 1), torch.eye(4)[targets])
    torch.testing.assert_close(2 * got.double(), torch.tensor(authors, dtype=torch.float64), rtol=0, atol=1e-6)


def uskd_target_terms(students, labels, whole_batch_means):
    """USKD's target term per sample, from the two largest label entries (ties: the lower class index, for a
    sample with one class): p_t = S_t^2 + V_t - the column's mean of S_t^2, the term of a V_t = 0 class zeroed.
    ``whole_batch_means``: the column means over every sample, as the authors' code (USKDLoss.forward) takes them;
    else over the samples whose class in that column has V_t > 0, as trivit does."""
    tops = [sorted(range(len(y)), key=lambda c: (-y[c], c))[:2] for y in labels]
    probs = [softmax(s) for s in students]
    means = []
    for col in range(2):
        rows = [(p, top) for p, top, y in zip(probs, tops, labels) if whole_batch_means or y[top[col]] > 0]
        means.append(sum(p[top[col]] ** 2 for p, top in rows) / len(rows))
    return [-sum((p[c] ** 2 + y[c] - means[col]) * math.log(p[c]) for col, c in enumerate(top) if y[c] > 0)
            for p, top, y in zip(probs, tops, labels)]


STUDENTS = [[2.0, 0.5, -1.0, 0.0, 1.2], [0.1, 0.2, 0.3, -0.4, 1.5], [-0.3, 1.1, 0.4, 0.9, 0.0]]
MIXED = [[0.0, 0.7, 0.0, 0.0, 0.3], [0.6, 0.0, 0.0, 0.0, 0.4], [0.0, 0.0, 0.45, 0.55, 0.0]]


def test_uskd_equals_the_authors_target_term_when_every_sample_mixes_two_classes():
    target, _ = uskd_terms(torch.tensor(STUDENTS), torch.zeros(3, 5), torch.tensor(MIXED), "code")
    authors = uskd_target_terms(STUDENTS, MIXED, whole_batch_means=True)
    torch.testing.assert_close(target.double(), torch.tensor(authors, dtype=torch.float64), rtol=0, atol=1e-6)


def test_a_same_class_mix_has_no_second_class_in_trivit_where_the_code_keeps_a_zero_weight_one():
    """A one-hot label in a mixup batch (both images of one class): the code's zero-weight second class still
    enters its column's batch mean (and leaves the non-target set); trivit's column mean skips it."""
    labels = [MIXED[0], MIXED[1], [0.0, 0.0, 0.0, 1.0, 0.0]]
    target, _ = uskd_terms(torch.tensor(STUDENTS), torch.zeros(3, 5), torch.tensor(labels), "code")
    ours = uskd_target_terms(STUDENTS, labels, whole_batch_means=False)
    authors = uskd_target_terms(STUDENTS, labels, whole_batch_means=True)
    torch.testing.assert_close(target.double(), torch.tensor(ours, dtype=torch.float64), rtol=0, atol=1e-6)
    assert ours[2] == authors[2], "the one-class sample's own term is the same"
    assert min(abs(a - b) for a, b in zip(ours[:2], authors[:2])) > 1e-3, "the mixed samples' second terms move"


def test_exact_top_k_keeps_k_links_where_the_references_smoothing_ties_the_sharp_rows_tail():
    """The reference ranks (p + eps/N) / (sum + eps), eps = 1e-6, in float32: every link below about 1e-15 then
    equals eps/N / (1 + eps), so a sharp row's small links tie with each other and the top-k keeps them all.
    trivit ranks p itself and keeps exactly the k largest (ties at the threshold only where p ties)."""
    row = torch.tensor([0.7, 0.3 - 4e-18, 1e-18, 1e-19, 1e-20, 1e-21, 1e-22, 1e-23], dtype=torch.float64)
    n, k, eps = len(row), 3, 1e-6
    smoothed = ((row + eps / n) / (row.sum() + eps)).float()
    assert int((smoothed >= smoothed.topk(k).values[-1]).sum()) == n, "the reference keeps all 8 links"
    attention = row.float().expand(n, n).unsqueeze(0)  # every query row the same; no prefix tokens
    mask = build_attention_mask(attention, torch.arange(n).unsqueeze(0), k / n, 0, 0)
    assert mask[0, 0].sum(-1).tolist() == [k] * n
    assert mask[0, 0, 0].tolist() == [True, True, True] + [False] * 5
