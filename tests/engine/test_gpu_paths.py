"""What a GPU cluster meets first, checked on the CPU with what it lacks faked: the precision every
backend reads, bf16 only where the GPU computes it, one device's RNG per rank, locks on a filesystem
without them, the FSDP export without /tmp, the attention mask built once per location, the global
evaluation batch, the compiled-graph bound, and a stalled shard read."""
from __future__ import annotations

import errno
import fcntl
import logging
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.conftest import synthetic_samples, tiny_overrides
from trivit.config import load
from trivit.datasets.config import DataConfig
from trivit.datasets.loaders import eval_loader
from trivit.datasets.shards import write_split
from trivit.datasets.stream import SampleDecoder
from trivit.datasets.transforms import eval_transform
from trivit.engine.backends.fsdp import SHARDS, export_weights
from trivit.engine.backends.zero import deepspeed_config
from trivit.engine.compile import allow_recompiles, graph_bound, report_recompile_limit
from trivit.engine.config import TrainConfig
from trivit.engine.distributed import World
from trivit.engine.evaluation import Evaluator
from trivit.engine.state import rng
from trivit.engine.state.run_lock import lock_run_dir
from trivit.locks import InUse
from trivit.sparse import blocks, create_vit, set_keep_rates


def fake_gpu(monkeypatch, capability: tuple[int, int], native_bf16: bool) -> None:
    """One visible CUDA device of ``capability``; emulated bf16 counts only where torch counts emulation."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU sm{capability[0]}{capability[1]}")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)


def launched(monkeypatch, world_size: int = 1) -> None:
    """The environment torchrun gives rank 0 of ``world_size`` processes."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)


def resolved(shards: Path, tmp_path: Path, **extra: str):
    from trivit.engine.startup import resolve_run

    return resolve_run(load(TrainConfig, None, tiny_overrides(shards, tmp_path, **{"optim.ema_decay": "null",
                                                                                    **extra})))


def test_deepspeed_at_precision_auto_trains_in_the_resolved_bf16(tiny_shards, tmp_path, monkeypatch):
    """torchrun + ZeRO-3 with no JSON on an H100: DeepSpeed's config enables bf16, matching the bf16 images
    prepare_inputs hands the model (both off before: a dtype mismatch at the first layer)."""
    fake_gpu(monkeypatch, (9, 0), native_bf16=True)
    launched(monkeypatch)
    setup = resolved(tiny_shards, tmp_path, **{"engine.backend": "deepspeed", "engine.zero_stage": "3"})
    assert setup.config.engine.precision == "bf16" and setup.amp_dtype == torch.bfloat16
    ds = deepspeed_config(setup.config, setup.world)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (True, False)


@pytest.mark.parametrize("backend, expected", [("single", "fp16"), ("fsdp", "fp32")])
def test_precision_auto_takes_no_emulated_bf16(tiny_shards, tmp_path, monkeypatch, caplog, backend, expected):
    """A V100 (sm70) 'supports' bf16 only by emulation: auto gives fp16 with loss scaling (fp32 under FSDP)."""
    fake_gpu(monkeypatch, (7, 0), native_bf16=False)
    if backend == "fsdp":
        launched(monkeypatch, world_size=2)
    with caplog.at_level(logging.WARNING):
        setup = resolved(tiny_shards, tmp_path, **{"engine.backend": backend})
    assert setup.config.engine.precision == expected
    assert f"has no native bf16; training in {expected}" in caplog.text


def test_precision_auto_is_bf16_on_ampere_and_fp32_on_the_cpu(tiny_shards, tmp_path, monkeypatch):
    assert resolved(tiny_shards, tmp_path).config.engine.precision == "fp32"
    fake_gpu(monkeypatch, (8, 0), native_bf16=True)
    assert resolved(tiny_shards, tmp_path).config.engine.precision == "bf16"


