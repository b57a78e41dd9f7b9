"""v2's launch configuration under the GPU image's Triton (3.6), whose smallest ``tl.dot`` ``K`` is 16 at every width.

CI compiles every kernel with triton 3.6 too (``.ci/run``'s second virtual environment); this checks, with the
installed Triton, that the tiles follow :func:`kernels.triton_packed_mma.min_dot_k` and that nothing changes where the
installed Triton allows ``K = 8`` (triton 3.9).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from grokfast_metrics.kernels import triton_packed_mma as kc2

from grokfast_metrics.foundation.tail import parse_tail

SPEC = parse_tail(nn.Sequential(nn.Linear(64, 100), nn.SiLU(), nn.Linear(100, 31)))


@pytest.mark.parametrize("dtype, prec, warps_at_8", [(torch.float64, None, 4), (torch.float32, "ieee", 8)])
@pytest.mark.parametrize("min_k, block_k, bpp, warps", [(8, 8, 4, 4), (16, 16, 8, 8)])
def test_fma_tiles_follow_the_smallest_dot_k(monkeypatch, dtype, prec, warps_at_8, min_k, block_k, bpp, warps):
    # fp32 "ieee" runs on 8 warps at either K chunk (4 spilled once the moments became scale-free); fp64 on 4 at K 8
    warps = warps_at_8 if min_k == 8 else warps
    monkeypatch.setattr(kc2, "min_dot_k", lambda fp64: min_k)
    cfg = kc2.launch_config(SPEC, dtype, 21, interpret=False, input_precision=prec)
    c = cfg.constexprs
    assert (c["BLOCK_K"], c["BPP"], cfg.num_warps) == (block_k, bpp, warps)
    assert 2 * c["BPP"] >= min_k and c["BLOCK_K"] >= min_k and c["K0"] % c["BLOCK_K"] == 0


def test_default_tile_does_not_depend_on_it(monkeypatch):
    for min_k in (8, 16):
        monkeypatch.setattr(kc2, "min_dot_k", lambda fp64, k=min_k: k)
        cfg = kc2.launch_config(SPEC, torch.float32, 21, interpret=False)
        c = cfg.constexprs
        assert (c["M"], c["BP"], c["BPP"], c["K0"], c["BLOCK_K"], cfg.num_warps) == (128, 6, 8, 112, 16, 4)


def test_min_dot_k_of_the_installed_triton():
    import triton

    version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    expected = {(3, 6): 16, (3, 9): 8}.get(version)  # the GPU image's and this project's versions
    if expected is None:
        pytest.skip(f"triton {triton.__version__}: neither the GPU image's 3.6 nor the project's 3.9")
    assert kc2.min_dot_k(False) == expected and kc2.min_dot_k(True) == expected
