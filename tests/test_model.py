"""clsvit.model checked against timm itself: a clone-initialised specialized model must compute
exactly what the timm model computes, the global-token copies must only touch the global rows, and
timm's model API (state dicts, grad checkpointing, optimizer groups, torch.compile) must keep working.
No expected logits are written by hand: the reference is always timm's own model."""

import collections
import copy
import inspect

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import DropPath, LayerScale, resample_abs_pos_embed
from timm.models import group_parameters
from timm.models.vision_transformer import ParallelScalingBlock
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clsvit import COMPONENTS, PAPER_DEFAULT, create_model, specialize
from clsvit.checkpoint import load_run
from clsvit.config import load_config, save_config
from clsvit.model import (
    NO_SPECIALIZATION,
    OPTIONS,
    block_indices,
    build_model,
    count_parameters,
    describe_specialization,
    feature_extractor,
    is_specialized,
    set_uniform_drop_path,
    specialized_modules,
    specialized_tokens,
    split_class,
)
from clsvit.model.specialization import scale_global_rows
from model_utils import images, random_timm_model, randomize_, tiny_vit

EVERYTHING = {"norm": 1.0, "layerscale": 1.0, "qkv": 1.0, "proj": 1.0, "mlp": 1.0, "final_norm": True}
EVERYTHING_NO_FINAL = {**EVERYTHING, "final_norm": False}


def global_copy_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> the specialized module (the one that owns a `global_copy`)."""
    return {name: module for name, module in model.named_modules() if hasattr(module, "global_copy")}


def every_output(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits, features and every intermediate layer through timm's public API."""
    out = {"logits": model(x), "forward_features": model.forward_features(x)}
    final, intermediates = model.forward_intermediates(
        x, norm=True, return_prefix_tokens=True, output_fmt="NLC")
    out["forward_intermediates.final"] = final
    for i, (patches, prefix) in enumerate(intermediates):
        out[f"forward_intermediates.{i}.patches"] = patches
        out[f"forward_intermediates.{i}.prefix"] = prefix
    for i, layer in enumerate(model.get_intermediate_layers(x, n=2, reshape=True)):
        out[f"get_intermediate_layers.{i}"] = layer
    with torch.inference_mode():  # no autograd: the splits overwrite rows of inference tensors
        out["logits.inference_mode"] = model(x)
    return out


def block_outputs(model: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    outputs = []
    handles = [block.register_forward_hook(lambda m, a, out: outputs.append(out)) for block in model.blocks]
    with torch.no_grad():
        model.forward_features(x, attn_mask=attn_mask)
    for handle in handles:
        handle.remove()
    return outputs


def assert_unchanged(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0.0, atol=1e-6)


def assert_changed(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 1e-3


def assert_every_token_changed(a: torch.Tensor, b: torch.Tensor) -> None:
    """Each token (dim 1) changed: a copy applied to [CLS] but not to the registers fails this."""
    assert ((a - b).abs().amax(dim=(0, 2)) > 1e-3).all()


# --- a clone-initialised specialized model is the timm model -----------------------------------

EQUIVALENCE_CASES = [
    pytest.param("deit3_small_patch16_224", {}, PAPER_DEFAULT, id="S-paper"),
    pytest.param("deit3_base_patch16_224", {}, PAPER_DEFAULT, id="B-paper"),
    pytest.param("deit3_large_patch16_224", {}, PAPER_DEFAULT, id="L-paper"),
    pytest.param("deit3_small_patch16_224", {"reg_tokens": 4}, PAPER_DEFAULT, id="S-cls+reg4-paper"),
    pytest.param("vit_little_patch16_reg4_gap_256", {"init_values": 1e-5}, PAPER_DEFAULT,
                 id="little-reg4-no-cls-avgpool-paper"),
    pytest.param("deit3_small_patch16_224", {}, EVERYTHING, id="S-everything"),
    pytest.param("deit3_small_patch16_224", {"reg_tokens": 4}, EVERYTHING, id="S-cls+reg4-everything"),
    pytest.param("vit_little_patch16_reg4_gap_256", {"init_values": 1e-5}, EVERYTHING_NO_FINAL,
                 id="little-reg4-no-cls-avgpool-everything"),  # fc_norm after pooling: no final norm
]


@pytest.mark.parametrize("arch, kwargs, components", EQUIVALENCE_CASES)
def test_clone_specialization_computes_the_timm_model(arch, kwargs, components):
    model = random_timm_model(arch, img_size=32, **kwargs)
    x = images(32)
    with torch.no_grad():
        reference = {mode: every_output(model.train(mode), x) for mode in (True, False)}
        base_count = count_parameters(model)
        specialize(model, **components)  # in place: the copies are cloned from these very weights
        assert count_parameters(model) > base_count
        for mode in (True, False):
            outputs = every_output(model.train(mode), x)
            assert outputs.keys() == reference[mode].keys()
            for key, expected in reference[mode].items():
                assert expected.abs().max() > 1e-2, key  # a 1e-5 tolerance means something
                assert (outputs[key] - expected).abs().max() <= 1e-5, (key, mode)


# --- the copies act on the global rows only ----------------------------------------------------

@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_mlp_copy_changes_global_tokens_and_leaves_that_blocks_patches_alone(reg_tokens):
    model = specialize(tiny_vit(reg_tokens=reg_tokens), mlp=[1])
    n = model.num_prefix_tokens
    x = images()
    before = block_outputs(model, x)
    with torch.no_grad():
        model.blocks[1].mlp.global_copy.fc2.bias.add_(1.0)
        model.blocks[1].mlp.global_copy.fc1.weight.mul_(1.5)
    after = block_outputs(model, x)
    assert_unchanged(after[0], before[0])
    assert_every_token_changed(after[1][:, :n], before[1][:, :n])  # [CLS] and registers
    assert_unchanged(after[1][:, n:], before[1][:, n:])  # patches of block 1
    assert_changed(after[2][:, n:], before[2][:, n:])  # block 2's patches attend to the new [CLS]


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_qkv_copy_reaches_patches_only_through_attention(reg_tokens):
    model = specialize(tiny_vit(reg_tokens=reg_tokens), qkv=[1])
    n, d = model.num_prefix_tokens, model.embed_dim
    copy_weight = model.blocks[1].attn.qkv.global_copy.weight
    x = images()
    seq_len = n + model.patch_embed.num_patches
    patches_blind = torch.ones(seq_len, seq_len, dtype=torch.bool)
    patches_blind[n:, :n] = False  # patch queries may not attend to global keys
    before, before_blind = block_outputs(model, x), block_outputs(model, x, patches_blind)
    noise = 0.5 * torch.randn(3 * d, d, generator=torch.Generator().manual_seed(2))

    def perturbed(rows: slice, attn_mask=None):
        saved = copy_weight.detach().clone()
        with torch.no_grad():
            copy_weight[rows] += noise[rows]
        outputs = block_outputs(model, x, attn_mask)
        with torch.no_grad():
            copy_weight.copy_(saved)
        return outputs

    # the global tokens' queries: only their own rows can change
    after = perturbed(slice(0, d))
    assert_every_token_changed(after[1][:, :n], before[1][:, :n])
    assert_unchanged(after[1][:, n:], before[1][:, n:])
    # their keys or values: the patches see them through the joint softmax...
    for rows in (slice(d, 2 * d), slice(2 * d, 3 * d)):
        after = perturbed(rows)
        assert_unchanged(after[0], before[0])
        assert_changed(after[1][:, n:], before[1][:, n:])
    # ...and only through it: with patch->global attention masked, nothing reaches the patches
    after = perturbed(slice(0, 3 * d), patches_blind)
    assert_every_token_changed(after[1][:, :n], before_blind[1][:, :n])
    assert_unchanged(after[1][:, n:], before_blind[1][:, n:])


# --- which tokens get the copies ----------------------------------------------------------------

class RowSplit(nn.Module):
    """The definition of a split module, from two unspecialized timm modules: `shared` on every
    row, then the rows `rows` recomputed by `copy` (written out here, not taken from clsvit)."""

    def __init__(self, shared: nn.Module, copy_: nn.Module, rows: slice):
        super().__init__()
        self.shared, self.copy, self.rows = shared, copy_, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared(x)
        out[:, self.rows] = self.copy(x[:, self.rows])
        return out


def hand_built(model: nn.Module, rows: slice) -> nn.Module:
    """timm's unspecialized model with `model`'s shared weights, each specialized module replaced
    by a RowSplit of timm's module and the copy (itself a plain timm module)."""
    with torch.device("meta"):
        reference = timm.create_model("deit3_small_patch16_224", **model.tiny_kwargs)
    reference = reference.to_empty(device="cpu")
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if ".global_copy." not in k}, strict=True)
    for name, module in specialized_modules(model).items():
        parent, _, child = name.rpartition(".")
        owner = reference.get_submodule(parent) if parent else reference
        setattr(owner, child, RowSplit(getattr(owner, child), copy.deepcopy(module.global_copy), rows))
    assert all(type(m).__module__.startswith(("timm.", "torch.")) for m in reference.modules()  # timm's own modules
               if not isinstance(m, RowSplit))
    return reference.eval()


