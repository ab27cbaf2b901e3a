"""The learning-forgetting frontier of a sweep with an lr axis (experiment=frontier): each arm's
lr chosen on validation, the test results at it, and the figures.

    python scripts/frontier.py outputs/finetune-sweep/<time> [--budget 0.01]

Writes <dir>/frontier/{frontier.md, frontier.png, lr_response.png, selection.json}. The sweep
writes the same at its end with the default rule; --budget re-applies another rule without
re-running anything (loralab.selection says what it is).
"""

import argparse
import math
import sys
from pathlib import Path

from loralab.errors import ArtifactError
from loralab.plots import write_frontier
from loralab.selection import Selection

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--budget", type=float, default=Selection().budget,
                        help="forgetting allowed free, as a share of the other digits' validation images (default %(default)s)")
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a directory; pass a sweep dir: python scripts/frontier.py outputs/finetune-sweep/<time>", file=sys.stderr)
        sys.exit(2)
    if not (math.isfinite(args.budget) and 0 <= args.budget <= 1):
        print(f"error: --budget={args.budget} is invalid: expected a share from 0 to 1 (0.01 is 1 %)", file=sys.stderr)
        sys.exit(2)
    try:
        written = write_frontier(args.sweep_dir, Selection(args.budget))
    except (ArtifactError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if written is None:
        print(f"error: {args.sweep_dir} has no arm trained at two or more learning rates; sweep optim.lr (or lr_step) too", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {written}")
