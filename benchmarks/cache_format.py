"""Which container reads random sample ids faster: safetensors (memory-mapped) or Arrow IPC (memory-mapped)?

The teacher cache is read one training batch at a time, by sample id, in shuffled order. This script writes the
same synthetic top-k shards (uint16 ids, float16 log-probs, float16 tail) in three ways and times fetching the
arrays of random batches of sample ids:

- ``safetensors+memmap``: a safetensors file whose header we parse, then ``numpy.memmap`` views (zero copy);
- ``safetensors+get_slice``: the same file through ``safetensors.safe_open(...).get_slice`` (the library's lazy API);
- ``arrow-ipc+mmap``: an Arrow IPC file (no compression), one row per token, fixed-size-list columns, opened with
  ``pyarrow.memory_map`` (skipped when pyarrow is not importable; it is not a distil dependency).

Run: PYTHONPATH=src python benchmarks/cache_format.py [--samples 1024 --seq-len 512 --k 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file


def make_shards(root: Path, samples: int, seq_len: int, k: int, per_shard: int, vocab: int) -> list[dict]:
    rng = np.random.default_rng(0)
    shards = []
    for s0 in range(0, samples, per_shard):
        n = min(per_shard, samples - s0)
        t = n * seq_len
        ids = rng.integers(0, vocab, size=(t, k), dtype=np.uint16)
        lp = np.sort(rng.normal(-8, 3, size=(t, k)).astype(np.float16), axis=1)[:, ::-1].copy()
        tail = rng.normal(-3, 1, size=t).astype(np.float16)
        offsets = np.arange(n + 1, dtype=np.int64) * seq_len
        sample_ids = np.arange(s0, s0 + n, dtype=np.int64)
        st = root / f"shard-{s0:06d}.safetensors"
        save_file({"ids": ids, "logprobs": lp, "tail": tail, "offsets": offsets, "sample_ids": sample_ids}, str(st))
        arrow = root / f"shard-{s0:06d}.arrow"
        try:
            import pyarrow as pa
            import pyarrow.ipc as ipc

            table = pa.table(
                {
                    "ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), k),
                    "logprobs": pa.FixedSizeListArray.from_arrays(pa.array(lp.ravel()), k),
                    "tail": pa.array(tail),
                }
            )
            with ipc.new_file(str(arrow), table.schema) as w:
                w.write_table(table, max_chunksize=1 << 30)
        except ImportError:
            arrow = None
        shards.append({"st": st, "arrow": arrow, "first": s0, "n": n, "offsets": offsets})
    return shards


def open_memmap(path: Path) -> dict[str, np.ndarray]:
    dtypes = {"U16": np.uint16, "F16": np.float16, "I64": np.int64}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        out[name] = raw[b:e].view(dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def bench(shards: list[dict], batches: list[np.ndarray], per_shard: int) -> dict[str, float]:
    results = {}

    mm = [open_memmap(s["st"]) for s in shards]

    def read_memmap(batch):
        out = []
        for sid in batch:
            sh, row = divmod(int(sid), per_shard)
            a = mm[sh]
            o0, o1 = a["offsets"][row], a["offsets"][row + 1]
            out.append((np.array(a["ids"][o0:o1]), np.array(a["logprobs"][o0:o1]), np.array(a["tail"][o0:o1])))
        return out

    handles = [safe_open(str(s["st"]), framework="numpy") for s in shards]
    offs = [h.get_tensor("offsets") for h in handles]

    def read_slice(batch):
        out = []
        for sid in batch:
            sh, row = divmod(int(sid), per_shard)
            h = handles[sh]
            o0, o1 = int(offs[sh][row]), int(offs[sh][row + 1])
            out.append(tuple(h.get_slice(n)[o0:o1] for n in ("ids", "logprobs", "tail")))
        return out

    readers = {"safetensors+memmap": read_memmap, "safetensors+get_slice": read_slice}
    if shards[0]["arrow"] is not None:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        tables = [ipc.open_file(pa.memory_map(str(s["arrow"]))).read_all() for s in shards]

        def read_arrow(batch):
            out = []
            for sid in batch:
                sh, row = divmod(int(sid), per_shard)
                o0, o1 = int(shards[sh]["offsets"][row]), int(shards[sh]["offsets"][row + 1])
                t = tables[sh].slice(o0, o1 - o0)
                cols = []
                for n in ("ids", "logprobs"):
                    col = t.column(n).combine_chunks()
                    cols.append(col.values.to_numpy(zero_copy_only=False).reshape(o1 - o0, -1).copy())
                cols.append(t.column("tail").to_numpy().copy())
                out.append(tuple(cols))
            return out

        readers["arrow-ipc+mmap"] = read_arrow

    reference = read_memmap(batches[0])
    for name, fn in readers.items():
        got = fn(batches[0])
        assert all(np.array_equal(a, b) for x, y in zip(got, reference) for a, b in zip(x, y)), name
        for b in batches[:5]:
            fn(b)  # warm the page cache and any lazy state
        times = []
        for b in batches:
            t0 = time.perf_counter()
            fn(b)
            times.append(time.perf_counter() - t0)
        results[name] = statistics.median(times) * 1e3
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--per-shard", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=200)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        shards = make_shards(Path(d), args.samples, args.seq_len, args.k, args.per_shard, 49152)
        rng = np.random.default_rng(1)
        batches = [rng.choice(args.samples, size=args.batch, replace=False) for _ in range(args.batches)]
        res = bench(shards, batches, args.per_shard)
    mb = args.batch * args.seq_len * (4 * args.k + 2) / 1e6
    print(f"batch of {args.batch} samples x {args.seq_len} tokens, k={args.k} ({mb:.1f} MB of targets)")
    for name, ms in res.items():
        print(f"{name:24s} {ms:8.3f} ms/batch (median of {args.batches})")


if __name__ == "__main__":
    main()