def tokens_vit(tokens, selection=PAPER_DEFAULT, seed: int = 11, **kwargs) -> nn.Module:
    """A tiny ViT with a 4x4 patch grid (patch 8 at 32 px), specialized for `tokens`, its copies
    randomised apart from the shared weights."""
    tiny_kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2, "num_classes": 10,
                   "init_values": 0.1, **kwargs}
    model = randomize_(specialize(timm.create_model("deit3_small_patch16_224", **tiny_kwargs), tokens=tokens,
                                  **selection), seed).eval()
    model.tiny_kwargs = tiny_kwargs
    return model


def patch_row(model: nn.Module, row: int, col: int) -> int:
    """The sequence row of the patch at (row, col), found the way a user would: the one row of
    timm's embedded sequence that changes when only that patch's pixels change."""
    x = images()
    moved = x.clone()
    p = model.patch_embed.patch_size[0]
    moved[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p] += 1.0
    with torch.no_grad():
        changed = (model._pos_embed(model.patch_embed(moved)) - model._pos_embed(model.patch_embed(x))).abs().amax(dim=(0, 2))
    assert (changed > 0).sum() == 1
    return int(changed.argmax())


@pytest.mark.parametrize("tokens, reg_tokens", [("global", 0), ("global", 4), ("cls", 4), ("registers", 4),
                                                ([2, 1], 0), ([3, 3], 4), ([0, 0], 0)])
def test_the_copies_act_on_the_chosen_rows_as_the_hand_built_split_does(tokens, reg_tokens):
    """Bit for bit what timm's unspecialized modules compute with the copy's output written over the
    chosen rows: the [CLS] + registers (global), [CLS] (row 0), the registers (rows 1-4), or the patch
    at (row, col) (the one row whose input depends on that patch's pixels)."""
    selection = {**EVERYTHING_NO_FINAL, "final_norm": True}
    model = tokens_vit(tokens, selection, reg_tokens=reg_tokens)
    n = model.num_prefix_tokens
    rows = ({"global": slice(0, n), "cls": slice(0, 1), "registers": slice(1, n)}[tokens] if isinstance(tokens, str)
            else slice(patch_row(model, *tokens), patch_row(model, *tokens) + 1))
    assert rows.stop > rows.start and rows.stop <= n + 16
    reference = hand_built(model, rows)
    x = images()
    for grad in (True, False):  # LayerScale: a per-token gamma with autograd, an overwrite without
        with torch.set_grad_enabled(grad):
            assert torch.equal(model(x), reference(x))
            assert torch.equal(model.forward_features(x), reference.forward_features(x))


def test_global_is_the_default_and_its_state_dict_is_timms_plus_the_copies():
    """`tokens="global"` is what `specialize` does without `tokens`: the same module classes, the
    same state dict (timm's keys plus `<module>.global_copy.<key>` of every selected module), the
    same outputs."""
    timm_model = tiny_vit(reg_tokens=2)
    default = specialize(copy.deepcopy(timm_model), **PAPER_DEFAULT)
    named = specialize(copy.deepcopy(timm_model), tokens="global", **PAPER_DEFAULT)
    timm_state = timm_model.state_dict()
    selected = [f"blocks.{i}.{m}" for i in range(4) for m in ("norm1", "norm2", "ls1", "ls2")] + ["blocks.0.attn.qkv"]
    expected = {**timm_state, **{f"{name}.global_copy.{key.removeprefix(name + '.')}": value
                                 for name in selected for key, value in timm_state.items() if key.startswith(name + ".")}}
    for model in (default, named):
        state = model.state_dict()
        assert list(state) == list(default.state_dict()) and state.keys() == expected.keys()
        assert all(torch.equal(state[key], value) for key, value in expected.items())
        assert {name: type(m).__name__ for name, m in model.named_modules()} == {
            name: type(m).__name__ for name, m in default.named_modules()}
        assert specialized_tokens(model) == "global"
    x = images()
    assert torch.equal(named(x), default(x))


