"""clsvit as an installed package: pyproject.toml's metadata against what the code imports and what
requirements.txt pins, and a wheel (and an editable install) in a fresh virtual environment outside
the checkout, used from a directory without clsvit's source."""

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from safetensors.torch import load_file

from model_utils import make_run

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# what a wheel is built from (pyproject.toml's readme, license-files, packages and their package-dir)
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "clsvit", "recipes")


def pins() -> dict[str, str]:
    """requirements.txt's exact pins: {normalised name: version}."""
    lines = (line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines())
    return {Requirement(line).name.lower().replace("_", "-"): str(Requirement(line).specifier).removeprefix("==")
            for line in lines if line}


def imported_distributions() -> set[str]:
    """The distributions whose modules clsvit/ imports (the standard library and clsvit aside)."""
    modules = set()
    for path in (REPO / "clsvit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    by_module = importlib.metadata.packages_distributions()
    third_party = modules - set(sys.stdlib_module_names) - {"clsvit", "__future__"}
    assert third_party <= by_module.keys(), f"imported but not installed: {third_party - by_module.keys()}"
    return {by_module[module][0].lower().replace("_", "-") for module in third_party}


def test_every_distribution_clsvit_imports_is_a_dependency_and_admits_the_pinned_version():
    declared = {Requirement(text).name.lower().replace("_", "-"): Requirement(text) for text in PROJECT["dependencies"]}
    assert imported_distributions() <= declared.keys()
    pinned = pins()
    for name, requirement in declared.items():
        version = pinned.get(name) or importlib.metadata.version(name)  # unpinned: what the pins brought in
        assert requirement.specifier.contains(version), f"{requirement} excludes {version} (requirements.txt)"
        assert requirement.specifier != "" and "==" not in str(requirement.specifier), f"{requirement}: a range"
    for text in PROJECT["optional-dependencies"]["test"]:
        assert Requirement(text).specifier.contains(pinned[Requirement(text).name.lower()])


def test_the_project_table_names_what_an_index_shows():
    assert PROJECT["name"] == "clsvit" and PROJECT["license"] == "Apache-2.0" and PROJECT["urls"]
    assert Requirement(f"python{PROJECT['requires-python']}").specifier.contains(sysconfig.get_python_version())


def fresh_venv(path: Path) -> Path:
    """A virtual environment without clsvit; its dependencies come from this interpreter's site-packages
    through a .pth file (installing torch again would download gigabytes). Returns its python."""
    venv.create(path, with_pip=False)
    python = path / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "zz_dependencies.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")))
    return python


def pip(*args: str | Path, python: Path | None = None, cwd: Path) -> None:
    """This interpreter's pip, offline (no index), optionally installing into another environment."""
    target = ["--python", str(python)] if python else []
    subprocess.run([sys.executable, "-m", "pip", *target, *map(str, args), "--no-index", "--no-build-isolation",
                    "--no-deps", "--disable-pip-version-check"], check=True, cwd=cwd, timeout=600,
                   env={**os.environ, "PIP_NO_INDEX": "1"})


def source_copy(tmp_path: Path) -> Path:
    """The build inputs, copied: a build writes build/ and *.egg-info into its source tree."""
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    return src


def run_outside(python: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python ARGS` of the fresh environment in `cwd`, without this checkout on PYTHONPATH."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# Run by the fresh environment's python from a directory without clsvit's source: export a run with the
# installed `python -m clsvit.export` (it reads the run's recipe against the installed default recipe), load
# the export with timm, and save its weights and logits.
LOAD_EXPORT = """
import subprocess, sys
from pathlib import Path
import clsvit, timm, torch
from safetensors.torch import save_file
from clsvit.config import DEFAULT_RECIPE
run, out, x_file, weights_file = sys.argv[1:]
print(Path(clsvit.__file__).parent, DEFAULT_RECIPE)
subprocess.run([sys.executable, "-m", "clsvit.export", run, out], check=True)
torch.set_num_threads(1)
model = timm.create_model("local-dir:" + out, pretrained=True).eval()
with torch.no_grad():
    logits = model(torch.load(x_file))
save_file({**model.state_dict(), "logits": logits}, weights_file)
"""


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_imports_and_loads_a_specialized_export_in_timm(tmp_path):
    src = source_copy(tmp_path)
    pip("wheel", "--wheel-dir", tmp_path / "dist", src, cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("clsvit-*.whl")
    python = fresh_venv(tmp_path / "venv")
    pip("install", wheel, python=python, cwd=tmp_path)

    model, _ = make_run(tmp_path / "runs" / "vit_s_specialized", {"norm": 1.0, "layerscale": 1.0, "qkv": "[0]"}, seed=3)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_outside(python, elsewhere, "-c", LOAD_EXPORT, str(tmp_path / "runs" / "vit_s_specialized"),
                       str(tmp_path / "exports" / "vit_s_specialized"), str(tmp_path / "x.pt"), str(tmp_path / "w.safetensors"))
    assert done.returncode == 0, done.stderr
    package, default_recipe = done.stdout.splitlines()[0].split()
    site = tmp_path / "venv" / "lib"
    assert Path(package).is_relative_to(site) and Path(default_recipe) == Path(package) / "recipes" / "default.yaml"
    loaded = load_file(tmp_path / "w.safetensors")
    logits = loaded.pop("logits")
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[key], value) for key, value in model.state_dict().items())
    assert any(key.endswith("global_copy.weight") for key in loaded)  # the specialized twin, not plain timm
    torch.set_num_threads(1)  # as the other process: the same summation order, the same bits
    with torch.no_grad():
        assert torch.equal(logits, model(x))

    # train.py is a script of the checkout, not of the package: a sweep from the wheel says so in one line
    recipe = Path(default_recipe).parent / "shapes" / "baseline.yaml"
    sweep = run_outside(python, elsewhere, "-m", "clsvit.sweep", str(recipe), f"run.root={tmp_path / 'sweeps'}")
    assert sweep.returncode == 2 and sweep.stderr.strip().splitlines()[-1].endswith(
        "train.py does not exist; run it from a clone (pip install -e . there)"), sweep.stderr
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.slow
def test_an_editable_install_reads_the_checkouts_recipes(tmp_path):
    src = source_copy(tmp_path)
    python = fresh_venv(tmp_path / "venv")
    pip("install", "--editable", src, python=python, cwd=tmp_path)
    (src / "recipes" / "shapes" / "mine.yaml").write_text("base: baseline.yaml\nrun:\n  name: mine\n")
    script = ("import clsvit, clsvit.config as c, timm\n"
              "print(clsvit.__file__, c.DEFAULT_RECIPE, c.load_config(c.RECIPES / 'shapes' / 'mine.yaml')['run']['name'],"
              " len(timm.list_models('*_clsvit')) > 0)")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_outside(python, elsewhere, "-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(src / "clsvit" / "__init__.py"), str(src / "recipes" / "default.yaml"), "mine", "True"]
