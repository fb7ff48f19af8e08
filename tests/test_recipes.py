"""The recipe grid: every recipe loads, builds, and its header comment tells the truth.

Each recipe opens with a comment block (`# field: value` lines) saying what it reproduces, its
source, how to launch it, the expected top-1 and its parameter count; specialized recipes also
name their baseline and the keys they change; a parameter-matched control names the recipe whose
parameter count it matches (`# matches:`) and states its forward FLOPs beside that recipe's
(`# flops:`). These tests hold those claims against the real config loader, the real model (built
on the meta device: no memory, no init cost, exact counts), timm's own unspecialized model, the
closed-form parameter overhead of the specialization and torch's FLOP counter.
"""

import re
from functools import lru_cache
from pathlib import Path

import pytest
import timm
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from clsvit.config import FREE_MAPPINGS, diff, flatten, load_config, recipe_leaves
from clsvit import PAPER_DEFAULT
from clsvit.model import block_indices, build_model, count_parameters

REPO = Path(__file__).resolve().parent.parent
RECIPE_DIR = REPO / "recipes"
RECIPES = sorted(p.relative_to(REPO).as_posix() for p in RECIPE_DIR.rglob("*.yaml")
                 if p.name != "default.yaml" and p.parent.name != "eval")  # recipes/eval/: tests/test_dense_recipes.py
REQUIRED_FIELDS = ("reproduces", "source", "launch", "expected", "params")
OPTIONAL_FIELDS = ("baseline", "differs in", "matches", "flops")
PARAMS = re.compile(r"(?P<n>[\d,]+) \((?:baseline\b.*|\+(?P<pct>\d+\.\d\d)% over baseline (?P<base>[\d,]+))\)$")
MATCHED_PARAMS = re.compile(r"[\d,]+ \(baseline architecture; (?P<gap>[\d,]+) (?P<side>fewer|more) than (?P<recipe>\S+), (?P<n>[\d,]+)\)$")
FLOPS = re.compile(r"(?P<n>[\d,]+) per (?P<size>\d+)x(?P=size) image, forward \([^)]*\)(?P<others>(?:; recipes/\S+: [\d,]+)+)$")
MATCH_TOLERANCE = 0.005  # a parameter-matched control is within 0.5 % of the count it matches

# The recipe grid (each name once; the QKV sweep's 1/3 point and the ablations' paper
# default are deit3/vit_s_800ep_specialized, the sweep's 0 point is norm + LayerScale alone).
EXPECTED_GRID = {
    *(f"recipes/deit3/vit_{s}_{ep}ep{spec}.yaml" for s in "sbl" for ep in (800, 400) for spec in ("", "_specialized")),
    *(f"recipes/deit3/vit_{s}_{pre}ft224{spec}.yaml" for s in "bl" for pre in ("", "400ep_") for spec in ("", "_specialized")),
    *(f"recipes/ablations/vit_s_{name}.yaml" for name in (
        "norm_only", "layerscale_only", "qkv_third_only", "proj_third_only", "mlp_third_only",
        "paper_default_proj", "paper_default_mlp", "everything",
        "norm_ls_qkv0", "norm_ls_qkv3", "norm_ls_qkv6", "norm_ls_qkv9", "norm_ls_qkv12", "param_matched",
        "patch_control")),
}


@lru_cache(maxsize=None)
def config(recipe):
    return load_config(REPO / recipe)


@lru_cache(maxsize=None)
def header(recipe):
    """{field: value} from the comment lines before the first YAML line (field names lower-cased;
    "expected" and "expected top-1" are the same field)."""
    fields = {}
    for line in (REPO / recipe).read_text().splitlines():
        if not line.startswith("#"):
            break
        match = re.match(r"# ([A-Za-z -]+?|[Ee]xpected top-1): (.+)$", line)
        name = match and match.group(1).lower().replace("expected top-1", "expected")
        if name in REQUIRED_FIELDS + OPTIONAL_FIELDS:
            assert name not in fields, f"{recipe}: header field {name!r} twice"
            fields[name] = match.group(2).strip()
    return fields


def params_claim(recipe):
    """(count, overhead percent or None, baseline count or None) from the `# params:` line."""
    match = PARAMS.match(header(recipe)["params"])
    assert match, f"{recipe}: bad params line {header(recipe)['params']!r}"
    base = int(match["base"].replace(",", "")) if match["base"] else None
    return int(match["n"].replace(",", "")), match["pct"], base


