"""The loopback cluster: two Ray nodes on 127.0.0.1, the smoke sweep submitted with `ray job submit`."""

import subprocess
import sys

from tests.conftest import REPO


def test_two_node_loopback_cluster_runs_the_smoke_sweep(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "cluster" / "loopback.py"), "--keep", str(tmp_path / "lb")],
                          capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loopback: OK" in proc.stdout
