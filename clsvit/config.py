"""Recipes: YAML files with `base:` inheritance, validated against recipes/default.yaml.

default.yaml is the schema: its keys are the only valid keys (big_vision-style locked config) and
the type of each default value is the type a recipe must give. The few rules the defaults cannot
express (which keys may be null, enumerated choices, block selections, rules between keys) live in
the small tables below, so adding a key to default.yaml needs no code here unless it is one of those.

A typo in a recipe must fail at launch with a one-line error, not silently train the wrong model
for days, hence strict keys, strict types and duplicate-key detection.
"""

import difflib
import functools
import os
import re
import tempfile
from pathlib import Path

import yaml
from timm.data import create_transform

from clsvit.errors import InputError
from clsvit.model.specialization import COMPONENTS, check_tokens

# The recipes: the checkout's recipes/ (also under `pip install -e .`), or clsvit/recipes/ in an installed wheel
# (pyproject.toml ships recipes/ there as package data).
_PACKAGE = Path(__file__).resolve().parent
RECIPES = _PACKAGE / "recipes" if (_PACKAGE / "recipes").is_dir() else _PACKAGE.parent / "recipes"
DEFAULT_RECIPE = RECIPES / "default.yaml"

# Keys that accept null, with the type of their non-null values. Every null default must be
# listed (its type cannot be read from the default); a non-null default listed here may be nulled.
NULLABLE_TYPES = {
    "model.num_classes": int,
    "model.pretrained": str,
    "model.layerscale_init": float,
    "model.reg_tokens": int,
    "aug.rand_augment": str,
    "optim.grad_clip": float,
    "train.max_steps": int,
    "train.mixed_precision": str,
    "train.compile": bool,
    "eval.max_batches": int,
    "data.max_image_pixels": int,
    **{f"eval.{task}.{key}": kind for task in ("seg", "depth")  # null = the protocol's published value
       for key, kind in (("iterations", int), ("batch_size", int), ("lr", float), ("weight_decay", float),
                         ("warmup_iters", int))},
}

