"""One CPU code path (medvlm/__init__.py): importing the library before torch makes torch, MKL and
oneDNN use AVX2 kernels on any x86-64 machine, so a figure measured on one machine comes out of
another; a value the user set wins."""

import os
import platform
import subprocess
import sys

from medvlm import CPU_CODE_PATH

PROBE = ("import os, {first}, torch; print(os.environ['MKL_CBWR'], os.environ['ONEDNN_MAX_CPU_ISA'], "
         "torch.backends.cpu.get_cpu_capability())")
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _run(code: str, **env) -> str:
    """The last line ``code`` prints in a fresh interpreter without the code-path variables (plus ``env``)."""
    clean = {k: v for k, v in os.environ.items() if k not in CPU_CODE_PATH}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


def _probe(first: str, **env) -> str:
    return _run(PROBE.format(first=first), **env)


def test_every_entry_package_sets_the_avx2_code_path_before_torch_loads():
    for first in ("medvlm", "client", "server", "simulations", "cli", "benchmarks"):
        mkl, onednn, aten = _probe(first).split()
        assert (mkl, onednn) == ("AVX2", "AVX2"), first
        if X86:   # torch's own kernels: AVX2 on any x86-64 machine (another ISA has no such path)
            assert aten == "AVX2", first


def test_a_code_path_the_user_set_wins():
    assert _probe("medvlm", ATEN_CPU_CAPABILITY="default", MKL_CBWR="AUTO").split() == ["AUTO", "AVX2", "DEFAULT"]
    assert CPU_CODE_PATH == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


RAN_FIRST = ("import warnings, torch\n{ops}"
             "with warnings.catch_warnings(record=True) as caught:\n"
             "    warnings.simplefilter('always')\n"
             "    import medvlm\n"
             "print(torch.backends.cpu.get_cpu_capability(), sum('ran before medvlm' in str(w.message) for w in caught))")


def _ran_first(ops: str) -> tuple[str, int]:
    capability, warned = _run(RAN_FIRST.format(ops=ops)).split()
    return capability, int(warned)


def test_torch_code_run_before_the_import_is_warned_when_its_kernels_are_not_the_path():
    # imported but not yet run: torch picks its kernels at the first operation, so the path still applies
    capability, warned = _ran_first("")
    assert warned == 0
    if X86:
        assert capability == "AVX2"
    # run first: the machine's own kernels stay; a process on AVX-512 ones is told, one on AVX2 ones is not
    capability, warned = _ran_first("torch.ones(64).exp().sum()\n")
    assert warned == (1 if capability.startswith("AVX512") else 0), capability
