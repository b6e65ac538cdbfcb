"""The run configuration: one nested dataclass per concern, loaded from YAML plus overrides."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trivit.config import check, finite
from trivit.datasets.config import DataConfig
from trivit.sparse.config import SparsityConfig
from trivit.sparse.dcal import DCALConfig

OWN_KEYS = ("img_size", "patch_size", "in_chans", "num_classes", "drop_path_rate")
"""timm arguments that model.* sets itself; model.timm_kwargs may not repeat them."""


@dataclass(kw_only=True)
class ModelConfig:
    """A timm ViT by name, with timm's constructor overrides."""

    name: str = "deit_tiny_patch16_224"
    """Any plain timm ViT name (deit_*_patch16_224, vit_*_patch16_224, ...)."""
    img_size: int = 224
    patch_size: int | None = None
    """Patch size; null keeps the model's own."""
    in_chans: int = 3
    num_classes: int | None = None
    """Classes of the classifier head; null takes the number of classes in the shard index."""
    drop_path_rate: float = 0.1
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further ``timm.create_model`` arguments (embed_dim, depth, num_heads, ...)."""
    arch: str | None = None
    """A pruned architecture (the arch.json ``trivit prune`` writes): per-block widths in place of
    timm's uniform ones; null takes the one of ``init_from`` when that is a pruned run."""
    init_from: str | None = None
    """Start from these weights (a start, not a resume: step 0, this run's schedules and checkpoints):
    a timm-format file (.safetensors, .pth, .pt, .bin), a trivit run_dir or checkpoint folder, or
    'timm' (timm's pretrained weights for ``name``, from the local cache). Another img_size, patch
    grid, in_chans or num_classes is adapted as timm does; null = random initialisation."""
    dcal: DCALConfig = field(default_factory=DCALConfig)
    """Dual cross-attention learning (GLCA, PWCA) beside the self-attention; off by default."""

    def __post_init__(self) -> None:
        check(self.img_size > 0, "img_size", self.img_size, "a positive integer")
        check(self.patch_size is None or self.patch_size > 0, "patch_size", self.patch_size, "a positive integer")
        if self.patch_size is not None:
            check(self.img_size % self.patch_size == 0, "img_size", self.img_size,
                  f"a multiple of model.patch_size ({self.patch_size})")
        check(self.in_chans in (1, 3), "in_chans", self.in_chans, "1 or 3")
        check(self.num_classes is None or self.num_classes > 0, "num_classes", self.num_classes, "a positive integer")
        check(0 <= self.drop_path_rate < 1, "drop_path_rate", self.drop_path_rate, "a rate in [0, 1)")
        for key in OWN_KEYS:
            check(key not in self.timm_kwargs, "timm_kwargs", self.timm_kwargs,
                  f"no {key!r}: it is model.{key}'s to set (the model.* key would win silently); set model.{key}")
        check(not self.timm_kwargs.get("pretrained"), "timm_kwargs", self.timm_kwargs,
              "no 'pretrained': trivit never downloads (it would wait for a hub it may not reach); use "
              "model.init_from=timm, which reads timm's weights from the local cache")

    def timm_arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``create_vit``."""
        args = dict(self.timm_kwargs, img_size=self.img_size, in_chans=self.in_chans,
                    drop_path_rate=self.drop_path_rate)
        if self.patch_size is not None:
            args["patch_size"] = self.patch_size
        if self.num_classes is not None:
            args["num_classes"] = self.num_classes
        return args


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW as in DeiT: lr = base_lr x global batch / 512 unless ``lr`` is given."""

    lr: float | None = None
    """Absolute peak learning rate; null scales base_lr by the global batch."""
    base_lr: float = 5e-4
    """Peak learning rate for a global batch of 512."""
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float | None = None
    """Clip the global gradient norm to this value; null = no clipping."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this decay (e.g. 0.99996); null = off."""
    layer_decay: float | None = None
    """Layer-wise learning-rate decay for fine-tuning (BEiT/MAE): block i's LR is scaled by
    layer_decay ** (depth + 1 - i), the head's by 1 (timm's parameter groups); null = off."""

    def __post_init__(self) -> None:
        check(self.lr is None or (self.lr > 0 and finite(self.lr)), "lr", self.lr, "a positive finite number or null")
        check(self.base_lr > 0 and finite(self.base_lr), "base_lr", self.base_lr, "a positive finite number")
        check(self.weight_decay >= 0 and finite(self.weight_decay), "weight_decay", self.weight_decay,
              "a finite number >= 0")
        check(self.eps > 0 and finite(self.eps), "eps", self.eps, "a small positive number (e.g. 1e-8)")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
              "two values in [0, 1)")
        check(self.clip_grad is None or (self.clip_grad > 0 and finite(self.clip_grad)), "clip_grad", self.clip_grad,
              "a positive norm or null")
        check(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", self.ema_decay, "a decay in (0, 1) or null")
        check(self.layer_decay is None or 0 < self.layer_decay <= 1, "layer_decay", self.layer_decay,
              "a factor in (0, 1] (e.g. 0.65 for ViT-B fine-tuning) or null")

    def peak_lr(self, global_batch: int) -> float:
        return self.lr if self.lr is not None else self.base_lr * global_batch / 512


@dataclass(kw_only=True)
class ScheduleConfig:
    """Length of training and the learning-rate schedule (linear warm-up, then cosine), in steps."""

    epochs: int | float = 300
    """Epochs of the schedule; steps per epoch = training samples // global batch. A fraction trains the first
    part of the last epoch's batches (2.5: two epochs, then half of the third), so that runs of equal training
    time can be compared at the epochs each one fits in it."""
    warmup_epochs: float = 5.0
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    max_steps: int | None = None
    """Stop after this many steps without changing the LR (or sparsity) schedules; null = run all epochs."""
    eval_every_steps: int = 0
    """Evaluate every N steps (0 = once per epoch); always at the end."""

    def __post_init__(self) -> None:
        check(self.epochs > 0 and finite(self.epochs), "epochs", self.epochs, "a positive number of epochs")
        check(0 <= self.warmup_epochs < self.epochs, "warmup_epochs", self.warmup_epochs,
              f"a number in [0, schedule.epochs={self.epochs})")
        check(self.min_lr >= 0 and finite(self.min_lr), "min_lr", self.min_lr, "a finite number >= 0")
        check(self.warmup_lr >= 0 and finite(self.warmup_lr), "warmup_lr", self.warmup_lr, "a finite number >= 0")
        check(self.max_steps is None or self.max_steps > 0, "max_steps", self.max_steps, "a positive integer or null")
        check(self.eval_every_steps >= 0, "eval_every_steps", self.eval_every_steps, "an integer >= 0")


@dataclass(kw_only=True)
class EngineConfig:
    """Where and how the steps run."""

    backend: Literal["auto", "single", "ddp", "fsdp", "deepspeed"] = "auto"
    """'auto' picks from the launcher's environment: 'fsdp' / 'deepspeed' under an accelerate
    config that asks for them, 'ddp' for any other multi-process launch, else 'single'."""
    zero_stage: Literal[1, 2, 3] | None = None
    """DeepSpeed ZeRO stage (backend 'deepspeed'); null: the accelerate config's, else the JSON's, else 2."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON (e.g. launch/deepspeed/zero3_bf16.json); "auto" values and the batch sizes,
    clipping, precision and ZeRO stage are filled from this config, which must agree with it."""
    deepspeed_options: dict[str, Any] = field(default_factory=dict)
    """Inline DeepSpeed config keys, laid over ``deepspeed_config`` (e.g. {zero_optimization: {overlap_comm: false}})."""
    grad_accum_steps: int = 1
    """Micro-batches per step on each rank; data.batch_size must divide by world size x this."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """'auto': the accelerate config's mixed_precision if launched with one, else bf16 on a GPU that
    supports it, else fp32."""
    timeout_s: int = 1800
    """A collective that waits longer than this (a dead or stuck rank) stops every rank with an error."""
    nonfinite_loss: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss: 'stop' with an error naming the step, or 'skip' the update (counted)."""
    max_nonfinite_steps: int = 10
    """With nonfinite_loss='skip': stop once more steps than this were skipped."""
    compile: bool = False
    """torch.compile the model for training and evaluation (FSDP: each block, before sharding). The
    keep-rate ramp is then quantised (sparsity.schedule.levels) so that it compiles a few graphs."""
    compile_backend: str = "inductor"
    """torch.compile's backend: 'inductor' generates kernels; 'aot_eager' traces the same graphs
    without code generation (quick, for checking graphs and numbers)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them (routed blocks included):
    less memory for ~1/3 more compute; losses are unchanged."""

    def __post_init__(self) -> None:
        check(self.grad_accum_steps > 0, "grad_accum_steps", self.grad_accum_steps, "a positive integer")
        check(self.timeout_s > 0, "timeout_s", self.timeout_s, "a positive number of seconds")
        check(self.max_nonfinite_steps >= 0, "max_nonfinite_steps", self.max_nonfinite_steps, "an integer >= 0")


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 1000
    """Save every N steps (and always at the end)."""
    keep: int = 3
    """Keep the last K checkpoints."""

    def __post_init__(self) -> None:
        check(self.every_steps > 0, "every_steps", self.every_steps, "a positive integer")
        check(self.keep > 0, "keep", self.keep, "a positive integer")


@dataclass(kw_only=True)
class LoggingConfig:
    every_steps: int = 50
    """Write a metrics.jsonl line and TensorBoard scalars every N steps."""
    tensorboard: bool = True
    progress_bar: bool = True

    def __post_init__(self) -> None:
        check(self.every_steps > 0, "every_steps", self.every_steps, "a positive integer")


@dataclass(kw_only=True)
class USKDConfig:
    """USKD's weights and its ranking of the non-target classes (``distill.loss: uskd``)."""

    alpha: float = 1.0
    """Weight of the target term."""
    beta: float = 0.1
    """Weight of the non-target (Zipf) term."""
    mu: float = 0.005
    """Weight of the weak classifier's cross-entropy."""
    ranking: Literal["paper", "code"] = "paper"
    """'paper': the weak classifier's and the student's normalised non-target probabilities, ranked among
    the non-target classes; 'code': the authors' code, which adds the student's log-probabilities instead
    and ranks over every class (its ranking is almost exactly the final logits')."""

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "mu"):
            check(getattr(self, name) >= 0, name, getattr(self, name), "a weight >= 0")


