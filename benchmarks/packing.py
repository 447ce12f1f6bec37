"""Packing speed, bin fill and memory: our best-fit decreasing `pack()` vs the first-fit decreasing it replaced.

N synthetic tokenized examples (default 1,000,000; lengths log-normal, mean ~270 tokens, clipped to
8..pack_length 2048, as format's cutoff leaves them (`pack()` refuses longer ones); random int32 ids and
labels, as the format stage writes them) are saved
once as an Arrow file under --work, so the run reads them memory-mapped as the train stage reads
`sft_dataset`. Each measurement runs in a fresh process: load, pack, report seconds, examples/s, bin fill,
peak RSS (VmHWM: counts the memory-mapped input pages it touched) and peak anonymous RSS (sampled every
10 ms: the memory pack() itself allocates). The old algorithm (the quadratic first fit, Python lists) is
the reference on the first --reference-n examples (default 20,000), beside the new one on the same rows.

    .venv/bin/python benchmarks/packing.py [--n 1000000] [--reference-n 20000] [--work /tmp/packing-bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

PACK_LENGTH = 2048
IGNORE_INDEX = -100


def old_pack(dataset, pack_length: int, neat: bool):
    """The pack() this benchmark replaces (qwen_pipeline 2346b56), verbatim but for the output dataset."""
    from datasets import Dataset

    lengths = [min(len(ids), pack_length) for ids in dataset["input_ids"]]
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, room in enumerate(free):
            if room >= lengths[i]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(pack_length - lengths[i])
    input_ids, labels, position_ids = [], [], []
    ids_column, labels_column = dataset["input_ids"], dataset["labels"]
    for members in bins:
        row_ids, row_labels, row_positions = [], [], []
        for i in members:
            n = lengths[i]
            row_ids += ids_column[i][:n]
            row_labels += [IGNORE_INDEX] + list(labels_column[i][1:n])
            row_positions += list(range(n)) if neat else list(range(len(row_positions), len(row_positions) + n))
        input_ids.append(row_ids)
        labels.append(row_labels)
        position_ids.append(row_positions)
    stats = {"examples": len(lengths), "bins": len(bins), "bin_fill": sum(lengths) / (len(bins) * pack_length)}
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels, "position_ids": position_ids}), stats


def make_data(path: Path, n: int, seed: int = 0) -> None:
    """n examples in an Arrow stream file of 1,000-row record batches, the layout of the format stage's
    output; written a batch at a time, once per work folder."""
    import numpy as np
    import pyarrow as pa

    if path.is_file():
        return
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(270) - 0.32, 0.8, n), 8, PACK_LENGTH).astype(np.int64)
    schema = pa.schema({"input_ids": pa.list_(pa.int32()), "labels": pa.list_(pa.int32())})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, n, 1000):
            batch = lengths[start : start + 1000]
            offsets = pa.array(np.concatenate([[0], np.cumsum(batch)]), type=pa.int32())
            ids = rng.integers(0, 151_643, int(batch.sum()), dtype=np.int32)
            labels = np.where(rng.random(len(ids)) < 0.5, IGNORE_INDEX, ids).astype(np.int32)
            columns = [pa.ListArray.from_arrays(offsets, pa.array(x)) for x in (ids, labels)]
            writer.write_batch(pa.record_batch(columns, schema=schema))
    partial.rename(path)


def measure(path: str, n: int, which: str) -> dict:
    """In this (fresh) process: load memory-mapped, pack the first n examples, report."""
    from datasets import Dataset

    from qwen_pipeline.training.packing import pack

    peak_anon = [0]

    def sample() -> None:
        while True:
            status = Path("/proc/self/status").read_text()
            peak_anon[0] = max(peak_anon[0], int(status.split("RssAnon:")[1].split()[0]))
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    dataset = Dataset.from_file(path)  # memory-mapped
    dataset = dataset.select(range(n)) if n < len(dataset) else dataset
    started = time.perf_counter()
    packed, stats = (pack if which == "new" else old_pack)(dataset, PACK_LENGTH, neat=True)
    seconds = time.perf_counter() - started
    assert len(packed) == stats["bins"]
    hwm = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0])
    return {**stats, "seconds": seconds, "peak_rss_mb": hwm / 1024, "peak_anon_mb": peak_anon[0] / 1024}


def run(path: Path, n: int, which: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", which, "--n", str(n), "--work", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--reference-n", type=int, default=20_000)
    parser.add_argument("--work", default="/tmp/packing-bench")
    parser.add_argument("--measure", choices=["new", "old"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # child process
        print(json.dumps(measure(str(Path(args.work)), args.n, args.measure)))
        return
    data = Path(args.work) / f"synthetic-{args.n}.arrow"
    started = time.perf_counter()
    make_data(data, args.n)
    print(f"data: {args.n:,} examples at {data} (made or found in {time.perf_counter() - started:.0f} s)")
    rows = [("new", args.n)]
    if args.reference_n:
        rows += [("old", args.reference_n), ("new", args.reference_n)]
    results = {}
    for which, n in rows:
        r = results[which, n] = run(data, n, which)
        print(
            f"  {which} pack, {n:>9,} examples: {r['seconds']:7.2f} s, {n / r['seconds']:>10,.0f} examples/s, "
            f"{r['bins']:,} bins, fill {r['bin_fill']:.5f}, peak RSS {r['peak_rss_mb']:,.0f} MB "
            f"(anonymous {r['peak_anon_mb']:,.0f} MB)"
        )
    if args.reference_n:
        old, new = results["old", args.reference_n], results["new", args.reference_n]
        print(
            f"  at {args.reference_n:,}: new is {old['seconds'] / new['seconds']:.1f}x faster, "
            f"fill {new['bin_fill']:.5f} vs {old['bin_fill']:.5f} ({old['bins'] - new['bins']:+d} bins fewer)"
        )


if __name__ == "__main__":
    main()
