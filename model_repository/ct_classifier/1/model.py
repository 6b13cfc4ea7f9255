"""ct_classifier on CPU: ONNX Runtime over the exported model.onnx, one run per dynamic batch.

Thin on purpose: the graph (network + softmax) and its parity proof come from `python -m export`;
this file only moves tensors between Triton and ONNX Runtime. Needs numpy and onnxruntime only.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_num_threads", "0"))
        options.inter_op_num_threads = int(parameters.get("inter_op_num_threads", "1"))
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests):
        """All requests of the dynamic batch in one ONNX Runtime run, split back per request."""
        volumes = [pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy() for request in requests]
        try:
            batch = volumes[0] if len(volumes) == 1 else np.concatenate(volumes, axis=0)  # no 64 MB copy for one request
            probabilities = self.session.run([self.output_name], {self.input_name: batch})[0]
        except Exception as error:  # ONNX Runtime failure: every request of the batch gets the error
            failure = pb_utils.TritonError(f"classifier failed: {error}", pb_utils.TritonError.INTERNAL)
            return [pb_utils.InferenceResponse(error=failure) for _ in requests]
        ends = np.cumsum([len(volume) for volume in volumes])[:-1]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, part)]) for part in np.split(probabilities, ends)
        ]
