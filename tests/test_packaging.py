"""The package builds as a wheel and an sdist that pass `twine check` and work when installed."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_and_sdist_build_check_and_run(tmp_path):
    pytest.importorskip("build")
    pytest.importorskip("twine")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)], check=True,
                   capture_output=True, timeout=300)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists)], check=True,
                   capture_output=True, timeout=120)
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "sats/cli.py" in names and "sats/methods/sats.py" in names and "sats/py.typed" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    target = tmp_path / "site"  # the wheel alone (its dependencies are this environment's)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(target), str(wheels[0])], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run([sys.executable, "-c", "import sats, sys; from sats.cli import main; print(sats.__file__); "
                            "sys.exit(main(['list', 'methods']))"], env=env, capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[0].startswith(str(target)) and "sats" in probe.stdout
    demo = subprocess.run([sys.executable, "-m", "sats.cli", "demo", "--quick", "--methods", "ft", "--tasks", "15-5",
                           "--output", str(tmp_path / "demo")], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # the demo's configs ship in the wheel
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (tmp_path / "demo" / "summary.md").is_file() and "FT" in (tmp_path / "demo" / "summary.md").read_text()
    assert "sats/_configs/demo/mib.yaml" in names and "sats/_configs/voc/sats_mit-b2_voc-15-1.yaml" in names
    help_text = subprocess.run([sys.executable, "-m", "sats.cli", "--help"], env=env, capture_output=True, text=True,
                               timeout=120, cwd=tmp_path)
    assert help_text.returncode == 0 and "train" in help_text.stdout
