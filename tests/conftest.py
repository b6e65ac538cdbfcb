"""Shared fixtures: tiny shards written by the tests themselves, and a tiny training config."""
from __future__ import annotations

import io
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trivit.datasets.shards import write_index, write_split

NUM_CLASSES = 4


def synthetic_samples(count: int, size: int = 16, seed: int = 0):
    """Grayscale images whose class is readable from where the bright square sits."""
    rng = np.random.default_rng(seed)
    for sample_id in range(count):
        label = sample_id % NUM_CLASSES
        image = rng.integers(0, 60, (size, size), dtype=np.uint8)
        row, col = divmod(label, 2)
        half = size // 2
        image[row * half:(row + 1) * half, col * half:(col + 1) * half] += 150
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG")
        yield {"__key__": f"{sample_id:08d}", "png": buffer.getvalue(), "cls": label, "id": sample_id}


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """train: 8 shards x 32 samples; val: 2 shards x 32 samples; 16x16 grayscale, 4 classes."""
    folder = tmp_path_factory.mktemp("shards")
    splits = {"train": write_split(synthetic_samples(256), folder, "train", 32),
              "val": write_split(synthetic_samples(64, seed=1), folder, "val", 32)}
    write_index(folder, splits, [f"class{i}" for i in range(NUM_CLASSES)])
    return folder


def tiny_overrides(shards: Path, run_dir: Path, **extra: str) -> list[str]:
    """Overrides that train a 2-block ViT on ``tiny_shards`` in a few seconds."""
    overrides = {
        "run_dir": str(run_dir),
        "data.train_urls": str(shards / "train-{000000..000007}.tar"),
        "data.val_urls": str(shards / "val-{000000..000001}.tar"),
        "data.batch_size": "16", "data.eval_batch_size": "32", "data.num_workers": "2",
        "data.shuffle_buffer": "20", "data.mean": "[0.3]", "data.std": "[0.3]",
        "data.auto_augment": "null", "data.hflip": "0", "data.re_prob": "0.1", "data.scale": "[0.9,1.0]",
        "data.mixup": "0.8", "data.cutmix": "1.0", "data.eval_crop_pct": "1.0",
        "model.img_size": "16", "model.patch_size": "4", "model.in_chans": "1", "model.drop_path_rate": "0.1",
        "model.timm_kwargs": "{embed_dim: 32, depth: 2, num_heads: 2}",
        "optim.lr": "1e-3", "optim.clip_grad": "1.0", "optim.ema_decay": "0.9",
        "schedule.epochs": "3", "schedule.warmup_epochs": "1",
        "checkpoint.every_steps": "4", "checkpoint.keep": "2",
        "logging.every_steps": "1", "logging.progress_bar": "false",
    }
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]


def default_sigint() -> None:
    """In a child process (``preexec_fn``): SIGINT handled and unblocked as in a terminal, whatever the test
    runner left in this process's disposition and signal mask. A child inherits both across exec, and a shell
    that starts the suite in the background (``&``, no job control) ignores SIGINT in all of it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def fault_step(low: int, high: int) -> int:
    """A random step in [low, high] at which a test injects a fault, printed so that a failure can be
    replayed: the seed is ``TRIVIT_TEST_FAULT_SEED`` if set, else the process id."""
    seed = int(os.environ.get("TRIVIT_TEST_FAULT_SEED", os.getpid()))
    step = random.Random(seed).randint(low, high)
    print(f"fault_step drew {step} (replay with TRIVIT_TEST_FAULT_SEED={seed})")
    return step


TINY_TEACHER_KWARGS = "{img_size: 16, patch_size: 4, in_chans: 1, embed_dim: 32, depth: 2, num_heads: 2}"
"""distill.teacher_kwargs of ``tiny_teacher_file``: the tiny test architecture."""


@pytest.fixture(scope="session")
def tiny_teacher_file(tmp_path_factory) -> Path:
    """A timm model of the tiny test architecture (4 classes), saved as timm saves weights."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                              num_heads=2, num_classes=4)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file(model.state_dict(), str(path))
    return path


SPAWNS_OR_TRAINS = {"Trainer", "Pruner", "Popen", "subprocess", "spawn"}
"""Names whose use in a test (or in a helper or fixture it uses) means it trains or starts processes."""
COMMANDS_THAT_TRAIN = {"train", "prune", "shards", "eval"}
"""``trivit`` commands that, given to the CLI's ``main``, train, write shards or start loader workers."""


def _slow_code(code, module_globals: dict, seen: set) -> bool:
    """Whether ``code`` (or a function of the tests it calls) trains or starts processes."""
    if code in seen:
        return False
    seen.add(code)
    names = set(code.co_names)
    if names & SPAWNS_OR_TRAINS:
        return True
    strings = {c for c in code.co_consts if isinstance(c, str)}
    if names & {"main", "cli", "run_cli", "trivit"} and strings & COMMANDS_THAT_TRAIN:
        return True
    nested = [c for c in code.co_consts if hasattr(c, "co_names")]
    helpers = [module_globals[n] for n in names if callable(module_globals.get(n)) and
               getattr(module_globals[n], "__module__", "").startswith("tests")]
    return any(_slow_code(c, module_globals, seen) for c in nested) or any(
        _slow_code(h.__code__, h.__globals__, seen) for h in helpers if hasattr(h, "__code__"))


def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` every test that trains or starts a process, found by what it (its helpers, its fixtures)
    calls: ``make test-fast`` runs the rest."""
    for item in items:
        function = getattr(item, "function", None)
        if function is None or item.get_closest_marker("slow"):
            continue
        seen: set = set()
        codes = [(function.__code__, function.__globals__)]
        for definitions in item._fixtureinfo.name2fixturedefs.values():
            fixture = definitions[-1].func
            if getattr(fixture, "__module__", "").startswith("tests"):
                codes.append((fixture.__code__, fixture.__globals__))
        if item.get_closest_marker("distributed") or any(_slow_code(c, g, seen) for c, g in codes):
            item.add_marker(pytest.mark.slow)
