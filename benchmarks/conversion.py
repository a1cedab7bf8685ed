"""Conversion throughput and memory: transformers -> SEIF vs `cp` vs naive safetensors.

Each method runs in its own process under `/usr/bin/time -v` (wall time, peak RSS), on the same
synthetic sharded checkpoint, in the same run, so the table holds ratios, not absolute claims:

- `cp`: `cp -r` of the source files plus `sync` of the copies (the writer fsyncs; so must `cp`);
- naive: `safetensors.numpy.load_file` + `save_file` per shard, then fsync (what ad-hoc
  conversion scripts do; it holds a whole shard in memory);
- seif: `seif convert SRC DST` (streams tensor by tensor, hashes while writing, fsyncs).

The page cache is warm for every method (the source was just written); that favours no method.
Before every timed run, `sync` flushes what earlier steps left dirty (otherwise the kernel's
background writeback of the freshly written source lands in whichever method runs ~30 s
later), and the previous output is deleted (its page cache freed). Each method runs
`--repeats` times, in rotating order; the table gives the median.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

NAIVE = r"""
import os, sys
from pathlib import Path
from safetensors.numpy import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for f in sorted(src.iterdir()):
    if f.suffix == ".safetensors":
        save_file(load_file(str(f)), str(dst / f.name))
        fd = os.open(dst / f.name, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


@dataclass
class Measurement:
    method: str
    seconds: float
    peak_rss_mb: float
    bytes: int
    cpu_seconds: float = float("nan")   # user + system, from time(1)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9


def timed(method: str, command: list[str], nbytes: int) -> Measurement:
    """Run `command` under /usr/bin/time -v; wall time from here, peak RSS from time(1)."""
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{result.stderr[-2000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)",
                                           result.stderr))
    return Measurement(method, seconds, int(match.group(1)) / 1024 if match else float("nan"),
                       nbytes, cpu)


def source_bytes(src: Path) -> int:
    return sum(f.stat().st_size for f in src.iterdir() if f.suffix == ".safetensors")


METHODS = ("cp -r + sync", "naive load_file+save_file", "seif convert")


def bench_family(src: Path, work: Path, repeats: int = 3,
                 methods_wanted: tuple[str, ...] = METHODS) -> list[Measurement]:
    """Median of `repeats` runs per method (rotating order); the last seif output is kept
    (work/x.seif) for the expert-read measurement."""
    nbytes = source_bytes(src)
    seif_bin = str(Path(sys.executable).with_name("seif"))
    copy, naive, seif_out = work / "cp", work / "naive", work / "x.seif"
    methods = [
        ("cp -r + sync", copy, ["sh", "-c", f'cp -r "{src}" "{copy}" && sync "{copy}"/*']),
        ("naive load_file+save_file", naive, [sys.executable, "-c", NAIVE, str(src), str(naive)]),
        ("seif convert", seif_out, [seif_bin, "convert", str(src), str(seif_out)]),
    ]
    methods = [m for m in methods if m[0] in methods_wanted]
    runs: dict[str, list[Measurement]] = {name: [] for name, _, _ in methods}
    for r in range(repeats):
        k = r % len(methods)
        for name, out, command in methods[k:] + methods[:k]:
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            runs[name].append(timed(name, command, nbytes))
    shutil.rmtree(copy, ignore_errors=True)
    shutil.rmtree(naive, ignore_errors=True)
    return [Measurement(name, statistics.median(m.seconds for m in ms),
                        max(m.peak_rss_mb for m in ms), nbytes,
                        statistics.median(m.cpu_seconds for m in ms))
            for name, ms in runs.items()]


