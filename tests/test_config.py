"""Recipe loading: base chains, strict keys and types, CLI overrides, save/load, flatten, diff."""

import copy
import os
import re

import pytest
import yaml

from clsvit.config import (CHOICES, DEFAULT_RECIPE, NULLABLE_TYPES, ConfigError, diff, dotted_items, flatten,
                           load_config, recipe_leaves, save_config)

# The independent reference: default.yaml read by plain PyYAML (its floats all have a dot, so
# YAML 1.1 reads them as floats too).
DEFAULT = yaml.safe_load(DEFAULT_RECIPE.read_text())


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def expect_error(match, *args):
    """load_config(*args) must raise a one-line ConfigError containing `match` (literal text)."""
    with pytest.raises(ConfigError, match=re.escape(match)) as info:
        load_config(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def with_changes(**changes):
    """DEFAULT with dotted keys replaced, e.g. with_changes(**{"optim.lr": 0.1})."""
    expected = copy.deepcopy(DEFAULT)
    for key, value in changes.items():
        *sections, name = key.split(".")
        node = expected
        for section in sections:
            node = node[section]
        assert name in node, key
        node[name] = value
    return expected


# --- default.yaml ------------------------------------------------------------------------------

def test_default_recipe_loads_unchanged():
    config = load_config(DEFAULT_RECIPE)
    assert config == DEFAULT
    assert list(config) == ["run", "model", "data", "aug", "optim", "schedule", "train", "eval", "log"]
    assert type(config["optim"]["lr"]) is float and config["optim"]["lr"] == 0.004
    assert config["optim"]["eps"] == 1e-8 and config["model"]["layerscale_init"] == 1e-4


def test_every_default_key_has_a_trailing_comment():
    """Each key (top-level section headers aside) documents itself on its own line."""
    key_line = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):(.*)$")
    names = []
    for number, line in enumerate(DEFAULT_RECIPE.read_text().splitlines(), 1):
        match = key_line.match(line)
        if not match:
            assert not line.strip() or line.lstrip().startswith("#"), f"line {number}: {line!r}"
            continue
        names.append(match[2])
        if match[1] or match[3].strip():  # not a bare top-level section header
            assert re.search(r"\s#\s*\S", match[3]), f"default.yaml line {number} has no comment: {line!r}"
    # The key lines are exactly the keys (sections included) in document order: none is hidden in
    # a flow mapping or shares a line.
    assert names == [path.rsplit(".", 1)[-1] for path, _ in dotted_items(DEFAULT, sections=True)]


def test_tables_cover_every_null_default_and_name_real_keys():
    flat = flatten(DEFAULT, stringify=False)
    assert flat and not any(isinstance(value, dict) for value in flat.values())
    assert {k for k, v in flat.items() if v is None} <= set(NULLABLE_TYPES)
    assert set(NULLABLE_TYPES) <= set(flat) and set(CHOICES) <= set(flat)


# --- base chains -------------------------------------------------------------------------------

def test_chain_child_mid_default_merges(tmp_path):
    default_rel = os.path.relpath(DEFAULT_RECIPE, tmp_path)
    write(tmp_path / "mid.yaml", f"""
base: {default_rel}
optim:
  lr: 1.0e-3
  betas: [0.8, 0.9]
model:
  specialize:
    qkv: 0.5
    norm: 0.25
aug:
  crop_scale: [0, 1]
""")
    child = write(tmp_path / "sub" / "child.yaml", """
base: ../mid.yaml
run:
  name: child
optim:
  lr: 2.0e-3
model:
  specialize:
    norm: [0, 1]
""")
    config = load_config(child)
    expected = with_changes(**{
        "run.name": "child",
        "optim.lr": 0.002,
        "optim.betas": [0.8, 0.9],
        "model.specialize.qkv": 0.5,
        "model.specialize.norm": [0, 1],   # the child's list replaces mid's fraction
        "aug.crop_scale": [0.0, 1.0],
    })
    assert config == expected
    assert "base" not in config
    assert [type(v) for v in config["aug"]["crop_scale"]] == [float, float]
    assert list(config["optim"]) == list(DEFAULT["optim"])  # default.yaml's key order


def test_recipe_without_base_is_merged_over_default(tmp_path):
    recipe = write(tmp_path / "r.yaml", "schedule:\n  epochs: 400\n")
    assert load_config(recipe) == with_changes(**{"schedule.epochs": 400})
    assert load_config(write(tmp_path / "empty.yaml", "# nothing\n")) == DEFAULT


