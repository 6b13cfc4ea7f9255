"""Compressed studies: the pydicom decoding path (pydicom + pylibjpeg) against imagecodecs on every core.

    .venv/bin/python -m benchmarks.decoding [--repeat N] [--size S] [--encodings jpeg2000,jpegls,rle,jpeg] [--out benchmarks/results]

Generates the issue's default study (`benchmarks.preprocessing.DEFAULT_STUDY`: 300 slices of 512x512,
scanner air, signed 16-bit stored values) uncompressed and as lossless copies: JPEG 2000
(pylibjpeg-openjpeg's encoder, as `phantom` writes it), RLE (pydicom's encoder), JPEG-LS (CharLS) and
JPEG lossless process 14 SV1 (libjpeg-turbo), both through imagecodecs. HTJ2K is not among them: no
encoder for it is installed (OpenJPEG 2.5 decodes HTJ2K but does not encode it).

For each copy, `preprocess.preprocess_study` in fast mode (decoding included, worker threads =
the CPUs this process may use, as served) with `preprocess.dicom.DECODER = "pydicom"` (the same
thread pool, but its decoders hold the GIL) and with "imagecodecs" (the default), interleaved
(pydicom, imagecodecs, imagecodecs, pydicom, ...), N times each, after one warm-up of each; the
uncompressed study is timed alongside for reference. Per path: median wall s, median CPU s and the
median "decode" stage from the study's META; per copy: the ratio of the medians and of each
interleaved pair (the shared 2-core VM drifts by ~1.5x over minutes, so only ratios are compared).
Exactness: every slice's HU (stored value x slope + intercept) from each path against the
uncompressed study's, max |difference| (must be 0), the frames each decoder handled, and the
largest difference between the output volumes. Also the GIL check of each JPEG 2000 decoder: the
rate at which another Python thread counts while it decodes, over the rate while sleeping.

Writes decoding-cpu.json and decoding-cpu.md to --out, prints a table and the JSON's path.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1, JPEGLSLossless

import preprocess
from benchmarks import option_types
from benchmarks.load import write_results
from benchmarks.preprocessing import DEFAULT_STUDY
from preprocess import dicom, phantom
from preprocess.dicom import decode_into, parse, volume_dtype
from preprocess.series import select_series
from preprocess.sources import expand
from preprocess.workers import worker_threads
from settings import PREPROCESSING

ENCODINGS = {"jpeg2000": "JPEG 2000 lossless", "jpegls": "JPEG-LS lossless", "rle": "RLE lossless", "jpeg": "JPEG lossless SV1"}
TARGET = 0.6  # JPEG 2000, fast mode, decode included: imagecodecs / pydicom median
FREE = 1.5  # parallelism probe after a pair at or above which the pair counts as run with the cores free


class decoder:
    """Select `preprocess.dicom.DECODER` for a block: the benchmark's way to time the pydicom path."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.saved, dicom.DECODER = dicom.DECODER, self.name

    def __exit__(self, *exc):
        dicom.DECODER = self.saved


