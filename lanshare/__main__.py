"""``python -m lanshare`` runs the command-line interface."""

from __future__ import annotations

from lanshare.cli import main

main()
