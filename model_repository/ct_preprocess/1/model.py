"""ct_preprocess: DICOM bytes -> model input volume. Thin: the work is `preprocess.preprocess_study`.

The config's `device` parameter says where the volume is computed: "cpu" (KIND_CPU instances, the
CPU fast path, a numpy volume) or "cuda" (KIND_GPU instances, each on its own GPU; the volume stays
on that GPU and goes to Triton by DLPack, so the classifier reads it there without a host copy). A
GPU instance runs a small synthetic study through that path when it loads (`warm_up`).

A bad study (preprocess.StudyError) fails that request only, with INVALID_ARG and the preprocess
message (written for the sender, free of patient data), and is logged with that message; anything
else is INTERNAL and is logged without its message (which could quote DICOM values).

A request over the served bounds (more files than INPUT_LIMITS.max_folder_files, more bytes than
SERVING.largest_study_bytes, what /dev/shm is sized for) is refused before any copy of its files:
Triton 2.51 has no request-size limit of its own, so this is the first place one can be refused.
Each refusal is counted by its error type (settings.METRICS.refused): why studies fail, for the site.

The only request parameter is NAMES.series_parameter; a request with any other is refused
(RequestParameterError), since a misspelt name would otherwise be ignored and another series answered.
Triton's own parameters (timeout, priority, sequence_id, ...) never reach the model.
"""

import json
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

import preprocess
from contract import internal_error, metric_update
from preprocess import phantom
from preprocess.workers import instance_device, instance_threads
from settings import INPUT_LIMITS, METRICS, NAMES, SERVING


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        dims = pb_utils.get_output_config_by_name(config, NAMES.volume)["dims"]
        self.size = int(dims[-1])  # the volume is [1, 1, S, S, S]; S is written once, in the config
        parameters = config.get("parameters", {})
        device = instance_device(NAMES.preprocess, parameters.get("device", {}).get("string_value", "cpu"), args)
        self.device = None if device == "cpu" else device  # None: the CPU path, numpy volumes
        instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
        self.threads = instance_threads(NAMES.preprocess, parameters.get("threads", {}).get("string_value", "0"), instances)
        self.instance = args["model_instance_name"]
        self.logger = pb_utils.Logger
        self.preprocess_study = preprocess.preprocess_study  # loads the pipeline now, not on the first request
        # one counter per error type from the start, so a dashboard shows zeros rather than no data
        self.refusals = pb_utils.MetricFamily(METRICS.refused, "studies refused, by error type", pb_utils.MetricFamily.COUNTER)
        self.refused = {kind.__name__: self.refusals.Metric(labels={"reason": kind.__name__}) for kind in _study_error_types()}
        if self.device is not None:
            started = time.perf_counter()
            warm_up(self.device, self.size)
            self.logger.log_info(f"{NAMES.preprocess}: {self.instance} warmed up on {self.device} in {time.perf_counter() - started:.1f} s")

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        started = time.time()
        try:
            series_uid = _requested_series(request)
            files = pb_utils.get_input_tensor_by_name(request, NAMES.dicom).as_numpy().reshape(-1)
            _check_bounds(files)
            study = self.preprocess_study(
                [bytes(f) for f in files], size=self.size, mode="fast", series_uid=series_uid, device=self.device, threads=self.threads
            )
        except preprocess.StudyError as error:
            reason = type(error).__name__
            if problem := metric_update(NAMES.preprocess, lambda: self.refused[reason].increment(1)):
                self.logger.log_warn(problem)
            self.logger.log_info(f"{NAMES.preprocess}: study refused ({reason}): {error}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
        except Exception as error:  # an internal bug: report the type and where, never the message
            logged, _ = internal_error(NAMES.preprocess, error)
            self.logger.log_error(logged)
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"internal error in preprocessing ({type(error).__name__})", pb_utils.TritonError.INTERNAL)
            )
        # Which instance did the work, and when (epoch seconds): for tracing a study through the server.
        study.meta["served_by"] = {"instance": self.instance, "threads": self.threads, "started": started, "finished": time.time()}
        if self.device is None:
            volume = pb_utils.Tensor(NAMES.volume, np.ascontiguousarray(study.volume, dtype=np.float32))
        else:  # C-contiguous and computed (preprocess synchronises the stream): Triton reads it in place
            volume = pb_utils.Tensor.from_dlpack(NAMES.volume, torch.utils.dlpack.to_dlpack(study.volume))
        return pb_utils.InferenceResponse(
            output_tensors=[
                volume,
                pb_utils.Tensor(NAMES.study_uid, np.array([study.study_uid.encode()], dtype=np.object_)),
                pb_utils.Tensor(NAMES.series_uid, np.array([study.series_uid.encode()], dtype=np.object_)),
                pb_utils.Tensor(NAMES.meta, np.array([json.dumps(study.meta).encode()], dtype=np.object_)),
            ]
        )


def warm_up(device: str, size: int) -> preprocess.PreprocessedStudy:
    """One small synthetic study (16 slices of 32 x 32) through the device path as a request takes it:
    the CUDA context, cuBLAS and the kernels CUDA loads on first use are paid for at load, not by the
    first study the instance serves (the pinned host buffer is sized by the study: the first large one
    still allocates its own)."""
    files = phantom.study_files("series", slices=16, rows=32, columns=32, pixel_spacing=12.0, slice_spacing=20.0)
    return preprocess.preprocess_study(files, size=size, mode="fast", device=device)


def _study_error_types() -> list[type]:
    """preprocess.StudyError and every error type derived from it: the reasons a study is refused."""
    found, pending = [], [preprocess.StudyError]
    while pending:
        kind = pending.pop()
        found.append(kind)
        pending.extend(kind.__subclasses__())
    return found


def _requested_series(request) -> str | None:
    """The SeriesInstanceUID the caller names with the request parameter NAMES.series_parameter, or None
    (the selection rule chooses): how a study holding several patients' series is classified at all.
    Any other parameter is refused: a misspelt name must not leave the choice to the rule unnoticed."""
    parameters = json.loads(request.parameters() or "{}")
    unknown = sorted(set(parameters) - {NAMES.series_parameter})
    if unknown:
        named = ", ".join(_shown_name(name) for name in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise preprocess.RequestParameterError(
            f"unknown request parameter{'s' if len(unknown) > 1 else ''} {named}: the only parameter this service takes is "
            f"{NAMES.series_parameter}"
        )
    value = parameters.get(NAMES.series_parameter)
    if NAMES.series_parameter in parameters and (not isinstance(value, str) or not preprocess.fits_vr(value, "UI")):
        raise preprocess.RequestParameterError(
            f"the request parameter {NAMES.series_parameter} is not a SeriesInstanceUID (digits and dots, at most 64)"
        )
    return value


def _shown_name(name: str, longest: int = 64) -> str:
    """A parameter name as a message may quote it: the caller's text, cut short and made printable."""
    return "'" + preprocess.printable(name[:longest]) + ("...'" if len(name) > longest else "'")


def _check_bounds(files: np.ndarray) -> None:
    """Refuse a request larger than any study this server is sized for, before copying its files."""
    most_files, most_bytes = INPUT_LIMITS.max_folder_files, SERVING.largest_study_bytes
    if files.size > most_files:
        raise preprocess.InputTooLargeError(f"the request holds {files.size} files, more than the limit of {most_files} per study")
    total = sum(len(f) for f in files)
    if total > most_bytes:
        raise preprocess.InputTooLargeError(
            f"the request holds {total / 2**20:.0f} MiB of files, more than the limit of {most_bytes / 2**20:.0f} MiB per study"
        )
