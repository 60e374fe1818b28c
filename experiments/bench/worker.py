"""The JSON-lines protocol of the benchmark's PyTorch workers (standard library only).

Every worker (TorchDEQ's side, the authors' code of w3ref, the time-to-tolerance
sides) reads one JSON request per line and answers each with one JSON line,
``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``; the runner's side of it is
:class:`experiments.bench.run.TorchWorker`. A failed request is reported, never
fatal: the runner raises it with the worker's message.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Callable, IO, Optional

#: What the runner sets to the number of threads both sides get.
THREADS_VARIABLE = "JDEQ_BENCH_TORCH_THREADS"


def serve_json_lines(handle: Callable[[dict], Optional[dict]], stdin: IO[str],
                     stdout: IO[str]) -> None:
  """Answers requests until ``{"cmd": "quit"}`` or the end of ``stdin``.

  Args:
    handle: ``request -> reply`` (a dict); it raises to report a failure. Not
      called for ``quit``.
    stdin: where requests come from, one JSON object per line.
    stdout: where replies go, one JSON object per line, flushed after each.
  """
  for line in stdin:
    request = json.loads(line)
    if request.get("cmd") == "quit":
      break
    try:
      reply = dict(handle(request) or {}, ok=True)
    except (Exception, SystemExit) as error:  # pylint: disable=broad-except  (reported)
      reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    stdout.write(json.dumps(reply) + "\n")
    stdout.flush()


def unknown_command(request: dict) -> ValueError:
  return ValueError(f"unknown command {request.get('cmd')!r}")


def runner_threads() -> int:
  """The thread count the runner chose for both sides (0: the framework's default)."""
  return int(os.environ.get(THREADS_VARIABLE, "0"))


def cpu_description() -> str:
  return f"cpu ({platform.processor() or platform.machine()})"
