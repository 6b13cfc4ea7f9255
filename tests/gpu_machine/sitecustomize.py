"""On PYTHONPATH, makes every interpreter that starts (the server's stubs included) import like the lent
GPU machine: the project's dependencies that machine lacks, and that benchmarks/gpu_carry.sh does not
carry, refuse to import. The GPU check's smoke run uses it so that a top-level import of one of them
fails here, not on the GPU."""

import importlib.abc
import sys

LACKING = {
    "SimpleITK",  # the reference preprocessing's alone
    "openvino",  # the cpu target's engine
    "onnxconverter_common",  # the FP16 ONNX graph
    "imagecodecs",  # compressed DICOM: pydicom's own handlers decode where they can
    "pylibjpeg",
    "libjpeg",
    "openjpeg",
    "rle",
    "locust",
    "fastapi",
    "uvicorn",
}


class _Lacking(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in LACKING:
            raise ModuleNotFoundError(f"No module named {name!r} (the GPU machine has none)", name=name)


sys.meta_path.insert(0, _Lacking())
