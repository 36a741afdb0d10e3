"""The auto precision policy (vaepack/policy.py) applied to `vaepack roundtrip --json` outputs: one fp32
reference and any number of candidates (same photos), one table row each; for int8 work (issue 17).

    python benchmarks/qat_policy.py fp32.json label=candidate.json [label=candidate.json ...] [--md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def psnrs(path: Path) -> tuple[list[str], list[float], dict]:
    d = json.loads(path.read_text())
    rows = d["ok"]
    return [r["input"] for r in rows], [float(r["psnr"]) for r in rows], d


def main(argv=None) -> int:
    from vaepack.policy import check_auto_policy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32", type=Path)
    ap.add_argument("candidates", nargs="+", help="label=roundtrip.json (or a bare path)")
    a = ap.parse_args(argv)
    names, ref, _ = psnrs(a.fp32)
    mean_ref = sum(ref) / len(ref)
    print("| candidate | mean PSNR | mean delta | min delta | max delta | photos beyond 0.1 dB | policy |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print(f"| fp32 (reference) | {mean_ref:.3f} | - | - | - | - | - |")
    for c in a.candidates:
        label, sep, path = c.partition("=")
        if not sep:  # a bare path: label the row with the file name
            label, path = Path(c).stem, c
        n2, cand, _ = psnrs(Path(path))
        if n2 != names:
            raise SystemExit(f"{path}: not the same photos as {a.fp32}")
        chk = check_auto_policy(ref, cand)
        beyond = sum(abs(x - r) > 0.1 for x, r in zip(cand, ref))
        print(f"| {label} | {sum(cand) / len(cand):.3f} | {chk.mean_delta_db:+.3f} | {chk.min_delta_db:+.3f} | "
              f"{chk.max_delta_db:+.3f} | {beyond} | {'**qualifies**' if chk.passed else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
