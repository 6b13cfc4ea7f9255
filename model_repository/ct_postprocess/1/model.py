"""ct_postprocess: class probabilities -> P(pathology), the decision, and the response META.

Thin: the rule is `contract.decide`. The operating point is a config parameter, so a site changes
its threshold without re-exporting (serve/README.md); the model provenance is the provenance.json
export writes beside this file, added to every answer. Each answer is counted by decision, its
probability observed in a histogram, and the threshold in force is a gauge (settings.METRICS).
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from contract import ContractError, MetaError, decide, internal_error, metric_update, parse_provenance, parse_threshold, triage_meta
from settings import METRICS, NAMES


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        # A missing or invalid threshold fails loading: never decide at an operating point nobody chose.
        self.threshold = parse_threshold(parameters.get("threshold", {}).get("string_value"))
        path = os.path.join(args["model_repository"], args["model_version"], "provenance.json")
        try:
            with open(path, encoding="utf-8") as stream:
                self.provenance = parse_provenance(stream.read())
        except FileNotFoundError:
            # Never answer without saying which model answered: this repository was not exported yet.
            raise pb_utils.TritonModelException(
                f"{NAMES.postprocess}: no {args['model_version']}/provenance.json: run `python -m export` on this repository"
            ) from None
        # the service's metrics (settings.METRICS), held for the model's life
        family = pb_utils.MetricFamily
        self.metric_families = [
            family(METRICS.decisions, "studies answered, by decision", family.COUNTER),
            family(METRICS.probability, "P(pathology) of the studies answered", family.HISTOGRAM),
            family(METRICS.threshold, "the operating point in force: pathology when P(pathology) >= it", family.GAUGE),
        ]
        decisions, probability, threshold = self.metric_families
        self.decided = [decisions.Metric(labels={"decision": label}) for label in NAMES.labels]
        self.probabilities = probability.Metric(labels={}, buckets=list(METRICS.probability_buckets))
        self.threshold_in_force = threshold.Metric(labels={})
        self.threshold_in_force.set(self.threshold)

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            probabilities = pb_utils.get_input_tensor_by_name(request, NAMES.probabilities).as_numpy()
            preprocess_meta = pb_utils.get_input_tensor_by_name(request, NAMES.meta).as_numpy().reshape(-1)[0]
            decision = decide(probabilities, self.threshold)
            meta = triage_meta(preprocess_meta, decision, self.provenance)
        except MetaError as error:  # only a client calling this model itself sends a META not preprocess's
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{NAMES.postprocess}: {error}", pb_utils.TritonError.INVALID_ARG))
        except ContractError as error:  # a classifier output that cannot give a trustworthy decision
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INTERNAL))
        except Exception as error:  # an internal bug, as the other models answer one: the type and where, never the message
            logged, answered = internal_error(NAMES.postprocess, error)
            pb_utils.Logger.log_error(logged)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(answered, pb_utils.TritonError.INTERNAL))
        if problem := metric_update(NAMES.postprocess, lambda: self._count(decision)):
            pb_utils.Logger.log_warn(problem)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(NAMES.probability, np.array([decision.probability], dtype=np.float32)),
                pb_utils.Tensor(NAMES.pathology, np.array([decision.pathology], dtype=np.int32)),
                pb_utils.Tensor(NAMES.meta, np.array([meta.encode()], dtype=np.object_)),
            ]
        )

    def _count(self, decision):
        self.decided[decision.pathology].increment(1)
        self.probabilities.observe(decision.probability)
