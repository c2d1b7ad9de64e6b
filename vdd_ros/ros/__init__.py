"""ROS 2 nodes: thin rclpy wrappers over vdd_ros.core (training, policies) and vdd_ros.sim.

Importing this package does not import rclpy; each node module does.
"""
