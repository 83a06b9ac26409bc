"""optuna-dashboard on a finished run's study, seen in a real browser: a small search on the bundled
model, `optuna-dashboard sqlite:///RUN/study.db` on 127.0.0.1, headless Chromium screenshots (PNG) of the
study page, the trial list (a trial's parameters and user attributes) and the study list, and a JSON
line saying what the dashboard served.

    pip install optuna-dashboard && apt-get install chromium
    python -m benchmarks.dashboard_screenshot --out benchmarks/results/dashboard-cpu.json

Loopback only: the server binds 127.0.0.1 and the browser is pointed nowhere else.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.output import emit
from benchmarks.small_search import write_config
from search import runs

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_finished_run(folder: Path) -> Path:
    """The test suite's small search (8 per generation, 4 generations, 4 documents), with two needle formats
    so that each trial has per-format attributes to show: about a minute."""
    config = runs.load_search_config(write_config(folder, **{"needles.formats": ["magic_number", "pass_key"]}))
    run_dir = runs.create(config, folder / "runs")
    runs.run(run_dir, quiet=True)
    return run_dir


def wait_for(url: str, seconds: float = 60) -> str:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def screenshot(browser: str, url: str, png: Path) -> None:
    # --virtual-time-budget lets the page's scripts fetch the study and draw before the picture is taken
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1000",
         "--virtual-time-budget=15000", f"--screenshot={png}", url],
        check=True, capture_output=True, timeout=120,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--run-dir", type=Path, help="a finished run to show (default: a small search made here)")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    dashboard = shutil.which("optuna-dashboard")
    if not browser or not dashboard:
        sys.exit("needs chromium (apt-get install chromium) and optuna-dashboard (pip install optuna-dashboard)")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or small_finished_run(Path(tmp))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([dashboard, f"sqlite:///{run_dir / 'study.db'}", "--host", "127.0.0.1",
                                   "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            study = json.loads(wait_for(f"{base}/api/studies"))["study_summaries"][0]
            detail = json.loads(wait_for(f"{base}/api/studies/{study['study_id']}?after=0"))
            RESULTS.mkdir(parents=True, exist_ok=True)
            study_page = f"{base}/dashboard/studies/{study['study_id']}"
            pages = {"study": study_page, "trials": f"{study_page}/trials", "list": f"{base}/dashboard/"}
            for name, url in pages.items():
                screenshot(browser, url, RESULTS / f"dashboard-{name}.png")
        finally:
            server.terminate()
            server.wait(timeout=30)
    last = detail["trials"][-1]
    emit({
        "study": study["study_name"],
        "trials": len(detail.get("trials", [])),
        "objective_names": detail.get("objective_names"),
        "user_attrs_of_a_trial": sorted(a["key"] for a in last.get("user_attrs", [])),
        "params_of_a_trial_besides_factors": [p["name"] for p in last["params"] if not p["name"].startswith("f")],
        "screenshots": [f"benchmarks/results/dashboard-{name}.png" for name in pages],
        "command": "optuna-dashboard sqlite:///RUN/study.db --host 127.0.0.1 --port 8080",
    }, args.out)


if __name__ == "__main__":
    main()