def recoded(data: bytes, syntax: str) -> bytes:
    """An uncompressed slice compressed by imagecodecs (JPEG-LS: CharLS, 16-bit precision from the
    uint16 bytes; JPEG lossless: libjpeg-turbo, first-order prediction, BitsStored precision)."""
    import imagecodecs

    ds = pydicom.dcmread(io.BytesIO(data))
    raw = np.frombuffer(ds.PixelData, np.uint16).reshape(ds.Rows, ds.Columns)  # the stored bits
    if syntax == JPEGLSLossless:
        frame = imagecodecs.jpegls_encode(raw)
    else:
        frame = imagecodecs.jpeg8_encode(raw & np.uint16(2**ds.BitsStored - 1), lossless=True, predictor=1, bitspersample=ds.BitsStored)
    ds.PixelData = encapsulate([bytes(frame)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def studies(encodings: list[str], slices: int = DEFAULT_STUDY["slices"]) -> dict[str, list[bytes]]:
    """The default study uncompressed and in each encoding, written and read back as a folder."""
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["explicit", *(e for e in encodings if e in ("jpeg2000", "rle"))]:
            start = time.perf_counter()
            folder = phantom.write_study(Path(tmp) / name, "series", **dict(DEFAULT_STUDY, slices=slices, transfer_syntax=name))
            result[name] = preprocess.read_study(folder)
            print(f"{name}: {len(result[name])} files written and read in {time.perf_counter() - start:.1f} s", flush=True)
    for name, syntax in (("jpegls", JPEGLSLossless), ("jpeg", JPEGLosslessSV1)):
        if name in encodings:
            result[name] = [recoded(data, syntax) for data in result["explicit"]]
    return result


def stored_hu(files: list[bytes], threads: int) -> tuple[np.ndarray, dict[str, int]]:
    """The chosen series' HU per slice (stored values decoded into one array, slope and intercept),
    and the frames each decoder handled."""
    blobs, _ = expand(files)
    stack, _ = select_series(parse(blobs)[0])
    out = np.empty((len(stack.frames), stack.frames[0].rows, stack.frames[0].columns), volume_dtype(stack.frames))
    counts = decode_into(out, stack.frames, blobs, threads=threads)
    slopes = np.array([f.slope for f in stack.frames])[:, None, None]
    intercepts = np.array([f.intercept for f in stack.frames])[:, None, None]
    return out * slopes + intercepts, counts


def timed(files: list[bytes], size: int) -> tuple[dict, np.ndarray]:
    start, cpu = time.perf_counter(), time.process_time()
    study = preprocess.preprocess_study(files, size=size, mode="fast")
    return {"s": time.perf_counter() - start, "cpu": time.process_time() - cpu, "decode": study.meta["timings_s"]["decode"]}, study.volume


def parallelism(threads: int) -> float:
    """How much faster `threads` threads run GIL-free C work (numpy heapsorts) than one thread, now:
    ~`threads` on idle cores; ~1 when other processes keep the other cores busy."""
    from concurrent.futures import ThreadPoolExecutor

    arrays = [np.random.default_rng(k).random(1_000_000) for k in range(4 * threads)]

    def work(a):
        return np.sort(a, kind="heapsort")[0]

    start = time.perf_counter()
    for a in arrays:
        work(a)
    one = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, arrays))
    return round(one / (time.perf_counter() - start), 2)


def gil_check(seconds_each: int = 3) -> dict[str, float]:
    """Counting rate of another Python thread while each JPEG 2000 decoder decodes a 1024x1024
    slice, over its rate while sleeping as long (best of 3): ~0 for a decoder that holds the GIL."""
    import imagecodecs
    from pylibjpeg.utils import get_pixel_data_decoders

    image = np.random.default_rng(0).integers(0, 4096, (1024, 1024)).astype(np.uint16)
    codestream = imagecodecs.jpeg2k_encode(image, level=0, codecformat="j2k", reversible=True, numthreads=1)
    openjpeg = next(iter(get_pixel_data_decoders(version=2)[pydicom.uid.JPEG2000Lossless].values()))
    decoders = {
        "pylibjpeg-openjpeg": lambda: openjpeg(codestream, version=2),
        "imagecodecs": lambda: imagecodecs.jpeg2k_decode(codestream, numthreads=1),
    }
    count, stop = [0], threading.Event()

    def counter():
        while not stop.is_set():
            count[0] += 1

    worker = threading.Thread(target=counter)
    worker.start()
    result = {}
    try:
        for name, decode in decoders.items():
            ratios = []
            for _ in range(seconds_each):
                before, start = count[0], time.perf_counter()
                decode()
                during, seconds = count[0] - before, time.perf_counter() - start
                before = count[0]
                time.sleep(seconds)
                ratios.append(during / max(1, count[0] - before))
            result[name] = round(max(ratios), 3)
    finally:
        stop.set()
        worker.join()
    return result


