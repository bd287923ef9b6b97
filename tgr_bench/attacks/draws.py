"""Per-sample random draws from integer keys, computed on the host.

An image's draws come from its own key (its seed, from the run seed and its name, mixed with
the iteration and the copy or neighbour index), never from a generator shared by the batch, so
an image's result does not depend on which other images share its batch. The draws are small
integers and floats decided on the host (sizes, offsets, indices), so reading them never waits
for the device; the tensors they shape are built in one batched operation.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1


def mix(*parts: int) -> int:
    """A 64-bit key from integers (splitmix64 steps): mix(seed, step, copy)."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z + (int(p) & MASK64) + 0x9E3779B97F4A7C15) & MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
    return z


def uniform(key: int) -> float:
    """A float in [0, 1) from a key."""
    return (mix(key) >> 11) / float(1 << 53)


def randint(key: int, low: int, high: int) -> int:
    """An int in [low, high) from a key (high > low)."""
    return low + mix(key) % (high - low)