def test_base_cycle_is_an_error_naming_the_files(tmp_path):
    a = write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    message = expect_error("base cycle", a)
    assert "a.yaml" in message and "b.yaml" in message


def test_missing_files(tmp_path):
    expect_error(f"recipe not found: {tmp_path / 'absent.yaml'}", tmp_path / "absent.yaml")
    child = write(tmp_path / "child.yaml", "base: nope.yaml\n")
    expect_error(f"recipe not found: {tmp_path / 'nope.yaml'} (named as base by {child})", child)


# --- strict keys -------------------------------------------------------------------------------

def test_unknown_key_in_file_suggests_nearest(tmp_path):
    recipe = write(tmp_path / "x.yaml", "optim:\n  lrr: 0.1\n")
    expect_error(f"unknown key 'optim.lrr' in {recipe}; did you mean 'optim.lr'?", recipe)
    recipe = write(tmp_path / "y.yaml", "lr: 0.1\n")  # right key, wrong section
    expect_error(f"unknown key 'lr' in {recipe}; did you mean 'optim.lr'?", recipe)


def test_unknown_key_in_override_suggests_nearest():
    expect_error("unknown key 'optim.lrr' in override 'optim.lrr=3'; did you mean 'optim.lr'?",
                 DEFAULT_RECIPE, ["optim.lrr=3"])
    expect_error("unknown key 'model.specialise' in override 'model.specialise.qkv=0.5'; "
                 "did you mean 'model.specialize'?", DEFAULT_RECIPE, ["model.specialise.qkv=0.5"])
    expect_error("unknown key 'model.specialize.foo'", DEFAULT_RECIPE, ["model.specialize.foo.bar=1"])


def test_duplicate_key_names_file_key_and_line(tmp_path):
    recipe = write(tmp_path / "dup.yaml", "optim:\n  lr: 0.1\n  name: adamw\n  lr: 0.2\n")
    expect_error(f"duplicate key 'lr' in {recipe} line 4", recipe)


def test_yaml_syntax_error_names_file(tmp_path):
    recipe = write(tmp_path / "bad.yaml", "optim:\n  lr: [0.1\n")
    expect_error(f"invalid YAML in {recipe}", recipe)


# --- types -------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", "'optim.lr' must be float, got 'abc' (str)"),
    ("optim.lr=true", "'optim.lr' must be float, got True (bool)"),
    ("run.seed=true", "'run.seed' must be int, got True (bool)"),
    ("run.seed=1.5", "'run.seed' must be int, got 1.5 (float)"),
    ("train.max_steps=false", "'train.max_steps' must be int, got False (bool)"),
    ("run.name=3", "'run.name' must be str, got 3 (int)"),
    ("data.pin_memory=1", "'data.pin_memory' must be bool, got 1 (int)"),
    ("optim.lr={a: 1}", "'optim.lr' takes a single value, got a mapping {'a': 1}"),
    ("optim.lr.x=1", "'optim.lr' takes a single value"),
    ("optim=0.1", "'optim' is a section and needs a mapping, got 0.1"),
    ("optim.betas=[0.9]", "'optim.betas' must be a list of 2 values"),
    ("optim.betas=0.9", "'optim.betas' must be a list of 2 values"),
    ("optim.betas=[0.9, x]", "'optim.betas[1]' must be float, got 'x'"),
])
def test_wrong_types_are_rejected(override, message):
    assert expect_error(message, DEFAULT_RECIPE, [override]).endswith(f"(in override '{override}')")


def test_wrong_type_in_file_names_the_file(tmp_path):
    recipe = write(tmp_path / "t.yaml", "train:\n  resume: yes\n")  # YAML 1.1 would read True
    expect_error(f"'train.resume' must be bool, got 'yes' (str) (in {recipe})", recipe)


def test_int_is_accepted_for_float_keys(tmp_path):
    config = load_config(write(tmp_path / "i.yaml", "optim:\n  lr: 1\n"), ["aug.hflip=0", "aug.crop_scale=[0, 1]"])
    assert type(config["optim"]["lr"]) is float and config["optim"]["lr"] == 1.0
    assert type(config["aug"]["hflip"]) is float
    assert config["aug"]["crop_scale"] == [0.0, 1.0] and type(config["aug"]["crop_scale"][0]) is float


