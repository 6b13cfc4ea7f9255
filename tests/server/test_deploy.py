"""The files a platform team deploys with, checked without Docker or a GPU: the compose file against
the Compose specification's schema and against what the project really has (export's options,
targets, the server's flags, the sizing formula), the image's Dockerfile, Prometheus' config, the
sizing formula against a measured run, and deploy/verify.sh against the real (CPU) server."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import check_jsonschema
import jsonschema
import pytest
import yaml
from helpers import ROOT, answering, discard, served_configs

import client
import export
import serve.__main__ as serve_cli
from export.__main__ import _parser as export_parser
from preprocess import phantom
from serve import sizing, start_on_free_ports
from settings import ADMIN, EXPORT_TARGETS, METRICS, OPERATING_POINT, SERVING

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE_SCHEMA = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
MIB = 1024**2


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    return {key: value for key, value in pairs}


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message}, with values as the .env file."""

    def one(match: re.Match) -> str:
        name, operator, rest = match.group(1), match.group(2), match.group(3)
        if values.get(name):
            return values[name]
        if operator == ":?":
            raise KeyError(f"{name} is required: {rest}")
        return rest or ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, text)


@pytest.fixture(scope="module")
def compose() -> dict:
    values = {**env_example(), "CHECKPOINT_FILE": "fold0.ckpt", "CT_TRIAGE_ADMIN_KEY": "test-key"}
    return yaml.safe_load(interpolate(COMPOSE.read_text(), values))


def _flags(command: list[str]) -> dict[str, list[str]]:
    flags: dict[str, list[str]] = {}
    for item in command:
        if item.startswith("--"):
            key, _, value = item.partition("=")
            flags.setdefault(key, []).append(value)
    return flags


def test_the_compose_file_follows_the_compose_specification(compose):
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.validate(yaml.safe_load(COMPOSE.read_text()), schema)  # as written, variables and all
    jsonschema.validate(compose, schema)  # as docker compose sees it with .env.example's values
    assert sorted(compose["services"]) == ["export", "locust", "prometheus", "triton"]
    assert compose["services"]["locust"]["profiles"] == ["load"] and compose["services"]["locust"]["build"]["target"] == "load"
    assert compose["services"]["triton"]["build"]["target"] == compose["services"]["export"]["build"]["target"] == "serving"


def test_every_knob_is_in_env_example_and_every_env_example_key_is_used():
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    assert used == set(env_example()), used ^ set(env_example())
    with pytest.raises(KeyError, match="CT_TRIAGE_ADMIN_KEY is required"):  # no default key, ever
        interpolate(COMPOSE.read_text(), {**env_example(), "CHECKPOINT_FILE": "x"})


