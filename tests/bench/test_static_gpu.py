"""The static GPU cost model (``grokfast-metrics bench --static-gpu``): SASS parsing and its self-checks.

No GPU is needed: the kernel is compiled for sm_90/sm_80 on the CPU. Nothing here asserts a time; the
checks are that the counted work is the kernel's work (MMA multiply-adds counted from the SASS loops
equal what its ``tl.dot`` calls perform) and that the estimate is assembled from its parts.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from grokfast_metrics.kernels import triton_rowblock as kc

from grokfast_metrics.bench import static_gpu as sg

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                  /* 0x00000a0000017a02 */
        /*0010*/              @P0 EXIT ;                                   /* 0x000000000000094d */
        /*0020*/                   FFMA R2, R3, R4, R5 ;                   /* 0x0000000403027223 */
        /*0030*/                   MUFU.EX2 R6, R2 ;                       /* 0x0000000200067308 */
        /*0040*/                   HGMMA.64x32x8.F32.TF32 gdesc[UR4], R24 ;/* 0x0000000004187df0 */
        /*0050*/              @!P2 BRA 0x20 ;                              /* 0xffffffcc0014a947 */
        /*0060*/                   HMMA.1688.F32.TF32 R8, R12, R16, R8 ;   /* 0x0000001c0c08723c */
        /*0070*/                   DMMA.884 R8, R12, R16, R8 ;             /* 0x0000001c0c08723c */
        /*0080*/                   EXIT ;                                  /* 0x000000000000794d */
        /*0090*/                   BRA 0x90;                               /* 0xfffffffc00fc7947 */
"""


def test_parse_sass_finds_loops_pipes_and_mma_shapes():
    sass = sg.parse_sass(SASS)
    assert [op for _, op, _, _ in sass.instructions][:4] == ["MOV", "EXIT", "FFMA", "MUFU"]
    assert sass.loops == [(2, 5)]  # FFMA .. BRA; the trailing self-branch is no loop
    pipes, fma = sg.dynamic_counts(sass, [3], warps=4)
    assert pipes["fp32"] == 3 and pipes["mufu"] == 3 and pipes["tensor"] == 3 + 2
    # HGMMA: a quarter of 64x32x8 per warp, 4 warps, 3 trips; HMMA m16n8k8 and DMMA m8n8k4 per warp, once
    assert fma == 3 * 4 * (64 * 32 * 8 // 4) + 4 * 16 * 8 * 8 + 4 * 8 * 8 * 4
    assert sg._instructions_before_exit(sass) == 2


def test_active_programs_and_occupancy():
    active, grid = sg.active_programs(5, 2)  # rows i=0..3 have 4,3,2,1 columns -> 2,2,1,1 programs
    assert (active, grid) == (6, 5 * 2)
    h100 = sg.GPUS[90]
    assert sg.occupancy(h100, regs=64, smem=0, threads=128) == 8  # 64 regs x 128 threads = 8 KiB regs
    assert sg.occupancy(h100, regs=255, smem=0, threads=128) == 2
    assert sg.occupancy(h100, regs=32, smem=100 * 1024, threads=128) == 2


def test_v2_tile_count_matches_the_host_list():
    from grokfast_metrics.kernels import triton_packed_mma as kc2

    for n, bp in [(2, 6), (17, 6), (50, 4)]:
        assert sg.v2_tiles(n, bp) == kc2.pair_tiles(n, bp).shape[0]
    assert sg.variants_for(100, 31, 1) == ["v1", "v2"] and sg.variants_for(100, 31, 2) == ["v1"]


@pytest.fixture(scope="module")
def default_estimate():
    if kc.kernel_is_interpreted():
        pytest.skip("TRITON_INTERPRET is set: the kernel cannot be compiled in this process")
    try:
        return {(arch, v): sg.estimate(961, 100, 31, 1, arch, variant=v) for arch in (90, 80) for v in ("v1", "v2")}
    except Exception as e:  # no cuobjdump / this triton cannot target CUDA here
        pytest.skip(f"static estimate unavailable here: {e!r}")


@pytest.mark.parametrize("arch", [90, 80])
def test_default_shape_estimate_is_self_consistent(default_estimate, arch):
    r = default_estimate[arch, "v1"]
    assert r["loops_verified"], "the SASS loops do not reproduce the kernel's MMA work"
    assert r["mma_fma_per_program"] == r["mma_fma_expected"] == 128 * 128 * 32 * 3  # M x K0 x P1 x tf32x3
    assert r["spill_bytes"] == 0 and r["registers"] <= 255 and r["ctas_per_sm"] >= 1
    assert r["programs_active"] == sum(-(-(960 - i) // r["config"]["BLOCK_J"]) for i in range(960))
    assert r["total_ms"] == max(r["issue_ms"], *r["ms"].values())
    assert r["per_program_warp_instructions"]["mufu"] > 0 and r["ms"]["tensor"] >= r["floors_ms"]["tensor"]


@pytest.mark.parametrize("arch", [90, 80])
def test_v2_estimate_is_self_consistent(default_estimate, arch):
    """v2: 128-row tiles of 6 pairs, K0 = 112 in chunks of 16, a persistent grid of 8 programs per SM (sm_80: the
    path's ends in chunks of 64)."""
    r = default_estimate[arch, "v2"]
    c = r["config"]
    assert (c["M"], c["BP"], c["K0"], c["BLOCK_K"], c["PO"]) == (128, 6, 112, 16, 32)
    tiles = sg.v2_tiles(961, 6)
    assert r["programs_active"] == r["programs_grid"] == min(tiles, 8 * sg.GPUS[arch].sms)
    # tf32x3 main product; the sums over t (8 tf32 passes: the mean and the per-pair scale, each broadcast back, and the
    # two moments in hi/lo halves)
    per_tile = 128 * 112 * 32 * 3 + 8 * 16 * 128 * 32
    assert r["loops_verified"], "the SASS loops do not reproduce the kernel's MMA work"
    assert r["mma_fma_per_program"] == pytest.approx(per_tile * tiles / r["programs_active"], rel=1e-9)
    # the K loop (7 chunks) and, on sm_80, _pair_bounds' loop over K0 in two chunks of BLOCK_KE = 64
    assert sorted(r["loop_trips"][:-1]) == ([2, 7] if arch == 80 else [7])
    assert r["spill_bytes"] == 0 and r["registers"] <= 255 and r["ctas_per_sm"] >= 1
    assert r["total_ms"] == max(r["issue_ms"], *r["ms"].values()) and r["ms"]["tensor"] >= r["floors_ms"]["tensor"]


def test_results_md_block_is_labelled_and_separate(default_estimate, tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nmeasured text\n")
    sg.update_results_md(list(default_estimate.values()), md)
    sg.update_results_md(list(default_estimate.values()), md)  # rewritten in place, not appended twice
    text = md.read_text()
    assert text.count(sg.MD_BEGIN) == 1 and "measured text" in text and "static estimate" in text
    assert "| v1 |" in text and "| v2 |" in text