def test_null_only_where_allowed():
    config = load_config(DEFAULT_RECIPE, ["optim.grad_clip=1", "model.layerscale_init=null",
                                          "train.max_steps=20", "train.max_steps=null"])
    assert config["optim"]["grad_clip"] == 1.0 and config["model"]["layerscale_init"] is None
    assert config["train"]["max_steps"] is None
    expect_error("'optim.lr' cannot be null", DEFAULT_RECIPE, ["optim.lr=null"])
    expect_error("'model.specialize.qkv' cannot be null", DEFAULT_RECIPE, ["model.specialize.qkv=null"])
    expect_error("'optim.betas[1]' cannot be null", DEFAULT_RECIPE, ["optim.betas=[0.9, null]"])


def test_choices(tmp_path):
    expect_error("'optim.name' must be one of lamb | adamw, got 'sgd'", DEFAULT_RECIPE, ["optim.name=sgd"])
    expect_error("'train.mixed_precision' must be one of no | bf16 | fp16, got 'fp8'",
                 DEFAULT_RECIPE, ["train.mixed_precision=fp8"])
    # `no` is the string "no" (YAML 1.1 would make it the bool False), in overrides and files.
    assert load_config(DEFAULT_RECIPE, ["train.mixed_precision=no"])["train"]["mixed_precision"] == "no"
    recipe = write(tmp_path / "mp.yaml", "train:\n  mixed_precision: no\n")
    assert load_config(recipe)["train"]["mixed_precision"] == "no"


def test_enumerations_of_the_eval_sections():
    expect_error("'eval.depth.bin_spacing' must be one of linear | log, got 'logarithmic'",
                 DEFAULT_RECIPE, ["eval.depth.bin_spacing=logarithmic"])
    expect_error("'eval.seg.source' must be one of hub | imagefolder | parquet | shapes | folder, got 'ade20k'",
                 DEFAULT_RECIPE, ["eval.seg.source=ade20k"])
    expect_error("'eval.tasks' takes a comma-separated subset of cls,seg,depth,analysis, got 'cls, sge' "
                 "('sge' unknown)", DEFAULT_RECIPE, ["eval.tasks=cls, sge"])
    assert load_config(DEFAULT_RECIPE, ["eval.tasks=depth,cls"])["eval"]["tasks"] == "depth,cls"


# --- rules between keys: one line naming both keys, at load time -------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["aug.label_smoothing=0.1"], "train.loss='bce' with aug.label_smoothing=0.1: BCE binarises its targets"),
    (["aug.rand_augment=rand-m9-mstd0.5-inc1"],
     "aug.three_augment=true with aug.rand_augment='rand-m9-mstd0.5-inc1': 3-Augment (DeiT-III pre-training) "
     "and RandAugment (fine-tuning) are alternatives"),
    (["train.finetune=true"], "train.finetune=true with model.pretrained=null: a fine-tuning recipe continues"),
    (["model.img_size=200"], "model.img_size=200 with model.arch='deit3_small_patch16_224': the architecture's "
                             "patch size does not divide the resolution"),
    (["model.timm_kwargs={patch_size: 15}"],
     "model.img_size=224 with model.timm_kwargs={'patch_size': 15}: the patch size does not divide"),
    (["aug.three_augment=false", "aug.rand_augment=rand-m9-mstd0.5-inc1x"],
     "aug.rand_augment='rand-m9-mstd0.5-inc1x': timm cannot parse this augmentation policy"),
    (["data.std=[0.229,0,0.225]"],
     "data.std=[0.229, 0.0, 0.225]: the inputs are divided by these standard deviations: each must be positive"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints=0: the run keeps this many newest checkpoints"),
    (["train.global_batch=0"], "train.global_batch=0: images per optimizer step: at least 1"),
    (["train.batch_per_device=-1"], "train.batch_per_device=-1: images per forward pass: at least 1"),
    (["eval.batch_per_device=0"], "eval.batch_per_device=0: images per evaluation forward pass: at least 1"),
    (["train.checkpoint_every=0"], "train.checkpoint_every=0: optimizer steps between checkpoints: at least 1"),
    (["eval.every=0"], "eval.every=0: optimizer steps between validation passes: at least 1"),
    (["log.every=0"], "log.every=0: optimizer steps between logs: at least 1"),
])
def test_cross_key_rules(tmp_path, overrides, message):
    expect_error(message, DEFAULT_RECIPE, overrides)
    # the same combination written in a recipe file is refused the same way
    nested = {}
    for key, value in (override.split("=", 1) for override in overrides):
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = yaml.safe_load(value)
    expect_error(message, write(tmp_path / "r.yaml", yaml.safe_dump(nested)))


