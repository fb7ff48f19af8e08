"""Export a trained run in timm's Hugging Face hub layout, and push it to the hub.

    python -m clsvit.export RUN_DIR OUT_DIR [--push-to-hub USER/REPO] [--private]

OUT_DIR receives what timm's `save_for_hf` writes — `config.json` (`architecture`, `num_classes`,
`pretrained_cfg` with the input size, interpolation, crop and mean/std the run was evaluated with,
`model_args` that rebuild the model, the specialization among them, `tokens` included) and
`model.safetensors` (written as a run's, its metadata recording the tokens of the copies) — plus a
model card `README.md` (recipe, metrics from the run's eval.json, parameter overhead,
citation) and the run's `eval.json`. config.json also holds a `clsvit` section (specialization,
recipe, parameter counts).

A specialized run's architecture is its twin in timm's registry (`<arch>_clsvit`, registered when
clsvit is imported): `import clsvit; timm.create_model("local-dir:OUT_DIR", pretrained=True)`, or
`"hf-hub:USER/REPO"` after the push, rebuilds the model with the run's logits. A baseline run's
architecture is timm's own: it loads in plain timm, without clsvit.

OUT_DIR is written as a hidden sibling directory and renamed into place at the end, so an export
that fails leaves nothing behind; an OUT_DIR that exists and is not empty is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import timm
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from timm.models._hub import save_config_for_hf

from clsvit import cli
from clsvit.checkpoint import load_run, save_weights
from clsvit.errors import InputError
from clsvit.model import (baseline_model_config, build_model, check_tokens, count_parameters,
                          describe_specialization, is_specialized, param_overhead_pct, specialized_name)

PAPER_CITATION = """\
@inproceedings{marouani2026revisiting,
  title     = {Revisiting [CLS] and Patch Token Interaction in Vision Transformers},
  author    = {Marouani, Alexis and Sim{\\'e}oni, Oriane and J{\\'e}gou, Herv{\\'e} and Bojanowski, Piotr and Vo, Huy V.},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2026},
  eprint    = {2602.08626},
  archivePrefix = {arXiv}
}"""
DEIT3_CITATION = """\
@inproceedings{touvron2022deit3,
  title     = {DeiT III: Revenge of the ViT},
  author    = {Touvron, Hugo and Cord, Matthieu and J{\\'e}gou, Herv{\\'e}},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2022},
  eprint    = {2204.07118},
  archivePrefix = {arXiv}
}"""
METRICS = (("cls.top1", "top-1 (%)"), ("cls.top5", "top-5 (%)"), ("seg.miou", "segmentation mIoU (%), linear probe"),
           ("depth.rmse", "depth RMSE (m), linear probe"), ("depth.abs_rel", "depth abs-rel"),
           ("depth.delta1", "depth delta<1.25"))


def export_run(run_dir: str | Path, out_dir: str | Path, repo_id: str | None = None) -> Path:
    """Write the run's model in timm's hub layout into `out_dir` (see the module docstring); the
    model card loads it from `repo_id` (default: USER/<out_dir's name>)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir} exists and is not empty; export into a new directory")
    model, cfg = load_run(run_dir)
    results = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    model_cfg, spec = cfg["model"], cfg["model"]["specialize"]
    specialized = is_specialized(spec)
    with torch.device("meta"):
        baseline_params = count_parameters(build_model(baseline_model_config(model_cfg)))
    params = count_parameters(model)
    architecture = specialized_name(model_cfg["arch"]) if specialized else timm.models.split_model_name_tag(
        model_cfg["arch"])[0]
    summary = {
        "specialization": dict(spec) if specialized else None,
        "specialization_text": describe_specialization(spec),
        "recipe": cfg["run"]["name"],
        "params": params,
        "params_unspecialized": baseline_params,
        "param_overhead_pct": round(param_overhead_pct(params, baseline_params), 2),
    }
    size = model_cfg["img_size"]
    data_config = {"input_size": (3, size, size), "interpolation": cfg["aug"]["interpolation"],
                   "crop_pct": cfg["aug"]["eval_crop_pct"], "crop_mode": "center",
                   "mean": tuple(cfg["data"]["mean"]), "std": tuple(cfg["data"]["std"])}  # clsvit.data's eval transform

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".partial"))
    try:
        save_weights(model, partial / "model.safetensors")  # timm's save_for_hf, with the tokens in the metadata
        save_config_for_hf(model, partial / "config.json",
                           model_config={"architecture": architecture, "clsvit": summary},
                           model_args={"specialize": dict(spec)} if specialized else None, data_config=data_config)
        (partial / "README.md").write_text(model_card(repo_id or f"USER/{out_dir.name}", architecture, cfg, summary,
                                                      results, json.loads((partial / "config.json").read_text())))
        if results:
            (partial / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


def copies_owner(tokens) -> str:
    """Who has the copies (`model.specialize.tokens`), as the model card says it."""
    tokens = check_tokens(tokens)
    if isinstance(tokens, list):
        return (f"One patch token (row {tokens[0]}, column {tokens[1]} of the patch grid, counted from the top-left "
                "from 0: a control, the copies given to a patch instead of the [CLS] token) has")
    return {"global": "The [CLS] and register tokens have", "cls": "The [CLS] token has",
            "registers": "The register tokens have"}[tokens]


def model_card(repo_id: str, architecture: str, cfg: dict, summary: dict, results: dict, hf_config: dict) -> str:
    """The README.md of an export: what the model is, how to load it, its results, its recipe."""
    pretrained_cfg = hf_config["pretrained_cfg"]
    specialized = summary["specialization"] is not None
    overhead = (f"{summary['params']:,} (+{summary['param_overhead_pct']:.2f} % over the unspecialized "
                f"{summary['params_unspecialized']:,})" if specialized else f"{summary['params']:,}")
    load = ("import clsvit  # registers the specialized architecture in timm\nimport timm\n" if specialized
            else "import timm  # plain timm: no clsvit needed\n")
    rows = [f"| {label} | {results[key]:.4g} |" for key, label in METRICS if isinstance(results.get(key), (int, float))]
    lines = [
        "---",
        "library_name: timm",
        "license: apache-2.0",
        "pipeline_tag: image-classification",
        "tags:",
        "- image-classification",
        "- timm",
        "- clsvit",
        "---",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A `{cfg['model']['arch']}` Vision Transformer trained with clsvit (recipe `{summary['recipe']}`). "
        + (f"{copies_owner(cfg['model']['specialize']['tokens'])} their own copy of selected token-wise weights "
           "(Marouani et al., *Revisiting [CLS] and Patch Token Interaction in Vision Transformers*, ICLR 2026): "
           f"`{summary['specialization_text']}`." if specialized else "Not specialized (the baseline)."),
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{architecture}` |",
        f"| specialization | `{summary['specialization_text']}` |",
        f"| parameters | {overhead} |",
        f"| classes | {hf_config['num_classes']} |",
        f"| input | {pretrained_cfg['input_size'][1]}x{pretrained_cfg['input_size'][2]}, "
        f"{pretrained_cfg['interpolation']}, crop {pretrained_cfg['crop_pct']}, "
        f"mean {tuple(pretrained_cfg['mean'])}, std {tuple(pretrained_cfg['std'])} |",
        "",
        "## Use",
        "",
        "```python",
        load + f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()  # or "local-dir:PATH"',
        "config = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**config)",
        "```",
        "",
        "## Results",
        "",
        *([f"`python eval.py --run` on the recipe's validation data (`{cfg['data']['path'] or cfg['data']['source']}`):",
           "", "| metric | value |", "|---|---|", *rows] if rows else ["No eval.py results were recorded for this run."]),
        "",
        "## Training recipe",
        "",
        "The resolved clsvit recipe (`train.py --config` with these values reproduces the run):",
        "",
        "```yaml",
        yaml.safe_dump(cfg, sort_keys=False).rstrip(),
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        PAPER_CITATION,
        "",
        DEIT3_CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(out_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an export directory as it is to the hub repository `repo_id` (created if missing)."""
    api = HfApi()
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(out_dir), commit_message="clsvit export")
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as error:
        first = " ".join(str(error).split()).split(". ")[0][:200]
        raise InputError(f"--push-to-hub {repo_id}: {type(error).__name__}: {first}; the export in {out_dir} "
                              f"is complete, push it later with --push-to-hub on a new directory or "
                              f"`hf upload {repo_id} {out_dir}`") from None
    return repo.repo_id


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m clsvit.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="run directory (config.yaml + model.safetensors)")
    parser.add_argument("out_dir", help="directory to write (new or empty)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload it to this hub repository")
    parser.add_argument("--private", action="store_true", help="create the hub repository private")
    args = parser.parse_args(argv)
    out = export_run(args.run_dir, args.out_dir, repo_id=args.push_to_hub)
    print(f"exported {args.run_dir} -> {out} (config.json, model.safetensors, README.md)")
    if args.push_to_hub:
        print(f"pushed to https://huggingface.co/{push_to_hub(out, args.push_to_hub, args.private)}")
    return out


if __name__ == "__main__":
    cli.run("clsvit.export", main)
