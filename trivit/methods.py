"""Which of trivit's methods combine: the one table, checked at start-up (and by ``--dry-run``), printed by
``trivit methods`` and copied into the README (a test keeps the copy equal).

A method is on when its settings say so (:data:`METHODS`). A pair is ``yes`` unless :data:`REFUSED` names
it, or ``partly`` where :data:`PARTLY` says which settings of the pair are refused (those checks live with
the method's code, where the settings are read). ``deit``, ``nkd`` and ``uskd`` are the values of one
setting, ``distill.loss``: one at a time. No method is refused on any backend (single, ddp, fsdp,
deepspeed ZeRO 1/2/3), compiled or not.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from trivit.config import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    turned_on_by: str
    """The setting that turns it on, as a user writes it."""
    is_on: Callable[[Any, bool], bool]
    """(TrainConfig, a pruning run) -> on."""


SPARSITY_ON = {
    "tokens": lambda sparsity: sparsity.tokens.keep_rate < 1,
    "attention": lambda sparsity: sparsity.attention.keep_rate < 1,
    "semantic": lambda sparsity: sparsity.semantic.enabled,
}
"""The model-side methods, read from a ``SparsityConfig`` (what a model built by ``create_vit`` carries)."""


def sparsity_methods(sparsity: Any) -> list[str]:
    """The model-side methods ``sparsity`` (a ``SparsityConfig``) turns on."""
    return [name for name, is_on in SPARSITY_ON.items() if is_on(sparsity)]


def sparsity_values(sparsity: Any) -> dict[str, Any]:
    """The model-side settings the table's messages name, with their values."""
    return {"sparsity.tokens.keep_rate": sparsity.tokens.keep_rate,
            "sparsity.attention.keep_rate": sparsity.attention.keep_rate,
            "sparsity.semantic.num_tokens": sparsity.semantic.num_tokens}


METHODS = (
    Method("tokens", "sparsity.tokens.keep_rate < 1", lambda c, p: SPARSITY_ON["tokens"](c.sparsity)),
    Method("attention", "sparsity.attention.keep_rate < 1", lambda c, p: SPARSITY_ON["attention"](c.sparsity)),
    Method("semantic", "sparsity.semantic.num_tokens", lambda c, p: SPARSITY_ON["semantic"](c.sparsity)),
    Method("examples", "sparsity.examples.policy", lambda c, p: c.sparsity.examples.policy != "none"),
    Method("dcal", "model.dcal.glca_top_r > 0 or model.dcal.pwca", lambda c, p: c.model.dcal.enabled),
    Method("deit", "distill.loss: soft | hard", lambda c, p: c.distill.loss in ("soft", "hard")),
    Method("nkd", "distill.loss: nkd", lambda c, p: c.distill.loss == "nkd"),
    Method("uskd", "distill.loss: uskd", lambda c, p: c.distill.loss == "uskd"),
    Method("pruning", "trivit prune", lambda c, p: p),
    Method("compile", "engine.compile", lambda c, p: bool(c.engine.compile)),
)
NAMES = tuple(method.name for method in METHODS)
ONE_SETTING = {"deit", "nkd", "uskd"}
"""The values of ``distill.loss``: never two at once."""


@dataclass(frozen=True)
class Refusal:
    methods: frozenset[str]
    setting: str
    """The setting the error names."""
    why: str
    """Why the pair cannot compose, and the fix."""


def _refusal(a: str, b: str, setting: str, why: str) -> Refusal:
    return Refusal(frozenset((a, b)), setting, why)


_ROLLOUT = ("model.dcal needs every block's attention over one fixed token set (the rollout; PWCA's paired "
            "stream)")
REFUSED = (
    _refusal("dcal", "tokens", "sparsity.tokens.keep_rate",
             f"{_ROLLOUT}; set it to 1.0, or turn DCAL off (model.dcal.glca_top_r=0, model.dcal.pwca=false)"),
    _refusal("dcal", "attention", "sparsity.attention.keep_rate", f"{_ROLLOUT}; set it to 1.0, or turn DCAL off"),
    _refusal("dcal", "semantic", "sparsity.semantic.num_tokens",
             f"{_ROLLOUT}, which semantic tokens replace; set it to null, or turn DCAL off"),
    _refusal("pruning", "dcal", "model.dcal", "trivit prune removes units of the backbone's blocks, not of DCAL's "
                                              "GLCA block; prune with DCAL off (model.dcal.glca_top_r=0, "
                                              "model.dcal.pwca=false)"),
    *(_refusal("pruning", loss, "distill.loss", "pruning distils from the unpruned model itself (prune.alpha, "
                                                "prune.temperature): leave distill.loss none")
      for loss in ("deit", "nkd", "uskd")),
)
PARTLY = {
    frozenset(("semantic", "tokens")): "token locations before the semantic stage only; no tokens.fuse",
    frozenset(("semantic", "attention")): "locations before the semantic stage only",
    frozenset(("semantic", "uskd")): "with semantic.head: cls (head gap drops the [CLS] USKD reads)",
}


def active(config: Any, pruning: bool = False) -> list[str]:
    """The methods ``config`` turns on (in table order)."""
    return [method.name for method in METHODS if method.is_on(config, pruning)]


def check_methods(names: Iterable[str], values: dict[str, Any] | None = None) -> None:
    """Raise the table's :class:`ConfigError` for the first refused pair among ``names``; ``values`` gives the
    named settings' values for the message."""
    on = set(names)
    for refusal in REFUSED:
        if refusal.methods <= on:
            value = (values or {}).get(refusal.setting)
            got = f"got {value!r} with {' and '.join(sorted(refusal.methods))}" if value is not None else (
                f"{' and '.join(sorted(refusal.methods))} do not combine")
            raise ConfigError(refusal.setting, f"{got}: {refusal.why}")


def check_composition(config: Any, pruning: bool = False) -> None:
    """Refuse, at start-up, a run whose methods the table says do not combine."""
    check_methods(active(config, pruning), {**sparsity_values(config.sparsity), "distill.loss": config.distill.loss})


def verdict(a: str, b: str) -> str:
    """``yes``, ``no``, ``partly`` or ``one of`` (two values of one setting) for the pair (a, b)."""
    pair = frozenset((a, b))
    if a == b:
        return "-"
    if pair <= ONE_SETTING:
        return "one of"
    if any(refusal.methods == pair for refusal in REFUSED):
        return "no"
    return "partly" if pair in PARTLY else "yes"


def table_markdown() -> str:
    """The table as Markdown: one row and one column per method, then what ``partly`` means."""
    lines = ["| | " + " | ".join(NAMES) + " |", "|---" * (len(NAMES) + 1) + "|"]
    lines += [f"| **{a}** | " + " | ".join(verdict(a, b) for b in NAMES) + " |" for a in NAMES]
    lines.append("")
    lines += [f"- {method.name}: on with `{method.turned_on_by}`" for method in METHODS]
    lines += [f"- partly, {' + '.join(sorted(pair))}: {note}" for pair, note in PARTLY.items()]
    lines.append("- every method runs on every backend (single, ddp, fsdp, deepspeed ZeRO 1/2/3)")
    return "\n".join(lines) + "\n"