def test_cross_key_rules_accept_the_valid_combinations():
    ok = [["aug.label_smoothing=0.1", "train.loss=soft_ce"],
          ["aug.three_augment=false", "aug.rand_augment=rand-m9-mstd0.5-inc1"],
          ["train.finetune=true", "model.pretrained=runs/vit_s"],
          ["model.img_size=192"], ["model.timm_kwargs={patch_size: 14}", "model.img_size=518"],
          ["model.img_size=200", "model.timm_kwargs={dynamic_img_pad: true}"], ["data.std=[0.5,0.5,0.5]"],
          ["train.keep_checkpoints=1"], ["log.every=1", "eval.every=1", "train.checkpoint_every=1"],
          ["train.global_batch=1", "train.batch_per_device=1", "eval.batch_per_device=1"]]
    for overrides in ok:
        load_config(DEFAULT_RECIPE, overrides)
    # a fine-tune recipe inherits train.finetune; dropping its model.pretrained is refused
    finetune = DEFAULT_RECIPE.parent / "deit3" / "vit_b_ft224_specialized.yaml"
    assert load_config(finetune)["train"]["finetune"] is True
    expect_error("train.finetune=true with model.pretrained=null", finetune, ["model.pretrained=null"])


@pytest.mark.parametrize("value, expected", [
    ("[0, 2, 5]", [0, 2, 5]), ("[]", []), ("0.25", 0.25), ("1", 1.0), ("0", 0.0)])
def test_specialize_accepts_fraction_or_block_list(value, expected):
    config = load_config(DEFAULT_RECIPE, [f"model.specialize.qkv={value}"])
    assert config["model"]["specialize"]["qkv"] == expected
    assert type(config["model"]["specialize"]["qkv"]) is type(expected)


@pytest.mark.parametrize("value", ["1.5", "-0.1", "[-1]", "[0.5]", "[true]", "true", "half"])
def test_specialize_rejects_bad_values(value):
    expect_error("'model.specialize.norm' must be a fraction in [0, 1] or a list of block indices >= 0",
                 DEFAULT_RECIPE, [f"model.specialize.norm={value}"])


@pytest.mark.parametrize("value, expected", [("global", "global"), ("cls", "cls"), ("registers", "registers"),
                                             ("[7, 7]", [7, 7]), ("[0,13]", [0, 13])])
def test_tokens_take_a_group_or_a_patch_position(value, expected, tmp_path):
    config = load_config(DEFAULT_RECIPE, [f"model.specialize.tokens={value}"])
    assert config["model"]["specialize"]["tokens"] == expected
    save_config(config, tmp_path / "config.yaml")  # and read back as written
    assert load_config(tmp_path / "config.yaml")["model"]["specialize"]["tokens"] == expected


@pytest.mark.parametrize("value, message", [
    ("patch", "'model.specialize.tokens': 'patch' is none of global, cls, registers or a patch position [row, col]"),
    ("registres", "did you mean 'registers'?"),
    ("[7]", "'model.specialize.tokens': expected global, cls, registers or a patch position [row, col] of two "
            "integers >= 0, got [7]"),
    ("[-1, 0]", "got [-1, 0]"), ("[1.5, 0]", "got [1.5, 0]"), ("[true, 0]", "got [True, 0]"), ("7", "got 7"),
    ("null", "'model.specialize.tokens' cannot be null"),
])
def test_tokens_refuse_what_names_no_token(value, message):
    expect_error(message, DEFAULT_RECIPE, [f"model.specialize.tokens={value}"])


