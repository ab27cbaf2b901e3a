"""Write PNG figures and a markdown report for a run or sweep directory.

    python scripts/report.py outputs/finetune-sweep/<time>

Writes <dir>/report/{report.md, per_digit.png, tradeoff.png} and the same figures as TensorBoard
images under <dir>/report.
"""

import sys
from pathlib import Path

from loralab.errors import ArtifactError
from loralab.plots import write_report

if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        print("error: pass one run or sweep directory: python scripts/report.py outputs/<...>", file=sys.stderr)
        sys.exit(2)
    try:
        print(f"wrote {write_report(Path(sys.argv[1]))}")
    except ArtifactError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
