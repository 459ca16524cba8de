"""The queue worker (``patinox worker``) holds database credentials and serves no HTTP:
importing what it runs loads neither FastAPI nor the HTTP API.

The import-linter contract in ``pyproject.toml`` checks the import statements; this checks
what a fresh interpreter actually loads, which also covers the root package's
``__init__`` (it imports ``create_app`` only on first use).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = """
import sys
import {module}
loaded = sorted(
    m for m in sys.modules
    if m.split(".")[0] in ("fastapi", "starlette", "uvicorn") or m.startswith("patinox.api")
)
print(",".join(loaded))
"""


@pytest.mark.parametrize("module", ["patinox.control.worker", "patinox.runtime", "patinox.cli"])
def test_the_queue_worker_loads_no_http_api(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(module=module)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_create_app_is_still_public_and_loads_the_api_on_first_use() -> None:
    probe = (
        "import sys, patinox; assert 'fastapi' not in sys.modules; "
        "from patinox import create_app; from patinox.api import create_app as api_create_app; "
        "assert create_app is api_create_app and 'fastapi' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)
