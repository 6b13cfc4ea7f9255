"""ct_classifier on CPU: classifier.OpenVINOClassifier over the exported IR (model.xml + model.bin), at the
config's `precision` (fp32, or bf16 opted in at export; the precision OpenVINO uses is logged).

Thin on purpose: the engine and its options live in `classifier`, the IR and its parity proof come
from `python -m export`; this file moves tensors between Triton and OpenVINO. The IR files must be
the ones export recorded in provenance.json (SHA-256), or the model refuses to load. Needs numpy,
openvino and the project's `classifier` and `preprocess.workers` (no PyTorch).
"""

import json
import os

import triton_python_backend_utils as pb_utils

from classifier import OpenVINOClassifier, file_sha256
from contract import ContractError, check_model_range
from preprocess.workers import instance_threads
from settings import NAMES


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(folder, "provenance.json")) as stream:
            expected = json.load(stream)["served_sha256"]
        for name in ("model.xml", "model.bin"):
            if file_sha256(os.path.join(folder, name)) != expected.get(name):
                raise pb_utils.TritonModelException(f"{name} is not the file export recorded in provenance.json: export again")
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        instances = sum(group.get("count", 1) for group in config.get("instance_group", [])) or 1
        threads = instance_threads(args["model_name"], parameters.get("threads", "0"), instances)
        size = int(config["input"][0]["dims"][-1])
        precision = parameters.get("precision", "fp32")
        try:
            self.engine = OpenVINOClassifier(os.path.join(folder, "model.xml"), size=size, threads=threads, precision=precision)
        except ValueError as error:  # a precision (or thread count) this engine does not offer
            raise pb_utils.TritonModelException(f"{args['model_name']}: {error}") from None
        pb_utils.Logger.log_info(
            f"{args['model_name']}: OpenVINO at {self.engine.precision_in_use} ({precision} asked), {threads} threads, S={size}"
        )

    def execute(self, requests):
        """The requests of a dynamic batch one after another (the engine runs volume by volume anyway:
        no 64 MB concatenation); an engine failure fails that request only."""
        responses = []
        for request in requests:
            volume = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            try:
                check_model_range(volume, self.input_name)
            except ContractError as error:
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{NAMES.classifier}: {error}", pb_utils.TritonError.INVALID_ARG))
                )
                continue
            try:
                probabilities = self.engine(volume)
            except Exception as error:  # OpenVINO failure
                failure = pb_utils.TritonError(f"classifier failed: {type(error).__name__}: {error}", pb_utils.TritonError.INTERNAL)
                responses.append(pb_utils.InferenceResponse(error=failure))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, probabilities)]))
        return responses
