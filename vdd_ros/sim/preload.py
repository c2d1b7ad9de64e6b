"""Imported once by the forkserver so that every worker forks with torch and robosuite loaded
(saves 1.5-2.5 s of start-up per worker). Importing this module only imports."""
import torch  # noqa: F401

from vdd_ros.sim import rollout  # noqa: F401
from vdd_ros.sim.env import import_robosuite

import_robosuite()
import robosuite.controllers  # noqa: E402,F401
