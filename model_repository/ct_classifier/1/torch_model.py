"""ct_classifier on a GPU (the torch-gpu config): classifier.TorchClassifier over 1/model.pt, one run per dynamic batch.

Thin on purpose: the engine and its precision choices live in `classifier`, its parity proof in `export`; this file
moves tensors between Triton and PyTorch. The weights must be the ones export recorded in
1/provenance.json (SHA-256), or the model refuses to load. A KIND_CPU instance runs on the CPU
(tests on machines without a GPU, at FP32).
"""

import json
import os

import numpy as np
import torch
import torch.utils.dlpack
import triton_python_backend_utils as pb_utils

from classifier import TorchClassifier, file_sha256
from contract import ContractError, check_model_range
from settings import NAMES


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        weights = os.path.join(folder, "model.pt")
        with open(os.path.join(folder, "provenance.json")) as stream:
            expected = json.load(stream)["served_sha256"]["model.pt"]
        if file_sha256(weights) != expected:
            raise pb_utils.TritonModelException(f"{weights} is not the file export recorded in provenance.json: export again")
        gpu = args["model_instance_kind"] == "GPU"
        if gpu and not torch.cuda.is_available():
            raise pb_utils.TritonModelException("KIND_GPU instance but this PyTorch sees no CUDA device")
        self.engine = TorchClassifier.from_file(
            weights,
            device=f"cuda:{args['model_instance_device_id']}" if gpu else "cpu",
            precision=parameters.get("precision", "fp16"),
            channels_last=parameters.get("channels_last", "yes") == "yes",
            cudnn_benchmark=parameters.get("cudnn_benchmark", "yes") == "yes",
        )
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests):
        """The requests of the dynamic batch whose volumes are model inputs in one forward pass, split
        back per request; the others fail alone."""
        responses = [None] * len(requests)
        volumes = {}
        for index, request in enumerate(requests):
            volume = _as_torch(pb_utils.get_input_tensor_by_name(request, self.input_name))
            try:
                check_model_range(volume, self.input_name)
                volumes[index] = volume
            except ContractError as error:
                responses[index] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{NAMES.classifier}: {error}", pb_utils.TritonError.INVALID_ARG)
                )
        for index, response in zip(volumes, self._run(list(volumes.values()))):
            responses[index] = response
        return responses

    def _run(self, volumes):
        if not volumes:
            return []
        try:
            batch = volumes[0] if len(volumes) == 1 else torch.cat([v.to(self.engine.device) for v in volumes])
            probabilities = self.engine(batch).cpu().numpy()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            failure = pb_utils.TritonError(
                f"classifier out of GPU memory at batch {len(volumes)}: lower max_batch_size", pb_utils.TritonError.UNAVAILABLE
            )
            return [pb_utils.InferenceResponse(error=failure) for _ in volumes]
        except Exception as error:  # every request of the batch gets the error
            failure = pb_utils.TritonError(f"classifier failed: {type(error).__name__}: {error}", pb_utils.TritonError.INTERNAL)
            return [pb_utils.InferenceResponse(error=failure) for _ in volumes]
        ends = np.cumsum([len(volume) for volume in volumes])[:-1]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, part)]) for part in np.split(probabilities, ends)
        ]


def _as_torch(tensor):
    """A Triton input as a torch tensor where it lies: GPU inputs through DLPack (no copy)."""
    if tensor.is_cpu():
        return torch.from_numpy(tensor.as_numpy())
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