def num_classes(cfg):
    """The classifier size the training script will use: the recipe's, else the dataset's."""
    if cfg["model"]["num_classes"] is not None:
        return cfg["model"]["num_classes"]
    return cfg["data"]["shapes"]["num_classes"] if cfg["data"]["source"] == "shapes" else 1000  # ImageNet-1k


def timm_reference(cfg):
    """Parameter count, depth, width and MLP width of timm's own unspecialized model with the
    recipe's architecture arguments (LayerScale init, registers, extra timm kwargs)."""
    model_cfg = cfg["model"]
    kwargs = dict(img_size=model_cfg["img_size"], num_classes=num_classes(cfg), **model_cfg.get("timm_kwargs", {}))
    if model_cfg["layerscale_init"] is not None:
        kwargs["init_values"] = model_cfg["layerscale_init"]
    if model_cfg["reg_tokens"] is not None:
        kwargs["reg_tokens"] = model_cfg["reg_tokens"]
    key = (model_cfg["arch"], repr(sorted(kwargs.items())))
    if key not in _TIMM_REFERENCES:
        with torch.device("meta"):
            model = timm.create_model(model_cfg["arch"], **kwargs)
        _TIMM_REFERENCES[key] = (count_parameters(model), len(model.blocks), model.embed_dim,
                                 model.blocks[0].mlp.fc1.out_features)
    return _TIMM_REFERENCES[key]


_TIMM_REFERENCES = {}


def closed_form_overhead(specialize, depth, dim, hidden):
    """Extra parameters of the global-token copies, from the component shapes alone."""
    per_block = {
        "norm": 2 * 2 * dim,                        # norm1 + norm2: weight + bias each
        "layerscale": 2 * dim,                      # ls1 + ls2: gamma each
        "qkv": 3 * dim * dim + 3 * dim,             # Linear(d, 3d) with bias
        "proj": dim * dim + dim,                    # Linear(d, d) with bias
        "mlp": 2 * dim * hidden + hidden + dim,     # fc1 + fc2 with biases
    }
    def num_blocks(value):
        return round(value * depth) if isinstance(value, float) else len(set(value))
    total = sum(size * num_blocks(specialize[name]) for name, size in per_block.items())
    return total + (2 * dim if specialize["final_norm"] else 0)


def is_specialized(cfg):
    spec = cfg["model"]["specialize"]
    return spec["final_norm"] or any(spec[c] not in (0.0, []) for c in ("norm", "layerscale", "qkv", "proj", "mlp"))


def copied_rows(cfg, model):
    """How many tokens get the copies: timm's global tokens, [CLS], its registers, or one patch."""
    tokens = cfg["model"]["specialize"]["tokens"]
    return {"global": model.num_prefix_tokens, "cls": 1, "registers": model.num_reg_tokens}.get(
        tokens if isinstance(tokens, str) else "patch", 1)


def as_set_in_a_recipe(keys):
    """Dotted keys as a recipe sets them: a free mapping (model.timm_kwargs) is one value, written whole."""
    return {next((m for m in FREE_MAPPINGS if key.startswith(m + ".")), key) for key in keys}


def test_the_grid_is_complete():
    missing = EXPECTED_GRID - set(RECIPES)
    assert not missing, f"recipes missing from the grid: {sorted(missing)}"


def test_no_two_recipes_train_the_same_thing():
    seen = {}
    for recipe in RECIPES:
        cfg = config(recipe)
        key = repr(sorted((k, repr(v)) for k, v in flatten(cfg, stringify=False).items() if k != "run.name"))
        assert key not in seen, f"{recipe} resolves to the same config as {seen[key]}"
        seen[key] = recipe


def test_run_names_are_unique():
    """Two recipes with one run.name would resume each other's checkpoints."""
    names = [config(recipe)["run"]["name"] for recipe in RECIPES]
    assert sorted(names) == sorted(set(names))


@pytest.mark.parametrize("recipe", RECIPES)
def test_header_fields_and_run_name(recipe):
    fields = header(recipe)
    for field in REQUIRED_FIELDS:
        assert fields.get(field), f"{recipe}: header lacks '# {field}: ...'"
    cfg = config(recipe)
    launchers = ["accelerate launch --mixed_precision bf16"]  # bf16 from the launcher; the recipe defers
    if cfg["data"]["source"] == "shapes":
        launchers += ["python", "accelerate launch"]  # the CPU toy runs
    assert fields["launch"].split("    ")[0] in [f"{l} train.py --config {recipe}" for l in launchers], fields["launch"]
    assert re.search(r"paper|DeiT-III README|third party|this repository", fields["source"]), fields["source"]
    assert re.match(r"not reported|see |\d\d\.\d \(", fields["expected"]), fields["expected"]
    if fields["source"].startswith("third party") and re.match(r"\d", fields["expected"]):
        assert "third party" in fields["expected"], f"{recipe}: a third-party number must say so"
    assert cfg["run"]["name"].endswith(Path(recipe).stem), "run.name is the file stem (with a prefix at most)"
    assert cfg["train"]["mixed_precision"] is None


