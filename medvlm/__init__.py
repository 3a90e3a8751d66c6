"""medvlm: the model, data, training and privacy library under the federation.

Importing it first (``client``, ``server``, ``simulations``, ``cli`` and the tests do) sets one CPU
code path for torch, MKL and oneDNN before torch loads: AVX2 on every x86-64 machine, whatever
vector units it has. The same training then gives the same figures on an AVX-512 server and an
AVX2 laptop; without it the default demo's accuracy differed by up to 3 points between the two
(README, "Measured"). A process that ran torch code before importing medvlm is warned (its kernels
are fixed by then). A value already in the environment wins (e.g. ``ATEN_CPU_CAPABILITY=avx512
MKL_CBWR=AUTO ONEDNN_MAX_CPU_ISA=ALL`` for the machine's widest units); GPUs are not affected.
"""

import os as _os
import sys as _sys

CPU_CODE_PATH = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
_user_chose = "ATEN_CPU_CAPABILITY" in _os.environ
for _key, _value in CPU_CODE_PATH.items():
    _os.environ.setdefault(_key, _value)

# torch fixes its kernels at its first operation, not at import: only a process that already ran torch
# code before importing us is on another path, and it should hear so rather than get other figures.
if "torch" in _sys.modules and not _user_chose:
    _capability = _sys.modules["torch"].backends.cpu.get_cpu_capability()
    if _capability.startswith("AVX512"):
        import warnings as _warnings

        _warnings.warn(
            f"torch ran before medvlm was imported and keeps its {_capability} kernels, not the AVX2 code "
            "path medvlm sets so that figures reproduce across machines (README, 'Measured'): accuracy "
            "may differ from the README's by points. Import medvlm (or client, server, simulations) "
            "before running any torch code, or set ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 "
            "ONEDNN_MAX_CPU_ISA=AVX2 in the environment.", RuntimeWarning, stacklevel=2)
