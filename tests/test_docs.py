"""The docs name things that exist: every link (and its #section), every repository path, recipe, recipe key
(`section.key`, with its value where the key has a fixed set of choices) and clsvit module or attribute named
in README.md, docs/*.md, benchmarks/README.md and recipes/README.md — in prose and in the commands shown."""

import glob
import importlib
import re
from pathlib import Path

import pytest

from clsvit.config import CHOICES, DEFAULT_RECIPE, flatten, load_config

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md",
        REPO / "recipes" / "README.md"]
KEYS = set(flatten(load_config(DEFAULT_RECIPE), stringify=False))
SECTIONS = {key.split(".")[0] for key in KEYS}
OUTPUTS = {".venv", "runs", "exports", "build"}  # what set-up and runs write: named in docs, absent from a checkout
TOP_LEVEL = {path.name for path in REPO.iterdir()} - {".git"} - OUTPUTS
RECIPES = {str(path.relative_to(REPO / "recipes").with_suffix("")) for path in (REPO / "recipes").rglob("*.yaml")}
RECIPE_STEMS = {Path(recipe).name for recipe in RECIPES}
FILE_SUFFIXES = {".py", ".yaml", ".md", ".sh", ".toml", ".txt", ".cff", ".png", ".json", ".jsonl", ".log", ".csv",
                 ".safetensors", ".pth", ".bin", ".tar", ".zip", ".jpg", ".JPEG", ".parquet", ".out", ".ts", ".rs",
                 ".ipynb", ".conf"}
# Files of other projects, of a run or of a dataset that the docs name by their bare name.
ELSEWHERE = {"README_revenge.md", "DATASETS.md", "MODEL_CARD.md", "iterable_dataset.py", "valprep.sh",
             "sitecustomize.py", "grace_hopper.jpg", "LOC_val_solution.csv", "config.yaml", "config.json", "model_ema.safetensors",
             "eval.json", "metrics.jsonl", "provenance.json", "model.safetensors", "sweep.json", "train.log",
             "compare.csv", "compare.md", "compare.png", "metadata.csv", "metadata.jsonl", "metadata.parquet",
             "nyu_train.txt", "nyu_test.txt", "kitti_eigen_train.txt", "kitti_eigen_test.txt", "ADEChallengeData2016.zip", "ILSVRC2012_img_train.tar",
             "ILSVRC2012_img_val.tar", "VOCtrainval_11-May-2012.tar", "gtFine_trainvaltest.zip",
             "leftImg8bit_trainvaltest.zip", "deit_3_base_224_1k.pth", "deit_3_small_224_1k.pth",
             "dinov2_vits14_reg4_pretrain.pth", "slurm.conf", "tf-hparams-parallel-coords-plot.ts",
             "tf-hparams-scatter-plot-matrix-plot.ts", "tests/test_models.py"}  # the last one: timm's
# Dotted names in backticks that are not modules: the safetensors metadata key clsvit writes.
NOT_MODULES = {"clsvit.specialize.tokens"}


