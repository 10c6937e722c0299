"""Environments for the tests only: episodes whose observations say exactly where in the episode they are."""

import gymnasium as gym
import numpy as np


class CountingEnv(gym.Env):
    """Fixed-length episodes: observation [t] (steps taken so far), reward 1 per step, the episode ends after
    `length` steps by termination (default) or by truncation. The final observation is [length], which no
    other step shows, so the autoreset step (whose stored observation is the final one) is recognisable.
    `nan_after` makes every reward NaN after that many steps in total (to test the non-finite guard);
    `continuous` gives a Box action space (the action is ignored either way)."""

    metadata = {"render_modes": []}

    def __init__(
        self, length: int = 3, truncate: bool = False, nan_after: int | None = None, continuous=False
    ):
        self.length, self.truncate, self.nan_after = length, truncate, nan_after
        self.observation_space = gym.spaces.Box(0.0, float(length), (1,), np.float32)
        self.action_space = (
            gym.spaces.Box(-1.0, 1.0, (1,), np.float32) if continuous else gym.spaces.Discrete(2)
        )
        self.t, self.total = 0, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        self.total += 1
        reward = float("nan") if self.nan_after is not None and self.total > self.nan_after else 1.0
        end = self.t >= self.length
        return (
            np.array([float(self.t)], np.float32),
            reward,
            end and not self.truncate,
            end and self.truncate,
            {},
        )


gym.register("Counting-v0", entry_point=CountingEnv)
gym.register("CountingTruncated-v0", entry_point=CountingEnv, kwargs={"truncate": True})
gym.register("CountingNaN-v0", entry_point=CountingEnv, kwargs={"nan_after": 300})
gym.register("CountingContinuous-v0", entry_point=CountingEnv, kwargs={"continuous": True})
gym.register(
    "CountingTruncatedContinuous-v0", entry_point=CountingEnv, kwargs={"truncate": True, "continuous": True}
)
gym.register(
    "CountingNaNContinuous-v0", entry_point=CountingEnv, kwargs={"nan_after": 300, "continuous": True}
)
