"""A real `tensorboard --logdir` on 127.0.0.1 and a client of its HTTP data API, as the browser
uses it (tests/test_tensorboard.py, scripts/tensorboard_screenshots.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from trainer_utils import free_port

ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


class TensorBoardClient:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **query):
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def scalars(self, run: str, tag: str) -> list[tuple[int, float]]:
        """[(step, value)] of one scalar time series (the scalars plugin's data, as the charts get it)."""
        return [(step, value) for _, step, value in self.get("/data/plugin/scalars/scalars", run=run, tag=tag)]

    def experiment(self) -> dict:
        """The HParams experiment the HParams tab asks for (hparamsLimit as in tf-hparams-query-pane.ts)."""
        return self.post("/data/plugin/hparams/experiment", {"experimentName": "", "hparamsLimit": 1000})

    def session_groups(self) -> dict[str, dict]:
        """{group name: session group} of every status, as the HParams table lists them."""
        body = {"experimentName": "", "allowedStatuses": ALL_STATUSES, "startIndex": 0, "sliceSize": 1000,
                "colParams": [{"metric": {"tag": "val/top1"}, "order": "ORDER_DESC"}]}
        groups = self.post("/data/plugin/hparams/session_groups", body)["sessionGroups"]
        return {group["name"]: group for group in groups}

    def wait_for(self, ready, timeout: float = 120.0):
        """Poll until `ready(self)` returns a true value (TensorBoard loads event files in the
        background); a bounded wait."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = ready(self)
                if result:
                    return result
            except (urllib.error.URLError, ConnectionError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"TensorBoard at {self.url} was not ready within {timeout:.0f} s")
            time.sleep(0.5)


@contextmanager
def served_tensorboard(logdir: Path, timeout: float = 120.0):
    """`tensorboard --logdir LOGDIR` on 127.0.0.1 at a free port (its default loader, the Rust data
    server); stopped on exit."""
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
                                "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    client = TensorBoardClient(f"http://127.0.0.1:{port}")
    def serving(c):
        if process.poll() is not None:
            raise RuntimeError("tensorboard exited")
        return c.get("/data/runs") is not None

    try:
        try:
            client.wait_for(serving, timeout)
        except (TimeoutError, RuntimeError) as error:
            log.seek(0)
            raise RuntimeError(f"{error}; tensorboard said: {log.read()[-2000:]}") from None
        yield client
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
