"""The baseline: the research model served the obvious way, to measure Triton against.

A FastAPI + uvicorn service in one process, as the research prototype shipped it: the same network
in PyTorch FP32 eager (the weights export kept, read as export reads a checkpoint), the `reference`
preprocessing (the trained steps one by one) in the request handler, one study at a time.

    python -m benchmarks.baseline --weights REPO.artifacts/weights.pt --size 64 --port 8090

POST /classify with one study as the body (a ZIP archive, or one DICOM file) answers
{"probability_of_pathology", "pathology", "study_uid", "series_uid", "seconds"}; a study that cannot
be read is 400 with the preprocess message. GET /health answers 200 once the model is loaded.
"""

from __future__ import annotations

import argparse
import time

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import export
import preprocess
from benchmarks import option_types
from classifier import ResNet34Classifier
from contract import decide
from settings import NAMES, OPERATING_POINT


def load_classifier(weights_path: str) -> ResNet34Classifier:
    """The network with these weights; export's CheckpointError (one line) for a file that holds none."""
    return export.build_classifier(export.load_checkpoint(weights_path))


def probability(classifier: torch.nn.Module, volume) -> float:
    """P(pathology) of one model input, in PyTorch FP32 eager."""
    with torch.inference_mode():
        probabilities = torch.softmax(classifier(torch.from_numpy(volume)), dim=1)[0].numpy()
    return decide(probabilities, OPERATING_POINT.threshold).probability


def create_app(weights_path: str, size: int) -> FastAPI:
    app = FastAPI(title="chest-CT triage baseline (FastAPI + PyTorch, one study at a time)")
    classifier = load_classifier(weights_path)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ready"}

    # `async def` with blocking work inside: the event loop runs one study at a time, as the prototype did.
    @app.post("/classify")
    async def classify(request: Request):
        started = time.perf_counter()
        body = await request.body()
        try:
            study = preprocess.preprocess_study([body], size=size, mode="reference")
        except preprocess.StudyError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        p = probability(classifier, study.volume)
        return {
            "probability_of_pathology": p,
            "pathology": int(p >= OPERATING_POINT.threshold),
            "study_uid": study.study_uid,
            "series_uid": study.series_uid,
            "labels": list(NAMES.labels),
            "seconds": time.perf_counter() - started,
        }

    return app


@option_types.entry_point
def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.baseline",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--weights", required=True, metavar="FILE", help="weights.pt that export kept in <repository>.artifacts/")
    parser.add_argument(
        "--size",
        type=option_types.SIZE,
        required=True,
        metavar="S",
        help="model input S, voxels per side (the one the Triton repository serves)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the service listens on")
    parser.add_argument("--port", type=option_types.PORT, default=8090, help="HTTP port the service listens on")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.weights, args.size), host=args.host, port=args.port, log_level="warning", workers=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
