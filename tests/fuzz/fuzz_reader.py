"""Long-run mutation fuzzer for the SEIF reader (spec §9).

Rule under test: every input either loads (validate --deep, read every tensor, run the reference
forward of every layer) or raises a SeifError subclass. Any other exception is a crash, running
past the per-input time bound is a hang, and the process runs under an address-space limit so a
claim of 2^62 elements that got allocated would surface as MemoryError (a crash).

    python tests/fuzz/fuzz_reader.py --count 1000000          # or: make fuzz N=1000000
    python tests/fuzz/fuzz_reader.py --seconds 600
    python tests/fuzz/fuzz_reader.py --make-corpus             # rewrite the seed corpus

Reproducers of crashes and hangs are written to tests/fuzz/crashes/<sha>/ (a checkpoint
directory) and the run exits with status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
CRASHES = HERE / "crashes"
INTERESTING_INTS = [0, 1, -1, 7, 8, 63, 64, 255, 256, 2**31 - 1, 2**31, 2**32, 2**40, 2**53,
                    2**62, 2**63 - 1, 2**63, 2**64, -(2**63)]


class Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise Hang()


def make_corpus() -> None:
    """A handful of small checkpoints that together use every optional feature."""
    import ml_dtypes

    import seif
    from seif.manifest import (
        Capacity,
        FFNSpec,
        LayerSpec,
        Quantization,
        RoutingSpec,
        SharedExpertsSpec,
    )
    from seif.moe import random_layer_params

    rng = np.random.default_rng(0)
    shutil.rmtree(CORPUS, ignore_errors=True)
    CORPUS.mkdir(parents=True)
    layers = {
        "topk": [LayerSpec(0, 4, 8, RoutingSpec("topk", 2, normalize="sum"),
                           FFNSpec(8, "swiglu"))],
        "group": [LayerSpec(2, 4, 8, RoutingSpec("group_topk", 2, "sigmoid", selection_bias=True,
                                                 normalize="sum", epsilon=1e-20, scale=2.0,
                                                 n_group=2, topk_group=1,
                                                 group_score="top2_sum"),
                            FFNSpec(8, "swiglu"), SharedExpertsSpec(1, FFNSpec(8, "swiglu"),
                                                                   True))],
        "capacity": [LayerSpec(1, 3, 8, RoutingSpec("topk", 1, capacity=Capacity(tokens=1)),
                               FFNSpec(8, "relu", bias=True))],
        "oai": [LayerSpec(0, 4, 8, RoutingSpec("topk", 2, "softmax_topk", router_bias=True),
                          FFNSpec(8, "swiglu_oai", bias=True))],
    }
    for name, spec in layers.items():
        tensors = {"embed.weight": rng.standard_normal((4, 8)).astype(np.float32)}
        for layer in spec:
            tensors.update(random_layer_params(layer, rng).to_tensors(layer))
        seif.save(CORPUS / f"{name}.seif", tensors, spec, max_shard_bytes=1024)
    # aliases, bf16 and an fp8-block quantized dense tensor
    w = rng.standard_normal((4, 4)).astype(np.float32)
    seif.save(CORPUS / "quant-alias.seif",
              {"a": w.astype(ml_dtypes.bfloat16), "b": w.astype(ml_dtypes.bfloat16),
               "q": w.astype(ml_dtypes.float8_e4m3fn), "q.scale": np.ones((2, 2), np.float32)},
              quantization={"q": Quantization("fp8-block", [4, 4], "q.scale", block=[2, 2])},
              dedupe=True)
    print(f"wrote {len(list(CORPUS.iterdir()))} seed checkpoints to {CORPUS}")


def exercise(path: Path) -> str:
    """Run each consumer step on its own, so a refusal by one step (say, a checksum) does not
    hide what a later step (reading unverified bytes, the forward) would do with the input."""
    import seif
    from seif.moe import moe_forward

    def read_everything() -> None:
        with seif.open(path) as ckpt:
            for name in ckpt.tensor_names():
                ckpt.tensor(name)
                ckpt.dequantized(name)
            for layer in ckpt.layers:
                x = np.ones((3, layer.hidden_size), np.float32)
                moe_forward(x, layer, ckpt.moe_params(layer.index))

    steps = (lambda: seif.validate(path), read_everything,
             lambda: seif.validate(path, deep=True))
    refused = False
    for step in steps:
        try:
            step()
        except seif.SeifError:
            refused = True
    return "refused" if refused else "ok"


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    kind = rng.randrange(7)
    if not buf:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    i = rng.randrange(len(buf))
    if kind == 0:
        buf[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        buf[i] = rng.choice([0, 0x7F, 0x80, 0xFF, ord("{"), ord('"'), ord("-"), ord("9")])
    elif kind == 2:
        del buf[i:i + rng.randrange(1, 64)]
    elif kind == 3:
        buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32)))
    elif kind == 4:  # splice a chunk of the input into another place
        j = rng.randrange(len(buf))
        buf[j:j] = buf[i:i + rng.randrange(1, 128)]
    elif kind == 5:  # replace a JSON integer with a boundary value
        numbers = [m.span() for m in re.finditer(rb"-?\d+", bytes(buf[:200_000]))]
        if numbers:
            a, b = rng.choice(numbers)
            buf[a:b] = str(rng.choice(INTERESTING_INTS)).encode()
    else:
        del buf[rng.randrange(len(buf)):]
    return bytes(buf)


def run(count: int | None, seconds: float | None, seed: int, per_input: float,
        memory_mb: int) -> int:
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, _on_alarm)
    seeds = sorted(p for p in CORPUS.iterdir() if p.is_dir())
    originals = {s: {f.name: f.read_bytes() for f in s.iterdir()} for s in seeds}
    rng = random.Random(seed)
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    stats = {"ok": 0, "refused": 0, "crash": 0, "hang": 0}
    start = time.monotonic()
    tried = 0
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        work = Path(tmp) / "x.seif"
        while (count is None or tried < count) and \
                (seconds is None or time.monotonic() - start < seconds):
            source = originals[rng.choice(seeds)]
            files = dict(source)
            for _ in range(rng.randrange(1, 4)):
                name = rng.choice(sorted(files))
                files[name] = mutate(files[name], rng)
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            for name, data in files.items():
                (work / name).write_bytes(data)
            tried += 1
            signal.setitimer(signal.ITIMER_REAL, per_input)
            try:
                outcome = exercise(work)
            except Hang:
                outcome = "hang"
            except Exception:
                outcome = "crash"
                report = traceback.format_exc()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            stats[outcome] += 1
            if outcome in ("crash", "hang"):
                digest = hashlib.sha256(b"".join(files[k] for k in sorted(files))).hexdigest()
                keep = CRASHES / digest[:16]
                if not keep.exists():
                    shutil.copytree(work, keep)
                    (keep / "REPORT.txt").write_text(report if outcome == "crash" else "hang\n")
                print(f"{outcome}: reproducer in {keep}", file=sys.stderr)
            if tried % 1000 == 0:
                print(f"{tried} inputs, {stats}", file=sys.stderr)
    elapsed = time.monotonic() - start
    print(f"fuzz_reader: {tried} inputs in {elapsed:.1f} s ({tried / max(elapsed, 1e-9):.0f}/s): "
          f"{stats['ok']} loaded, {stats['refused']} refused with SeifError, "
          f"{stats['crash']} crashes, {stats['hang']} hangs")
    return 1 if stats["crash"] or stats["hang"] else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, help="stop after this many inputs")
    parser.add_argument("--seconds", type=float, help="stop after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-input", type=float, default=5.0, help="seconds before a hang")
    parser.add_argument("--memory-mb", type=int, default=4096, help="address-space limit")
    parser.add_argument("--make-corpus", action="store_true")
    args = parser.parse_args()
    if args.make_corpus:
        make_corpus()
        return
    if args.count is None and args.seconds is None:
        args.count = 1000
    sys.exit(run(args.count, args.seconds, args.seed, args.per_input, args.memory_mb))


if __name__ == "__main__":
    main()
