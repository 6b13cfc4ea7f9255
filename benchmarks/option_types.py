"""Option types shared by the benchmarks' command lines (contract.arguments): a value a benchmark
cannot use is a one-line usage error before any server starts, not a traceback minutes later."""

from __future__ import annotations

from client.cli import MAX_CONCURRENCY
from contract.arguments import integer, model_size, number, port
from preprocess.workers import MAX_THREADS
from settings import INPUT_LIMITS, SERVING

SIZE = model_size
SLICES = integer(INPUT_LIMITS.min_slices, INPUT_LIMITS.max_slices)
MATRIX = integer(32, min(INPUT_LIMITS.max_rows, INPUT_LIMITS.max_columns))  # the phantom's rows and columns
CONCURRENCY = integer(1, MAX_CONCURRENCY)
COUNT = integer(1, 1_000_000)  # studies, requests, rounds, repeats
THREADS = integer(0, MAX_THREADS)  # 0: every CPU this process may use
WAIT_US = integer(0, SERVING.most_queue_delay_microseconds)
SECONDS = number(0)
PORT = port
MINUTES = number(0, 7 * 24 * 60, above_low=True)  # a soak's length: up to a week
FORM_MIB = integer(1, 1024)  # http_faults: a form-typed request is built in memory, three copies of it at once
CHUNKS = integer(1, 4_000_000)  # http_faults: tritonserver keeps about 1 KB per one-byte chunk (4 GB at most)
WINDOW = integer(2, 1_000_000)  # report_scale: a window's time per study spans its first and last study
