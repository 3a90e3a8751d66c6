"""server: see DESIGN.md. Imports medvlm first: one CPU code path before torch loads."""

import medvlm  # noqa: F401