@pytest.mark.parametrize("recipe", RECIPES)
def test_parameter_count_matches_header(recipe):
    cfg = config(recipe)
    model_cfg = cfg["model"]
    claimed, claimed_pct, claimed_base = params_claim(recipe)
    with torch.device("meta"):
        model = build_model(model_cfg, num_classes=num_classes(cfg))
    assert next(model.parameters()).is_meta
    count = count_parameters(model)
    assert count == claimed, f"{recipe}: {count:,} parameters, header says {claimed:,}"

    base, depth, dim, hidden = timm_reference(cfg)
    assert count - base == closed_form_overhead(model_cfg["specialize"], depth, dim, hidden)
    if claimed_pct is None:
        assert not is_specialized(cfg) and count == base, f"{recipe}: header says baseline"
    else:
        assert is_specialized(cfg) and claimed_base == base
        assert claimed_pct == f"{100 * (count - base) / base:.2f}"


MATCHED = [r for r in RECIPES if "matches" in header(r)]


def meta_model(recipe):
    cfg = config(recipe)
    with torch.device("meta"):
        return build_model(cfg["model"], num_classes=num_classes(cfg))


@lru_cache(maxsize=None)
def forward_flops(recipe):
    """FLOPs of one forward pass of one image at the recipe's resolution, as torch's counter counts
    them (matrix products, convolutions, attention; a multiply-add counts 2)."""
    size = config(recipe)["model"]["img_size"]
    model = meta_model(recipe).eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, size, size, device="meta"))
    return counter.get_total_flops()


def test_the_grid_has_its_parameter_matched_controls():
    assert {"recipes/ablations/vit_s_param_matched.yaml", "recipes/shapes/param_matched.yaml"} <= set(MATCHED)
    assert {"recipes/ablations/vit_s_patch_control.yaml", "recipes/shapes/patch_control.yaml"} <= set(MATCHED)


@pytest.mark.parametrize("recipe", MATCHED)
def test_parameter_matched_control(recipe):
    """An unspecialized model of the matched recipe's baseline, within 0.5 % of its parameter count,
    the gap stated right; or a token control: the matched recipe's copies given to other tokens, with
    exactly its parameters and its FLOPs."""
    fields, cfg = header(recipe), config(recipe)
    matched = fields["matches"]
    assert matched in RECIPES and is_specialized(config(matched))
    assert fields.get("baseline") == header(matched)["baseline"], "the control shares the specialized recipe's baseline"
    count, other = count_parameters(meta_model(recipe)), count_parameters(meta_model(matched))
    if is_specialized(cfg):
        assert set(diff(cfg, config(matched), list(cfg))) - {"run.name"} == {"model.specialize.tokens"}
        assert count == other == params_claim(recipe)[0] and forward_flops(recipe) == forward_flops(matched)
        return
    assert abs(count - other) <= MATCH_TOLERANCE * other, f"{recipe}: {count:,} vs {matched}: {other:,}"
    claim = MATCHED_PARAMS.match(fields["params"])
    assert claim and claim["recipe"] == matched, fields["params"]
    assert int(claim["n"].replace(",", "")) == other
    assert int(claim["gap"].replace(",", "")) == (other - count if claim["side"] == "fewer" else count - other)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if "flops" in header(r)])
def test_flops_match_header(recipe):
    claim = FLOPS.match(header(recipe)["flops"])
    assert claim, f"{recipe}: bad flops line {header(recipe)['flops']!r}"
    assert int(claim["size"]) == config(recipe)["model"]["img_size"]
    assert forward_flops(recipe) == int(claim["n"].replace(",", ""))
    others = re.findall(r"; (recipes/\S+): ([\d,]+)", claim["others"])
    assert header(recipe).get("matches") in [other for other, _ in others], "the FLOPs stand beside the matched recipe's"
    for other, flops in others:
        assert forward_flops(other) == int(flops.replace(",", "")), other


@pytest.mark.parametrize("recipe", sorted({header(r)["matches"] for r in MATCHED} | {
    r for r in RECIPES if is_specialized(config(r)) and config(r)["model"]["specialize"]["tokens"] != "global"}))
