"""Every backend for real: 2 CPU processes on gloo under a real launcher, through the real CLI.

Each run trains the tiny ViT with all three sparsity levels for 4 steps, stops, and is launched
again to resume to step 8; DDP, FSDP2 and ZeRO-2 compiled and with activation checkpointing,
ZeRO-3 with activation checkpointing. The losses must be finite, fall, and (the same mathematics) equal a
single process that accumulates the same two micro-batches per step; the checkpoint must be in
the backend's own format and the exported weights must load into timm strictly. ZeRO-1, whose
checkpoints are ZeRO-2's format, trains against the single process in the semantic-token test.
"""
from __future__ import annotations

import math

import pytest
import timm
from safetensors.torch import load_file

from tests.conftest import TINY_TEACHER_KWARGS, tiny_overrides
from tests.launchers import DISTRIBUTED, TOLERANCE, train_cli
from trivit.config import load
from trivit.engine.config import TrainConfig
from trivit.engine.metrics import read_metrics
from trivit.engine.trainer import Trainer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMPILED = {"engine.compile": "true", "engine.compile_backend": "aot_eager", "engine.activation_checkpointing": "true"}
"""The large-model path; aot_eager traces the graphs inductor would compile, without its minutes of code generation."""
CHECKPOINTED = {"engine.activation_checkpointing": "true"}

VARIANTS = {
    # name: (launcher, trivit overrides, checkpoint entry the backend writes, equals the reference)
    "ddp_compiled": ("accelerate", {"engine.backend": "ddp", **COMPILED}, "trainer.pt", True),
    "fsdp_compiled": ("fsdp.yaml", {"engine.precision": "fp32", **COMPILED}, "sharded", True),
    "zero2_compiled": ("torchrun", {"engine.backend": "deepspeed", "engine.zero_stage": "2", **COMPILED}, "deepspeed",
                       True),
    "zero3_bf16_checkpointed": ("deepspeed_zero3.yaml", CHECKPOINTED, "deepspeed", False),
}


@pytest.fixture(scope="module", autouse=True)
def deepspeed_comm_op():
    """Build DeepSpeed's CPU communication op once, here, before two ranks at a time would race to
    JIT-compile it (cached in ~/.cache/torch_extensions; about a minute the first time)."""
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory) -> dict[int, float]:
    """One process, two micro-batches per step: the same global batches as 2 ranks."""
    run_dir = tmp_path_factory.mktemp("reference")
    overrides = tiny_overrides(tiny_shards, run_dir, **dict(DISTRIBUTED, **{"engine.grad_accum_steps": "2",
                                                                            "schedule.max_steps": "8"}))
    Trainer(load(TrainConfig, None, overrides)).train()
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_train_checkpoint_resume_and_export(variant, tiny_shards, tmp_path, reference):
    kind, overrides, written, same_math = VARIANTS[variant]
    first = train_cli(kind, tiny_shards, tmp_path, **overrides, **{"schedule.max_steps": "4"})
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "step_00000004" / written).exists()
    second = train_cli(kind, tiny_shards, tmp_path, **overrides, **{"schedule.max_steps": "8"})
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "at step 4" in second.stderr

    records = read_metrics(tmp_path)
    losses = {r["step"]: r["loss"] for r in records}
    if overrides.get("engine.compile") == "true":
        assert all(r["compiled_graphs"] > 0 for r in records), "the compiled model's graphs are counted"
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    assert losses[7] + losses[8] < losses[1] + losses[2], f"loss does not fall: {losses}"
    if same_math:
        worst = max(abs(losses[s] - reference[s]) for s in losses)
        assert worst < TOLERANCE, f"{variant} differs from one process by {worst}: {losses} vs {reference}"
    else:  # bf16 weights: the same run to bf16 precision
        assert all(abs(losses[s] - reference[s]) < 0.02 for s in losses), f"{losses} vs {reference}"

    model = timm.create_model("deit_tiny_patch16_224", num_classes=4, img_size=16, patch_size=4, in_chans=1,
                              embed_dim=32, depth=2, num_heads=2)
    model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)


