"""Label storage at ImageNet-1K shape: our Parquet formats against FKD-style fp16 dense labels.

Rows: FKD (SRe2L relabel, fp16 + CutMix records, batch 1024; measured per `torch.save` batch
file), then ours (storage/labels.py `write_epoch`, measured on random logits) in fp32, fp16 and
top-k (k in --topk) for E = 300, 100 and 30 labelled epochs. Two ratios:

- "vs FKD files": FKD's measured directory over ours;
- "vs N*C*2*E": the fp16 soft labels alone (no augmentation record, no file overhead) over
  ours, the stricter of the two; a row is marked when this one reaches --goal (100x).

Every epoch is written whole by default (--max-rows 50000: 50,000 x 1000 fp32 is ~200 MB, a few
seconds). Larger epochs are extrapolated along a line through two measured sizes (max_rows / 2,
max_rows); the linearity lines first compare such a fit from 5,000 and 10,000 rows with a full
write at --check-n rows: Parquet's dictionary encoding switches on and off with the number of
distinct values, so the size is not exactly linear in the rows (see docs/labels.md).

    .venv/bin/python bench/label_storage.py
    .venv/bin/python bench/label_storage.py --ipc 10 --topk 1 5 --max-rows 4000
"""

from __future__ import annotations

import argparse
import time

from storage.label_sizes import (
    epoch_bytes,
    fkd_bytes,
    fkd_dense_fp16_bytes,
    parquet_epoch_bytes,
    schema_bytes,
)


def human(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1000 or unit == "TB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{b:.0f} B"
        b /= 1000
    raise AssertionError


def linearity(n: int, classes: int, fmt: str, k: int) -> tuple[int, int]:
    """(full write at n rows, line through 5,000 and 10,000 rows extrapolated to n)."""
    full = parquet_epoch_bytes(n, classes, fmt, k)  # type: ignore[arg-type]
    fit = epoch_bytes(n, classes, fmt, k, max_rows=10_000)  # type: ignore[arg-type]
    return full, fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--epochs", type=int, nargs="+", default=[300, 100, 30])
    ap.add_argument("--topk", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument("--max-rows", type=int, default=50_000)
    ap.add_argument("--check-n", type=int, default=50_000)
    ap.add_argument("--goal", type=float, default=100.0)
    args = ap.parse_args()
    c, e_ref = args.classes, max(args.epochs)
    t0 = time.time()

    print(f"linearity (one epoch, {args.check_n} rows, {c} classes): full write vs line fit")
    for fmt, k in (("fp16", 10), ("topk", 1), ("topk", 10)):
        full, fit = linearity(args.check_n, c, fmt, k)
        err = 100 * (fit / full - 1)
        print(f"  {fmt:5s} k={k:<3d} full {full} B, fit {fit} B, error {err:+.3f}%")

    formats = [("fp32", 0), ("fp16", 0)] + [("topk", k) for k in args.topk]
    print()
    print(f"| IPC | N | labels | E | bytes | vs FKD files | vs N*C*2*E | >= {args.goal:.0f}x |")
    print("|---|---|---|---|---|---|---|---|")
    for ipc in args.ipc:
        n = ipc * c
        fkd = fkd_bytes(n, c, e_ref)
        dense = fkd_dense_fp16_bytes(n, c, e_ref)
        print(
            f"| {ipc} | {n} | FKD fp16 dense + CutMix records, 1024/file | {e_ref} | "
            f"{human(fkd)} | 1.0x | {dense / fkd:.3f}x | |"
        )
        print(
            f"| {ipc} | {n} | N*C*2*E (fp16 soft labels alone) | {e_ref} | "
            f"{human(dense)} | {fkd / dense:.3f}x | 1.0x | |"
        )
        for fmt, k in formats:
            per_epoch = epoch_bytes(n, c, fmt, k or 10, args.max_rows)  # type: ignore[arg-type]
            meta = schema_bytes(fmt, c, k or 10)  # type: ignore[arg-type]
            name = f"ours {fmt}" + (f" k={k}" if fmt == "topk" else "")
            for e in args.epochs:
                ours = e * per_epoch + meta
                r_files, r_dense = fkd / ours, dense / ours
                mark = "yes" if r_dense >= args.goal else ""
                print(
                    f"| {ipc} | {n} | {name} | {e} | {human(ours)} | {r_files:.1f}x | "
                    f"{r_dense:.1f}x | {mark} |"
                )
    print(f"\n({time.time() - t0:.0f} s; FKD reference at E = {e_ref}; bytes are 10^3 multiples)")


if __name__ == "__main__":
    main()