def test_patch_copies_leave_every_other_row_of_that_block_alone():
    """A copy for the patch at (1, 2) in block 1's MLP changes that patch's row there and nothing
    else; block 2 then sees it through attention."""
    model = tokens_vit([1, 2], {"mlp": [1]}, reg_tokens=4)
    row = patch_row(model, 1, 2)
    assert row == model.num_prefix_tokens + 1 * 4 + 2
    x = images()
    before = block_outputs(model, x)
    with torch.no_grad():
        model.blocks[1].mlp.global_copy.fc2.bias.add_(1.0)
    after = block_outputs(model, x)
    assert_unchanged(after[0], before[0])
    others = [i for i in range(after[1].shape[1]) if i != row]
    assert_changed(after[1][:, row], before[1][:, row])
    assert_unchanged(after[1][:, others], before[1][:, others])  # [CLS], registers and the other patches
    assert_changed(after[2], before[2])
    assert ((after[2] - before[2]).abs().amax(dim=(0, 2)) > 0).all()  # every token attends to that patch


def test_final_norm_copy_of_a_patch_changes_that_patch_feature_and_not_the_class_logits():
    """`final_norm` with a patch position: the norm after the last block normalises that patch's
    row with the copy (its dense feature changes), while the [CLS]-pooled logits see the shared norm."""
    model = tokens_vit([3, 0], {"norm": 1.0, "final_norm": True})
    row = patch_row(model, 3, 0)
    x = images()
    with torch.no_grad():
        features, logits = model.forward_features(x), model(x)
        model.norm.global_copy.bias.add_(0.5)
        moved_features, moved_logits = model.forward_features(x), model(x)
    assert_changed(moved_features[:, row], features[:, row])
    assert torch.equal(moved_features[:, [i for i in range(features.shape[1]) if i != row]],
                       features[:, [i for i in range(features.shape[1]) if i != row]])
    assert torch.equal(moved_logits, logits)


def forward_flops(model: nn.Module, size: int = 32) -> int:
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, size, size, device="meta"))
    return counter.get_total_flops()


@pytest.mark.parametrize("arch, kwargs", [("deit3_small_patch16_224", {}), ("deit3_small_patch16_224", {"reg_tokens": 4})])
def test_tokens_change_neither_the_parameters_nor_more_flops_than_their_rows(arch, kwargs):
    """Every choice has the paper default's copies (the same state-dict keys and shapes); its
    forward costs the baseline's plus the copies' products on its own rows (torch's FlopCounterMode):
    one patch costs what [CLS] alone costs, so on a model without registers a patch position costs
    exactly the paper default's FLOPs."""
    kwargs = {"img_size": 64, **kwargs}
    base = meta_model(arch, **kwargs)
    d = base.embed_dim
    qkv_products = 2 * d * 3 * d * round(len(base.blocks) / 3)  # the QKV copies in the first third, per row
    base_flops = forward_flops(base, 64)
    shapes = {}
    for tokens, rows in (("global", base.num_prefix_tokens), ("cls", 1), ("registers", 4), ([3, 3], 1), ([0, 0], 1)):
        if tokens in ("cls", "registers") and not kwargs.get("reg_tokens"):
            continue
        model = specialize(meta_model(arch, **kwargs), tokens=tokens, **PAPER_DEFAULT)
        shapes[str(tokens)] = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        assert forward_flops(model, 64) == base_flops + rows * qkv_products, tokens
    assert len({repr(s) for s in shapes.values()}) == 1


NO_REGISTERS = ("tokens: registers, but the model has no registers (build it with model.reg_tokens / timm's reg_tokens, "
                "or a *_reg* architecture)")
EVERY_GLOBAL = "chooses every global token of this model ({}): that is tokens global; write global"
OUTSIDE = "tokens: patch position {} is outside the 2x2 patch grid (rows and columns count from 0)"
NOT_A_TOKEN = "tokens: expected global, cls, registers or a patch position [row, col] of two integers >= 0, got {}"


