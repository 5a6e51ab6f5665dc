"""``python -m llamaswap.demo``: run the demo upstream (see ``server.py``)."""

from __future__ import annotations

from llamaswap.demo.server import main

if __name__ == "__main__":
    raise SystemExit(main())
