"""Environments for the tests only: episodes whose observations say exactly where in the episode they are."""

import gymnasium as gym
import numpy as np


class CountingEnv(gym.Env):
    """Fixed-length episodes: observation [t] (steps taken so far), reward 1 per step, the episode ends after
    `length` steps by termination (default) or by truncation. The final observation is [length], which no
    other step shows, so the autoreset step (whose stored observation is the final one) is recognisable.
    `nan_after` makes every reward NaN after that many steps in total (to test the non-finite guard);
    `continuous` gives a Box action space (the action is ignored either way). `obs_format` "atari" or "procgen"
    gives uint8 images ((4, 84, 84) or (64, 64, 3)) whose every pixel is t."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        length: int = 3,
        truncate: bool = False,
        nan_after: int | None = None,
        continuous=False,
        obs_format: str = "vector",
    ):
        self.length, self.truncate, self.nan_after = length, truncate, nan_after
        self.shape = {"vector": (1,), "atari": (4, 84, 84), "procgen": (64, 64, 3)}[obs_format]
        if obs_format == "vector":
            self.observation_space = gym.spaces.Box(0.0, float(length), self.shape, np.float32)
        else:
            self.observation_space = gym.spaces.Box(0, 255, self.shape, np.uint8)
        self.action_space = (
            gym.spaces.Box(-1.0, 1.0, (1,), np.float32) if continuous else gym.spaces.Discrete(2)
        )
        self.t, self.total = 0, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.observe(), {}

    def observe(self):
        return np.full(self.shape, self.t, dtype=self.observation_space.dtype)

    def step(self, action):
        self.t += 1
        self.total += 1
        reward = float("nan") if self.nan_after is not None and self.total > self.nan_after else 1.0
        end = self.t >= self.length
        return (
            self.observe(),
            reward,
            end and not self.truncate,
            end and self.truncate,
            {},
        )


# Counting{,Truncated,NaN}{,Continuous,Atari,Procgen}-v0
for _variant, _variant_kwargs in (("", {}), ("Truncated", {"truncate": True}), ("NaN", {"nan_after": 300})):
    for _family, _family_kwargs in (
        ("", {}),
        ("Continuous", {"continuous": True}),
        ("Atari", {"obs_format": "atari"}),
        ("Procgen", {"obs_format": "procgen"}),
    ):
        gym.register(
            f"Counting{_variant}{_family}-v0",
            entry_point=CountingEnv,
            kwargs={**_variant_kwargs, **_family_kwargs},
        )


class CoinLengthEnv(gym.Env):
    """Episodes of 10 or 500 steps with probability 1/2 each, drawn at reset from the env's own seeded RNG and
    independent of the actions: the true mean length is 255. Observation [0], reward 1 per step. A batch that
    favours short episodes (by dropping those still running at a cut) shows a mean length well below 255."""

    metadata = {"render_modes": []}
    observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.length = 0, int(self.np_random.choice([10, 500]))
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(1, np.float32), 1.0, self.t >= self.length, False, {}


gym.register("CoinLength-v0", entry_point=CoinLengthEnv)
