"""The fast paths of a specialized model compute what the plain eager model computes:
torch.compile of the whole model and of each block (regional compilation), gradient
checkpointing, and the split's gradient (the shared weights get exactly the patch rows' sum).
Behaviour only — no test here measures time. The references are the eager model (itself checked
against timm in test_model.py) and facts that hold whatever the implementation."""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from clsvit import PAPER_DEFAULT, specialize
from clsvit.model import GlobalTokenLayerScale

from test_model import EVERYTHING, images, randomize_, tiny_vit

# norms + LayerScale everywhere, QKV in block 0 of 3: blocks of two different structures
PAPER_TINY = {**PAPER_DEFAULT, "qkv": [0]}


def specialized_tiny(components, seed: int = 0, **kwargs) -> nn.Module:
    """A tiny specialized ViT whose copies differ from the shared weights (randomised after the
    split), so a copy applied to the wrong rows changes the result."""
    kwargs = {"embed_dim": 32, "depth": 3, "reg_tokens": 2, **kwargs}
    return randomize_(specialize(tiny_vit(**kwargs), **components), seed)


def loss_and_grads(model: nn.Module, x: torch.Tensor, forward=None) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    head = torch.randn(model.num_classes, generator=torch.Generator().manual_seed(7))
    out = (model if forward is None else forward)(x)
    (out @ head).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_same(actual: dict, expected: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name] is not None, name
        torch.testing.assert_close(actual[name], value, rtol=rtol, atol=atol, msg=name)


def test_layerscale_split_is_the_shared_gamma_on_patches_and_the_copy_on_global_rows():
    model = specialized_tiny(PAPER_TINY)
    layerscales = [m for m in model.modules() if isinstance(m, GlobalTokenLayerScale)]
    assert len(layerscales) == 2 * len(model.blocks)
    n = model.num_prefix_tokens
    x = torch.randn(3, n + 16, 32, generator=torch.Generator().manual_seed(1))
    for ls in layerscales:
        assert not ls._forward_hooks and type(ls.global_copy).__name__ == "LayerScale"
        expected = x * ls.gamma  # the definition: shared gamma on the patches, the copy's on the global rows
        expected[:, :n] = x[:, :n] * ls.global_copy.gamma
        assert torch.equal(ls(x), expected)  # per-token gamma (autograd records)
        with torch.no_grad():
            assert torch.equal(ls(x), expected)  # overwrite (no backward to pay for)


def test_shared_weights_get_exactly_zero_where_only_global_rows_reach_the_loss():
    """In the last block of a [CLS]-pooled model the patch rows after norm2 never reach the logits:
    the shared norm2 / ls2 / MLP gradient is exactly 0 (not rounding noise, which Adam and LAMB would
    turn into updates), and the copies carry the whole gradient."""
    model = specialized_tiny(EVERYTHING, reg_tokens=0)
    assert model.global_pool == "token"
    _, grads = loss_and_grads(model.train(), images(batch=3))
    last = "blocks.2"
    for module in ("norm2", "ls2", "mlp.fc1", "mlp.fc2"):
        for name in ("weight", "bias", "gamma"):
            shared = grads.get(f"{last}.{module}.{name}")
            if shared is None:
                continue
            assert not shared.any(), (module, name)
            assert grads[f"{last}.{module}.global_copy.{name}" if "mlp" not in module else
                         f"{last}.mlp.global_copy.{module.split('.')[1]}.{name}"].abs().sum() > 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dynamo_captures_the_specialized_model_and_each_block_in_one_graph(training):
    model = specialized_tiny(PAPER_TINY).train(training)
    x = images(batch=2)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    tokens = model.forward_features(x).detach()
    for block in (model.blocks[0], model.blocks[1]):  # with and without the QKV copy
        explanation = torch._dynamo.explain(block)(tokens)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


