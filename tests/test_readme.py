"""The README's promises that can be run: its Python snippet is a script that works as
it stands, and what the demo and the snippet write stays out of git (issue 20, 5 + 9)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from astropy.io import fits

from .conftest import LCO_DIR, ROOT

README = ROOT / "README.md"
DATA_IN_README = "../shared/data/lco-pds110"


def python_snippet() -> str:
    """The ```python block of the README's 'Python API' section."""
    text = README.read_text()
    match = re.search(r"^## Python API\n.*?```python\n(.*?)^```", text, re.S | re.M)
    assert match, "README.md has no ```python block under '## Python API'"
    return match.group(1)


def test_snippet_names_the_shared_frames_as_seen_from_the_checkout():
    snippet = python_snippet()
    assert DATA_IN_README in snippet
    assert (ROOT / DATA_IN_README).resolve() == LCO_DIR.resolve()
    assert 'if __name__ == "__main__":' in snippet


def test_readme_snippet_runs_as_a_script(lco_dir, tmp_path):
    """Pasted into a file and run: exit 0, a coadd, nothing written into the checkout."""
    script = tmp_path / "stack_pds110.py"
    script.write_text(python_snippet().replace(DATA_IN_README, str(lco_dir)))
    before = set(os.listdir(ROOT))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    coadds = sorted((tmp_path / "pds110-run").glob("coadd_*.fits"))
    assert [p.name for p in coadds] == ["coadd_rp.fits"]
    assert fits.getheader(coadds[0])["NCOMBINE"] == 3
    assert set(os.listdir(ROOT)) == before


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="not a git checkout")
@pytest.mark.parametrize("path", ["daskstack-demo/coadd_rp.fits", "pds110-run/run.json"])
def test_default_outputs_are_ignored_by_git(path):
    proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
    assert proc.returncode == 0, f"{path} is not ignored by .gitignore"


def test_demo_default_output_is_outside_the_package():
    from daskstack.cli import main

    out = next(p for p in main.commands["demo"].params if p.name == "out_dir")
    assert out.default == "daskstack-demo"  # relative: the current directory
    assert not os.path.isabs(out.default)
