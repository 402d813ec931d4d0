"""Starting `flask --app wsgi …` loads only what every command needs: the heavy libraries
(diffprivlib with NumPy, SciPy and scikit-learn; the FHIR R4B models; the synthetic data
generator) are imported by the paths that use them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("diffprivlib", "numpy", "scipy", "sklearn", "fhir.resources", "service.synthetic")
# The real `flask` entry point; at exit, the heavy modules it had imported by then.
SCRIPT = f"""
import atexit, json, sys
atexit.register(lambda: print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr))
from flask.cli import main
sys.argv = ["flask", "--app", "wsgi", "--help"]
main()
"""


def test_cli_start_up_loads_no_heavy_library(tmp_path: Path) -> None:
    env = {**os.environ, "PASSERELLE_INSTANCE_DIR": str(tmp_path)}
    child = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=60)
    assert child.returncode == 0, child.stderr
    assert "project" in child.stdout  # the app was built and its commands registered
    assert json.loads(child.stderr.strip().splitlines()[-1]) == []