def _drop_cache(path: Path) -> None:
    """Evict the checkpoint's (clean) pages, so both reads below start cold alike: the writer's
    direct I/O leaves most of a fresh checkpoint out of the page cache, but not all of it."""
    for f in path.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_expert_read(path: Path) -> dict:
    """Bytes and time to read one expert vs every tensor of its layer, each from a cold page
    cache."""
    import seif

    _drop_cache(path)
    with seif.open(path) as ckpt:
        layer = ckpt.layers[0]
        start = time.perf_counter()
        ckpt.expert(layer.index, layer.num_experts // 2)
        one_s, one_b = time.perf_counter() - start, ckpt.bytes_read
    _drop_cache(path)
    with seif.open(path) as ckpt:
        names = [n for n in ckpt.tensor_names() if n.startswith(f"layers.{layer.index}.")]
        start = time.perf_counter()
        for name in names:
            ckpt.tensor(name)
        all_s, all_b = time.perf_counter() - start, ckpt.bytes_read
    return {"expert_bytes": one_b, "layer_bytes": all_b, "expert_s": one_s, "layer_s": all_s}


FAMILIES = ("deepseek_v3", "mixtral")


def run(size_gb: float, work: Path, keep: bool = False, repeats: int = 3,
        families_wanted: tuple[str, ...] = FAMILIES,
        methods_wanted: tuple[str, ...] = METHODS) -> dict:
    """`methods_wanted` must include cp (the baseline of the ratios) and seif convert (its
    output is what the expert-read measurement reads)."""
    from benchmarks.synthetic import write_checkpoint

    # Shapes: DeepSeek-like (E=64, k=6, H=2048, I=1408) and Mixtral-like (E=8, k=2),
    # layer count chosen to reach the requested size.
    families = {
        "deepseek_v3": dict(hidden=2048, inter=4096, moe_inter=1408, experts=64),
        "mixtral": dict(hidden=2048, inter=5632, moe_inter=5632, experts=8),
    }
    families = {k: v for k, v in families.items() if k in families_wanted}
    if size_gb < 0.1:  # smoke size: the benchmark runs, the numbers mean nothing
        families = {k: dict(v, hidden=128, inter=256, moe_inter=96) for k, v in families.items()}
    results = {}
    work.mkdir(parents=True, exist_ok=True)
    for family, dims in families.items():
        per_layer = dims["experts"] * 3 * dims["hidden"] * dims["moe_inter"] * 2
        layers = max(2, round(size_gb * 1e9 / per_layer))
        src = work / f"{family}-hf"
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(work / family, ignore_errors=True)
        write_checkpoint(src, family, layers=layers, vocab=32000 if size_gb >= 0.1 else 1000,
                         heads=16, head_dim=128, **dims)
        largest = max(dims["moe_inter"] * dims["hidden"] * 2,
                      (32000 if size_gb >= 0.1 else 1000) * dims["hidden"] * 2)
        fam_work = work / family
        fam_work.mkdir()
        measurements = bench_family(src, fam_work, repeats, methods_wanted)
        reads = bench_expert_read(fam_work / "x.seif")
        results[family] = {"layers": layers, "source_bytes": source_bytes(src),
                           "largest_tensor_bytes": largest,
                           "methods": [m.__dict__ | {"gb_per_s": m.gb_per_s}
                                       for m in measurements], "expert_read": reads}
        if not keep:
            shutil.rmtree(src)
            shutil.rmtree(fam_work)
    return results


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    for family, r in results.items():
        table = Table(title=f"{family}: {r['source_bytes'] / 1e9:.2f} GB, {r['layers']} layers; "
                            f"largest tensor {r['largest_tensor_bytes'] / 1e6:.1f} MB")
        for col in ("method", "seconds", "GB/s", "x cp throughput", "peak RSS MB", "CPU s"):
            table.add_column(col)
        base = r["methods"][0]["gb_per_s"]
        for m in r["methods"]:
            table.add_row(m["method"], f"{m['seconds']:.2f}", f"{m['gb_per_s']:.2f}",
                          f"{m['gb_per_s'] / base:.2f}", f"{m['peak_rss_mb']:.0f}",
                          f"{m.get('cpu_seconds', float('nan')):.2f}")
        console.print(table)
        e = r["expert_read"]
        console.print(f"read one expert: {e['expert_bytes'] / 1e6:.2f} MB in "
                      f"{e['expert_s'] * 1e3:.1f} ms; whole layer: {e['layer_bytes'] / 1e6:.1f} "
                      f"MB in {e['layer_s'] * 1e3:.1f} ms (bytes ratio "
                      f"{e['layer_bytes'] / e['expert_bytes']:.0f}x)")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="per family (default 2)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/seif-bench"))
    parser.add_argument("--repeats", type=int, default=3, help="runs per method (median)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        help="checkpoint shapes to run (default: both)")
    parser.add_argument("--skip-naive", action="store_true",
                        help="leave out the naive load_file+save_file method (the slowest)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    methods = tuple(m for m in METHODS if not (args.skip_naive and m.startswith("naive")))
    results = run(args.size_gb, args.work, repeats=args.repeats,
                  families_wanted=tuple(args.families), methods_wanted=methods)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
