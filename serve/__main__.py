"""`python -m serve --repository DIR`: run tritonserver in the foreground until SIGINT/SIGTERM.

The server is supervised: a Python-backend stub that dies, or a region grown past what serve.sizing
gives its model, gets its model reloaded; a server that exits or hangs (--hang-timeout without
answering a health check), or a failed reload, gets the server restarted (after 3 restarts in a row
that did not bring it up, this exits 1). Each action is a line on stderr and in the server log.

CT_TRIAGE_ADMIN_KEY, when set, restricts the model-repository, shared-memory, trace and logging APIs
to requests carrying it (serve/README.md, "Security"). It is read from the environment only: a
command-line argument would show in `ps`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from contract.arguments import integer, number, port
from serve.launcher import Installation, ServerError, TritonServer, installation_at
from settings import ADMIN, SERVING

COMMITTED_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


class _Stop(Exception):
    """Raised in the main thread by SIGINT/SIGTERM so start-up and waiting unwind to stop()."""


def _raise_stop(signum, _frame):
    raise _Stop(signal.Signals(signum).name)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, each option's default after its help."""


def parser() -> argparse.ArgumentParser:
    """The command line (the Kubernetes test reads the Deployment's container arguments with it)."""
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument(
        "--repository",
        metavar="DIR",
        default=str(COMMITTED_REPOSITORY),
        help="model repository folder (the project's model_repository/ holds models once `python -m export` has filled it)",
    )
    parser.add_argument("--http-port", type=port, default=SERVING.http_port, metavar="PORT", help="Triton's HTTP/REST port")
    parser.add_argument("--grpc-port", type=port, default=SERVING.grpc_port, metavar="PORT", help="Triton's gRPC port")
    parser.add_argument(
        "--metrics-port", type=port, default=SERVING.metrics_port, metavar="PORT", help="Triton's Prometheus metrics port (/metrics)"
    )
    parser.add_argument(
        "--log-file",
        metavar="FILE",
        help="server log; /dev/stdout in a container, for its log collector; omitted: a temporary file, its path printed",
    )
    parser.add_argument(
        "--tritonserver",
        metavar="DIR",
        help="a Triton installation to run (bin/tritonserver, backends/, lib/: /opt/tritonserver in NGC's image, whose "
        "ONNX Runtime and TensorRT backends the onnx-gpu and tensorrt targets need); omitted: the nvidia-pytriton wheel's",
    )
    parser.add_argument(
        "--log-verbose",
        type=integer(0, 2**31 - 1),
        default=0,
        metavar="LEVEL",
        help="Triton's verbose log level (0: off; 1 and up: more detail per level)",
    )
    parser.add_argument(
        "--model-config-name",
        metavar="NAME",
        help="load configs/<name>.pbtxt where a model has one (Triton's own option); omitted: each model's config.pbtxt",
    )
    parser.add_argument(
        "--startup-timeout",
        type=number(0, above_low=True),
        default=SERVING.startup_timeout_s,
        metavar="SECONDS",
        help="give up when the models are not all loaded by then, s",
    )
    parser.add_argument(
        "--hang-timeout",
        type=number(0, above_low=True),
        default=SERVING.hang_timeout_s,
        metavar="SECONDS",
        help="restart a server whose liveness check goes unanswered this long, s",
    )
    parser.add_argument(
        "--load-model",
        action="append",
        metavar="NAME",
        help="load only this model (repeatable; an ensemble brings its steps): --load-model ct_triage serves "
        "without the explanation models; omitted, or '*': every model",
    )
    return parser


def server_for(args: argparse.Namespace, admin_key: str | None, installation: Installation | None) -> TritonServer:
    """The supervised server a command line describes."""
    return TritonServer(
        args.repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_file=args.log_file,
        log_verbose=args.log_verbose,
        model_config_name=args.model_config_name,
        admin_key=admin_key,
        supervise=True,
        startup_timeout_s=args.startup_timeout,
        hang_timeout_s=args.hang_timeout,
        models=None if args.load_model in (None, ["*"]) else args.load_model,
        installation=installation,
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    admin_key = os.environ.get(ADMIN.key_env)  # set but empty: refused below, never served open by mistake
    try:
        installation = installation_at(args.tritonserver) if args.tritonserver else None
    except ServerError as error:
        print(f"error: --tritonserver: {error}", file=sys.stderr)
        return 2
    try:
        server = server_for(args, admin_key, installation)
    except ValueError as error:
        print(f"error: {ADMIN.key_env}: {error}", file=sys.stderr)
        return 2
    access = f"restricted to holders of {ADMIN.key_env}" if admin_key is not None else f"open to every client ({ADMIN.key_env} not set)"
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        server.start()
        print(
            f"tritonserver ready: http {server.http_url}  grpc {server.grpc_url}  metrics {server.metrics_url}\n"
            f"{', '.join(ADMIN.restricted_apis)} APIs: {access}\n"
            f"log: {server.log_file}\nstop with Ctrl-C or SIGTERM",
            flush=True,
        )
        while server.serving():
            time.sleep(0.5)
        print(f"tritonserver could not be kept running:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except _Stop as stop:
        print(f"{stop}: stopping tritonserver", flush=True)
        return 0
    except ServerError as error:
        log = f"\nlog: {server.log_file}" if server.log_file and Path(server.log_file).exists() else ""  # none before Triton ran
        print(f"error: {error}{log}", file=sys.stderr)
        return 2
    finally:
        # A second signal must not interrupt the clean-up (stop() itself is bounded in time).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
