"""Screenshots of TensorBoard for the README, from a real browser: the HParams table of a small
ablation and its curves overlaid on the custom-scalars page.

    python scripts/tensorboard_screenshots.py [--out docs] [--steps 80] [--runs DIR]

Trains three shapes runs on CPU (the baseline, the paper's specialization, and an ablation with QKV
specialized in every block) for --steps steps of 64 images without warmup, with four validation
points each; evaluates the first two with eval.py (short probes; the ablation is left unprobed, as a
run still waiting for eval.py is); serves `tensorboard --logdir` on 127.0.0.1 and photographs it with
headless Chromium (Debian: `apt-get install chromium`): <out>/tensorboard_hparams.png and
<out>/tensorboard_curves.png. Runs already complete in --runs are reused.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from tensorboard_server import served_tensorboard  # noqa: E402

RUNS = {  # run name -> (recipe, overrides, probed by eval.py)
    "shapes_baseline": ("recipes/shapes/baseline.yaml", [], True),
    "shapes_specialized": ("recipes/shapes/specialized.yaml", [], True),
    "shapes_specialized_qkv_all_blocks": ("recipes/shapes/specialized.yaml", ["model.specialize.qkv=1.0"], False),
}
PROBES = ["--tasks", "seg,depth,analysis", *[f"eval.{task}.{key}" for task in ("seg", "depth") for key in (
    "iterations=200", "max_train_images=256", "max_val_images=200")]]
SHOTS = {  # file -> (TensorBoard page, window size)
    "tensorboard_hparams.png": ("#hparams", (2050, 560)),
    "tensorboard_curves.png": ("#custom_scalars&_smoothingWeight=0", (1700, 1250)),
}


def run(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def train_and_evaluate(root: Path, steps: int) -> None:
    for name, (recipe, overrides, probed) in RUNS.items():
        run_dir = root / name
        if not (run_dir / "model.safetensors").is_file():
            run(sys.executable, "train.py", "--config", recipe, f"run.root={root}", f"run.name={name}",
                f"train.max_steps={steps}", "train.global_batch=64", "train.batch_per_device=64",
                "schedule.warmup_epochs=0",
                f"eval.every={steps // 4}", "log.every=5", "log.progress_bar=false", *overrides)
        if probed and not (run_dir / "eval.json").is_file():
            run(sys.executable, "eval.py", "--run", str(run_dir), *PROBES)


def screenshot(browser: str, url: str, size: tuple[int, int], path: Path) -> None:
    """Headless Chromium renders the page; the virtual-time budget lets TensorBoard's app fetch its
    data and draw before the picture is taken."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                        "--force-device-scale-factor=1", "--virtual-time-budget=30000",
                        f"--screenshot={path}", url], check=True, timeout=180, capture_output=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "docs"), help="directory for the PNGs (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=80, help="training steps per run (default: %(default)s)")
    parser.add_argument("--runs", help="run root to use and keep (default: a temporary directory)")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("tensorboard_screenshots.py: error: no Chromium found (Debian: apt-get install chromium)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.runs or scratch).resolve()
        train_and_evaluate(root, args.steps)
        with served_tensorboard(root) as tensorboard:
            probed = [name for name, (_, _, p) in RUNS.items() if p]
            tensorboard.wait_for(lambda tb: len(tb.session_groups()) == len(RUNS)
                                 and all(tb.scalars(name, "seg/miou") for name in probed))
            for file, (page, size) in SHOTS.items():
                screenshot(browser, f"{tensorboard.url}/{page}", size, out / file)


if __name__ == "__main__":
    main()
