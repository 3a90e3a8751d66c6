"""medvlm: the model, data, training and privacy library under the federation.

Importing it first (``client``, ``server``, ``simulations``, ``cli`` and the tests do) sets one CPU
code path for torch, MKL and oneDNN before torch loads: AVX2 on every x86-64 machine, whatever
vector units it has. The same training then gives the same figures on an AVX-512 server and an
AVX2 laptop; without it the default demo's accuracy differed by up to 3 points between the two
(README, "Measured"). A value already in the environment wins (e.g. ``ATEN_CPU_CAPABILITY=avx512
MKL_CBWR=AUTO ONEDNN_MAX_CPU_ISA=ALL`` for the machine's widest units); GPUs are not affected.
"""

import os as _os

CPU_CODE_PATH = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
for _key, _value in CPU_CODE_PATH.items():
    _os.environ.setdefault(_key, _value)
