"""ct_postprocess: class probabilities -> P(pathology), the decision, and the response META.

Thin: the rule is `serve.decision`. The operating point and the model provenance are config
parameters, so a site changes its threshold without re-exporting (serve/README.md).
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from serve.decision import DecisionError, decide, parse_provenance, parse_threshold, triage_meta
from settings import NAMES


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        # A missing or invalid threshold fails loading: never decide at an operating point nobody chose.
        self.threshold = parse_threshold(parameters.get("threshold", {}).get("string_value"))
        self.provenance = parse_provenance(parameters.get("provenance", {}).get("string_value", ""))

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            probabilities = pb_utils.get_input_tensor_by_name(request, NAMES.probabilities).as_numpy()
            preprocess_meta = pb_utils.get_input_tensor_by_name(request, NAMES.meta).as_numpy().reshape(-1)[0]
            decision = decide(probabilities, self.threshold)
            meta = triage_meta(preprocess_meta, decision, self.provenance)
        except DecisionError as error:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INTERNAL))
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(NAMES.probability, np.array([decision.probability], dtype=np.float32)),
                pb_utils.Tensor(NAMES.pathology, np.array([decision.pathology], dtype=np.int32)),
                pb_utils.Tensor(NAMES.meta, np.array([meta.encode()], dtype=np.object_)),
            ]
        )