def test_resume_saves_and_restores_only_the_ranks_own_gpu_generator(monkeypatch):
    """Saved under torchrun (8 visible GPUs, this rank on GPU 3), restored under srun --gpus-per-task=1
    (one visible, device 0): the rank's own state goes to its own device; no other device is touched."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([10 + device]))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("read every visible device"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("wrote every visible device"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state.item(), device)))
    state = rng.rng_state()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    rng.set_rng_state(state)
    assert restored == [(13, 0)]


def test_a_filesystem_without_locks_warns_and_trains(tmp_path, monkeypatch, caplog):
    """lockf answering ENOLCK (NFS without lockd) is no proof of another run: warn and go on. EAGAIN is."""
    world, cpu = World(rank=0, world_size=1, local_rank=0), torch.device("cpu")

    def refuse(code):
        def lockf(fd, operation):
            raise OSError(code, "refused")
        return lockf

    monkeypatch.setattr(fcntl, "lockf", refuse(errno.ENOLCK))
    with caplog.at_level(logging.WARNING):
        lock_run_dir(tmp_path / "run", world, cpu).close()
    assert "this filesystem cannot lock files" in caplog.text
    monkeypatch.setattr(fcntl, "lockf", refuse(errno.EAGAIN))
    with pytest.raises(InUse, match="in use by another process"):
        lock_run_dir(tmp_path / "run", world, cpu)


def test_the_fsdp_export_reads_the_model_alone_and_writes_no_temporary_file(tmp_path, monkeypatch):
    """A compute node's /tmp may be too small for the whole consolidated checkpoint: no temporary file."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
             checkpoint_id=str(tmp_path / SHARDS), no_dist=True)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))
    weights = export_weights(tmp_path, {})
    assert weights.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(weights[name], tensor)


def test_the_additive_attention_mask_is_built_once_per_location(monkeypatch):
    """On CUDA SDPA takes the links as an additive mask: one per location (2), not one per masked block (5);
    the outputs equal the boolean mask's."""
    sparsity = {"tokens": {"keep_rate": 0.7, "locations": [1, 3]}, "attention": {"keep_rate": 0.3}}
    model = create_vit("deit_tiny_patch16_224", sparsity, img_size=32, patch_size=8, depth=6, num_classes=4).eval()
    set_keep_rates(model, 0.7, 0.3)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        boolean = model(images)
        built = []
        original = blocks.additive_mask
        monkeypatch.setattr(blocks, "takes_additive_mask", lambda device: True)
        monkeypatch.setattr(blocks, "additive_mask", lambda mask, dtype: built.append(dtype) or original(mask, dtype))
        additive = model(images)
    assert built == [torch.float32, torch.float32]
    torch.testing.assert_close(additive, boolean, rtol=1e-5, atol=1e-5)


def test_the_evaluation_batch_is_global_and_the_graph_bound_counts_every_shape():
    config = load(TrainConfig, None, ["data.eval_batch_size=10", "data.num_workers=2"])
    evaluator = Evaluator(config, World(rank=1, world_size=4, local_rank=1), torch.device("cpu"),
                          [f"val-{i}.tar" for i in range(8)], None, None)
    assert evaluator.batch_size == 3, "10 images over 4 ranks: 3 per rank per forward (rounded up)"
    assert evaluator.batch_shapes() == 4, "the full batch, each of 2 workers' last batch, the placeholder"
    with torch._dynamo.config.patch(recompile_limit=8):
        allow_recompiles(levels=4, locations=3, eval_shapes=4, eval_models=2)
        assert graph_bound(4, 4, 2) == 4 + 1 + 8
        assert torch._dynamo.config.recompile_limit == 13 * 4


def test_a_function_past_its_recompile_limit_is_reported(caplog):
    report_recompile_limit()
    doubled = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2), caplog.at_level(logging.WARNING, logger="trivit.engine.compile"):
        for size in range(1, 5):
            doubled(torch.ones(size))
    assert "reached dynamo's recompile_limit (2 graphs) and runs EAGER" in caplog.text


def test_a_stalled_pipe_read_ends_within_the_timeout_naming_the_shard(tmp_path):
    write_split(synthetic_samples(16), tmp_path, "val", 16)
    stalled = f"pipe:sleep 60; cat {tmp_path}/val-000000.tar"
    decode = SampleDecoder(eval_transform(DataConfig(mean=[0.3], std=[0.3]), 16), "L")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="in 2 s \\(engine.timeout_s\\): its workers were reading") as error:
        with eval_loader([stalled], decode, batch_size=8, rank=0, world_size=1, num_workers=1,
                         timeout_s=2).batches() as batches:
            list(batches)
    assert stalled in str(error.value)
    assert time.monotonic() - start < 30
