"""ct_explain: model input volume -> attribution map in [0, 1] and the class probabilities, in one pass.

Thin on purpose: the methods and their costs live in `explain.Explainer` (PyTorch + Captum, FP32);
this file reads the config's parameters and moves tensors between Triton and the explainer. The
weights are the ones export wrote beside this file (weights.pt, a plain state_dict loaded with
weights-only loading), checked against provenance.json's SHA-256 at load, or the model refuses to
load; the provenance is logged once and kept. On a GPU its convolutions run in IEEE FP32, not
PyTorch's default TF32: the map and the probabilities ct_triage_explain decides on are the FP32
network's, as on the CPU and as benchmarks.explain measures them.

A request the explainer cannot answer as asked (explain.ExplainError: shape, dtype, values that
are not finite or outside [-1, 1]) fails that request only, with INVALID_ARG and the explainer's one-line message; out of GPU
memory is UNAVAILABLE; anything else is INTERNAL with the exception's type only (never its message or a
traceback), logged with its type, where and message (tensors only, no DICOM values).
"""

import json
import os

import torch
import triton_python_backend_utils as pb_utils

from classifier import file_sha256
from contract import internal_error
from explain import Explainer, ExplainError
from preprocess.workers import instance_device, instance_threads
from settings import NAMES

WEIGHTS = "weights.pt"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        weights = os.path.join(folder, WEIGHTS)
        try:
            with open(os.path.join(folder, "provenance.json"), encoding="utf-8") as stream:
                self.provenance = json.load(stream)
        except FileNotFoundError:
            raise pb_utils.TritonModelException(
                f"{NAMES.explain}: no {args['model_version']}/provenance.json: run `python -m export` on this repository"
            ) from None
        if not os.path.isfile(weights) or file_sha256(weights) != self.provenance.get("weights_sha256"):
            raise pb_utils.TritonModelException(
                f"{NAMES.explain}: {WEIGHTS} is not the file export recorded in provenance.json: export again"
            )
        instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
        self.threads = instance_threads(NAMES.explain, parameters.get("threads", "0"), instances)
        torch.set_num_threads(self.threads)
        torch.backends.cudnn.allow_tf32 = False  # TF32 keeps 10 bits of mantissa: not the network the export checked
        size = int(pb_utils.get_input_config_by_name(config, NAMES.volume)["dims"][-1])  # [1, 1, S, S, S]
        try:
            self.explainer = Explainer.from_file(
                weights,
                size=size,
                device=instance_device(NAMES.explain, parameters.get("device", "cpu"), args),
                method=parameters.get("method", "gradcam"),
                steps=_integer(parameters, "steps", "16"),
                window=_integer(parameters, "window", "16"),
            )
        except ExplainError as error:  # a method, steps or window it refuses: one line, for whoever set it
            raise pb_utils.TritonModelException(f"{NAMES.explain}: {error}") from None
        pb_utils.Logger.log_info(
            f"{NAMES.explain}: {self.explainer.method} at S={size} on {self.explainer.device} ({self.threads} threads, "
            f"{'TF32' if torch.backends.cudnn.allow_tf32 else 'IEEE FP32'} convolutions), "
            f"weights {self.provenance.get('weights_sha256', '?')[:12]} of {self.provenance.get('checkpoint')} "
            f"exported {self.provenance.get('exported_at')}"
        )

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            volume = pb_utils.get_input_tensor_by_name(request, NAMES.volume).as_numpy()
            explanation = self.explainer(volume)
        except ExplainError as error:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{NAMES.explain}: {error}", pb_utils.TritonError.INVALID_ARG))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            failure = pb_utils.TritonError(f"{NAMES.explain}: out of GPU memory", pb_utils.TritonError.UNAVAILABLE)
            return pb_utils.InferenceResponse(error=failure)
        except Exception as error:  # a failure of the explainer itself: the log says what, the caller that it failed
            logged, answered = internal_error(NAMES.explain, error, with_message=True)
            pb_utils.Logger.log_error(logged)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(answered, pb_utils.TritonError.INTERNAL))
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(NAMES.attribution, explanation.attribution),
                pb_utils.Tensor(NAMES.probabilities, explanation.probabilities),
            ]
        )


def _integer(parameters: dict, key: str, default: str) -> int:
    value = parameters.get(key, default)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{NAMES.explain}: parameter {key} must be an integer, not {value!r}") from None
