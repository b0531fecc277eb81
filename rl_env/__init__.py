"""Gymnasium environments, reward components and schedules, PPO runs and Tune sweeps."""