@pytest.mark.parametrize("tokens, kwargs, selection, message", [
    ("registers", {}, PAPER_DEFAULT, NO_REGISTERS),
    ("registers", {"arch": "deit_tiny_distilled_patch16_224", "init_values": None}, {"norm": 1.0},
     NO_REGISTERS),  # [CLS] + distillation token: no register
    ("cls", {"arch": "vit_little_patch16_reg4_gap_256"}, PAPER_DEFAULT,
     "tokens: cls, but the model has no [CLS] token (class_token=False; 4 registers, global_pool='avg')"),
    ("cls", {}, PAPER_DEFAULT, "tokens: cls " + EVERY_GLOBAL.format("[CLS] is its only global token")),
    ("registers", {"arch": "vit_little_patch16_reg4_gap_256"}, PAPER_DEFAULT,
     "tokens: registers " + EVERY_GLOBAL.format("it has no [CLS] token")),
    ([2, 0], {}, PAPER_DEFAULT, OUTSIDE.format("[2, 0]")),
    ([0, 2], {}, PAPER_DEFAULT, OUTSIDE.format("[0, 2]")),
    ([1, 1], {"dynamic_img_size": True}, PAPER_DEFAULT, "tokens: patch position [1, 1] on a model built with "
     "dynamic_img_size: its grid changes with each input, so no row is that patch"),
    ([1, 1], {"patch_drop_rate": 0.25}, PAPER_DEFAULT, "tokens: patch position [1, 1] on a model with patch dropout "
     "(patch_drop_rate): it drops and reorders the patch rows; build it without"),
    ([1, 1], {}, NO_SPECIALIZATION, "tokens: [1, 1] chooses the tokens that get the copies, but no component is "
     "specialized; leave tokens global or select a component"),
    ("patch", {}, PAPER_DEFAULT, "tokens: 'patch' is none of global, cls, registers or a patch position [row, col]"),
    ("registres", {}, PAPER_DEFAULT, "tokens: 'registres' is none of global, cls, registers or a patch position "
     "[row, col]; did you mean 'registers'?"),
    ([1], {}, PAPER_DEFAULT, NOT_A_TOKEN.format("[1]")),
    ([1, True], {}, PAPER_DEFAULT, NOT_A_TOKEN.format("[1, True]")),
    ([-1, 0], {}, PAPER_DEFAULT, NOT_A_TOKEN.format("[-1, 0]")),
    ([1.0, 0], {}, PAPER_DEFAULT, NOT_A_TOKEN.format("[1.0, 0]")),
])
def test_tokens_a_model_cannot_give_are_refused_and_the_model_is_left_untouched(tokens, kwargs, selection, message):
    kwargs = dict(kwargs)
    model = tiny_vit(kwargs.pop("arch", "deit3_small_patch16_224"), **kwargs)
    classes = {name: type(module) for name, module in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as refused:
        specialize(model, **{**selection, "tokens": tokens})
    assert str(refused.value) == message
    assert {name: type(module) for name, module in model.named_modules()} == classes
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
    assert specialized_tokens(model) is None


def test_a_specialized_model_keeps_the_tokens_of_its_copies():
    model = specialize(tiny_vit(patch_size=8), tokens=[1, 1], norm=1.0)
    specialize(model, tokens=[1, 1], qkv=[0])  # more copies for the same token
    assert specialized_tokens(model) == [1, 1] and "blocks.0.attn.qkv" in specialized_modules(model)
    assert {(m.row_start, m.row_stop) for m in specialized_modules(model).values()} == {(6, 7)}  # 1 + 1 * 4 + 1
    state = copy.deepcopy(model.state_dict())
    for other, shown in [("global", "global"), ([1, 2], "[1, 2]")]:
        with pytest.raises(ValueError) as refused:
            specialize(model, tokens=other, mlp=[0])
        assert str(refused.value) == f"tokens: the model's copies are for tokens [1, 1]; it cannot also have copies for {shown}"
    assert model.state_dict().keys() == state.keys() and specialized_tokens(model) == [1, 1]
    assert specialize(tiny_vit(), tokens=(0, 1), norm=1.0).specialized_tokens == [0, 1]  # one spelling: a list


# --- parameter counts --------------------------------------------------------------------------

def meta_model(arch: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(arch, **kwargs)


@pytest.mark.parametrize("arch, expected_percent", [
    ("deit3_small_patch16_224", 8.17), ("deit3_base_patch16_224", 8.25), ("deit3_large_patch16_224", 8.32)])
def test_paper_default_parameter_overhead(arch, expected_percent):
    model = meta_model(arch, num_classes=1000)
    base = count_parameters(model)
    specialize(model, **PAPER_DEFAULT)
    assert round(100 * (count_parameters(model) / base - 1), 2) == expected_percent


def per_block_count(component: str, d: int, h: int) -> int:
    return {"norm": 4 * d, "layerscale": 2 * d, "qkv": 3 * d * d + 3 * d, "proj": d * d + d,
            "mlp": 2 * d * h + h + d}[component]


@pytest.mark.parametrize("arch", ["deit3_small_patch16_224", "deit3_large_patch16_224"])
def test_every_component_count_matches_its_closed_form(arch):
    base = meta_model(arch)
    d, depth = base.embed_dim, len(base.blocks)
    h = base.blocks[0].mlp.fc1.out_features
    base_count = count_parameters(base)
    for component in COMPONENTS:
        for value in (0.0, 1 / 4, 1 / 3, 1 / 2, 1.0, [0, 5], [depth - 1], [3, 1, 3]):
            blocks = round(value * depth) if isinstance(value, float) else len(set(value))
            model = specialize(copy.deepcopy(base), **{component: value})
            assert count_parameters(model) - base_count == blocks * per_block_count(component, d, h), \
                (component, value)
    model = specialize(copy.deepcopy(base), final_norm=True)
    assert count_parameters(model) - base_count == 2 * d


# --- block selection ---------------------------------------------------------------------------

def test_fractions_count_blocks_from_the_input():
    assert block_indices(1 / 3, 12, "qkv") == [0, 1, 2, 3]
    assert block_indices(1 / 3, 24, "qkv") == list(range(8))
    assert block_indices(0.3, 12, "qkv") == [0, 1, 2, 3]  # rounded (3.6 -> 4), not floored
    assert block_indices(0.0, 12, "qkv") == [] and block_indices(1.0, 12, "qkv") == list(range(12))
    assert block_indices(1, 12, "qkv") == list(range(12))
    assert block_indices([5, 0, 5], 12, "qkv") == [0, 5]
    model = specialize(meta_model("deit3_large_patch16_224"), qkv=1 / 3, proj=[2, 7])
    assert set(global_copy_modules(model)) == (
        {f"blocks.{i}.attn.qkv" for i in range(8)} | {"blocks.2.attn.proj", "blocks.7.attn.proj"})


def test_split_class_runs_the_base_forward_under_the_name_shared_forward_and_copies():
    """`split_class` of any token-wise module class: `shared_forward` is the base class's forward
    with its signature, defaults and closure (here a `super()` call), named `shared_forward` (the
    name TorchScript compiles it under); a split module survives deepcopy (its class is rebuilt from
    the base class, as when it is unpickled)."""
    class ScaledLinear(nn.Linear):
        def forward(self, x: torch.Tensor, scale: float = 2.0, *, shift: float = 1.0) -> torch.Tensor:
            return super().forward(x) * scale + shift

    split = split_class(ScaledLinear)
    assert split.__name__ == "GlobalTokenScaledLinear" and split_class(ScaledLinear) is split
    shared = split.shared_forward
    assert shared.__name__ == "shared_forward"
    assert shared.__qualname__ == ScaledLinear.forward.__qualname__.removesuffix("forward") + "shared_forward"
    assert inspect.signature(shared) == inspect.signature(ScaledLinear.forward)
    module, x = ScaledLinear(4, 4), torch.randn(2, 5, 4)
    with torch.no_grad():
        assert torch.equal(shared(module, x), module(x))
        assert torch.equal(shared(module, x, 3.0, shift=-1.0), module(x, 3.0, shift=-1.0))

    copy_of_rows = ScaledLinear(4, 4)
    module.global_copy, module.row_start, module.row_stop = copy_of_rows, 1, 3
    module.__class__ = split
    restored = copy.deepcopy(module)  # through __reduce_ex__, as pickle
    assert type(restored) is split and restored._split_base is ScaledLinear
    with torch.no_grad():
        expected = module.shared_forward(x)  # every row by the shared weights, rows 1:3 by the copy
        expected[:, 1:3] = copy_of_rows(x[:, 1:3])
        assert torch.equal(restored(x), expected) and torch.equal(module(x), expected)


def test_layerscale_scales_the_chosen_rows_by_the_copy_in_training_and_inference():
    """`scale_global_rows` against its definition (gamma on every row, the copy's gamma on rows
    start:stop), with and without autograd, for rows at the start, inside and at the end of a
    sequence longer than the width (17 tokens of width 8)."""
    x, gamma, copy_gamma = torch.randn(2, 17, 8), torch.randn(8), torch.randn(8)
    for start, stop in ((0, 1), (0, 5), (9, 10), (16, 17)):
        expected = x * gamma
        expected[:, start:stop] = x[:, start:stop] * copy_gamma
        for grad_enabled in (True, False):
            with torch.set_grad_enabled(grad_enabled):
                assert torch.equal(scale_global_rows(x, gamma, copy_gamma, start, stop), expected), (start, stop)


def test_specialize_is_idempotent():
    model = specialize(tiny_vit(), **PAPER_DEFAULT)
    x = images()
    with torch.no_grad():
        model.blocks[0].norm1.global_copy.weight.mul_(2.0)  # copies no longer equal the shared weights
    state, expected = copy.deepcopy(model.state_dict()), model(x)
    assert specialize(model, **PAPER_DEFAULT) is model
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # copies not re-cloned
    for m in global_copy_modules(model).values():  # split once: no second subclass, no second copy
        assert type(m) is split_class(type(m.global_copy))  # e.g. GlobalTokenLayerNorm, not GlobalTokenGlobalToken...
        assert not hasattr(m.global_copy, "global_copy") and not m._forward_hooks
    assert torch.equal(model(x), expected)
    specialize(model, **EVERYTHING)  # adds only what is missing
    assert count_parameters(model) == count_parameters(specialize(tiny_vit(), **EVERYTHING))


# --- gradients ---------------------------------------------------------------------------------

@pytest.mark.parametrize("reg_tokens, tokens", [(0, "global"), (4, "global"), (4, [1, 0])])
def test_gradients_split_exactly_between_shared_weights_and_copies(reg_tokens, tokens):
    """With clone init, d(loss)/d(shared) + d(loss)/d(copy) is the timm model's gradient (the other
    rows' part and the chosen rows' part of the same sum), and each copy gets a gradient."""
    vanilla = tiny_vit(reg_tokens=reg_tokens)
    model = specialize(copy.deepcopy(vanilla), tokens=tokens, **EVERYTHING)
    x = images()
    head_weights = torch.randn(10, generator=torch.Generator().manual_seed(3))
    for m in (vanilla, model):
        (m(x) @ head_weights).sum().backward()  # [CLS]-pooled loss
    vanilla_grads = {name: p.grad for name, p in vanilla.named_parameters()}
    specialized = global_copy_modules(model)
    assert len(specialized) == 7 * 4 + 1
    # a patch's row after the last attention never reaches the [CLS]-pooled loss: those copies get 0
    unreached = set() if tokens == "global" else {"norm", *(f"blocks.3.{m}" for m in ("attn.proj", "ls1", "norm2",
                                                                                        "mlp", "ls2"))}
    for name, param in model.named_parameters():
        if ".global_copy." in name:
            reached = name.split(".global_copy.")[0] not in unreached
            assert param.grad is not None and (param.grad.abs().sum() > 0) == reached, name
            continue
        owner = name.rsplit(".", 1)[0]
        if owner in specialized:  # shared weights of a specialized module
            twin = specialized[owner].global_copy.get_parameter(name.rsplit(".", 1)[1])
            torch.testing.assert_close(param.grad + twin.grad, vanilla_grads[name], rtol=1e-4, atol=1e-7)
        elif owner.rsplit(".", 1)[0] in specialized:  # mlp.fc1 / mlp.fc2
            module, child = owner.rsplit(".", 1)
            twin = specialized[module].global_copy.get_submodule(child).get_parameter(name.rsplit(".", 1)[1])
            torch.testing.assert_close(param.grad + twin.grad, vanilla_grads[name], rtol=1e-4, atol=1e-7)
        else:  # embeddings, tokens, head: untouched by the split
            torch.testing.assert_close(param.grad, vanilla_grads[name], rtol=1e-4, atol=1e-7)


# --- fresh initialisation ----------------------------------------------------------------------

def test_fresh_copies_follow_timm_init_and_leave_shared_weights_alone():
    model = tiny_vit(embed_dim=128, init_values=0.1)  # random "trained" shared weights
    shared_before = copy.deepcopy(model.state_dict())
    specialize(model, **EVERYTHING, init="fresh")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in shared_before.items())
    checked = collections.Counter()
    for name, module in global_copy_modules(model).items():
        for child in module.global_copy.modules():
            if isinstance(child, nn.LayerNorm):
                assert torch.equal(child.weight, torch.ones_like(child.weight)), name
                assert torch.equal(child.bias, torch.zeros_like(child.bias)), name
            elif isinstance(child, LayerScale):
                assert torch.equal(child.gamma, torch.full_like(child.gamma, 0.1)), name
            elif isinstance(child, nn.Linear):  # timm: trunc_normal_(std=0.02), zero bias
                assert abs(child.weight.std().item() - 0.02) < 0.001, name
                assert abs(child.weight.mean().item()) < 0.001, name
                assert torch.equal(child.bias, torch.zeros_like(child.bias)), name
            checked[type(child).__name__] += 1
        for key, value in module.global_copy.state_dict().items():
            assert not torch.equal(value, module.state_dict()[key]), (name, key)
    # 4 blocks: norm1+norm2 (+ final norm), ls1+ls2, qkv+proj+fc1+fc2
    assert checked["LayerNorm"] == 9 and checked["LayerScale"] == 8 and checked["Linear"] == 16


def test_fresh_copies_follow_the_models_own_init_scheme_by_module_name():
    """A model built with timm's weight_init="jax" re-initialises its copies by that scheme, which
    reads each module's name (timm init_weights_vit_jax): Xavier-uniform weights, the MLP's biases
    drawn with std 1e-6 and the other biases zero."""
    model = tiny_vit(embed_dim=128, weight_init="jax")
    specialize(model, qkv=1.0, mlp=1.0, init="fresh")
    for i in range(4):
        fc1, qkv = model.blocks[i].mlp.global_copy.fc1, model.blocks[i].attn.qkv.global_copy
        assert 0 < fc1.bias.abs().max().item() < 1e-5 and torch.equal(qkv.bias, torch.zeros_like(qkv.bias))
        bound = (6 / (qkv.in_features + qkv.out_features)) ** 0.5  # xavier_uniform_
        assert 0.95 * bound < qkv.weight.abs().max().item() <= bound


# --- state dicts -------------------------------------------------------------------------------

def test_specialized_state_dict_round_trips_through_safetensors(tmp_path):
    model = randomize_(specialize(tiny_vit(), **EVERYTHING), seed=5)  # copies differ from shared
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    fresh = specialize(tiny_vit(seed=6), **EVERYTHING)
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    x = images()
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_vanilla_state_dict_loads_strictly_and_fills_the_copies():
    vanilla = tiny_vit(seed=7).eval()
    model = specialize(tiny_vit(seed=8), **EVERYTHING, init="fresh").eval()
    model.load_state_dict(vanilla.state_dict(), strict=True)
    for name, module in global_copy_modules(model).items():
        for key, value in module.global_copy.state_dict().items():
            assert torch.equal(value, module.state_dict()[key]), (name, key)
    x = images()
    assert (model(x) - vanilla(x)).abs().max() <= 1e-5
    # a deep copy keeps its own working load hook
    clone = copy.deepcopy(model)
    clone.load_state_dict(tiny_vit(seed=9).state_dict(), strict=True)


def test_specialized_state_dict_does_not_fit_a_vanilla_model():
    model = specialize(tiny_vit(), **PAPER_DEFAULT)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*global_copy"):
        tiny_vit().load_state_dict(model.state_dict())


# --- timm's model API --------------------------------------------------------------------------

def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    model = specialize(tiny_vit(), **EVERYTHING)
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    calls = []
    checkpointed.blocks[0].norm1.register_forward_hook(lambda *args: calls.append(1))
    x = images()
    outputs = []
    for m in (model, checkpointed):
        out = m.train()(x)
        out.square().sum().backward()
        outputs.append(out)
    assert len(calls) == 2  # recomputed in backward: the checkpointed path really ran
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_optimizer_groups_treat_copies_like_their_shared_twins():
    model = specialize(tiny_vit(reg_tokens=4), **EVERYTHING)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {"pos_embed", "cls_token", "reg_token"} <= model.no_weight_decay()

    optimizer = create_optimizer_v2(model, "lamb", weight_decay=0.05)
    decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    copies = [n for n in names.values() if ".global_copy." in n]
    assert {n for n in copies if model.get_parameter(n).ndim == 1} <= no_decay
    assert {n for n in copies if model.get_parameter(n).ndim == 2} <= decay
    assert "blocks.0.attn.qkv.global_copy.weight" in decay and "norm.global_copy.weight" in no_decay

    # group_matcher puts every copy in its block's group (the final norm's copy with the final norm)
    groups = group_parameters(model, model.group_matcher())
    group_of = {name: g for g, members in groups.items() for name in members}
    assert group_of.keys() == set(names.values())
    for name in copies:
        assert group_of[name] == group_of[name.replace("global_copy.", "")], name
    # ...so layer-wise lr decay scales each copy like its twin
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    lr_scale = {names[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert len(set(lr_scale.values())) == len(model.blocks) + 2
    for name in copies:
        assert lr_scale[name] == lr_scale[name.replace("global_copy.", "")], name


def test_drop_path_is_uniform_across_blocks():
    kwargs = {"img_size": 32, "embed_dim": 32, "depth": 4, "num_heads": 2}
    model = create_model("deit3_small_patch16_224", drop_path=0.2, specialize=PAPER_DEFAULT, **kwargs)
    rates = [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in model.blocks]
    assert rates == [(0.2, 0.2)] * 4
    linear = timm.create_model("deit3_small_patch16_224", drop_path_rate=0.2, **kwargs)
    assert isinstance(linear.blocks[0].drop_path1, nn.Identity)  # timm's rises from 0: not DeiT-III
    set_uniform_drop_path(model, 0.0)
    assert all(isinstance(b.drop_path1, nn.Identity) and isinstance(b.drop_path2, nn.Identity) for b in model.blocks)
    set_uniform_drop_path(linear, 0.1)
    assert all(isinstance(b.drop_path2, DropPath) and b.drop_path2.drop_prob == 0.1 for b in linear.blocks)
    with pytest.raises(ValueError, match="^drop_path_rate"):
        create_model("deit3_small_patch16_224", drop_path_rate=0.2, **kwargs)
    with pytest.raises(ValueError, match="^drop_path"):
        set_uniform_drop_path(model, 1.0)


def test_create_model_applies_layerscale_init_and_specialization():
    model = create_model("deit3_small_patch16_224", img_size=32, embed_dim=32, depth=3, num_heads=2,
                         layerscale_init=1e-4, specialize={**PAPER_DEFAULT, "qkv": [2]})
    assert torch.equal(model.blocks[1].ls2.gamma, torch.full((32,), 1e-4))
    assert set(global_copy_modules(model)) == (
        {f"blocks.{i}.{p}" for i in range(3) for c in ("norm", "layerscale") for p in COMPONENTS[c]}
        | {"blocks.2.attn.qkv"})


def test_torch_compile_has_no_graph_breaks_and_matches_eager():
    model = specialize(tiny_vit(embed_dim=32, depth=2, reg_tokens=2), **EVERYTHING).eval()
    x = images()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model)(x)
    assert (compiled - expected).abs().max() <= 1e-5


# --- TorchScript, torch.fx, feature extraction -------------------------------------------------

TRACE_CASES = [
    pytest.param("deit3_small_patch16_224", {"reg_tokens": 2}, EVERYTHING, id="cls+reg2-everything"),
    pytest.param("vit_little_patch16_reg4_gap_256", {"init_values": 1e-5}, EVERYTHING_NO_FINAL, id="reg4-avgpool"),
    pytest.param("deit_tiny_distilled_patch16_224", {"init_values": None}, {"norm": 1.0, "qkv": 0.5},
                 id="distilled-no-layerscale"),
    pytest.param("deit3_small_patch16_224", {"reg_tokens": 2, "patch_size": 8}, {**EVERYTHING, "tokens": [2, 1]},
                 id="patch-everything"),
]


@pytest.mark.parametrize("arch, kwargs, selection", TRACE_CASES)
def test_torchscript_computes_the_eager_model(arch, kwargs, selection):
    model = specialize(tiny_vit(arch, **kwargs), **selection).eval()
    scripted = torch.jit.script(model)
    x = images()
    for grad in (True, False):  # LayerScale: per-token gamma with autograd, row overwrite without
        with torch.set_grad_enabled(grad):
            assert_unchanged(scripted(x), model(x))


@pytest.mark.parametrize("arch, kwargs, selection", TRACE_CASES)
def test_fx_trace_computes_the_eager_model_and_its_gradients(arch, kwargs, selection):
    model = specialize(tiny_vit(arch, **kwargs), **selection)
    twin = copy.deepcopy(model)
    with torch.no_grad():  # traced without autograd, run below with it: LayerScale's choice is made at run time
        traced = torch.fx.symbolic_trace(twin)
    calls = collections.Counter(node.target.__name__ for node in traced.graph.nodes if node.op == "call_function")
    copies = global_copy_modules(model).values()
    assert calls["scale_global_rows"] == sum(isinstance(m, LayerScale) for m in copies)
    assert calls["with_global_rows"] == sum(not isinstance(m, LayerScale) for m in copies)
    x, weights = images(), torch.randn(10, generator=torch.Generator().manual_seed(4))
    for m in (model, traced):
        (m.train()(x) @ weights).sum().backward()
    traced_grads = dict(traced.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(traced_grads[name].grad, param.grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():
        assert_unchanged(traced.eval()(x), model.eval()(x))


def test_feature_extractors_trace_a_specialized_model():
    """torchvision's and timm's create_feature_extractor (torch.fx), and timm's features_only."""
    from torchvision.models import feature_extraction

    model = specialize(tiny_vit(reg_tokens=2), **EVERYTHING).eval()
    x = images()
    blocks = block_outputs(model, x)
    for create in (feature_extraction.create_feature_extractor, timm.models.create_feature_extractor):
        features = create(model, return_nodes={"blocks.1": "block1", "blocks.3": "block3"})(x)
        assert_unchanged(features["block1"], blocks[1])
        assert_unchanged(features["block3"], blocks[3])

    expected = model.forward_intermediates(x, indices=3, intermediates_only=True)  # NCHW maps, last 3 blocks
    wrapped = feature_extractor(copy.deepcopy(model))  # timm's FeatureGetterNet, as features_only builds it
    assert wrapped.feature_info.channels() == [64] * 3
    for feature, reference in zip(wrapped.eval()(x), expected, strict=True):
        assert_unchanged(feature, reference)
    built = create_model("deit3_small_patch16_224", specialize=PAPER_DEFAULT, features_only=True,
                         img_size=32, embed_dim=64, depth=4, num_heads=2)
    twin = timm.create_model("deit3_small_patch16_224_clsvit", features_only=True, out_indices=(1, 3),
                             img_size=32, embed_dim=64, depth=4, num_heads=2)
    for extractor in (built, twin):
        assert type(extractor).__name__ == "FeatureGetterNet"
        assert len(global_copy_modules(extractor.model)) == 4 * 4 + 1  # the paper default in 4 blocks
    assert [tuple(f.shape) for f in twin(x)] == [(2, 64, 2, 2)] * 2


# --- bad arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"norm": 1.5}, "norm: fraction 1.5 is outside [0, 1]"),
    ({"qkv": -0.1}, "qkv: fraction -0.1 is outside [0, 1]"),
    ({"qkv": [0, 4]}, "qkv: block index 4 is not in [0, 3] (depth 4)"),
    ({"mlp": [-1]}, "mlp: block index -1 is not in [0, 3] (depth 4)"),
    ({"proj": [1.0]}, "proj: block index 1.0 is not in [0, 3] (depth 4)"),
    ({"qkv": [True]}, "qkv: block index True is not in [0, 3] (depth 4)"),
    ({"layerscale": True}, "layerscale: expected a fraction in [0, 1] or a list of block indices, got True"),
    ({"qkv": "all"}, "qkv: expected a fraction in [0, 1] or a list of block indices, got 'all'"),
    ({"nrom": 1.0}, "specialize: unknown component 'nrom'; did you mean 'norm'?"),
    ({"zzzz": 1.0}, "specialize: unknown component 'zzzz'"),
    ({"init": "zeros"}, "init: expected one of ('clone', 'fresh'), got 'zeros'"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError) as refused:
        specialize(tiny_vit(), **kwargs)
    assert str(refused.value) == message


def test_models_that_cannot_be_specialized_are_refused():
    with pytest.raises(ValueError, match=r"^model: specialize\(\) needs a timm VisionTransformer, got Linear$"):
        specialize(nn.Linear(4, 4), norm=1.0)
    with pytest.raises(ValueError, match=r"^arch: 'resnet10t' is a ResNet"):
        create_model("resnet10t")
    with pytest.raises(ValueError, match=r"^arch: "):
        create_model("no_such_vit_patch16")
    with pytest.raises(ValueError, match=r"^model: it has no global tokens \(no \[CLS\] and no registers\) to "
                                         r"specialize; a patch position \(tokens: \[row, col\]\) can be$"):
        specialize(tiny_vit(class_token=False, global_pool="avg"), norm=1.0)
    in_place = tiny_vit()
    in_place.blocks[1].ls2.inplace = True  # timm's LayerScale(inplace=True) multiplies its input in place
    with pytest.raises(ValueError, match=r"^layerscale: blocks.1.ls2 is an in-place LayerScale; build the model "
                                         r"with inplace=False$"):
        specialize(in_place, layerscale=1.0)
    no_layerscale = timm.create_model("vit_small_patch16_224", img_size=32, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(ValueError, match=r"^layerscale: blocks.0.ls1 is an Identity"):
        specialize(no_layerscale, layerscale=1.0)
    specialize(no_layerscale, norm=1.0, qkv=1 / 2)  # the other components are fine
    pooled = tiny_vit("vit_little_patch16_reg4_gap_256")
    with pytest.raises(ValueError, match=r"^final_norm: "):
        specialize(pooled, final_norm=True)


@pytest.mark.parametrize("arch, kwargs, selection, message", [
    ("vit_tiny_patch16_224", {"init_values": None}, PAPER_DEFAULT,
     r"^layerscale: blocks.0.ls1 is an Identity in this model \(the architecture has no LayerScale: build it with "
     r"layerscale_init / timm's init_values, or set layerscale to 0\)$"),
    ("deit3_small_patch16_224", {"norm_layer": nn.Identity}, {"norm": 1.0},
     r"^norm: blocks.0.norm1 is an Identity in this model$"),  # built without norms
    ("deit_tiny_distilled_patch16_224", {"init_values": None}, PAPER_DEFAULT, r"^layerscale: blocks.0.ls1"),
    ("vit_little_patch16_reg4_gap_256", {"init_values": 1e-5}, {**PAPER_DEFAULT, "final_norm": True},
     r"^final_norm: the model has no final norm over the tokens \(it pools the patch tokens and normalises "
     r"the pooled vector \(fc_norm\), which no global token enters\); leave final_norm false$"),
    ("deit3_small_patch16_224", {"final_norm": False}, {"norm": 1.0, "final_norm": True},
     r"^final_norm: the model has no final norm over the tokens \(it was built without one\); leave final_norm false$"),
    ("deit3_small_patch16_224", {}, {"norm": 1.0, "layerscale": 1.0, "qkv": [0, 9]}, r"^qkv: block index 9"),
    ("vit_small_patch16_224", {"block_fn": ParallelScalingBlock, "init_values": None}, {"norm": 1.0, "qkv": 0.5},
     r"^norm: block type ParallelScalingBlock has no module 'blocks.0.norm1'$"),  # one fused in_proj, one norm
])
def test_a_refused_specialization_leaves_the_model_untouched(arch, kwargs, selection, message):
    """Every check comes before the first change: a component the architecture lacks is refused
    (not skipped), and the model keeps its classes, weights and load hooks."""
    model = tiny_vit(arch, **kwargs)
    classes = {name: type(module) for name, module in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        specialize(model, **selection)
    assert {name: type(module) for name, module in model.named_modules()} == classes
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
    assert not any(module._load_state_dict_pre_hooks for module in model.modules())


# --- one description of a specialization --------------------------------------------------------

def test_the_recipe_keys_are_the_options_of_specialize():
    from clsvit.config import BLOCK_SELECTION_KEYS

    default = load_config("recipes/default.yaml")["model"]["specialize"]
    assert list(default) == list(OPTIONS) and default == dict(NO_SPECIALIZATION)
    assert BLOCK_SELECTION_KEYS == {f"model.specialize.{component}" for component in COMPONENTS}


def test_describe_specialization_and_is_specialized():
    assert describe_specialization(PAPER_DEFAULT) == "norm=1 layerscale=1 qkv=0.333"
    assert describe_specialization({**NO_SPECIALIZATION, "qkv": [0, 1], "final_norm": True}) == "qkv=[0, 1] final_norm"
    assert describe_specialization(NO_SPECIALIZATION) == "none" and describe_specialization(None) == "none"
    assert describe_specialization({**PAPER_DEFAULT, "tokens": "global"}) == "norm=1 layerscale=1 qkv=0.333"
    assert describe_specialization({"norm": 1.0, "tokens": [7, 7]}) == "norm=1 tokens=[7, 7]"
    assert describe_specialization({"qkv": [0], "tokens": "cls"}) == "qkv=[0] tokens=cls"
    assert describe_specialization({**NO_SPECIALIZATION, "tokens": [7, 7]}) == "none"
    assert not is_specialized(NO_SPECIALIZATION) and not is_specialized({"qkv": []}) and not is_specialized(None)
    assert is_specialized(PAPER_DEFAULT) and is_specialized({"qkv": [3]}) and is_specialized({"final_norm": True})
    assert specialized_modules(specialize(tiny_vit(), qkv=[2])).keys() == {"blocks.2.attn.qkv"}


# --- runs -------------------------------------------------------------------------------------

def test_load_run_rebuilds_the_model_a_recipe_describes(tmp_path):
    cfg = load_config("recipes/default.yaml", [
        "model.img_size=32", "model.num_classes=7", "model.drop_path=0.1", "model.reg_tokens=2",
        "model.specialize.norm=1.0", "model.specialize.qkv=[1, 3]", "model.specialize.final_norm=true"])
    model = randomize_(build_model(cfg["model"]), seed=13)
    assert model.num_prefix_tokens == 3 and model.head.out_features == 7
    assert model.blocks[0].drop_path1.drop_prob == 0.1 and model.blocks[11].drop_path2.drop_prob == 0.1
    assert set(global_copy_modules(model)) == (
        {f"blocks.{i}.{p}" for i in range(12) for p in ("norm1", "norm2")}
        | {"blocks.1.attn.qkv", "blocks.3.attn.qkv", "norm"})
    save_config(cfg, tmp_path / "config.yaml")
    save_file(model.state_dict(), tmp_path / "model.safetensors")

    loaded, loaded_cfg = load_run(tmp_path)

    assert loaded_cfg == cfg and not loaded.training
    x = images()
    assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(ValueError, match="^model.num_classes"):
        build_model({**cfg["model"], "num_classes": None})
    assert build_model({**cfg["model"], "num_classes": None}, num_classes=3).head.out_features == 3

    # command-line overrides apply: another resolution resizes the position embeddings (timm's
    # resampling), a component the run did not specialize is cloned from its shared weights
    resized, resized_cfg = load_run(tmp_path, ["model.img_size=48", "model.specialize.mlp=[0]"])
    assert resized_cfg["model"]["img_size"] == 48 and resized_cfg["model"]["specialize"]["mlp"] == [0]
    expected_pos_embed = resample_abs_pos_embed(model.pos_embed.detach(), new_size=[3, 3], num_prefix_tokens=0)
    torch.testing.assert_close(resized.pos_embed.detach(), expected_pos_embed, rtol=0, atol=0)
    assert torch.equal(resized.blocks[0].mlp.global_copy.fc1.weight, model.blocks[0].mlp.fc1.weight)
    assert torch.equal(resized.norm.global_copy.weight, model.norm.global_copy.weight)
