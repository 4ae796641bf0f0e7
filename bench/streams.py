"""Labelled test streams for batch-1 adaptation: the orders a camera's frames come in.

iid        shuffled: every frame independent
dirichlet  label-correlated by Dirichlet sorting (delta=0.1), the standard non-i.i.d. TTA protocol
video      class runs of random length (mean 30 frames), as a camera watching one thing at a time
continual  one corruption after another, i.i.d. within each, never reset
mixed      every frame a random corruption, i.i.d. labels
"""
from __future__ import annotations

import numpy as np


def iid_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(len(labels))


def dirichlet_order(labels: np.ndarray, rng: np.random.Generator, delta: float = 0.1, slots: int | None = None
                    ) -> np.ndarray:
    """Each class's samples are spread over `slots` time slots by a Dirichlet(delta) draw (RoTTA/NOTE)."""
    classes = np.unique(labels)
    slots = slots or len(classes)
    buckets: list[list[int]] = [[] for _ in range(slots)]
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        share = rng.dirichlet([delta] * slots)
        cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
        for slot, part in enumerate(np.split(idx, cuts)):
            buckets[slot].extend(part.tolist())
    return np.concatenate([rng.permutation(b) for b in buckets if b]).astype(int)


def video_order(labels: np.ndarray, rng: np.random.Generator, mean_run: int = 30) -> np.ndarray:
    """Runs of one class with geometric lengths, drawing without replacement until every sample is used."""
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)}
    order: list[int] = []
    while any(pools.values()):
        c = rng.choice([k for k, v in pools.items() if v])
        run = min(rng.geometric(1 / mean_run), len(pools[c]))
        order.extend(pools[c][:run])
        pools[c] = pools[c][run:]
    return np.asarray(order, int)


ORDERS = {"iid": iid_order, "dirichlet": dirichlet_order, "video": video_order}
