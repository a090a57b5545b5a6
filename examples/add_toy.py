"""ADD on a problem that trains on CPU: coloured 8×8 digits, the ADD paper's ablation in miniature.

    python examples/add_toy.py            # full study, ~25 min on 2 CPU cores
    python examples/add_toy.py --quick    # < 3 min: teacher + one ADD student
    python examples/add_toy.py --flow     # a rectified-flow teacher and its ADD / LADD students
    python examples/add_toy.py --ladd-probe --out outputs/add_toy_flow   # LADD's discriminator alone

See ``examples/toy/`` for the parts and ``docs/results.md`` for the numbers.
"""

from __future__ import annotations

from toy.study import main  # the script's folder is on sys.path: examples/toy is importable

if __name__ == "__main__":
    main()