CHOICES = {
    "data.source": ("hub", "imagefolder", "parquet", "shapes"),
    "data.val_layout": ("class_folders", "ilsvrc_csv"),
    "data.augment_on": ("cpu", "device"),
    "data.decode_on": ("cpu", "device"),
    "data.order": ("auto", "grouped", "random"),
    "optim.name": ("lamb", "adamw"),
    "schedule.name": ("cosine", "constant"),
    "train.loss": ("bce", "soft_ce"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "model.specialize.init": ("clone", "fresh"),
    "aug.interpolation": ("bicubic", "bilinear", "nearest"),
    "eval.seg.protocol": ("dinov2_linear", "dinov3_linear"),
    "eval.depth.protocol": ("dinov2_linear", "dinov3_linear"),
    "eval.seg.source": ("hub", "imagefolder", "parquet", "shapes", "folder"),
    "eval.depth.source": ("hub", "imagefolder", "parquet", "shapes", "folder"),
    "eval.seg.layout": ("ade20k", "voc", "cityscapes"),
    "eval.depth.layout": ("nyu", "kitti"),
    "eval.depth.crops": ("nyu", "kitti", "none"),
    "eval.depth.bin_spacing": ("linear", "log"),
}

# Comma-separated lists of choices.
CHOICE_LISTS = {
    "eval.tasks": ("cls", "seg", "depth", "analysis"),
}

# Mappings passed through as they are (their keys belong to another library, e.g. timm's model kwargs).
FREE_MAPPINGS = {"model.timm_kwargs"}

# A fraction of the blocks counted from the input, or explicit block indices (checked against
# the depth by the model, which knows it): one key per specializable component.
BLOCK_SELECTION_KEYS = {f"model.specialize.{c}" for c in COMPONENTS}

# The tokens that get the copies: global, cls, registers or a patch position [row, col] (checked against
# the patch grid by the model, which knows it).
TOKENS_KEY = "model.specialize.tokens"

# Lists of any length >= 1 (other lists keep the length of their default), with their element type.
VARIABLE_LISTS = {"eval.seg.test_ratios": float}


class ConfigError(InputError):
    """A bad recipe or override; the message is one line naming the file/key and the value."""


def _patch_misfit(c, from_kwargs):
    """Whether the patch size does not divide model.img_size, the patch size coming from
    model.timm_kwargs.patch_size (`from_kwargs`) or else from the timm name (deit3_small_patch16_224)."""
    kwargs = c["model.timm_kwargs"]
    if ("patch_size" in kwargs) != from_kwargs or kwargs.get("dynamic_img_pad"):  # timm pads then
        return False
    match = re.search(r"patch(\d+)", c["model.arch"])
    patch = kwargs["patch_size"] if from_kwargs else int(match.group(1)) if match else None
    return type(patch) is int and patch > 0 and c["model.img_size"] % patch != 0


def _timm_rejects(policy):
    """Whether timm cannot build an augmentation from the `auto_augment` string `policy`."""
    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except (AssertionError, ValueError, KeyError, IndexError):
        return True
    return False


# Rules between keys, checked on the complete config once every file and override is applied (at
# load time, before any data work): (keys, when the combination is wrong, why / what to do). A
# failure is one line naming the keys with their values, e.g.
#   train.loss='bce' with aug.label_smoothing=0.1: BCE binarises its targets ...
CROSS_KEY_RULES = [
    (("train.loss", "aug.label_smoothing"),
     lambda c: c["train.loss"] == "bce" and c["aug.label_smoothing"] > 0,
     "BCE binarises its targets (target > train.bce_threshold) and every smoothed target is above 0, so all "
     "become 1 (timm); DeiT-III pre-training uses aug.label_smoothing=0, fine-tuning train.loss=soft_ce"),
    (("aug.three_augment", "aug.rand_augment"),
     lambda c: c["aug.three_augment"] and c["aug.rand_augment"] is not None,
     "3-Augment (DeiT-III pre-training) and RandAugment (fine-tuning) are alternatives; turn one off"),
    (("train.finetune", "model.pretrained"),
     lambda c: c["train.finetune"] and c["model.pretrained"] is None,
     "a fine-tuning recipe continues a trained run: set model.pretrained to its run directory or .safetensors"),
    (("model.img_size", "model.timm_kwargs"), lambda c: _patch_misfit(c, from_kwargs=True),
     "the patch size does not divide the resolution (timm's patch embedding would drop the last pixels)"),
    (("model.img_size", "model.arch"), lambda c: _patch_misfit(c, from_kwargs=False),
     "the architecture's patch size does not divide the resolution (timm's patch embedding would drop the "
     "last pixels); change model.img_size or set model.timm_kwargs.patch_size"),
    (("aug.rand_augment",),
     lambda c: c["aug.rand_augment"] is not None and _timm_rejects(c["aug.rand_augment"]),
     "timm cannot parse this augmentation policy (RandAugment: e.g. rand-m9-mstd0.5-inc1)"),
    (("data.max_image_pixels",), lambda c: c["data.max_image_pixels"] is not None and c["data.max_image_pixels"] < 1,
     "images above this many pixels are replaced as broken files: it must be positive (or null: Pillow's own "
     "limit only)"),
    (("data.order", "data.source"), lambda c: c["data.order"] == "grouped" and c["data.source"] == "imagefolder",
     "the grouped order reads parquet row groups; a folder is read one file per image, in the random order "
     "(data.order=auto or random)"),
    (("data.window", "data.source"),
     lambda c: c["data.window"] != _default("data.window") and c["data.source"] == "imagefolder",
     "the window shapes the grouped order of parquet sources; a folder is read in the random order"),
    (("data.window", "data.order"), lambda c: c["data.window"] != _default("data.window") and c["data.order"] == "random",
     "the window shapes the grouped order; the random order permutes all rows (data.order=grouped or auto)"),
    (("data.window",), lambda c: c["data.window"] < 1, "a loader worker shuffles at least one row at a time"),
    (("data.std",), lambda c: any(value <= 0 for value in c["data.std"]),
     "the inputs are divided by these standard deviations: each must be positive (ImageNet's: "
     "[0.229,0.224,0.225])"),
    (("train.keep_checkpoints",), lambda c: c["train.keep_checkpoints"] < 1,
     "the run keeps this many newest checkpoints and resumes from the newest: at least 1"),
    *(((key,), lambda c, key=key: c[key] < 1, f"{what}: at least 1") for key, what in (
        ("train.global_batch", "images per optimizer step"),
        ("train.batch_per_device", "images per forward pass"),
        ("eval.batch_per_device", "images per evaluation forward pass"),
        ("train.checkpoint_every", "optimizer steps between checkpoints"),
        ("eval.every", "optimizer steps between validation passes"),
        ("log.every", "optimizer steps between logs"))),
]


@functools.cache
def _default(key):
    """A key's value in default.yaml (for the rules that refuse a key set where it means nothing)."""
    return dict(flatten(_read_recipe(DEFAULT_RECIPE), stringify=False))[key]


def check_rules(config):
    """Raises a one-line ConfigError for the first CROSS_KEY_RULES entry `config` breaks, and for
    comma-separated lists with an item outside CHOICE_LISTS."""
    view = dict(recipe_leaves(config))  # view["model.img_size"]
    for key, allowed in CHOICE_LISTS.items():
        unknown = [item.strip() for item in view[key].split(",") if item.strip() not in allowed]
        if unknown:
            raise ConfigError(f"'{key}' takes a comma-separated subset of {','.join(allowed)}, "
                              f"got {view[key]!r} ({', '.join(map(repr, unknown))} unknown)")
    for keys, broken, why in CROSS_KEY_RULES:
        if broken(view):
            raise ConfigError(" with ".join(f"{key}={_yaml_value(view[key])}" for key in keys) + f": {why}")


def _yaml_value(value):
    """A value as a recipe or override writes it: true, null, 0.1, 'bce'."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return repr(value)


# YAML 1.2 core schema instead of PyYAML's YAML 1.1: in 1.1 `mixed_precision: no` is the bool
# False and `lr: 3e-3` is the *string* "3e-3" (a float needs a dot), both silent traps here.
_CORE_SCHEMA = [  # (tag, regexp, possible first characters)
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    ("int", r"[-+]?(?:0|[1-9][0-9]*)", list("-+0123456789")),
    ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
     list("-+0123456789.")),
]


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema that rejects duplicate keys (PyYAML keeps the last)."""

    yaml_implicit_resolvers = {}

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            mark = key_node.start_mark
            if not isinstance(key, str):
                raise ConfigError(f"key {key!r} in {mark.name} line {mark.line + 1} is not a string")
            if key in seen:
                raise ConfigError(f"duplicate key '{key}' in {mark.name} line {mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep)


class _RecipeDumper(yaml.SafeDumper):
    """Block-style sections with inline lists; quotes any string that YAML 1.1 or our loader
    would read as a non-string (its YAML 1.1 resolvers come before the core schema's)."""


_RecipeDumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


for _tag, _regexp, _first in _CORE_SCHEMA:
    for _cls in (_RecipeLoader, _RecipeDumper):
        _cls.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_regexp})$"), _first)