def measure(files: dict[str, list[bytes]], encodings: list[str], size: int, repeat: int) -> dict:
    threads = worker_threads(None)
    probes = [parallelism(threads)]
    reference_hu, _ = stored_hu(files["explicit"], threads)
    results: dict[str, dict] = {}
    _, plain_volume = timed(files["explicit"], size)  # warm-up
    plain_runs = []
    for name in encodings:
        paths: dict[str, list[dict]] = {"pydicom": [], "imagecodecs": []}
        pair_probes = []
        exact = {}
        for path in paths:
            with decoder(path):
                hu, counts = stored_hu(files[name], threads)
                _, volume = timed(files[name], size)  # warm-up
            exact[path] = {
                "max_abs_hu_diff": float(np.abs(hu - reference_hu).max()),
                "frames_by_decoder": counts,
                "max_abs_volume_diff": float(np.abs(volume - plain_volume).max()),
            }
        for k in range(repeat):
            for path in ("pydicom", "imagecodecs") if k % 2 == 0 else ("imagecodecs", "pydicom"):
                with decoder(path):
                    paths[path].append(timed(files[name], size)[0])
            plain_runs.append(timed(files["explicit"], size)[0])
            probes.append(parallelism(threads))
            pair_probes.append(probes[-1])
            print(
                f"{name} run {k + 1}: "
                + ", ".join(f"{p} {runs[-1]['s']:.2f} s" for p, runs in paths.items())
                + f"; parallelism {probes[-1]}",
                flush=True,
            )
        summary = {
            path: {
                "median_s": round(statistics.median(r["s"] for r in runs), 3),
                "cpu_s": round(statistics.median(r["cpu"] for r in runs), 3),
                "decode_s": round(statistics.median(r["decode"] for r in runs), 3),
                "runs_s": [round(r["s"], 3) for r in runs],
                **exact[path],
            }
            for path, runs in paths.items()
        }
        pydicom_s, imagecodecs_s = summary["pydicom"]["median_s"], summary["imagecodecs"]["median_s"]
        for path in summary.values():  # CPU s per wall s: how many cores the run actually got
            path["cores"] = round(path["cpu_s"] / path["median_s"], 2)
        results[name] = {
            "encoding": ENCODINGS[name],
            "dicom_mb": round(sum(len(f) for f in files[name]) / 2**20, 1),
            "pydicom": summary["pydicom"],
            "imagecodecs": summary["imagecodecs"],
            "imagecodecs_over_pydicom": round(imagecodecs_s / pydicom_s, 3),
            "paired_imagecodecs_over_pydicom": [round(c["s"] / p["s"], 3) for c, p in zip(paths["imagecodecs"], paths["pydicom"])],
            "paired_parallelism": pair_probes,
        }
        free = [r for r, probe in zip(results[name]["paired_imagecodecs_over_pydicom"], pair_probes) if probe >= FREE]
        results[name]["imagecodecs_over_pydicom_free_cores"] = round(statistics.median(free), 3) if free else None
    uncompressed = {
        "dicom_mb": round(sum(len(f) for f in files["explicit"]) / 2**20, 1),
        "median_s": round(statistics.median(r["s"] for r in plain_runs), 3),
        "cpu_s": round(statistics.median(r["cpu"] for r in plain_runs), 3),
        "runs": len(plain_runs),
    }
    return {"threads": threads, "parallelism_probes": probes, "uncompressed": uncompressed, "encodings": results}


