"""Which settings a resumed run may change.

A checkpoint carries its run's resolved config. At a resume every setting either applies from the
resumed step on (the ones below, logged when changed) or must be as it was: the learning rate, the
schedules' lengths, the model, the sparsity levels and the losses are baked into the optimizer, the
schedulers and the weights, so a new value would be silently ignored, or half applied. Those stop
the run, naming each key with both values.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trivit.config import to_dict
from trivit.engine.config import TrainConfig

log = logging.getLogger(__name__)

APPLY_AT_RESUME = (
    "run_dir", "resume", "schedule.max_steps", "schedule.eval_every_steps", "logging.", "checkpoint.",
    "engine.timeout_s", "engine.nonfinite_loss", "engine.max_nonfinite_steps", "engine.compile",
    "engine.compile_backend", "engine.activation_checkpointing", "engine.precision", "engine.device",
    "data.max_bad_fraction", "data.eval_batch_size", "data.eval_cache_mb", "data.val_urls", "data.train_urls", "data.index",
    "data.cache_dir", "model.init_from", "optim.ema_decay",
)
"""Keys (or key prefixes) that take effect from the resumed step on."""
CHECKED_ELSEWHERE = (
    "seed", "data.batch_size", "data.num_workers", "data.shuffle_initial", "engine.grad_accum_steps", "engine.backend",
    "engine.zero_stage",
    "engine.deepspeed_config", "engine.deepspeed_options", "sparsity.schedule.levels",
)
"""Keys the checkpoint's data position, backend or compiled path already checks with their own message."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not name.endswith(("timm_kwargs", "deepspeed_options")):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def check_resumed_settings(saved: dict[str, Any] | None, config: TrainConfig, source: Path) -> None:
    """Raise if ``config`` changes a setting the checkpoint ``source`` (saved with config ``saved``) fixes;
    log the changes that apply from now on."""
    if saved is None:
        log.info("checkpoint %s predates the record of its config: the settings cannot be compared", source)
        return
    before, after = flatten(saved), flatten(to_dict(config))
    newer = sorted(after.keys() - before.keys())
    if newer:  # settings added to trivit after the checkpoint was written: their code keeps the old behaviour
        log.info("checkpoint %s predates the settings %s: they are not compared", source, ", ".join(newer))
    changed = {key: (before.get(key), after.get(key)) for key in sorted(before.keys())
               if before.get(key) != after.get(key) and not key.startswith(CHECKED_ELSEWHERE)}
    fixed = {key: values for key, values in changed.items() if not key.startswith(APPLY_AT_RESUME)}
    if fixed:
        detail = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in fixed.items())
        raise ValueError(f"checkpoint {source} was trained with other settings that a resume cannot apply ({detail}): "
                         "the optimizer, schedules and weights carry the old ones. Restore them to continue this run, "
                         f"or start a new run_dir from its weights (model.init_from={source})")
    for key, (old, new) in changed.items():
        if key not in ("run_dir", "resume"):
            log.info("resumed with %s changed: %r -> %r (applies from here on)", key, old, new)
