"""The composition table (trivit/methods.py): every pair it refuses is refused at start-up naming the setting,
every pair it allows passes, and the README's copy is the table."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from trivit.cli import main
from trivit.config import ConfigError, load
from trivit.engine.config import TrainConfig
from trivit.methods import NAMES, REFUSED, active, check_composition, table_markdown, verdict

TURN_ON = {
    "tokens": ["sparsity.tokens.keep_rate=0.7"],
    "attention": ["sparsity.attention.keep_rate=0.5"],
    "semantic": ["sparsity.semantic.num_tokens=16"],
    "examples": ["sparsity.examples.policy=infobatch"],
    "dcal": ["model.dcal.pwca=true"],
    "deit": ["distill.loss=soft", "distill.teacher=runs/teacher"],
    "nkd": ["distill.loss=nkd", "distill.teacher=runs/teacher"],
    "uskd": ["distill.loss=uskd", "distill.alpha=null"],
    "compile": ["engine.compile=true"],
}


def config_with(*methods: str) -> TrainConfig:
    return load(TrainConfig, None, [flag for method in methods if method != "pruning" for flag in TURN_ON[method]])


def test_each_method_is_read_from_its_own_settings():
    for name in TURN_ON:
        assert active(config_with(name)) == [name]
    assert active(config_with(), pruning=True) == ["pruning"]


@pytest.mark.parametrize("refusal", REFUSED, ids=lambda r: "+".join(sorted(r.methods)))
def test_a_refused_pair_is_refused_at_start_up_naming_the_setting(refusal):
    config = config_with(*refusal.methods)
    with pytest.raises(ConfigError, match=f"'{refusal.setting}'"):
        check_composition(config, pruning="pruning" in refusal.methods)


def test_every_pair_the_table_allows_passes_the_check():
    allowed = [pair for pair in itertools.combinations(NAMES, 2) if verdict(*pair) in ("yes", "partly")]
    assert len(allowed) > 20
    for pair in allowed:
        check_composition(config_with(*pair), pruning="pruning" in pair)


def test_the_readme_holds_the_table_and_trivit_methods_prints_it(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table_markdown() in readme, "README's table is stale: paste the output of `trivit methods`"
    assert main(["methods"]) == 0
    assert capsys.readouterr().out == table_markdown()