def prose(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def code_spans(text: str) -> list[str]:
    """`...` spans of the prose, also where a span wraps onto the next line."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+?)`", prose(text)) if "\n\n" not in span]


def command_tokens(text: str) -> list[str]:
    """The words of the fenced code blocks (commands, YAML, the layout tree)."""
    return [token for block in re.findall(r"^```[\w]*\n(.*?)^```", text, flags=re.S | re.M)
            for line in block.splitlines() if not line.lstrip().startswith(("#", "import", "from", "model =", "@"))
            for token in line.split("#")[0].split()]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in prose(path.read_text()).splitlines() if line.startswith("#")}


def expand(pattern: str) -> list[str]:
    """Shell brace expansion and timm-style optional parts: a{b,c}d, x[_specialized]."""
    if match := re.search(r"\{([^{}]*,[^{}]*)\}", pattern):
        return [p for part in match[1].split(",") for p in expand(pattern[:match.start()] + part + pattern[match.end():])]
    if match := re.search(r"\[(_\w+)\]", pattern):
        return [p for part in ("", match[1]) for p in expand(pattern[:match.start()] + part + pattern[match.end():])]
    return [pattern]


def path_problem(name: str, doc: Path) -> str | None:
    """Why a path named in `doc` does not resolve, or None: relative to the repository root or to the doc's
    directory; a glob must match; a bare file name must be a file of the repository (or of ELSEWHERE)."""
    if any(c in name for c in "<>$…") or name.startswith(("/", "~", "http", "../")) or name in ELSEWHERE:
        return None  # placeholders, paths on a user's machine, URLs, a recipe's `base: ../default.yaml`
    if "::" in name:  # a pytest node id: tests/test_x.py::test_name
        path, _, test = name.partition("::")
        if (REPO / path).is_file() and not re.search(rf"^\s*def {re.escape(test.split('[')[0])}\(",
                                                      (REPO / path).read_text(), flags=re.M):
            return f"{name}: no test {test} in {path}"
        name = path
    for candidate in expand(name.rstrip(".,;:)")):
        first = candidate.split("/")[0]
        if first in OUTPUTS:
            continue
        if "/" not in candidate.rstrip("/"):
            if Path(candidate).suffix not in FILE_SUFFIXES or candidate in ELSEWHERE or "*" in candidate:
                continue
            if not (REPO / candidate).exists() and not (doc.parent / candidate).exists() \
                    and not any(REPO.glob(f"[!.]*/**/{candidate}")):
                return f"{candidate}: no such file in the repository"
        elif first in TOP_LEVEL or (doc.parent / first).is_dir():
            base = REPO if first in TOP_LEVEL else doc.parent
            if not glob.glob(str(base / candidate)) and not (base == REPO / "recipes" and candidate in RECIPES):
                return f"{candidate}: no such path in {'the repository' if base == REPO else base.relative_to(REPO)}"
    return None


def key_problem(text: str) -> str | None:
    """Why `section.key`, `section.key=value` or `section.key: value` is not a recipe key (or value)."""
    match = re.fullmatch(r"([a-z_]+(?:\.[a-z_0-9]+)+)(?:(?:=|: )(\S+))?", text)
    if not match or match[1].split(".")[0] not in SECTIONS or Path(match[1]).suffix in FILE_SUFFIXES:
        return None
    key, value = match[1], match[2]
    if key not in KEYS and not any(k.startswith(key + ".") for k in KEYS):
        return f"{key}: not a key of recipes/default.yaml"
    if key in CHOICES and value is not None and value.strip("'\"") not in CHOICES[key]:
        return f"{text}: {key} takes {' | '.join(CHOICES[key])}"
    return None


def module_problem(text: str) -> str | None:
    """Why clsvit.a.b(...) does not resolve to a module or an attribute of one."""
    name = re.match(r"clsvit(?:\.\w+)*", text)[0]
    if name in NOT_MODULES:
        return None
    if mutant := re.fullmatch(r"(clsvit(?:\.\w+)*)\.x_(\w+?)__mutmut_\d+", name):  # mutmut's id of a function's mutant
        name = f"{mutant[1]}.{mutant[2]}"
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return f"{name}: {'.'.join(parts[:cut])} has no {attribute}"
            target = getattr(target, attribute)
        return None
    return f"{name}: no such module"


def recipe_table_problems(text: str) -> list[str]:
    """recipes/README.md's tables name recipes by their stem (`vit_s_800ep`) or folder/stem in the recipe
    column (or row): each must be a recipe."""
    problems = []
    for table in re.findall(r"(?:^\|.*\|\n)+", text, flags=re.M):
        rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
        columns = [i for i, cell in enumerate(rows[0]) if cell == "recipe"]
        cells = [row[i] for row in rows[2:] for i in columns if i < len(row)]
        cells += [cell for row in rows[2:] if row[0] == "recipe" for cell in row[1:]]
        for cell in cells:
            previous = ""
            for span in re.findall(r"`([^`]+)`", cell):
                for name in expand(span):
                    if name.startswith("_") and previous:  # `x_specialized_cls` / `_registers`: another suffix
                        name = next((c for c in (previous + name, previous.rsplit("_", 1)[0] + name)
                                     if c in RECIPE_STEMS), previous + name)
                    if name not in RECIPES and name not in RECIPE_STEMS:
                        problems.append(f"{name}: no recipe recipes/**/{name}.yaml")
                    previous = name
    return problems


def problems(doc: Path, text: str | None = None) -> list[str]:
    """Every name in `doc` (or in `text`, read as if it were `doc`) that does not resolve."""
    text = doc.read_text() if text is None else text
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists():
            found.append(f"link {target}: {path} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            found.append(f"link {target}: no section #{anchor} in {resolved.relative_to(REPO)}")
    for where, title in re.findall(r"(README|[\w/.-]+\.md)(?:'s)? (?:section )?\"([^\"]+)\"", prose(text)):
        target = REPO / "README.md" if where == "README" else doc.parent / where
        if slug(title) not in anchors(target):
            found.append(f'{where} "{title}": no such section')
    for item in code_spans(text) + command_tokens(text):
        if item.startswith("{"):
            continue  # a dict or JSON literal
        words = [item] if re.fullmatch(r"[a-z_.0-9]+: \S+", item) else re.split(r"[\s()]+|,(?![^{]*\})", item)
        for word in words:  # a span may hold a command or a list, or be a `section.key: value`
            word = word.strip("'\"")
            if problem := key_problem(word):
                found.append(problem)
            elif word.startswith("clsvit.") and (problem := module_problem(word)):
                found.append(problem)
            elif ("/" in word or Path(word).suffix in FILE_SUFFIXES) and "=" not in word and ":" not in word.split("/")[0] \
                    and (problem := path_problem(word, doc)):
                found.append(problem)
    if doc == REPO / "recipes" / "README.md":
        found += recipe_table_problems(text)
    return sorted(set(found))


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(REPO)))
def test_every_name_in_the_doc_exists(doc):
    assert problems(doc) == []


PLANTED = """# Planted

See [the data page](data.md#no-such-section), [a page](missing.md), README "No such title",
`clsvit/parquet.py`, `benchmarks/bench_nothing.py`, `bench_gone.py`, `optim.lrr`, `data.augment_on: gpu`,
`clsvit.checkpoint.no_such_function`, `clsvit.nomodule`, `tests/test_docs.py::test_nothing_like_this`.

| recipe | what |
|---|---|
| `vit_s_801ep` | a recipe that does not exist |
| `deit3_s_ft` / `_specialised` | a suffix that does not exist |

```bash
python train.py --config recipes/deit3/vit_s_801ep.yaml train.max_stepz=5
```
"""
CORRECT = """# Correct

See [the data page](data.md#imagenet-from-folders), [a page](training.md), README "Two commands",
`clsvit/data/parquet.py`, `benchmarks/bench_scale.py`, `bench_train.py`, `optim.lr`, `data.augment_on: device`,
`clsvit.checkpoint.load_run(run_dir)`, `clsvit.sweep`, `recipes/eval/{ade20k,voc}_linear.yaml`, `<run>/eval.json`,
`tests/test_docs.py::test_the_check_catches_a_wrong_name_of_each_kind`.

| recipe | what |
|---|---|
| `deit3/vit_s_800ep` → `vit_b_400ep[_specialized]` | recipes |
| `deit3_s_ft` / `_specialized` | a recipe and its twin |

```bash
python train.py --config recipes/deit3/vit_s_800ep.yaml train.max_steps=5 model.specialize.qkv=[0,1]
python -m clsvit.export runs/x exports/x
```
"""


def test_the_check_catches_a_wrong_name_of_each_kind():
    assert problems(DOCS[1], CORRECT) == []
    assert problems(REPO / "recipes" / "README.md", PLANTED) == sorted([
        "link data.md#no-such-section: data.md does not exist",
        "link missing.md: missing.md does not exist",
        'README "No such title": no such section',
        "clsvit/parquet.py: no such path in the repository",
        "benchmarks/bench_nothing.py: no such path in the repository",
        "bench_gone.py: no such file in the repository",
        "optim.lrr: not a key of recipes/default.yaml",
        "data.augment_on: gpu: data.augment_on takes cpu | device",
        "clsvit.checkpoint.no_such_function: clsvit.checkpoint has no no_such_function",
        "clsvit.nomodule: clsvit has no nomodule",
        "vit_s_801ep: no recipe recipes/**/vit_s_801ep.yaml",
        "deit3_s_ft_specialised: no recipe recipes/**/deit3_s_ft_specialised.yaml",
        "tests/test_docs.py::test_nothing_like_this: no test test_nothing_like_this in tests/test_docs.py",
        "recipes/deit3/vit_s_801ep.yaml: no such path in the repository",
        "train.max_stepz: not a key of recipes/default.yaml"])
    docs_page = problems(REPO / "docs" / "planted.md", PLANTED)
    assert "link data.md#no-such-section: no section #no-such-section in docs/data.md" in docs_page


def layout_paths() -> set[str]:
    """The paths of docs/layout.md's tree: an entry indented under a folder belongs to it."""
    block = re.search(r"^```\n(.*?)^```", (REPO / "docs" / "layout.md").read_text(), flags=re.S | re.M)[1]
    stack, paths = [], set()
    for line in block.splitlines():
        if not line.strip() or line.startswith(" " * 10):
            continue  # a description's continuation line
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        stack[depth:] = [name]
        paths.add("".join(stack))
    return paths


def test_the_layout_names_every_module_benchmark_and_script_and_nothing_else():
    named = layout_paths()
    modules = {str(p.relative_to(REPO)) for p in (REPO / "clsvit").rglob("*.py")
               if p.name != "__init__.py" or p.parent.name == "clsvit"}
    tools = {str(p.relative_to(REPO)) for folder in ("benchmarks", "scripts") for p in (REPO / folder).iterdir()
             if p.suffix in (".py", ".sh")}
    assert modules | tools <= named, f"not in docs/layout.md: {sorted((modules | tools) - named)}"
    assert [path for path in sorted(named) if not (REPO / path).exists()] == []
