"""The paths timm's model tests check for every ViT, on trivit's models, each against timm's own model with
the same weights: TorchScript, FX symbolic tracing (forward and backward), FX then TorchScript, and
``features_only``. Written for trivit (what timm's suite checks, not its code)."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch.fx import symbolic_trace

from trivit.sparse import create_vit, set_keep_rates

KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
SPARSE = {"tokens": {"keep_rate": 0.7, "locations": [1]}, "attention": {"keep_rate": 0.5}}


@pytest.fixture(params=["deit_tiny_patch16_224", "vit_small_patch16_224"])
def pair(request) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A dense trivit model and timm's own model of the same name holding its weights, both in eval mode."""
    torch.manual_seed(0)
    ours = create_vit(request.param, None, **KWARGS).eval()
    theirs = timm.create_model(request.param, **KWARGS).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def scripted(model: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in favour of torch.compile
        return torch.jit.script(model)


def test_torchscript_of_a_dense_model_computes_timms_outputs(pair):
    ours, theirs = pair
    script = scripted(ours)
    torch.testing.assert_close(script(images()), theirs(images()))
    assert isinstance(ours.blocks, torch.nn.Sequential) and hasattr(ours.blocks, "sparsity"), "the model is untouched"


def test_fx_forward_and_backward_of_a_dense_model_equal_timms(pair):
    ours, theirs = pair
    graph = symbolic_trace(ours)
    torch.testing.assert_close(graph(images()), theirs(images()))
    graph.train()
    theirs.train()
    torch.manual_seed(2)
    graph(images()).square().mean().backward()
    torch.manual_seed(2)
    theirs(images()).square().mean().backward()
    ours_grads = {name: p.grad for name, p in graph.named_parameters()}
    for name, param in theirs.named_parameters():
        torch.testing.assert_close(ours_grads[name], param.grad, msg=name)


def test_fx_then_torchscript_of_a_dense_model(pair):
    ours, theirs = pair
    script = scripted(symbolic_trace(ours))
    torch.testing.assert_close(script(images()), theirs(images()))


def test_features_only_is_refused_naming_the_timm_path():
    with pytest.raises(ValueError, match="features_only.*timm.create_model\\('deit_tiny_patch16_224', "
                                         "features_only=True"):
        create_vit("deit_tiny_patch16_224", None, features_only=True, **KWARGS)


def test_a_sparse_model_traces_at_its_current_keep_rates():
    torch.manual_seed(0)
    model = create_vit("deit_tiny_patch16_224", SPARSE, **KWARGS).eval()
    graph = symbolic_trace(model)
    torch.testing.assert_close(graph(images()), model(images()))
    called = {getattr(node.target, "__name__", "") for node in graph.graph.nodes if node.op == "call_function"}
    assert {"select_tokens", "build_attention_mask", "_masked_attention"} <= called, "the routing is in the graph"
    set_keep_rates(model, 1.0, 1.0)
    torch.testing.assert_close(symbolic_trace(model)(images()), model(images()))


def test_torchscript_of_a_sparse_model_is_refused_with_the_way_out():
    model = create_vit("deit_tiny_patch16_224", SPARSE, **KWARGS).eval()
    with pytest.raises(RuntimeError, match="TorchScript cannot script trivit's routing \\(tokens or attention at keep "
                                           "rates below 1.0\\).*Use torch.compile"):
        scripted(model)
    set_keep_rates(model, 1.0, 1.0)
    torch.testing.assert_close(scripted(model)(images()), model(images()))
