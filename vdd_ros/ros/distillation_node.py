"""`python -m vdd_ros.ros.distillation_node --ros-args ...` (see training_nodes.py)."""
from vdd_ros.ros.training_nodes import distillation_main

if __name__ == '__main__':
    distillation_main()
