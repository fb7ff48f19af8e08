"""Screenshots of TensorBoard for docs/, from a real browser: the HParams table of a small
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
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
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
# file -> (TensorBoard page, window size). "Ignore outliers in chart scaling" is off for the curves: it
# drops the values below the 5 % and above the 95 % quantile when TensorBoard scales a chart, which
# leaves nothing of a metric with one point per run and two runs (vz_line_chart2/linear-scale.ts).
SHOTS = {
    "tensorboard_hparams.png": ("#hparams", (2400, 520)),
    "tensorboard_curves.png": ("#custom_scalars&_smoothingWeight=0", (1700, 1250)),
}
LOCAL_STORAGE = {"_ignoreYOutliers": "false"}


def run(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def train_and_evaluate(root: Path, steps: int) -> None:
    for name, (recipe, overrides, probed) in RUNS.items():
        run_dir = root / name
        if not (run_dir / "model.safetensors").is_file():
            run(sys.executable, "train.py", "--config", recipe, f"run.root={root}", f"run.name={name}",
                f"train.max_steps={steps}", "train.global_batch=64", "train.batch_per_device=64",
                "schedule.warmup_epochs=0", f"eval.every={steps // 4}", "log.every=5", "log.progress_bar=false",
                *overrides)
        if probed and not (run_dir / "eval.json").is_file():
            run(sys.executable, "eval.py", "--run", str(run_dir), *PROBES)


class Chromium:
    """Headless Chromium driven through the DevTools protocol over a pipe (`--remote-debugging-pipe`:
    the browser reads commands on fd 3 and writes replies on fd 4, JSON messages ended by a NUL byte)."""

    def __init__(self, browser: str, profile: str):
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def on_fds_3_and_4():  # via fresh numbers: a pipe may already be fd 3 or 4 (and close on exec)
            read, write = os.dup(commands_read), os.dup(replies_write)
            os.dup2(read, 3)
            os.dup2(write, 4)

        self.process = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                         "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
                                        preexec_fn=on_fds_3_and_4, close_fds=False,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(replies_write)
        self._buffer, self._next_id, self.session = b"", 0, None
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.send("Page.enable")

    def send(self, method: str, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def screenshot(self, url: str, size: tuple[int, int], path: Path, local_storage: dict | None = None,
                   settle: float = 10.0) -> None:
        """Open `url` at `size` (after setting TensorBoard's local-storage settings on its origin), let
        the app fetch its data and draw for `settle` seconds, and save the page as a PNG."""
        self.send("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                  mobile=False)
        if local_storage:
            self.send("Page.navigate", url=url.split("#")[0])
            time.sleep(2.0)
            for key, value in local_storage.items():
                self.send("Runtime.evaluate",
                          expression=f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")
        self.send("Page.navigate", url=url)
        time.sleep(settle)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        os.close(self._commands)
        os.close(self._replies)


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
            with tempfile.TemporaryDirectory() as profile:
                chromium = Chromium(browser, profile)
                try:
                    for file, (page, size) in SHOTS.items():
                        chromium.screenshot(f"{tensorboard.url}/{page}", size, out / file, LOCAL_STORAGE)
                finally:
                    chromium.close()


if __name__ == "__main__":
    main()