def test_triton_reserves_the_gpu_and_serves_what_export_writes(compose):
    services = compose["services"]
    triton, job = services["triton"], services["export"]
    for service in (triton, job):
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    assert triton["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert job["restart"] == "no" and triton["restart"] == "unless-stopped"
    options = export_parser().parse_args(job["command"][3:])  # python3 -m export ... as the export CLI parses it
    assert options.target in export.TARGETS and options.checkpoint == "/checkpoints/fold0.ckpt"
    # the supervised launcher on the image's Triton, as serve's CLI parses it (serve/README.md says what it passes)
    assert triton["command"][:3] == ["python3", "-m", "serve"]
    served = serve_cli.parser().parse_args(triton["command"][3:])
    assert served.repository == options.out and f"{options.out}:" not in str(triton["volumes"])
    assert served.tritonserver == "/opt/tritonserver" and served.log_file == "/dev/stdout" and served.load_model == ["*"]
    assert served.startup_timeout > SERVING.startup_timeout_s  # a GPU warm-up takes minutes
    assert "models:/models:ro" in triton["volumes"] and "models:/models" in job["volumes"]
    assert options.artifacts.startswith("/models/") and options.out.startswith("/models/")
    assert triton["environment"][ADMIN.key_env] == "test-key"  # from .env; the launcher keeps it from the models
    assert not any("test-key" in argument for argument in triton["command"])
    assert triton["init"] is True  # reaps what the launcher's restarts leave orphaned
    ports = {port.rsplit(":", 1)[1]: port for port in triton["ports"]}  # by the container's port
    assert set(ports) == {str(SERVING.http_port), str(SERVING.grpc_port), str(SERVING.metrics_port)}
    assert ports[str(SERVING.metrics_port)].startswith("127.0.0.1:")  # metrics: the host's loopback only
    assert compose["services"]["prometheus"]["ports"][0].startswith("127.0.0.1:")  # no authentication
    assert triton["read_only"] is True and triton["cap_drop"] == ["ALL"] and triton["environment"]["HOME"] == "/tmp"
    assert "/v2/models/ct_triage/ready" in " ".join(triton["healthcheck"]["test"])  # as the Kubernetes readiness probe


def exported(compose) -> tuple[argparse.Namespace, sizing.Deployment]:
    """The compose file's export, as its CLI parses it, and the deployment serve.sizing sizes for it."""
    job = export_parser().parse_args(compose["services"]["export"]["command"][3:])
    deployment = sizing.Deployment(
        size=job.size,
        preprocess_instances=job.preprocess_instances,
        max_batch_size=job.max_batch_size,
        classifier_python_instances=1 if job.target in EXPORT_TARGETS.python_backend else 0,
        preprocess_on_gpu=job.preprocess_device == "cuda",
    )
    return job, deployment


def test_shared_memory_follows_the_sizing_formula(compose):
    _, deployment = exported(compose)
    assert compose["services"]["triton"]["shm_size"] == f"{sizing.mib(sizing.shm_bytes(deployment))}m"


def test_the_launcher_gives_triton_the_cuda_pool_the_sizing_formula_gives(compose, tmp_path):
    job, deployment = exported(compose)
    served = serve_cli.parser().parse_args(compose["services"]["triton"]["command"][3:])
    served.repository = str(served_configs(tmp_path / "repository", job.preprocess_device, job.preprocess_instances))
    served.model_config_name = job.target  # the committed layout of the configs export renders for that target
    server = serve_cli.server_for(served, None, None)
    assert server.models is None  # --load-model=*: every model
    launched = server.command(tmp_path)
    assert f"--cuda-memory-pool-byte-size=0:{sizing.cuda_pool_bytes(deployment)}" in launched


def test_the_image_is_the_ngc_release_with_the_project_installed_and_runs_as_its_user():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, re.M)
    assert stages == [("scratch", "source"), ("python:3.11-slim", "load"), ("nvcr.io/nvidia/tritonserver:24.10-py3", "serving")]
    source = text[text.index("AS source") : text.index("AS load")]
    copied = set(re.findall(r"^COPY (\w+) \1$", source, re.M))
    for path in [*re.findall(r"^COPY (\S+)", source, re.M), "pyproject.toml", "README.md"]:
        assert (ROOT / path).exists(), path
    packages = {p.rstrip("*") for p in re.findall(r'"(\w+)\*"', (ROOT / "pyproject.toml").read_text())}
    assert packages | {"model_repository", "deploy"} <= copied, packages - copied
    serving = text[text.index("AS serving") :]  # the last stage: what `docker build` gives by default
    assert "COPY --from=source /opt/ct-triage /opt/ct-triage" in serving and "pip install -e ." in serving
    for stage in text.split("\nFROM ")[2:]:  # the two images
        users = re.findall(r"^USER (\S+)", stage, re.M)
        assert users and users[-1] not in ("root", "0"), stage.splitlines()[0]


def test_prometheus_scrapes_triton_metrics_and_loads_the_alerts(compose):
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"triton:{SERVING.metrics_port}"]
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"] and "./deploy/prometheus-rules.yml:/etc/prometheus/rules.yml:ro" in volumes


def _selectors(node) -> list:
    """The vector selectors of a parsed PromQL expression (promql_parser's tree)."""
    if type(node).__name__ == "VectorSelector":
        return [node]
    children = [getattr(node, name, None) for name in ("lhs", "rhs", "expr", "param", "vector_selector")]
    children += getattr(node, "args", None) or []
    nodes = [child for child in children if type(child).__module__ == "promql_parser"]  # not literals' values, not None
    return [selector for child in nodes for selector in _selectors(child)]


def _promql_in_deploy() -> dict[str, str]:
    """Every PromQL expression a site is given: the alerts, and the dashboard queries of deploy/README's "Metrics" table."""
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus-rules.yml").read_text())
    found = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}
    metrics = (ROOT / "deploy" / "README.md").read_text().split("### Metrics", 1)[1].split("\n### ", 1)[0]
    for panel, query in re.findall(r"^\| ([^|`]+) \| `([^`]+)`[^|`]* \|$", metrics, flags=re.MULTILINE):
        found[panel.strip()] = query
    return found


