"""What a colcon build installs: the node executables in lib/vdd_ros (for `ros2 run`), the
launch and parameter files in share/vdd_ros, and `vdd-ros` on PATH once the workspace is
sourced."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXECUTABLES = {'vdd-ros', 'teacher_training_node', 'distillation_node', 'policy_node',
               'sim_node'}


@pytest.mark.skipif(shutil.which('colcon') is None, reason='colcon is not installed')
def test_colcon_install_layout_and_vdd_ros_on_path(tmp_path):
    build = subprocess.run(
        ['colcon', '--log-base', str(tmp_path / 'log'), 'build', '--base-paths', str(ROOT),
         '--packages-select', 'vdd_ros', '--build-base', str(tmp_path / 'build'),
         '--install-base', str(tmp_path / 'install')],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stdout + build.stderr
    prefix = tmp_path / 'install' / 'vdd_ros'
    lib = prefix / 'lib' / 'vdd_ros'
    assert {p.name for p in lib.iterdir()} == EXECUTABLES
    assert all(os.access(p, os.X_OK) for p in lib.iterdir())
    share = prefix / 'share' / 'vdd_ros'
    assert (share / 'package.xml').is_file()
    assert {p.name for p in (share / 'launch').iterdir()} == {'policy.launch.py',
                                                              'pipeline.launch.py'}
    assert {p.name for p in (ROOT / 'config').glob('*.yaml')} <= {
        p.name for p in (share / 'config').iterdir()}
    assert (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' /
            'vdd_ros').is_file()

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('AMENT_', 'COLCON_')) and k != 'PYTHONPATH'}
    env['PATH'] = os.pathsep.join([str(Path(sys.executable).parent), '/usr/bin', '/bin'])
    shell = subprocess.run(
        ['bash', '-c', f'source {tmp_path}/install/setup.bash && command -v vdd-ros && '
                       'vdd-ros --help'],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert shell.returncode == 0, shell.stdout + shell.stderr
    where, _, help_text = shell.stdout.partition('\n')
    assert where == str(prefix / 'bin' / 'vdd-ros')
    assert help_text.startswith('usage: vdd-ros')
