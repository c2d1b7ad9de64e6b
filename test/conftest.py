"""Shared test settings: one torch thread (2-core machines), headless matplotlib."""
import os

import matplotlib
import torch

matplotlib.use('Agg')
torch.set_num_threads(1)
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