def test_specialization_adds_only_the_recomputed_global_rows(recipe):
    """The paper's specialization adds no FLOPs. Here the copies' matrix products run on the rows of
    the tokens that get them, which the shared weights also compute: 2 x tokens x (fan-in x fan-out)
    per copy."""
    cfg = config(recipe)
    spec = cfg["model"]["specialize"]
    _, depth, dim, hidden = timm_reference(cfg)
    products = {"qkv": dim * 3 * dim, "proj": dim * dim, "mlp": 2 * dim * hidden}
    copies = sum(size * len(block_indices(spec[name], depth, name)) for name, size in products.items())
    extra = forward_flops(recipe) - forward_flops(header(recipe)["baseline"])
    assert extra == 2 * copied_rows(cfg, meta_model(recipe)) * copies


def test_meta_device_count_equals_a_real_model():
    """The meta-device build above counts what a materialised model holds."""
    recipe = "recipes/deit3/vit_s_800ep_specialized.yaml"
    model_cfg = config(recipe)["model"]
    assert count_parameters(build_model(model_cfg, num_classes=1000)) == params_claim(recipe)[0]


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.startswith("recipes/deit3/") and r.endswith("_specialized.yaml")])
def test_specialized_deit3_recipes_are_the_paper_default(recipe):
    spec = config(recipe)["model"]["specialize"]
    depth = timm_reference(config(recipe))[1]
    for component, value in PAPER_DEFAULT.items():
        assert block_indices(spec[component], depth, component) == block_indices(value, depth, component), component
    assert spec["final_norm"] is False and spec["init"] == "clone"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_sets_only_what_differs_from_its_base(recipe):
    raw = yaml.safe_load((REPO / recipe).read_text())
    assert "base" in raw, f"{recipe}: name its base explicitly"
    base = (REPO / recipe).parent / raw.pop("base")
    changed = as_set_in_a_recipe(diff(config(recipe), load_config(base), list(config(recipe))))
    set_here = {key for key, _ in recipe_leaves(raw)}
    assert set_here == changed, f"{recipe}: keys set but equal to the base: {sorted(set_here - changed)}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_differs_from_its_baseline_only_in_the_claimed_keys(recipe):
    fields, cfg = header(recipe), config(recipe)
    if "baseline" not in fields:
        assert not is_specialized(cfg), f"{recipe}: a specialized recipe must name its baseline"
        assert "differs in" not in fields
        return
    baseline = fields["baseline"]
    assert baseline in RECIPES and baseline != recipe
    claimed = [key.strip() for key in fields["differs in"].split(",")]
    changed = set(diff(cfg, config(baseline), list(cfg))) - {"run.name"}
    assert changed == set(claimed), f"{recipe} vs {baseline}: changes {sorted(changed)}, claims {claimed}"
    if is_specialized(cfg) and not is_specialized(config(baseline)):
        # the overhead is measured against the baseline recipe's own model
        assert params_claim(recipe)[2] == params_claim(baseline)[0]


@pytest.mark.parametrize("recipe", [r for r in RECIPES if config(r)["model"]["pretrained"]
                                    and not config(r)["model"]["pretrained"].startswith("hf-hub:")])
def test_finetune_starts_from_a_recipe_of_the_grid(recipe):
    """Fine-tunes of a run (retrofits of public weights start from the hub: tests/test_checkpoints.py)."""
    cfg = config(recipe)
    run_dir = Path(cfg["model"]["pretrained"])
    assert run_dir.parent == Path(cfg["run"]["root"]), f"{recipe}: pretrained is not a run directory"
    sources = [r for r in RECIPES if config(r)["run"]["name"] == run_dir.name]
    assert len(sources) == 1, f"{recipe}: no recipe trains {run_dir}"
    source = config(sources[0])
    assert source["model"]["pretrained"] is None, f"{recipe}: starts from another fine-tune"
    for key in ("arch", "specialize", "num_classes", "reg_tokens", "timm_kwargs"):
        assert source["model"].get(key) == cfg["model"].get(key), f"{recipe}: model.{key} differs from {sources[0]}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_is_internally_consistent(recipe):
    cfg = config(recipe)
    if cfg["train"]["loss"] == "bce":
        # Mixup's label smoothing would lift every binarised BCE target above the 0 threshold
        assert cfg["aug"]["label_smoothing"] == 0.0
    elif cfg["data"]["source"] != "shapes":  # the CPU toy uses cross-entropy from scratch (its header says why)
        assert cfg["model"]["pretrained"], "soft-target CE is the fine-tuning loss here"
    assert not (cfg["aug"]["three_augment"] and cfg["aug"]["rand_augment"]), "3-Augment replaces RandAugment"