def _parse_yaml(text, name):
    try:
        loader = _RecipeLoader(text)  # its reader refuses control characters here
        loader.name = name  # shown in marks: duplicate-key and syntax errors name the file
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as err:
        where = f" line {err.problem_mark.line + 1}" if err.problem_mark else ""
        raise ConfigError(f"invalid YAML in {name}{where}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML in {name}: {' '.join(str(err).split())}") from None


def _read_recipe(path):
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read recipe {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                          f"{err.start})") from None
    data = _parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def _check_value(key, value, default, where):
    """Returns `value` (ints widened to float where a float is expected) or raises ConfigError."""
    if value is None:
        if default is None or key in NULLABLE_TYPES:
            return None
        raise ConfigError(f"'{key}' cannot be null (in {where})")
    if key in BLOCK_SELECTION_KEYS:
        if isinstance(value, list) and all(type(i) is int and i >= 0 for i in value):
            return value
        if type(value) in (int, float) and 0 <= value <= 1:
            return float(value)
        raise ConfigError(f"'{key}' must be a fraction in [0, 1] or a list of block indices >= 0, "
                          f"got {value!r} (in {where})")
    if key == TOKENS_KEY:
        try:
            return check_tokens(value)
        except InputError as error:  # "tokens: <why>"
            raise ConfigError(f"'{key}': {str(error).partition(': ')[2]} (in {where})") from None
    if key in VARIABLE_LISTS:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"'{key}' must be a non-empty list like {default}, got {value!r} (in {where})")
        return [_check_value(f"{key}[{i}]", v, VARIABLE_LISTS[key](0), where) for i, v in enumerate(value)]
    expected = NULLABLE_TYPES[key] if default is None else type(default)
    if expected is list:
        if not isinstance(value, list) or len(value) != len(default):
            raise ConfigError(f"'{key}' must be a list of {len(default)} values like {default}, "
                              f"got {value!r} (in {where})")
        return [_check_value(f"{key}[{i}]", v, d, where) for i, (v, d) in enumerate(zip(value, default))]
    if expected is float and type(value) is int:
        value = float(value)
    if type(value) is not expected:  # `type is`, not isinstance: a bool is not an int here
        raise ConfigError(f"'{key}' must be {expected.__name__}, got {value!r} "
                          f"({type(value).__name__}) (in {where})")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"'{key}' must be one of {' | '.join(CHOICES[key])}, got {value!r} (in {where})")
    return value


