"""The LMN paper's three algorithmic tasks (seed 001, Section 3) and their seeded train/test split.

Every task is a binary operation ``c = a ∘ b`` over a finite set of ``n_tokens`` symbols; the
dataset is *all* ``n_tokens ** 2`` ordered pairs, labelled by the index of ``c``:

=========  ==========================================  ========  =======
name       operation                                    inputs    classes
=========  ==========================================  ========  =======
``add``    ``(a + b) mod p`` (p = 31 by default)        961       31
``s4``     composition in the permutation group S4      576       24
``xor``    5-bit bitwise XOR ``a ^ b``                  1024      32
=========  ==========================================  ========  =======
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

TASKS = ("add", "s4", "xor")

#: modulus of the addition task and bit width of the XOR task
ADD_MODULUS = 31
XOR_BITS = 5


@dataclass
class Task:
    """A fully enumerated binary-operation dataset with its train/test split.

    Attributes:
        name: one of :data:`TASKS`.
        x: ``(N, 2)`` int64 operand indices ``(a, b)``, all ``N = n_tokens ** 2`` pairs, row-major in ``a``.
        y: ``(N,)`` int64 label (index of ``a ∘ b``).
        n_tokens: number of distinct operands (vocabulary of each embedding).
        n_classes: number of output classes.
        train_idx: ``(N_train,)`` int64 indices into ``x`` (sorted).
        test_idx: ``(N - N_train,)`` int64 indices into ``x`` (sorted), disjoint from ``train_idx``.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    n_tokens: int
    n_classes: int
    train_idx: torch.Tensor
    test_idx: torch.Tensor

    @property
    def n_inputs(self) -> int:
        """Total number of inputs ``N``."""
        return int(self.x.shape[0])


def s4_elements() -> list[tuple[int, ...]]:
    """The 24 permutations of ``(0, 1, 2, 3)`` in lexicographic order (index = token id)."""
    return list(itertools.permutations(range(4)))


def compose(p: tuple[int, ...], q: tuple[int, ...]) -> tuple[int, ...]:
    """Composition ``(p ∘ q)(i) = p[q[i]]`` (apply ``q`` first, then ``p``)."""
    return tuple(p[q[i]] for i in range(len(q)))


def _table(name: str, p: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    if p is not None and name != "add":
        raise ValueError(f"p is the modulus of the add task; the {name} task has none")
    if name == "add":
        n = ADD_MODULUS if p is None else int(p)
        if n < 2:
            raise ValueError(f"the modulus p must be >= 2; got {p}")
        a, b = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        x = torch.stack([a.flatten(), b.flatten()], dim=1)
        return x, (x[:, 0] + x[:, 1]) % n, n, n
    if name == "xor":
        n = 2**XOR_BITS
        a, b = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        x = torch.stack([a.flatten(), b.flatten()], dim=1)
        return x, torch.bitwise_xor(x[:, 0], x[:, 1]), n, n
    if name == "s4":
        perms = s4_elements()
        index = {p: i for i, p in enumerate(perms)}
        pairs = [(i, j) for i in range(len(perms)) for j in range(len(perms))]
        x = torch.tensor(pairs, dtype=torch.int64)
        y = torch.tensor([index[compose(perms[i], perms[j])] for i, j in pairs], dtype=torch.int64)
        return x, y, len(perms), len(perms)
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")


def split_indices(n: int, train_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random split of ``range(n)`` into sorted, disjoint train and test index sets.

    Uses its own ``torch.Generator``; the global RNG is not touched.

    Args:
        n: number of inputs.
        train_fraction: fraction in (0, 1) of inputs for training; ``round(train_fraction * n)``
            inputs, clipped to ``[1, n - 1]``.
        seed: split seed.

    Returns:
        ``(train_idx, test_idx)`` int64 tensors.

    Raises:
        ValueError: ``train_fraction`` not in (0, 1) or ``n < 2``.
    """
    if not 0.0 < float(train_fraction) < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1); got {train_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 inputs to split; got {n}")
    n_train = min(max(round(train_fraction * n), 1), n - 1)
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    return perm[:n_train].sort().values, perm[n_train:].sort().values


def make_task(name: str, train_fraction: float = 0.8, seed: int = 0, p: int | None = None) -> Task:
    """Build a task with all its inputs and a seeded ``train_fraction`` split.

    Args:
        name: ``"add"``, ``"s4"`` or ``"xor"``.
        train_fraction: fraction of all inputs used for training (paper: 0.8).
        seed: seed of the split.
        p: modulus of ``add`` (default :data:`ADD_MODULUS`, 31: ``p ** 2`` inputs and ``p`` classes).

    Returns:
        :class:`Task`.

    Raises:
        ValueError: unknown task name, ``train_fraction`` outside (0, 1), ``p`` for a task other than ``add`` or below 2.
    """
    x, y, n_tokens, n_classes = _table(name, p)
    train_idx, test_idx = split_indices(x.shape[0], train_fraction, seed)
    return Task(name, x, y, n_tokens, n_classes, train_idx, test_idx)
