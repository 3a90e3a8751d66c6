"""The one ``medvlm-fl`` command line, on top of everything: the library's recipes
(``cli/library.py``), the federation and deployment (``cli/federation.py``), put together in
``cli/main.py``. Nothing imports this package but the console script and the tests."""

import medvlm  # noqa: F401  (one CPU code path before torch loads: medvlm/__init__.py)
