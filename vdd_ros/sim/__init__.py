"""Simulation: robosuite tasks, scripted oracles and the rollout runner (robosuite is imported
lazily, on the first environment built)."""
