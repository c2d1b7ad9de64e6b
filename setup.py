"""ament_python build of vdd_ros.

The console scripts go to lib/vdd_ros (setup.cfg), where `ros2 run` finds them; bin/vdd-ros
runs the `vdd-ros` one from there, so a sourced workspace has `vdd-ros` on PATH.
"""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'vdd_ros'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        ('bin', ['resource/vdd-ros']),
        (f'share/{PACKAGE}/launch', glob('launch/*.launch.py')),
        (f'share/{PACKAGE}/config', glob('config/*.yaml')),
        (f'share/{PACKAGE}/config/bindings', glob('config/bindings/*.yaml')),
    ],
    install_requires=['setuptools'],
    extras_require={'test': ['pytest']},
    zip_safe=True,
    maintainer='vdd_ros maintainers',
    maintainer_email='maintainers@vdd-ros.dev',
    description='Variational Diffusion Distillation of diffusion policies into a Mixture of '
                'Experts, with ROS 2 nodes.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'vdd-ros = vdd_ros.cli:main',
            'teacher_training_node = vdd_ros.ros.training_nodes:teacher_main',
            'distillation_node = vdd_ros.ros.training_nodes:distillation_main',
            'policy_node = vdd_ros.ros.policy_node:main',
            'sim_node = vdd_ros.ros.sim_node:main',
        ],
    },
)