TEACHER_LOSSES = ("soft", "hard", "nkd")
LEGACY_ALPHA = 0.5
"""``distill.alpha``'s default before it became null without a teacher: in older runs' config.yaml."""


@dataclass(kw_only=True)
class DistillConfig:
    """A teacher and the loss that distils it into the student, or USKD (the student is its own teacher)."""

    loss: Literal["none", "soft", "hard", "nkd", "uskd"] = "none"
    """'soft': DeiT's KL at temperature tau; 'hard': cross-entropy to the teacher's argmax (DeiT);
    'nkd': normalized knowledge distillation (gamma, lambda_); 'uskd': universal self-knowledge
    distillation, no teacher (``uskd``)."""
    teacher: str | None = None
    """A trivit run_dir or checkpoint folder (its config.yaml gives the architecture), or a timm model
    name whose weights ``teacher_weights`` gives."""
    teacher_weights: str | None = None
    """For a timm-named teacher: a weights file, a trivit run, or 'timm' (timm's cached pretrained weights)."""
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    """For a timm-named teacher: ``timm.create_model`` arguments (img_size, in_chans, num_classes, ...)."""
    alpha: float | None = None
    """Weight of a teacher's term; the label loss gets 1 - alpha (DeiT: 0.5 hard, 0.1 soft). Default 0.5."""
    tau: float = 1.0
    """Soft distillation's temperature (DeiT: 3.0)."""
    gamma: float = 1.0
    """NKD's weight of the non-target term."""
    lambda_: float = 1.0
    """NKD's temperature of the non-target softmaxes."""
    uskd: USKDConfig = field(default_factory=USKDConfig)

    def __post_init__(self) -> None:
        if self.loss in TEACHER_LOSSES:
            check(bool(self.teacher), "teacher", self.teacher,
                  f"a trivit run_dir or a timm model name (distill.loss={self.loss!r} needs a teacher)")
            self.alpha = 0.5 if self.alpha is None else self.alpha
            check(0 <= self.alpha <= 1, "alpha", self.alpha, "a weight in [0, 1]")
        else:
            check(self.teacher is None, "teacher", self.teacher,
                  f"null with distill.loss={self.loss!r} (a teacher needs loss soft, hard or nkd)")
            if self.loss == "none" and self.alpha == LEGACY_ALPHA:
                self.alpha = None  # the default that configs written before trivit had USKD hold
            check(self.alpha is None, "alpha", self.alpha,
                  "null: it weighs a teacher's term" + ("; USKD's weights are distill.uskd.alpha, beta and mu"
                                                        if self.loss == "uskd" else ""))
        check(self.tau > 0, "tau", self.tau, "a positive temperature")
        check(self.gamma >= 0, "gamma", self.gamma, "a weight >= 0")
        check(self.lambda_ > 0, "lambda_", self.lambda_, "a positive temperature")


