"""One CPU code path (medvlm/__init__.py): importing the library before torch makes torch, MKL and
oneDNN use AVX2 kernels on any x86-64 machine, so a figure measured on one machine comes out of
another; a value the user set wins."""

import os
import platform
import subprocess
import sys

import pytest

PROBE = "import {first}, torch; print(torch.backends.cpu.get_cpu_capability())"


def _capability(first: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env={**clean, **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="an x86-64 code path")
def test_every_entry_package_sets_the_avx2_code_path_before_torch_loads():
    for first in ("medvlm", "client", "server", "simulations", "cli", "benchmarks"):
        assert _capability(first) == "AVX2", first


def test_a_code_path_the_user_set_wins():
    assert _capability("medvlm", ATEN_CPU_CAPABILITY="default") == "DEFAULT"
    import medvlm

    assert medvlm.CPU_CODE_PATH == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
