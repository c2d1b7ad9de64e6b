"""Style as a test (as ament packages run ament_flake8 under `colcon test`): ruff with the
repository's ruff.toml (99 columns, pycodestyle, pyflakes) over the package, the tests, the
launch files and setup.py."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ['vdd_ros', 'test', 'launch', 'setup.py']


def _ruff() -> list[str] | None:
    """The command that runs ruff: the `ruff` module of this Python, else `ruff` on PATH."""
    if importlib.util.find_spec('ruff') is not None:
        return [sys.executable, '-m', 'ruff']
    found = shutil.which('ruff')
    return [found] if found else None


@pytest.mark.skipif(_ruff() is None, reason='ruff is not installed (pip install ruff; it is in '
                                            'requirements-test.txt)')
def test_ruff_finds_no_violations():
    assert (ROOT / 'ruff.toml').is_file()
    result = subprocess.run(
        [*_ruff(), 'check', '--no-cache', '--output-format', 'concise',
         '--config', str(ROOT / 'ruff.toml'), *TARGETS],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