def test_every_promql_expression_parses_and_selects_series_the_server_exports(triton_server):
    """A typo in a metric, a label or a label value would leave a dashboard empty or an alert silent,
    with no error anywhere: each selector must match a series of the running server. `up` and `job`
    are Prometheus's own; nv_gpu_* exist only on a GPU server."""
    import promql_parser

    from serve.metrics import scrape

    groups = yaml.safe_load((ROOT / "deploy" / "prometheus-rules.yml").read_text())["groups"]
    assert all({"alert", "expr", "for", "labels", "annotations"} <= set(rule) for group in groups for rule in group["rules"])
    exported = scrape(triton_server.metrics_url)
    expressions = _promql_in_deploy()
    assert len(expressions) == 6 + 13, sorted(expressions)  # the alerts and the table's rows
    for name, expression in expressions.items():
        for selector in _selectors(promql_parser.parse(expression)):
            if selector.name == "up" or selector.name.startswith("nv_gpu_"):
                continue
            series = [labels for sample, labels in exported if sample == selector.name]
            assert series, f"{name}: no series {selector.name}"
            for matcher in selector.matchers.matchers:
                if matcher.name == "job" or str(matcher.op) not in ("MatchOp.Equal", "MatchOp.Re"):
                    continue
                values = {dict(labels).get(matcher.name) for labels in series}
                matching = {value for value in values if value is not None and re.fullmatch(matcher.value, value)}
                has = sorted(map(str, values))
                assert matching, f"{name}: {selector.name} has no {matcher.name} matching {matcher.value!r} (it has {has})"


def _shm_used(prefix: str) -> int:
    return sum(path.stat().st_size for path in Path("/dev/shm").glob(f"{prefix}*"))


@pytest.fixture(scope="module")
def fresh_server(triton_repository, tmp_path_factory):
    """A server of this module's own, for the sizing test first (its regions as they start), then for
    the metrics test, which reloads its ct_postprocess at another threshold: one start for both."""
    server = start_on_free_ports(triton_repository, log_file=tmp_path_factory.mktemp("fresh") / "tritonserver.log", exit_timeout_s=5)
    try:
        yield server
    finally:
        discard(server)


def test_the_sizing_formula_matches_a_measured_run(fresh_server, triton_repository, tmp_path):
    """One uncompressed 140-slice 512 x 512 study (73 MiB) through a fresh server: its regions as the formula says."""
    study = phantom.write_study(tmp_path / "study", form="series", slices=140, rows=512, columns=512, pixel_spacing=0.7, slice_spacing=2.0)
    configs = export.target_configs("cpu", triton_repository)
    options = export.serving_options(configs)
    server = fresh_server
    idle = _shm_used(server.shm_prefix)
    peak, running = idle, True

    def sample() -> None:
        nonlocal peak
        while running:
            peak = max(peak, _shm_used(server.shm_prefix))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with client.TriageClient(server.grpc_url, "grpc") as triage:
            assert triage.classify(study).ok
    finally:
        running = False
        sampler.join()
    stubs = options.preprocess_instances + 4  # + ct_classifier (Python backend on the cpu target), ct_postprocess, ct_explain, ct_localize
    assert idle == stubs * SERVING.shm_default_byte_size
    payload = sum(path.stat().st_size + 4 for path in study.rglob("*") if path.is_file())  # + each BYTES element's length
    grown = sizing.region_bytes(payload + 4 * options.size**3) - SERVING.shm_default_byte_size  # the instance that read the study
    assert grown > 0 and peak == idle + grown, (peak / MIB, idle / MIB, grown / MIB)
    deployment = sizing.Deployment(
        size=options.size, preprocess_instances=options.preprocess_instances, max_batch_size=1, largest_study_bytes=payload
    )
    assert peak <= sizing.shm_bytes(deployment) - sizing.HEADROOM_BYTES  # the deployment size covers it


def test_verify_passes_against_the_running_server(triton_server, triton_repository):
    artifacts = triton_repository.with_name(triton_repository.name + ".artifacts")
    command = ["bash", "deploy/verify.sh", "--local", "--http", triton_server.http_url, "--grpc", triton_server.grpc_url]
    command += ["--metrics", f"localhost:{triton_server.metrics_port}"]
    command += ["--repository", str(triton_repository), "--artifacts", str(artifacts), "--parity-inputs", "4"]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[:5]] == ["PASS"] * 5 and lines[-1] == "verify: 5/5 checks passed", lines
    assert "max |dP|" in lines[2] and "studies/s" in lines[3]
    assert f"threshold {OPERATING_POINT.threshold:g} as configured" in lines[4], lines[4]