def test_a_resume_with_other_tokens_is_refused():
    """train.py's resume check covers model.specialize.tokens (RESUME_LOCKED holds model.specialize)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", DEFAULT_RECIPE.parent.parent / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    specialized = load_config(DEFAULT_RECIPE, ["model.specialize.norm=1.0"])
    patch = load_config(DEFAULT_RECIPE, ["model.specialize.norm=1.0", "model.specialize.tokens=[7,7]"])
    assert diff(specialized, patch, train.RESUME_LOCKED) == ["model.specialize.tokens"]


# --- overrides ---------------------------------------------------------------------------------

def test_override_values_are_parsed_as_yaml():
    config = load_config(DEFAULT_RECIPE, [
        "optim.lr=3e-3", "schedule.min_lr=1E-6", "schedule.warmup_lr=2.5e+0",
        "model.specialize.qkv=[0,1,2]", "train.max_steps=null", "run.name=foo",
        "data.path=a=b", "eval.every = 7"])
    assert config == with_changes(**{
        "optim.lr": 0.003, "schedule.min_lr": 1e-6, "schedule.warmup_lr": 2.5,
        "model.specialize.qkv": [0, 1, 2], "train.max_steps": None, "run.name": "foo",
        "data.path": "a=b", "eval.every": 7})
    assert type(config["optim"]["lr"]) is float


def test_later_overrides_win_and_apply_over_the_recipe(tmp_path):
    recipe = write(tmp_path / "r.yaml", "optim:\n  lr: 0.5\n  name: adamw\n")
    config = load_config(recipe, ["optim.lr=0.1", "optim.lr=0.2", "model.specialize={qkv: 0.5}"])
    assert config == with_changes(**{"optim.lr": 0.2, "optim.name": "adamw", "model.specialize.qkv": 0.5})


@pytest.mark.parametrize("override", ["optim.lr", "=3", "optim..lr=3", ".lr=3"])
def test_malformed_override(override):
    expect_error(f"override '{override}' is not of the form section.key=value", DEFAULT_RECIPE, [override])


# --- save / flatten / diff ---------------------------------------------------------------------

def test_save_then_load_round_trips(tmp_path):
    # Strings that look like other types under YAML 1.1 or 1.2 must survive (they get quoted).
    config = load_config(DEFAULT_RECIPE, [
        "run.name='1e-3'", "data.path=yes", "train.mixed_precision=no", "model.specialize.qkv=[0,1,2]",
        "optim.lr=3e-3", "optim.eps=1e-12", "model.num_classes=7", "aug.three_augment=false",
        "aug.rand_augment=rand-m9-mstd0.5-inc1"])
    assert config["run"]["name"] == "1e-3" and config["data"]["path"] == "yes"
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    save_config(config, path)  # overwriting is fine
    assert load_config(path) == config
    assert yaml.safe_load(path.read_text()) == config  # plain PyYAML reads the same values
    assert list(flatten(load_config(path))) == list(flatten(config))  # key order preserved
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]  # no temp file left


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [0, 1, 2], "e": None}}, "f": "x", "g": True}) == {
        "a.b": 1, "a.c.d": "[0, 1, 2]", "a.c.e": "null", "f": "x", "g": True}
    flat = flatten(load_config(DEFAULT_RECIPE, ["model.specialize.qkv=[0, 1, 2]"]))
    assert flat["optim.lr"] == 0.004 and flat["model.specialize.qkv"] == "[0, 1, 2]"
    assert flat["optim.betas"] == "[0.9, 0.999]" and flat["data.shapes.num_classes"] == 10
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    assert flatten({"a": {"b": [1]}}, stringify=False) == {"a.b": [1]}


def test_dotted_items_walks_leaves_sections_and_whole_mappings():
    tree = {"a": {"b": 1, "c": {"d": 2}}, "e": {"f": 3}}
    assert list(dotted_items(tree)) == [("a.b", 1), ("a.c.d", 2), ("e.f", 3)]
    assert [key for key, _ in dotted_items(tree, sections=True)] == ["a", "a.b", "a.c", "a.c.d", "e", "e.f"]
    assert list(dotted_items(tree, whole={"a.c"})) == [("a.b", 1), ("a.c", {"d": 2}), ("e.f", 3)]
    leaves = dict(recipe_leaves(load_config(DEFAULT_RECIPE, ["model.timm_kwargs={patch_size: 8}"])))
    assert leaves["model.timm_kwargs"] == {"patch_size": 8} and leaves["optim.lr"] == 0.004


def test_diff():
    a = load_config(DEFAULT_RECIPE)
    b = load_config(DEFAULT_RECIPE, ["schedule.epochs=400", "optim.lr=0.001", "run.name=other",
                                     "model.specialize.qkv=[0]"])
    assert diff(a, b, ["schedule", "optim.lr", "train.global_batch"]) == ["schedule.epochs", "optim.lr"]
    assert diff(a, b, ["model.specialize", "run"]) == ["model.specialize.qkv", "run.name"]
    assert diff(a, copy.deepcopy(a), ["schedule", "optim", "model"]) == []
    assert diff(a, a, ["schedule.epochs", "schedule"]) == []
    del b["schedule"]["min_lr"]  # e.g. a checkpoint's config from before a key existed
    assert diff(a, b, ["schedule"]) == ["schedule.epochs", "schedule.min_lr"]
    with pytest.raises(ConfigError, match="'sched' matches no config key"):
        diff(a, b, ["sched"])  # prefixes end at a dot