MIN_WIDTHS = {"embed": 0.25, "heads": 0.25, "qk": 0.25, "v": 0.25, "mlp": 0.1}
"""``prune.min_widths``' defaults: a quarter of the embedding, heads and head widths, a tenth of the MLP."""


@dataclass(kw_only=True)
class PruneConfig:
    """NViT's global structural pruning, run by ``trivit prune`` (``trivit train`` ignores it).

    Every ``every_steps`` steps the lowest-scoring groups of units are masked until the block
    latency (by ``latency_table``) has fallen by ``latency_step`` of the unpruned model's, while
    training on the config's data goes on; it ends at ``target_latency``. The loss is the label
    loss and a distillation to the unpruned model (KL at ``temperature``), weighted by ``alpha``.
    """

    target_latency: float = 0.5
    """The block latency to reach, as a fraction of the unpruned model's (by the same table)."""
    saliency: Literal["code", "paper"] = "paper"
    """How units are scored (sparse/nvit.py). ``paper``: every weight a unit owns, each kind normalised by its
    sum, scores restarted at each pruning step, loss (1 - alpha) x labels + alpha x KL. ``code``: the authors'
    code: their weight subsets, fixed divisors, a moving average (0.9) over pruning steps, and the loss
    labels + 1e5 x KL (mean over classes, at ``temperature``), the KL off until the first pruning step;
    ``code_latency_weight`` prices the latency. README, "Structural pruning", says which won here."""
    code_latency_weight: float = 5e-4
    """``saliency: code``: a group's score is its saliency less this x the milliseconds (by the table) it saves
    (the authors' 5e-4)."""
    latency_table: str | None = None
    """A table from ``trivit bench latency-table``; null measures one at start-up (run_dir/latency_table.json)."""
    every_steps: int = 10
    latency_step: float = 0.02
    """Latency removed at each pruning step, as a fraction of the unpruned model's."""
    latency_weight: float = 0.25
    """lambda: a group's score is its share of its kind's saliency less lambda x its share of the latency.
    0.25 beat 1.0 on the demo (86.26 against 84.93 top-1 at half the latency, two seeds; RESULTS.md)."""
    temperature: float = 3.0
    alpha: float = 0.5
    """Weight of the distillation term; the label loss gets 1 - alpha."""
    table_batch: int = 16
    """Batch size of a latency table measured at start-up."""
    min_widths: dict[str, float] = field(default_factory=lambda: dict(MIN_WIDTHS))
    """Per unit kind (embed, heads, qk, v, mlp), the fraction of the unpruned width every layer keeps (at least
    one group, one head): pruning stops there, with a message, rather than hollow the model out."""
    min_accuracy: float | None = 0.5
    """Stop when an evaluation's top-1 falls below this fraction of the unpruned model's (null: never)."""

    def __post_init__(self) -> None:
        check(0 < self.target_latency < 1, "target_latency", self.target_latency, "a fraction in (0, 1)")
        check(set(self.min_widths) <= set(MIN_WIDTHS), "min_widths", self.min_widths,
              f"keys among {', '.join(MIN_WIDTHS)}")
        check(all(0 <= v < 1 for v in self.min_widths.values()), "min_widths", self.min_widths, "fractions in [0, 1)")
        check(self.min_accuracy is None or 0 <= self.min_accuracy <= 1, "min_accuracy", self.min_accuracy,
              "a fraction in [0, 1] or null")
        check(self.every_steps > 0, "every_steps", self.every_steps, "a positive integer")
        check(0 < self.latency_step <= 1, "latency_step", self.latency_step, "a fraction in (0, 1]")
        check(self.latency_weight >= 0, "latency_weight", self.latency_weight, "a weight >= 0")
        check(self.code_latency_weight >= 0, "code_latency_weight", self.code_latency_weight, "a weight >= 0")
        check(self.temperature > 0, "temperature", self.temperature, "a positive temperature")
        check(0 <= self.alpha <= 1, "alpha", self.alpha, "a weight in [0, 1]")
        check(self.table_batch > 0, "table_batch", self.table_batch, "a positive integer")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run needs; written to ``<run_dir>/config.yaml``."""

    run_dir: str = "runs/default"
    """Folder of the run: config, metrics.jsonl, TensorBoard events, checkpoints."""
    seed: int = 0
    resume: str = "auto"
    """'auto' (continue from the latest checkpoint in run_dir, if any), 'never', or a checkpoint path."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)

    def __post_init__(self) -> None:
        check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        check(bool(self.run_dir), "run_dir", self.run_dir, "a folder path")
        self.run_dir = os.path.expanduser(self.run_dir)  # '~/x' from YAML or quoted reaches no shell to expand it
        check(not Path(self.run_dir).is_file(), "run_dir", self.run_dir, "a folder path, not a file")
        check(len(os.fsencode(Path(self.run_dir).name)) < 200, "run_dir", self.run_dir,
              "a folder name under 200 bytes (checkpoint paths inside it must fit the filesystem's limit)")
        check(len(self.data.mean) == self.model.in_chans, "data.mean", self.data.mean,
              f"one value per input channel (model.in_chans={self.model.in_chans})")
        peak = self.optim.peak_lr(self.data.batch_size)
        check(self.schedule.min_lr <= peak, "schedule.min_lr", self.schedule.min_lr,
              f"at most the peak learning rate {peak:g} (optim.lr, or optim.base_lr x data.batch_size / 512), "
              "or the cosine 'decay' would raise the learning rate")
        final = self.sparsity.schedule.final_dense_epochs
        check(final < self.schedule.epochs, "sparsity.schedule.final_dense_epochs", final,
              f"fewer epochs than the run's schedule.epochs={self.schedule.epochs:g}")