def test_verify_fails_a_metrics_port_that_is_not_the_servers(triton_server, fresh_server):
    """--metrics of a server that did not count the studies sent, or whose threshold is not the one
    --http's serves (the module's own server, reloaded at another threshold)."""
    verify = _verify_module()
    elsewhere = f"localhost:{fresh_server.metrics_port}"
    before = verify._counts(elsewhere)
    with client.TriageClient(triton_server.http_url, "http") as triage:
        assert triage.classify(phantom.study_files(form="series")).ok
    with pytest.raises(AssertionError, match=r"counted 0 answers and 0 refusals of the 1 and 0 sent: is it the server --http reaches\?"):
        verify._metrics(elsewhere, triton_server.http_url, before, answered=1, refused=0)
    client.set_threshold(fresh_server.http_url, 0.3)
    shared = f"localhost:{triton_server.metrics_port}"
    with pytest.raises(AssertionError, match=rf"{METRICS.threshold} is {OPERATING_POINT.threshold!r}, the served config says 0.3"):
        verify._metrics(shared, fresh_server.http_url, verify._counts(shared), answered=0, refused=0)


def _verify_module():
    spec = importlib.util.spec_from_file_location("deploy_verify", ROOT / "deploy" / "verify.py")
    verify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verify)
    return verify


def test_verify_fails_loudly_when_the_served_model_is_not_the_export(triton_server, triton_repository, tmp_path):
    """The parity check compares against the export's own FP32 reference: another model must fail it."""
    import torch

    verify = _verify_module()
    state = torch.load(triton_repository.with_name(triton_repository.name + ".artifacts") / "weights.pt", weights_only=True)
    state["fc.bias"] = state["fc.bias"] + torch.tensor([0.0, 1.0])  # a different head: a different model
    torch.save(state, tmp_path / "weights.pt")  # no model.onnx in tmp_path: the reference is PyTorch FP32 on these weights
    with pytest.raises(AssertionError, match=r"vs PyTorch FP32 on weights\.pt on 3 volumes at 64\^3: max \|dP\| .* \(bound 1e-04\)"):
        verify._parity(triton_server.http_url, tmp_path, tmp_path, {"target": "cpu", "precision": "fp32"}, 3)


def test_a_check_that_cannot_run_is_a_skip_not_a_pass(tmp_path, monkeypatch, capsys):
    """Without perf_analyzer the sweep says SKIP and why; the summary counts it neither way."""
    from benchmarks import perf_analyzer

    verify = _verify_module()
    monkeypatch.setattr(perf_analyzer, "installed", lambda: False)
    results = []
    verify.check(results, "ready", lambda: "ready over HTTP and gRPC")
    verify.check(results, "sweep", lambda: verify._sweep("localhost:1", tmp_path))
    verify.check(results, "parity", lambda: 1 / 0)
    assert capsys.readouterr().out.splitlines() == [
        "PASS  ready: ready over HTTP and gRPC",
        "SKIP  sweep: perf_analyzer is not installed (python -m benchmarks.perf_analyzer install)",
        "FAIL  parity: ZeroDivisionError: division by zero",
    ]
    assert verify.summary(results) == "verify: 1/2 checks passed; FAILED: parity; SKIPPED: sweep"


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x7f\xff\xff\xff", r"does not answer HTTP \(BadStatusLine\)"),  # gRPC's port
        (b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>hello</html>", r"not a Prometheus sample: '<html>hello</html>'"),
    ],
    ids=["grpc-port", "web-page"],
)
def test_a_metrics_endpoint_that_serves_no_metrics_fails_the_metrics_check_alone(monkeypatch, capsys, reply, reason):
    """--metrics of another port or a web page: the metrics check fails in one line, the others still
    report, the summary and the exit status are as documented (it was a traceback with no summary)."""
    verify = _verify_module()
    monkeypatch.setattr(verify, "_ready", lambda http, grpc: "ready")
    monkeypatch.setattr(verify, "_studies", lambda http, grpc, work: ("studies", {"target": "cpu"}))
    monkeypatch.setattr(verify, "_parity", lambda *args: "parity")
    monkeypatch.setattr(verify, "_sweep", lambda grpc, work: "sweep")
    metrics, listener = answering(reply)
    try:
        code = verify.main(["--metrics", metrics])
    finally:
        listener.close()
    lines = capsys.readouterr().out.splitlines()
    assert code == 1 and len(lines) == 6, lines
    assert [line.split()[0] for line in lines[:4]] == ["PASS"] * 4, lines
    assert re.fullmatch(rf"FAIL  metrics: .*{reason}.*: is it Triton's metrics port\?", lines[4]), lines[4]
    assert lines[5] == "verify: 4/5 checks passed; FAILED: metrics"
