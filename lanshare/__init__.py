"""lanshare: keeps a folder in sync between the machines of one LAN."""

from __future__ import annotations

__version__ = "0.1.0"
