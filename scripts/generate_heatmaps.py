#!/usr/bin/env python3
"""Thin entry point: `scripts/generate_heatmaps.py run --config CONF [KEY=VALUE ...]` = `attention-map ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attention_map.cli import main  # noqa: E402

sys.exit(main())