def _suggest(name, prefix, level, root):
    """The nearest valid key: a sibling first, else any key anywhere with a similar last part."""
    close = difflib.get_close_matches(name, list(level), n=1)
    if close:
        return prefix + close[0]
    paths = [key for key, _ in dotted_items(root, sections=True)]
    close = difflib.get_close_matches(name, [p.rsplit(".", 1)[-1] for p in paths], n=1)
    return next((p for p in paths if p.rsplit(".", 1)[-1] == close[0]), None) if close else None


def _validate(data, schema, where, root, prefix=""):
    """Checks a partial config (one recipe file or one override) against `schema` (a part of `root`)."""
    checked = {}
    for name, value in data.items():
        key = prefix + name
        if name not in schema:
            suggestion = _suggest(name, prefix, schema, root)
            hint = f"; did you mean '{suggestion}'?" if suggestion else ""
            raise ConfigError(f"unknown key '{key}' in {where}{hint}")
        default = schema[name]
        if key in FREE_MAPPINGS:
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ConfigError(f"'{key}' needs a mapping of keyword arguments, got {value!r} (in {where})")
            checked[name] = value
        elif isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' is a section and needs a mapping, got {value!r} (in {where})")
            checked[name] = _validate(value, default, where, root, key + ".")
        elif isinstance(value, dict):
            raise ConfigError(f"'{key}' takes a single value, got a mapping {value!r} (in {where})")
        else:
            checked[name] = _check_value(key, value, default, where)
    return checked


def _merge(base, child):
    """`child` over `base`: sections merge key by key, lists and scalars replace."""
    merged = dict(base)
    for name, value in child.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(name), dict)
        merged[name] = _merge(base[name], value) if both_dicts else value
    return merged


def _check_schema(schema):
    """default.yaml and the tables above must agree; catches editing one without the other."""
    flat = flatten(schema, stringify=False)
    rule_keys = [key for keys, _, _ in CROSS_KEY_RULES for key in keys]
    for key in [*NULLABLE_TYPES, *CHOICES, *CHOICE_LISTS, *BLOCK_SELECTION_KEYS, TOKENS_KEY, *VARIABLE_LISTS,
                *rule_keys]:
        if key not in flat and key not in FREE_MAPPINGS:
            raise ConfigError(f"config.py's tables name '{key}', which is not a key of {DEFAULT_RECIPE}")
    for key, value in flat.items():
        if value is None and key not in NULLABLE_TYPES:
            raise ConfigError(f"'{key}' defaults to null in {DEFAULT_RECIPE} but has no NULLABLE_TYPES entry")


