"""Running mean and standard deviation of every reward seen: an ensemble's `running`
standardisation in the service and PPO's score scaling in the trainer share this one."""

from __future__ import annotations

import math
from collections.abc import Sequence


class RunningMoments:
    """Chan et al.'s parallel update: exact for any split of the values into batches."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean

    def update(self, values: Sequence[float]) -> None:
        if not values:
            return
        count = len(values)
        mean = math.fsum(values) / count
        m2 = math.fsum((v - mean) ** 2 for v in values)
        total = self.count + count
        delta = mean - self.mean
        self._m2 += m2 + delta * delta * self.count * count / total
        self.mean += delta * count / total
        self.count = total

    @property
    def std(self) -> float:
        """Population standard deviation; 1.0 before two values."""
        return math.sqrt(self._m2 / self.count) if self.count > 1 else 1.0

    @property
    def sample_std(self) -> float:
        """With Bessel's correction (TRL's score scaling); 1.0 before two values."""
        return math.sqrt(self._m2 / (self.count - 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self._m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self._m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
