"""Preprocessing speed and memory: fast vs reference on one study, decoding included; the device path.

    .venv/bin/python -m benchmarks.preprocessing [--study PATH | --real-ct] [--repeat N] [--size S] [--exact-air] [--transfer-syntax TS]
    .venv/bin/python -m benchmarks.preprocessing --device cuda [--repeat N] [--size S]

Without --study it generates the issue's default: a 300-slice 512x512 phantom (~150 MB of DICOM).
--real-ct stacks pydicom-data's real CT slice 693_UNCR.dcm (the patient's back at the edge of the
field of view, -3024 HU padding beyond it) REAL_CT_SLICES times, 5 mm apart: real padding meeting the
body, which the phantoms never have.
The two modes run interleaved, N times each, so that both see the same minutes of a shared machine.
Prints a table, then as its last line one JSON object: fast_s and reference_s (median wall seconds
per study through preprocess.preprocess_study), speedup (their ratio) and paired_speedups (one per
interleaved pair), CPU seconds and the load average, peak_mb (fast mode's peak resident memory
above the resident memory before the call, i.e. above the DICOM bytes already in memory), the same
for reference, and the raw int16 volume size the memory target is relative to.
With --device, it prints `device_report`'s JSON instead (the default study's shape, generated).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import preprocess
from benchmarks import option_types
from benchmarks.process_memory import release_freed_memory, reset_peak, status_mib
from preprocess import phantom, resample
from preprocess.dicom import parse
from preprocess.pipeline import stored_values
from preprocess.series import select_series
from preprocess.sources import expand
from preprocess.workers import worker_threads
from settings import PREPROCESSING

REAL_CT_SLICES = 20


def real_ct_series(slices: int = REAL_CT_SLICES) -> list[bytes]:
    """A series of copies of pydicom-data's real slice 693_UNCR.dcm, each its own instance, 5 mm apart."""
    import io

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    series_uid, files = generate_uid(), []
    for k in range(slices):
        ds = pydicom.dcmread(get_testdata_file("693_UNCR.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID, ds.InstanceNumber = series_uid, k + 1
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * k]
        stream = io.BytesIO()
        ds.save_as(stream, enforce_file_format=True)
        files.append(stream.getvalue())
    return files


# the issue's default study; scanner air (noisy air in the field of view, padding outside) makes the
# crop box the whole field of view, as on real scans, instead of just the body
DEFAULT_STUDY = dict(slices=300, rows=512, columns=512, pixel_spacing=0.7, slice_spacing=1.0, scanner_air=True)


def _run(files: list[bytes], mode: str, size: int) -> tuple[dict, preprocess.PreprocessedStudy]:
    release_freed_memory()
    exact = reset_peak()
    before = status_mib("VmRSS")
    start, start_cpu = time.perf_counter(), time.process_time()
    study = preprocess.preprocess_study(files, size=size, mode=mode)
    return {
        "s": time.perf_counter() - start,
        "cpu": time.process_time() - start_cpu,
        "peak": status_mib("VmHWM") - before if exact else float("nan"),
        "stages": study.meta["timings_s"],
    }, study


def measure(files: list[bytes], size: int, repeat: int) -> dict[str, dict]:
    """Both modes, interleaved (fast, reference, reference, fast, ...), so that a slower minute on a
    shared machine falls on both; each pair also gives its own speed-up."""
    for mode in preprocess.MODES:
        preprocess.preprocess_study(files, size=size, mode=mode)  # warm-up: imports, thread pools, allocator
    runs: dict[str, list[dict]] = {mode: [] for mode in preprocess.MODES}
    last: dict[str, preprocess.PreprocessedStudy] = {}  # each mode's latest output, for the comparison
    for k in range(repeat):
        for mode in preprocess.MODES if k % 2 == 0 else reversed(preprocess.MODES):
            last.pop(mode, None)  # freed before the run, so it does not count in the next peak
            run, last[mode] = _run(files, mode, size)
            runs[mode].append(run)
    result = {
        mode: {
            "median_s": statistics.median(r["s"] for r in rs),
            "cpu_s": statistics.median(r["cpu"] for r in rs),
            "peak_mb": max(r["peak"] for r in rs),
            "stages_s": {k: round(statistics.median(r["stages"][k] for r in rs), 4) for k in rs[0]["stages"]},
            "volume": last[mode].volume,
        }
        for mode, rs in runs.items()
    }
    result["original_shape"] = last["fast"].meta["original_shape"]
    result["paired_speedups"] = [ref["s"] / fast["s"] for fast, ref in zip(runs["fast"], runs["reference"])]
    return result


def device_report(device: str, *, slices: int = 300, rows: int = 512, columns: int = 512, size: int = 256, repeats: int = 5) -> dict:
    """The tensor path (`resample.on_device`) on `device` against the CPU fast path, on one
    uncompressed phantom of the default study's kind (scanner air, 0.7 mm pixels, 1 mm slices)
    generated in memory, parsed and read on the CPU as the pipeline does (slices in place).

    Times, each synchronised with the device, one warm-up then `repeats` runs (median and min):
    upload_ms (gathering the stored values into one page-locked buffer and copying them to the
    device), device_ms (everything after: crop box, filters, clamp), and the CPU fast path's
    fast_s on the same slices. Also the largest difference from the fast path and whether the crop
    box and mapping are the same, the device's peak memory during the last run (CUDA: the stored
    values and the working memory) and the float32 matmul precision (TF32 would change the results).
    No SimpleITK: this runs where only the serving dependencies are installed.
    """
    files = phantom.study_files("series", **dict(DEFAULT_STUDY, slices=slices, rows=rows, columns=columns))
    blobs, _ = expand(files)
    stack, _ = select_series(parse(blobs)[0])
    threads = worker_threads(None)
    values = stored_values(stack, blobs, in_place=True, threads=threads)
    cuda = torch.device(device).type == "cuda"

    def timed(step, *args, **kwargs):  # seconds of one call, with everything queued before and by it finished
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = step(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, result

    upload, run, fast = [], [], []
    for k in range(repeats + 1):  # the first run is the warm-up (allocators, kernels, thread pools)
        stored = volume = None  # the previous run's memory is released first
        seconds, stored = timed(resample.upload, values, device)
        upload.append(seconds)
        if cuda and k == repeats:
            torch.cuda.reset_peak_memory_stats(device)
        seconds, (volume, mapping) = timed(resample.from_stored, stored, stack, size)
        run.append(seconds)
        seconds, (expected, expected_mapping) = timed(resample.fast, values, stack, size, threads=threads)
        fast.append(seconds)

    def summary(times: list[float], scale: float) -> dict:
        return {"median": round(statistics.median(times[1:]) * scale, 3), "min": round(min(times[1:]) * scale, 3)}

    return {
        "device": str(volume.device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "CPU",
        "shape": [slices, rows, columns],
        "size": size,
        "repeats": repeats,
        "stored_dtype": str(stored.dtype).removeprefix("torch."),
        "upload_ms": summary(upload, 1e3),
        "device_ms": summary(run, 1e3),
        "fast_s": summary(fast, 1.0),
        "fast_threads": threads,
        "max_abs_diff_vs_fast": float(np.abs(volume.cpu().numpy() - expected).max()),
        "same_mapping": mapping == expected_mapping,
        "peak_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


@option_types.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.preprocessing",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    study = parser.add_mutually_exclusive_group()
    study.add_argument(
        "--study", type=option_types.study_path, metavar="PATH", help="folder, ZIP or DICOM file; omitted: a generated 300x512x512 phantom"
    )
    study.add_argument("--real-ct", action="store_true", help=f"pydicom-data's real 693_UNCR.dcm slice stacked {REAL_CT_SLICES} times")
    parser.add_argument(
        "--repeat",
        type=option_types.COUNT,
        default=3,
        metavar="N",
        help="runs of each mode, interleaved (with --device: of the device path)",
    )
    parser.add_argument("--size", type=option_types.SIZE, default=PREPROCESSING.size, metavar="S", help="output S, voxels per side")
    parser.add_argument("--exact-air", action="store_true", help="generated study: air at exactly -1000 HU, so only the body is cropped")
    parser.add_argument(
        "--transfer-syntax",
        choices=tuple(phantom.TRANSFER_SYNTAXES),
        default="explicit",
        help="generated study's transfer syntax (rle, jpeg2000: decoding included in the times)",
    )
    parser.add_argument(
        "--device",
        type=option_types.torch_device,
        help="instead: device_report on this torch device (cuda, cpu), as one JSON line; omitted: fast vs reference",
    )
    args = parser.parse_args(argv)
    if args.device:
        shape = {k: DEFAULT_STUDY[k] for k in ("slices", "rows", "columns")}
        print(json.dumps(device_report(args.device, **shape, size=args.size, repeats=args.repeat)))
        return 0
    if args.study:
        files, label = preprocess.read_study(args.study), args.study
    elif args.real_ct:
        files, label = real_ct_series(), f"pydicom-data 693_UNCR.dcm (real CT) x {REAL_CT_SLICES}, 5 mm apart"
    else:
        options = dict(DEFAULT_STUDY, scanner_air=not args.exact_air, transfer_syntax=args.transfer_syntax)
        with tempfile.TemporaryDirectory() as tmp:  # written and read back like a real folder
            folder = phantom.write_study(Path(tmp) / "study", "series", **options)
            files = preprocess.read_study(folder)
        air = "air at -1000 HU" if args.exact_air else "scanner air"
        label = f"generated phantom 300x512x512, 0.7 mm pixels, 1 mm slices, {air}, {args.transfer_syntax}"
    measured = measure(files, args.size, args.repeat)
    fast, reference = measured["fast"], measured["reference"]
    diff = np.abs(fast["volume"] - reference["volume"])
    shape = measured["original_shape"]
    raw_mb = shape[0] * shape[1] * shape[2] * 2 / 2**20
    result = {
        "study": label,
        "files": len(files),
        "dicom_mb": round(sum(len(f) for f in files) / 2**20, 1),
        "original_shape": shape,
        "size": args.size,
        "repeat": args.repeat,
        "torch_threads": torch.get_num_threads(),
        "fast_s": round(fast["median_s"], 4),
        "reference_s": round(reference["median_s"], 4),
        "speedup": round(reference["median_s"] / fast["median_s"], 1),
        "paired_speedups": [round(v, 1) for v in measured["paired_speedups"]],
        "fast_cpu_s": round(fast["cpu_s"], 4),
        "reference_cpu_s": round(reference["cpu_s"], 4),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "cpus": os.cpu_count(),
        "peak_mb": round(fast["peak_mb"], 1),
        "reference_peak_mb": round(reference["peak_mb"], 1),
        "raw_int16_mb": round(raw_mb, 1),
        "peak_over_raw": round(fast["peak_mb"] / raw_mb, 2),
        "fast_stages_s": fast["stages_s"],
        "reference_stages_s": reference["stages_s"],
        "mean_abs_diff": float(f"{diff.mean():.6f}"),
        "max_abs_diff": float(f"{diff.max():.6f}"),
        "voxels_over_0.15": int((diff > 0.15).sum()),
    }
    print(
        f"study: {label} ({result['files']} files, {result['dicom_mb']} MB), S={args.size}, "
        f"{args.repeat} runs, {result['torch_threads']} torch threads"
    )
    print(f"{'mode':<10}{'median s':>10}{'CPU s':>8}{'peak MB':>10}  stages (median s)")
    for name, m in (("fast", fast), ("reference", reference)):
        print(f"{name:<10}{m['median_s']:>10.3f}{m['cpu_s']:>8.3f}{m['peak_mb']:>10.0f}  {m['stages_s']}")
    print(
        f"load average {result['load_average']} on {result['cpus']} CPUs: wall times grow with other processes' load, CPU times much less"
    )
    print(
        f"speed-up {result['speedup']}x (ratio of medians; per interleaved pair {result['paired_speedups']}); "
        f"peak/raw int16 volume {result['peak_over_raw']}x; "
        f"fast vs reference mean |diff| {result['mean_abs_diff']}, max {result['max_abs_diff']}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
