"""Tasks: sizes, labels, split disjointness and seeding, S4 composition against permutation matrices."""

import itertools

import pytest
import torch

from grokfast_metrics.experiment.tasks import TASKS, compose, make_task, s4_elements, split_indices


@pytest.mark.parametrize("name, n_inputs, n_classes, n_train", [("add", 961, 31, 769), ("s4", 576, 24, 461), ("xor", 1024, 32, 819)])
def test_sizes_and_split(name, n_inputs, n_classes, n_train):
    t = make_task(name, 0.8, seed=3)
    assert t.x.shape == (n_inputs, 2) and t.y.shape == (n_inputs,)
    assert t.n_classes == n_classes and t.n_tokens**2 == n_inputs
    assert len(t.train_idx) == n_train and len(t.test_idx) == n_inputs - n_train
    assert not set(t.train_idx.tolist()) & set(t.test_idx.tolist())
    assert sorted(t.train_idx.tolist() + t.test_idx.tolist()) == list(range(n_inputs))
    # every ordered pair appears exactly once, labels in range, every class used
    assert len({tuple(r) for r in t.x.tolist()}) == n_inputs
    assert int(t.y.min()) == 0 and int(t.y.max()) == n_classes - 1
    assert len(set(t.y.tolist())) == n_classes


def test_labels_spot_checks():
    add, xor = make_task("add"), make_task("xor")
    lab = {tuple(r): int(v) for r, v in zip(add.x.tolist(), add.y)}
    assert lab[(3, 30)] == 2 and lab[(0, 0)] == 0 and lab[(30, 30)] == 29 and lab[(15, 16)] == 0
    assert all(v == (a + b) % 31 for (a, b), v in lab.items())
    lab = {tuple(r): int(v) for r, v in zip(xor.x.tolist(), xor.y)}
    assert lab[(5, 3)] == 6 and lab[(31, 31)] == 0 and lab[(16, 15)] == 31 and lab[(0b10101, 0b01100)] == 0b11001


def _perm_matrix(p):
    m = torch.zeros(4, 4, dtype=torch.int64)
    for i, pi in enumerate(p):
        m[pi, i] = 1  # e_i -> e_{p(i)}
    return m


def test_s4_composition():
    perms = s4_elements()
    assert len(perms) == 24 and len(set(perms)) == 24 and perms[0] == (0, 1, 2, 3)
    t = make_task("s4")
    for (i, j), k in zip(t.x.tolist(), t.y.tolist()):
        # label is the permutation whose matrix is the product: apply q = perms[j] first, then p = perms[i]
        assert torch.equal(_perm_matrix(perms[k]), _perm_matrix(perms[i]) @ _perm_matrix(perms[j]))
    table = t.y.view(24, 24)
    assert torch.equal(table[0], torch.arange(24)) and torch.equal(table[:, 0], torch.arange(24))  # identity
    for row in table:  # Latin square: every row and column a permutation of the group
        assert sorted(row.tolist()) == list(range(24))
    assert sorted(table[:, 5].tolist()) == list(range(24))
    assert not torch.equal(table, table.T)  # S4 is not abelian
    for a, b, c in itertools.islice(itertools.product(range(24), repeat=3), 0, 13824, 97):  # associativity
        assert table[table[a, b], c] == table[a, table[b, c]]
    assert compose((1, 2, 3, 0), (1, 2, 3, 0)) == (2, 3, 0, 1)


def test_split_seeded_and_rng_untouched():
    state = torch.get_rng_state()
    a, b = make_task("add", 0.8, 1), make_task("add", 0.8, 1)
    assert torch.equal(a.train_idx, b.train_idx)
    assert not torch.equal(a.train_idx, make_task("add", 0.8, 2).train_idx)
    assert torch.equal(torch.get_rng_state(), state)
    tr, te = split_indices(10, 0.3, 0)
    assert len(tr) == 3 and len(te) == 7


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_bad_fraction(frac):
    with pytest.raises(ValueError, match="train_fraction"):
        make_task("add", frac)


def test_bad_name():
    with pytest.raises(ValueError, match="unknown task"):
        make_task("mul")
    assert TASKS == ("add", "s4", "xor")