def _recipe_chain(path):
    """[(display name, raw dict)] from default.yaml down to `path`, following `base:`."""
    chain, seen, named_by = [], {}, None  # seen: resolved path -> path as named
    path = Path(path)
    while path is not None:
        resolved = path.resolve()
        if resolved in seen:
            raise ConfigError(f"base cycle: {' -> '.join([*seen.values(), str(path)])}")
        seen[resolved] = str(path)
        if not path.is_file():
            by = f" (named as base by {named_by})" if named_by else ""
            raise ConfigError(f"recipe not found: {path}{by}")
        data = _read_recipe(path)
        base = data.pop("base", None)
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"'base' in {path} must be a path string, got {base!r}")
        chain.append((str(path), data))
        named_by = path
        if base is not None:
            path = Path(os.path.normpath(path.parent / base))
        else:
            path = None if resolved == DEFAULT_RECIPE else DEFAULT_RECIPE
    return chain[::-1]


def _parse_override(text):
    """'optim.lr=3e-3' -> {'optim': {'lr': 0.003}}; the value is YAML (lists, null, ...)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    value = _parse_yaml(raw, f"override {text!r}")
    for part in reversed(parts):
        value = {part: value}
    return value


def load_config(path, overrides=(), overlays=()):
    """Loads a recipe and its `base:` chain (ending at default.yaml), then applies the `overlays`
    (partial recipes without `base:`, e.g. recipes/eval/*.yaml over a run's config.yaml), then
    `overrides`.

    Every file and override is validated on its own, so errors name where the bad key came from.
    The result is a complete config (every default.yaml key, in its order) without `base`.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    chain = _recipe_chain(path)
    schema = chain[0][1]
    _check_schema(schema)
    for overlay in overlays:
        if not Path(overlay).is_file():
            raise ConfigError(f"recipe not found: {overlay}")
        data = _read_recipe(Path(overlay))
        if "base" in data:
            raise ConfigError(f"{overlay} is applied over a run's config and cannot name a 'base'")
        chain.append((str(overlay), data))
    config = {}
    for where, data in chain:
        config = _merge(config, _validate(data, schema, where, schema))
    for text in overrides:
        config = _merge(config, _validate(_parse_override(text), schema, f"override {text!r}", schema))
    check_rules(config)
    return config


def save_config(config, path):
    """Writes the resolved config as YAML, atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(config, Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("# resolved clsvit config (complete; no base)\n" + text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dotted_items(tree, *, sections=False, whole=(), prefix=""):
    """(dotted key, value) of every entry of a nested dict, in its order: the leaves, with `sections`
    also each section (before its entries); a mapping under a key of `whole` is one value. The one
    walk over a config's keys."""
    for name, value in tree.items():
        key = prefix + name
        nested = isinstance(value, dict) and key not in whole
        if sections or not nested:
            yield key, value
        if nested:
            yield from dotted_items(value, sections=sections, whole=whole, prefix=key + ".")


def recipe_leaves(config):
    """(dotted key, value) of every recipe key, in default.yaml's order; a free mapping
    (model.timm_kwargs) is one value."""
    return dotted_items(config, whole=FREE_MAPPINGS)


def flatten(config, stringify=True):
    """{'optim.lr': 0.004, ...}, down to the leaves of every mapping. With `stringify`, lists become
    '[0, 1, 2]' and null 'null', as TensorBoard HParams takes only numbers, strings and bools (and
    silently drops None)."""
    def shown(value):
        if stringify and (isinstance(value, list) or value is None):
            return "null" if value is None else str(value)
        return value
    return {key: shown(value) for key, value in dotted_items(config)}


def diff(config_a, config_b, keys):
    """Dotted keys under any of `keys` (a key or a section prefix like 'schedule') whose values
    differ between the two configs; a key missing from one side counts as different."""
    flat_a, flat_b = flatten(config_a, stringify=False), flatten(config_b, stringify=False)
    names = list(flat_a) + [k for k in flat_b if k not in flat_a]
    changed = []
    for wanted in keys:
        matching = [k for k in names if k == wanted or k.startswith(wanted + ".")]
        if not matching:
            raise ConfigError(f"diff: '{wanted}' matches no config key")
        for k in matching:
            differs = k not in flat_a or k not in flat_b or flat_a[k] != flat_b[k]
            if differs and k not in changed:
                changed.append(k)
    return changed
