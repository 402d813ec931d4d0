"""`python -m benchmarks` (what `make bench` runs)."""
from __future__ import annotations

import sys
from pathlib import Path

# The product's packages (service, policies, consent) live at the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.runner import main

if __name__ == "__main__":
    sys.exit(main())
