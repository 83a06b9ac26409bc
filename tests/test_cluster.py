"""A search on an existing Ray cluster: two nodes started with `ray start` on loopback."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.search_helpers import history_of, launch, write_config

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(*args, env):
    return subprocess.Popen([RAY, "start", "--block", "--num-cpus=1", "--disable-usage-stats", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.slow
def test_search_on_a_two_node_cluster(tmp_path, reference_history):
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    head = node("--head", f"--port={port}", "--include-dashboard=false", env=env)
    worker = None
    try:
        deadline = time.time() + 120
        while subprocess.run([RAY, "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True).returncode:
            assert time.time() < deadline and head.poll() is None, "the head node did not start"
            time.sleep(1)
        worker = node(f"--address=127.0.0.1:{port}", env=env)
        while b"2 node" not in b"".join(_nodes(port, env)):
            assert time.time() < deadline and worker.poll() is None, "the second node did not join"
            time.sleep(1)
        # one CPU per node and one CPU per worker: the two workers must land on the two nodes
        config = write_config(tmp_path, **{"workers.backend": "ray", "workers.count": 2})
        search = launch(["search", str(config), "--runs-dir", str(tmp_path / "runs"), "--address",
                         f"127.0.0.1:{port}"], env={"RAY_AUTH_MODE": "disabled"})
        assert search.wait(timeout=600) == 0, search.stderr.read().decode()[-2000:]
        run_dir = next((tmp_path / "runs").iterdir())
        assert history_of(run_dir) == reference_history[0]
    finally:
        for process in (worker, head):
            if process is not None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)


def _nodes(port, env):
    out = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='127.0.0.1:{port}', "
                          "log_to_driver=False); print(len([n for n in ray.nodes() if n['Alive']]), 'node')"],
                         env=env, capture_output=True)
    return [out.stdout]
