"""Peak memory of ``connectivity``: O(N^2 + chunk), measured in a fresh process; refusal before allocating (also under
an address-space limit)."""

from __future__ import annotations

import subprocess

import pytest
import torch
from helpers import PYTHON

import grokfast_metrics as gm
from grokfast_metrics.foundation import policy as _policy

#: N=2000, a small tail, 1 MiB chunks: L is 16 MB in fp32. The torch path used to keep the index and value
#: tensors of every pair until the end (about 40 MB more here, growing like N^2); now only L and a chunk.
#: n_lambda=5: what grows with N does not depend on T, and the 2M pairs cost 3.4x the time at T=21.
_PEAK = """
import resource, torch, grokfast_metrics as gm
torch.manual_seed(0)
tail = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
gm.connectivity(torch.randn(16, 6), tail, backend="torch", n_lambda=5)  # warm-up: imports, allocator
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
L = gm.connectivity(torch.randn(2000, 6), tail, backend="torch", chunk_bytes=1 << 20, n_lambda=5)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(after - before, L.numel() * L.element_size())
"""


def test_peak_extra_memory_is_L_plus_a_chunk():
    out = subprocess.run([*PYTHON, "-c", _PEAK], capture_output=True, text=True, check=True, timeout=600).stdout.split()
    extra, l_bytes = int(out[-2]), int(out[-1])
    # beyond L itself: worst observed 6.4 MiB (5.9 MiB at T=21; N=1000 and N=2000 alike: the chunk, not N^2); bound 32 MiB
    assert extra - l_bytes <= 32 << 20, f"peak grew by {extra / 2**20:.0f} MiB for a {l_bytes / 2**20:.0f} MiB L"


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_refuses_before_allocating_what_cannot_fit(monkeypatch, backend):
    monkeypatch.setattr(_policy, "available_bytes", lambda device: 1 << 20)  # pretend 1 MiB is free
    tail = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    with pytest.raises(MemoryError, match="only 1 MiB is free"):
        gm.connectivity(torch.randn(1000, 3), tail, backend=backend)  # L alone: 4 MB


#: N=40000 in fp32: L alone is 6.4 GB. The address-space limit is set to what the process maps now plus 1 GiB,
#: so the allocation cannot succeed whatever the machine's free memory is.
_RLIMIT = """
import resource, torch, grokfast_metrics as gm
tail = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
gm.connectivity(torch.randn(8, 3), tail)
vm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:')][0]
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    gm.connectivity(torch.randn(40000, 3), tail)
except MemoryError as e:
    print('MemoryError:', e)
"""


def test_fit_check_reads_the_address_space_limit():
    out = subprocess.run([*PYTHON, "-c", _RLIMIT], capture_output=True, text=True, timeout=300)
    assert "MemoryError: connectivity needs about" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "limit" in out.stdout
