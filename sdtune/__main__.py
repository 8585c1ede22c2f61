"""Entry point for `python -m sdtune`, `python sdtune` and `accelerate launch sdtune ...`.

`python sdtune ...` (what `accelerate launch sdtune ...` runs from the repository root) puts
the package folder itself first on sys.path, where its modules would shadow top-level ones;
replace it with the repository root before importing anything else.
"""

import os
import sys

if not __package__:
    _package_dir = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == _package_dir:
        sys.path[0] = os.path.dirname(_package_dir)

from sdtune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
