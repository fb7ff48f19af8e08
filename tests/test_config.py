"""Recipe loading: base chains, strict keys and types, CLI overrides, save/load, flatten, diff."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clsvit.config import (CHOICES, DEFAULT_RECIPE, NULLABLE_TYPES, ConfigError, diff, dotted_items, flatten,
                           load_config, recipe_leaves, save_config)
from trainer_utils import REPO

# The independent reference: default.yaml read by plain PyYAML (its floats all have a dot, so
# YAML 1.1 reads them as floats too).
DEFAULT = yaml.safe_load(DEFAULT_RECIPE.read_text(encoding="utf-8"))


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
    assert message == f"base cycle: {a} -> {tmp_path / 'b.yaml'} -> {a}"


def test_missing_files(tmp_path):
    message = expect_error(f"recipe not found: {tmp_path / 'absent.yaml'}", tmp_path / "absent.yaml")
    assert message == f"recipe not found: {tmp_path / 'absent.yaml'}"
    child = write(tmp_path / "child.yaml", "base: nope.yaml\n")
    expect_error(f"recipe not found: {tmp_path / 'nope.yaml'} (named as base by {child})", child)
    overlay = tmp_path / "absent_overlay.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT_RECIPE, overlays=[overlay])
    assert str(info.value) == f"recipe not found: {overlay}"


def test_a_recipe_is_a_utf8_mapping_with_a_path_as_base(tmp_path):
    listed = write(tmp_path / "list.yaml", "- optim\n- lr\n")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("run:\n  name: café\n".encode("latin-1"))
    numbered = write(tmp_path / "numbered.yaml", "base: 7\n")
    for recipe, message in [(listed, f"recipe {listed} must be a mapping of sections, got list"),
                            (latin1, f"recipe {latin1} is not UTF-8 text (byte 0xe9 at offset 16)"),
                            (numbered, f"'base' in {numbered} must be a path string, got 7")]:
        assert expect_error(message, recipe) == message
    # a file that cannot be read: /proc/self/mem is a regular file whose offset 0 (unmapped) the kernel
    # refuses to read (EIO); as root, permissions would not stop the read
    message = "cannot read recipe /proc/self/mem: Input/output error"
    assert expect_error(message, Path("/proc/self/mem")) == message


def test_recipes_are_read_as_utf8_whatever_the_locale():
    """default.yaml's comments hold non-ASCII characters: under the POSIX locale without UTF-8 mode
    (Python's default text encoding is then ASCII) it loads to the config it loads to here, and a
    saved config reads back."""
    assert any(ord(c) > 127 for c in DEFAULT_RECIPE.read_text(encoding="utf-8"))
    here = load_config(DEFAULT_RECIPE, ["run.name=café"])
    script = ("import json, tempfile, locale; from pathlib import Path; "
              "from clsvit.config import DEFAULT_RECIPE, load_config, save_config; "
              "assert locale.getpreferredencoding(False) == 'ANSI_X3.4-1968', locale.getpreferredencoding(False); "
              "config = load_config(DEFAULT_RECIPE, ['run.name=caf\\u00e9']); "
              "path = Path(tempfile.mkdtemp()) / 'config.yaml'; save_config(config, path); "
              "assert load_config(path) == config; print(json.dumps(config))")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == here and here["run"]["name"] == "café"


def test_overlays_apply_after_the_chain_and_are_named_in_errors(tmp_path):
    """Overlays (recipes/eval/*.yaml over a run's config.yaml) apply over the recipe and before the
    overrides; they cannot name a base, and their errors name the overlay file."""
    run_config = write(tmp_path / "config.yaml", "optim:\n  lr: 0.5\n")
    overlay = write(tmp_path / "overlay.yaml", "optim:\n  lr: 0.25\nschedule:\n  epochs: 9\n")
    config = load_config(run_config, ["schedule.epochs=11"], overlays=[overlay])
    assert (config["optim"]["lr"], config["schedule"]["epochs"]) == (0.25, 11)
    with_base = write(tmp_path / "with_base.yaml", "base: config.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(run_config, overlays=[with_base])
    assert str(info.value) == f"{with_base} is applied over a run's config and cannot name a 'base'"
    unknown = write(tmp_path / "unknown.yaml", "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(run_config, overlays=[unknown])
    assert str(info.value) == f"unknown key 'optim.lrr' in {unknown}; did you mean 'optim.lr'?"


def test_one_override_may_be_given_as_a_string():
    assert load_config(DEFAULT_RECIPE, "optim.lr=0.125")["optim"]["lr"] == 0.125


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


@pytest.mark.parametrize("override, unknown, suggestion", [
    ("optim.names=adamw", "optim.names", "optim.name"),  # the sibling, though run.name comes first
    ("specialise.qkv=0.5", "specialise", "model.specialize"),  # a section under another section
    ("qvk=0.5", "qvk", "model.specialize.qkv"),  # a leaf three levels down, by its last part
    ("data.shapes.num_classe=3", "data.shapes.num_classe", "data.shapes.num_classes"),  # not model.num_classes
])
def test_the_suggestion_is_the_sibling_else_the_nearest_key_anywhere(override, unknown, suggestion):
    """The hint names the nearest key in the same section; failing that, the key anywhere (a section
    or a leaf at any depth) whose last part is nearest, as difflib ranks them."""
    expect_error(f"unknown key '{unknown}' in override '{override}'; did you mean '{suggestion}'?",
                 DEFAULT_RECIPE, [override])


def test_duplicate_key_names_file_key_and_line(tmp_path):
    recipe = write(tmp_path / "dup.yaml", "optim:\n  lr: 0.1\n  name: adamw\n  lr: 0.2\n")
    expect_error(f"duplicate key 'lr' in {recipe} line 4", recipe)


@pytest.mark.parametrize("key, shown", [("7", "7"), ("[1, 2]", "[1, 2]"), ("{a: 1}", "{'a': 1}")])
def test_a_key_that_is_not_a_string_names_file_key_and_line(tmp_path, key, shown):
    recipe = write(tmp_path / "keys.yaml", f"optim:\n  lr: 0.1\n  ? {key}\n  : 3\n")
    message = expect_error(f"key {shown} in {recipe} line 3 is not a string", recipe)
    assert message == f"key {shown} in {recipe} line 3 is not a string"


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
    expect_error("got 'sge,cls,dpth' ('sge', 'dpth' unknown)", DEFAULT_RECIPE, ["eval.tasks=sge,cls,dpth"])
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
          ["model.arch=vit_base_mci_224"],  # a timm name without a patch size: nothing to check
          ["model.timm_kwargs={patch_size: 0}"],  # not a patch size: timm refuses it when it builds the model
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
    ("'a: b'", "'model.specialize.tokens': 'a: b' is none of global"),  # the value whole, though it holds ': '
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


def test_default_yaml_and_the_key_tables_must_agree():
    """A key named in config.py's tables but missing from default.yaml, or a null default without a
    NULLABLE_TYPES entry (its type would be unknown), is caught where the schema is read."""
    from clsvit.config import _check_schema
    schema = load_config(DEFAULT_RECIPE)
    _check_schema(schema)
    missing = copy.deepcopy(schema)
    del missing["eval"]["seg"]["test_ratios"]
    with pytest.raises(ConfigError) as info:
        _check_schema(missing)
    assert str(info.value) == f"config.py's tables name 'eval.seg.test_ratios', which is not a key of {DEFAULT_RECIPE}"
    untyped = copy.deepcopy(schema)
    untyped["optim"]["lr"] = None
    with pytest.raises(ConfigError) as info:
        _check_schema(untyped)
    assert str(info.value) == f"'optim.lr' defaults to null in {DEFAULT_RECIPE} but has no NULLABLE_TYPES entry"


def test_an_unknown_key_without_a_near_one_gets_no_hint():
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT_RECIPE, ["zzzzzz=1"])
    assert str(info.value) == "unknown key 'zzzzzz' in override 'zzzzzz=1'"


@pytest.mark.parametrize("value", ["abc", "[1, 2]", "7"])
def test_a_free_mapping_takes_only_keyword_arguments(value):
    """model.timm_kwargs is passed to timm.create_model as **kwargs: a mapping with string keys."""
    override = f"model.timm_kwargs={value}"
    parsed = yaml.safe_load(value)
    expect_error(f"'model.timm_kwargs' needs a mapping of keyword arguments, got {parsed!r} (in override "
                 f"'{override}')", DEFAULT_RECIPE, [override])


def test_an_item_of_a_list_of_any_length_is_named_by_its_index():
    expect_error("'eval.seg.test_ratios[1]' must be float, got 'x' (str) (in override "
                 "'eval.seg.test_ratios=[1, x]')", DEFAULT_RECIPE, ["eval.seg.test_ratios=[1, x]"])


def test_an_override_that_is_not_yaml_is_named(tmp_path):
    expect_error("invalid YAML in override 'optim.lr=[1, 2' line 1: expected ',' or ']', but got '<stream end>'",
                 DEFAULT_RECIPE, ["optim.lr=[1, 2"])
    # a control character: PyYAML's reader refuses it before parsing (a ReaderError, with no line)
    refused = 'unacceptable character #x0007: special characters are not allowed in "<unicode string>", position'
    expect_error(f"invalid YAML in override 'run.name=a\\x07b': {refused} 1", DEFAULT_RECIPE, ["run.name=a\x07b"])
    recipe = write(tmp_path / "bell.yaml", "run:\n  name: a\x07b\n")
    expect_error(f"invalid YAML in {recipe}: {refused} 14", recipe)


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
    text = path.read_text()  # in the recipes' order, sections in block style, lists on one line
    assert text.startswith("# resolved clsvit config (complete; no base)\nrun:\n")
    assert "\noptim:\n  name: lamb\n  lr: 0.003\n" in text and "\n    qkv: [0, 1, 2]\n" in text
    assert "{" not in text.replace("timm_kwargs: {}", "")


def test_save_config_writes_a_hidden_sibling_then_renames_it(tmp_path, monkeypatch):
    """The file is written whole beside its target under a hidden name and renamed over it (atomic on
    one filesystem); a failure before the rename leaves the old file and no temporary one."""
    path = tmp_path / "config.yaml"
    save_config({"a": 1}, path)
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))), real_replace(src, dst)))
    save_config({"a": 2}, path)
    [(temporary, target)] = renames
    assert target == path and temporary.parent == tmp_path
    assert temporary.name.startswith(".config.yaml.") and temporary.name.endswith(".tmp")

    def fsync(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        save_config({"a": 3}, path)
    assert yaml.safe_load(path.read_text()) == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


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
    assert diff(b, a, ["schedule"]) == ["schedule.epochs", "schedule.min_lr"]  # missing from the first
    with pytest.raises(ConfigError, match="'sched' matches no config key"):
        diff(a, b, ["sched"])  # prefixes end at a dot