def test_regional_compilation_equals_eager_outputs_and_gradients():
    """`block.compile()` on every block (what regional compilation of repeated blocks does): one
    compiled code for the blocks of the same structure, a recompile for the QKV-specialized one."""
    eager = specialized_tiny(PAPER_TINY).train()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    for block in compiled.blocks:
        block.compile(backend=counter)
    x = images(batch=3)
    out_eager, grads_eager = loss_and_grads(eager, x)
    for _ in range(2):  # the second pass runs block 0 when blocks 1-2's graph exists too
        out_compiled, grads_compiled = loss_and_grads(compiled, x)
        torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-6)
        assert_same(grads_compiled, grads_eager)
    assert counter.frame_count == 2  # block 0 (QKV copy) and blocks 1-2 (norms + LayerScale)
    assert any(".global_copy." in name for name in grads_compiled)
    torch._dynamo.reset()


def test_a_model_compiled_after_another_of_other_structure_runs_its_own_graph():
    """Compiled code is cached per Python function, shared by every model of the class: the guards
    must tell a baseline, a norm+QKV and a paper-default model apart (forward hooks are not guarded,
    module types are)."""
    torch._dynamo.reset()
    x = images(batch=2)
    for components in (None, {"norm": 1.0, "qkv": 1.0}, PAPER_TINY):
        model = tiny_vit(embed_dim=32, depth=3).eval()
        if components:
            model = randomize_(specialize(model, **components), seed=4)
        with torch.no_grad():
            expected = model(x)
            compiled = torch.compile(model, backend="eager")(x)  # Dynamo's guards; no code generation
        torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_whole_model_compilation_equals_eager_in_training():
    eager = specialized_tiny(PAPER_TINY).train()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    forward = torch.compile(compiled, backend=counter, fullgraph=True)
    x = images(batch=3)
    out_eager, grads_eager = loss_and_grads(eager, x)
    out_compiled, grads_compiled = loss_and_grads(compiled, x, forward)
    assert counter.frame_count == 1
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-6)
    assert_same(grads_compiled, grads_eager)
    torch._dynamo.reset()


def test_grad_checkpointing_with_compiled_blocks_gives_the_eager_gradients():
    """ViT-L's memory option (checkpointed blocks) together with regional compilation."""
    eager = specialized_tiny(PAPER_TINY).train()
    checkpointed = copy.deepcopy(eager)
    checkpointed.set_grad_checkpointing(True)
    torch._dynamo.reset()
    for block in checkpointed.blocks:
        block.compile(backend="aot_eager")  # traced fwd+bwd graphs, no code generation (fast)
    recomputed = []
    checkpointed.blocks[1].register_forward_pre_hook(lambda *args: recomputed.append(1))
    x = images(batch=3)
    out_eager, grads_eager = loss_and_grads(eager, x)
    out_ckpt, grads_ckpt = loss_and_grads(checkpointed, x)
    assert len(recomputed) == 2  # forward, then the recomputation in backward
    torch.testing.assert_close(out_ckpt, out_eager, rtol=1e-5, atol=1e-6)
    assert_same(grads_ckpt, grads_eager)
    torch._dynamo.reset()


def test_a_specialized_model_pickles_whole(tmp_path):
    """The specialized classes are made at run time; torch.save / torch.load of the whole module
    (and deepcopy) rebuild them."""
    model = specialized_tiny(EVERYTHING).eval()
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert type(loaded.blocks[0].norm1).__name__ == "GlobalTokenLayerNorm"
    with torch.no_grad():
        assert torch.equal(loaded(images()), model(images()))


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward during the forward pass."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    return sum(storages.values())


def test_specialization_saves_no_extra_full_size_activation():
    """The split adds small tensors for backward (the global rows, per-token gammas), never another
    activation of the full sequence: at 64 tokens the paper default stays within 10 % of timm's."""
    kwargs = {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
    baseline = tiny_vit(**kwargs).train()
    specialized = specialize(copy.deepcopy(baseline), **PAPER_TINY)
    x = images(64, batch=4)
    base_bytes, spec_bytes = saved_activation_bytes(baseline, x), saved_activation_bytes(specialized, x)
    assert base_bytes < spec_bytes <= 1.10 * base_bytes
    specialized.set_grad_checkpointing(True)
    assert saved_activation_bytes(specialized, x) < 0.5 * base_bytes  # the blocks' activations are dropped
