"""Identity-balanced (PK) batch sampling for metric learning."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["PKSampler"]


class PKSampler:
    """Batches of P identities x K images each, as batch-hard triplet mining needs.

    An epoch visits every identity once (in a random order, P at a time); identities with fewer than K images are
    sampled with replacement.

    Args:
        labels: Identity label of every training image.
        p: Identities per batch.
        k: Images per identity.
        seed: Seed of the sampler's generator (the order is reproducible).
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, p: int, k: int, seed: int = 0) -> None:
        labels = np.asarray(labels)
        if p < 2 or k < 2:
            raise ValueError(f"PK sampling needs p >= 2 and k >= 2 for triplets, got p={p}, k={k}")
        ids, inverse = np.unique(labels, return_inverse=True)
        if len(ids) < p:
            raise ValueError(f"PK sampling needs at least p={p} identities, the data has {len(ids)}")
        self.p, self.k = p, k
        self._by_id = [np.flatnonzero(inverse == i) for i in range(len(ids))]
        self._rng = np.random.default_rng(seed)

    def get_state(self) -> dict:
        """The generator's state (to resume a run where it stopped)."""
        return self._rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        """Restore a state from :meth:`get_state`."""
        self._rng.bit_generator.state = state

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self._by_id) // self.p

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self._rng.permutation(len(self._by_id))
        for b in range(len(self)):
            chosen = order[b * self.p:(b + 1) * self.p]
            yield np.concatenate([
                self._rng.choice(self._by_id[i], self.k, replace=len(self._by_id[i]) < self.k) for i in chosen
            ])