def markdown(result: dict) -> str:
    r = result
    lines = [
        "# Compressed studies: decoding on every core (`benchmarks/decoding.py`)",
        "",
        f"`{r['command']}`, one run on {r['date']}: {r['machine']}, "
        f"load average {r['load_average_before']} before and {r['load_average_after']} after (a shared machine), "
        f"{r['threads']} worker threads, imagecodecs {r['versions']['imagecodecs']}, pydicom {r['versions']['pydicom']}.",
        "",
        f'Study: {r["study"]}; S={r["size"]}, fast mode, decode included. pydicom: `preprocess.dicom.DECODER = "pydicom"` '
        "(pydicom + pylibjpeg on the same worker threads); imagecodecs: the default. "
        f"Interleaved, {r['repeat']} runs of each after a warm-up; medians.",
        "",
        "| encoding | DICOM MB | pydicom wall s | pydicom CPU s | pydicom decode s | imagecodecs wall s | imagecodecs CPU s "
        "| imagecodecs decode s | imagecodecs cores | imagecodecs / pydicom | per pair "
        "| max \\|HU diff\\| pydicom / imagecodecs | frames by imagecodecs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in r["encodings"].values():
        by_pydicom, by_codecs = e["pydicom"], e["imagecodecs"]
        lines.append(
            f"| {e['encoding']} | {e['dicom_mb']} | {by_pydicom['median_s']} | {by_pydicom['cpu_s']} | {by_pydicom['decode_s']} | "
            f"{by_codecs['median_s']} | {by_codecs['cpu_s']} | {by_codecs['decode_s']} | {by_codecs['cores']} | "
            f"**{e['imagecodecs_over_pydicom']}** | "
            f"{', '.join(map(str, e['paired_imagecodecs_over_pydicom']))} | "
            f"{by_pydicom['max_abs_hu_diff']:g} / {by_codecs['max_abs_hu_diff']:g} | {by_codecs['frames_by_decoder']['imagecodecs']} |"
        )
    u = r["uncompressed"]
    lines += [
        f"| uncompressed (reference) | {u['dicom_mb']} | | | | {u['median_s']} | {u['cpu_s']} | | | | | 0 | |",
        "",
        f"Target: JPEG 2000, imagecodecs <= {TARGET} x pydicom: **{r['target']}**.",
        "",
        f"Pairs whose parallelism probe (taken right after the pair) was >= {FREE}, i.e. run while the other core was free, "
        "median imagecodecs / pydicom: "
        + ", ".join(
            f"{e['encoding']} {e['imagecodecs_over_pydicom_free_cores']} ({sum(probe >= FREE for probe in e['paired_parallelism'])} pairs)"
            for e in r["encodings"].values()
        )
        + ".",
        "",
        "imagecodecs cores: its CPU s per wall s (the pydicom path's stays near 1: its decoders hold the GIL). "
        f"Parallelism probes (GIL-free numpy work, {r['threads']} threads over 1, at the start and after each interleaved pair; "
        f"~{r['threads']} on idle cores, ~1 when other processes hold the other cores): {r['parallelism_probes']}.",
        "",
        "GIL check (another Python thread's counting rate while a 1024x1024 JPEG 2000 slice decodes, over its rate while "
        f"sleeping as long; ~0 = the decoder holds the GIL): {r['gil_check']}.",
        "",
        "Output volumes against the uncompressed study's, max |diff|: "
        + ", ".join(
            f"{e['encoding']} {e['pydicom']['max_abs_volume_diff']:g} / {e['imagecodecs']['max_abs_volume_diff']:g}"
            for e in r["encodings"].values()
        )
        + " (pydicom / imagecodecs).",
        "",
    ]
    return "\n".join(lines)


@option_types.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.decoding",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--repeat", type=option_types.COUNT, default=3, metavar="N", help="timed runs of each decoding path per copy (after one warm-up)"
    )
    parser.add_argument(
        "--size",
        type=option_types.SIZE,
        default=PREPROCESSING.size,
        metavar="S",
        help="model input S the studies are preprocessed to, voxels per side",
    )
    parser.add_argument("--encodings", default=",".join(ENCODINGS), metavar="LIST", help=f"comma-separated, of {', '.join(ENCODINGS)}")
    parser.add_argument(
        "--out", type=option_types.out_folder, default="benchmarks/results", metavar="DIR", help="folder for decoding-cpu.json and .md"
    )
    parser.add_argument(
        "--slices",
        type=option_types.SLICES,
        default=DEFAULT_STUDY["slices"],
        metavar="N",
        help="slices of the 512x512 study; fewer for a quick check",
    )
    args = parser.parse_args(argv)
    encodings = [e for e in args.encodings.split(",") if e]
    if not encodings:
        parser.error("--encodings names no encoding")
    if unknown := set(encodings) - set(ENCODINGS):
        parser.error(f"unknown encodings {sorted(unknown)}")
    if dicom.imagecodecs is None:
        parser.error("imagecodecs is not installed: there is nothing to compare the pydicom path with")
    load_before = [round(v, 2) for v in os.getloadavg()]
    files = studies(encodings, args.slices)
    measured = measure(files, encodings, args.size, args.repeat)
    import imagecodecs

    result = {
        "command": option_types.command_line(parser, argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "study": f"generated phantom {args.slices}x512x512, 0.7 mm pixels, 1 mm slices, scanner air, signed 16-bit stored values",
        "size": args.size,
        "repeat": args.repeat,
        **measured,
        "gil_check": gil_check(),
        "load_average_before": load_before,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "versions": {"imagecodecs": imagecodecs.__version__, "pydicom": pydicom.__version__, "numpy": np.__version__},
    }
    if "jpeg2000" in measured["encodings"]:
        j2k = measured["encodings"]["jpeg2000"]
        ratio, free = j2k["imagecodecs_over_pydicom"], j2k["imagecodecs_over_pydicom_free_cores"]
        result["target"] = f"{'met' if ratio <= TARGET else 'not met'} ({ratio} x, all pairs)"
        if free is not None:
            pairs = sum(probe >= FREE for probe in j2k["paired_parallelism"])
            result["target"] += f"; {'met' if free <= TARGET else 'not met'} ({free} x) over the {pairs} pairs run with the cores free"
    else:
        result["target"] = "not measured (no jpeg2000 copy)"
    out = args.out
    text = markdown(result)
    write_results(out, "decoding-cpu", result, text)
    print(text)
    ratios = {name: e["imagecodecs_over_pydicom"] for name, e in result["encodings"].items()}
    print(json.dumps({"target": result["target"], "imagecodecs_over_pydicom": ratios, "results": str(out / "decoding-cpu.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
