"""`python -m vdd_ros.ros.teacher_training_node --ros-args ...` (see training_nodes.py)."""
from vdd_ros.ros.training_nodes import teacher_main

if __name__ == '__main__':
    teacher_main()
