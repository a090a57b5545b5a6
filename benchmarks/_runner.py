"""The command line every ``bench_*.py`` of this folder shares: pick device and sizes, run, print."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from _report import table


def main(
    run: Callable[..., dict[str, Any]],
    *,
    quick: Any,
    full: Any,
    description: str,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Parse ``--quick`` / ``--out``, run ``run(config, device, out_dir=...)``, print its table.

    Full sizes run on CUDA when it is present and ``--quick`` is not given; otherwise the quick
    configuration runs on the CPU.

    Returns:
        The payload ``run`` wrote.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/<device>)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    payload = run(quick if device.type == "cpu" else full, device, out_dir=args.out)
    payload.setdefault("_device_dir", device.type)
    print(table(payload))
    return payload