def test_uneven_shards_give_every_rank_the_same_steps(tmp_path):
    """One rank's shards hold 3x the samples of the other's: both still take every step of every epoch."""
    from tests.conftest import synthetic_samples
    from trivit.datasets.shards import brace_pattern, write_index, write_shard, write_split

    samples = list(synthetic_samples(160))
    sizes = [100, 20, 20, 20]  # 2 ranks x 1 worker: whichever rank reads the big shard has 3x the samples
    names = [f"train-{index:06d}.tar" for index in range(len(sizes))]
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    for name, end, size in zip(names, ends, sizes):
        write_shard(tmp_path / name, samples[end - size:end])
    train = {"shards": names, "counts": sizes, "total": 160, "urls": brace_pattern(names)}
    val = write_split(synthetic_samples(32, seed=1), tmp_path, "val", 32)
    write_index(tmp_path, {"train": train, "val": val}, [f"class{i}" for i in range(4)])
    run = train_cli("torchrun", tmp_path, tmp_path / "run", **{
        "engine.backend": "ddp", "data.train_urls": str(tmp_path / "train-{000000..000003}.tar"),
        "data.val_urls": str(tmp_path / "val-000000.tar"), "schedule.epochs": "2",
        "sparsity.examples.policy": "none", "engine.timeout_s": "60"})
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_metrics(tmp_path / "run")
    assert records[-1]["step"] == 2 * (160 // 16), "two whole epochs of 10 steps each"


def distill_overrides(loss: str, teacher_file) -> dict[str, str]:
    teacher = {"distill.teacher": "deit_tiny_patch16_224", "distill.teacher_weights": str(teacher_file),
               "distill.teacher_kwargs": TINY_TEACHER_KWARGS} if loss == "nkd" else {"distill.uskd.mu": "0.5"}
    return {"distill.loss": loss, **teacher, "schedule.max_steps": "4"}


def assert_two_processes_equal_one(kind: str, backend: dict[str, str], overrides: dict[str, str], shards, tmp_path):
    reference_dir = tmp_path / "one"
    Trainer(load(TrainConfig, None, tiny_overrides(shards, reference_dir, **dict(
        DISTRIBUTED, **overrides, **{"engine.grad_accum_steps": "2"})))).train()
    run = train_cli(kind, shards, tmp_path / "two", **backend, **overrides)
    assert run.returncode == 0, run.stderr[-3000:]
    one = {r["step"]: r["loss"] for r in read_metrics(reference_dir)}
    two = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "two")}
    assert sorted(two) == [1, 2, 3, 4] and max(abs(two[s] - one[s]) for s in one) < TOLERANCE, (one, two)


SEMANTIC = {"model.timm_kwargs": "{embed_dim: 32, depth: 4, num_heads: 2}", "sparsity.semantic.num_tokens": "4",
            "sparsity.tokens.locations": "[0]", "sparsity.tokens.fuse": "false", "schedule.max_steps": "4"}
"""4 semantic tokens pooled from the 4 x 4 patch grid, the STGM at blocks 1-2; before it, block 0 prunes tokens
and masks links (DISTRIBUTED's rates); the example level on."""


@pytest.mark.parametrize("kind, backend", [("deepspeed", {"engine.backend": "deepspeed", "engine.zero_stage": "1"}),
                                           ("fsdp.yaml", {"engine.precision": "fp32", **COMPILED}),
                                           ("torchrun", {"engine.backend": "deepspeed", "engine.zero_stage": "3"})])
def test_semantic_tokens_with_nkd_on_two_processes_equal_one(kind, backend, tiny_shards, tmp_path, tiny_teacher_file):
    """With NKD: its teacher, replicated outside every backend's wrapper, sees each rank's images."""
    overrides = {**SEMANTIC, **distill_overrides("nkd", tiny_teacher_file)}
    assert_two_processes_equal_one(kind, backend, overrides, tiny_shards, tmp_path)


DCAL = {"model.dcal.glca_top_r": "0.25", "model.dcal.pwca": "true", "sparsity.tokens.keep_rate": "1.0",
        "sparsity.attention.keep_rate": "1.0", "schedule.max_steps": "4"}
"""GLCA (the top 4 of 16 patches) and PWCA (distractors keyed by sample, so the pairs do not depend on the
rank), with the example level on, around USKD (its weak classifier outside the backend's wrapper, its
gradients averaged over the ranks by hand)."""


@pytest.mark.parametrize("kind, backend", [("torchrun", {"engine.backend": "ddp"}),
                                           ("fsdp.yaml", {"engine.precision": "fp32", **COMPILED}),
                                           ("torchrun", {"engine.backend": "deepspeed", "engine.zero_stage": "3"})])
def test_dcal_with_uskd_on_two_processes_equals_one(kind, backend, tiny_shards, tmp_path):
    assert_two_processes_equal_one(kind, backend, {**DCAL, **distill_overrides("uskd", None)}, tiny_shards, tmp_path)
