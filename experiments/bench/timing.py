"""Wall-clock measurement shared by the jdeq and the TorchDEQ side (standard library only).

A measurement is ``rounds`` rounds of ``reps`` timed calls after ``warmup`` untimed
ones. The reported figure is the median over all timed calls; the spread is their
interquartile range and the range of the per-round medians, which exposes drift
(another process waking up) that a single median hides.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Timing:
  """Summary of repeated wall-clock measurements, in seconds.

  Attributes:
    median: median over all timed calls.
    p25: first quartile over all timed calls.
    p75: third quartile over all timed calls.
    round_medians: median of each round, in the order measured.
    count: number of timed calls.
  """
  median: float
  p25: float
  p75: float
  round_medians: tuple[float, ...]
  count: int

  @classmethod
  def from_samples(cls, rounds: Sequence[Sequence[float]]) -> "Timing":
    samples = sorted(t for one_round in rounds for t in one_round)
    if not samples:
      raise ValueError("Timing needs at least one sample")
    quartiles = (statistics.quantiles(samples, n=4) if len(samples) > 1
                 else [samples[0]] * 3)
    return cls(median=statistics.median(samples), p25=quartiles[0], p75=quartiles[2],
               round_medians=tuple(statistics.median(r) for r in rounds if r),
               count=len(samples))

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def time_round(call: Callable[[], object], reps: int) -> list[float]:
  """Seconds taken by each of ``reps`` consecutive calls of ``call()``."""
  samples = []
  for _ in range(reps):
    start = time.perf_counter()
    call()
    samples.append(time.perf_counter() - start)
  return samples


def time_calls(call: Callable[[], object], *, reps: int, rounds: int = 1,
               warmup: int = 1) -> Timing:
  """Times ``call()``, which must block until its result is ready.

  Args:
    call: the operation; its return value is ignored.
    reps: timed calls per round.
    rounds: number of rounds.
    warmup: untimed calls before the first round (compilation, caches, allocator).

  Returns:
    The :class:`Timing` of the ``reps * rounds`` timed calls.
  """
  if reps < 1 or rounds < 1 or warmup < 0:
    raise ValueError(f"need reps >= 1, rounds >= 1, warmup >= 0; got reps={reps}, "
                     f"rounds={rounds}, warmup={warmup}")
  for _ in range(warmup):
    call()
  return Timing.from_samples([time_round(call, reps) for _ in range(rounds)])


def pin_threads(threads: int) -> int:
  """Restricts this process (and the processes it starts) to ``threads`` cores.

  Both sides of the benchmark size their thread pools from the cores a process may
  run on (XLA when its CPU backend starts; the TorchDEQ worker through
  ``torch.set_num_threads``), so pinning before either starts gives both the same
  number of threads.

  Args:
    threads: the number of cores; 0 (or more than are available) keeps them all.

  Returns:
    The number of cores this process may now run on.
  """
  available = sorted(os.sched_getaffinity(0))
  if 0 < threads < len(available):
    os.sched_setaffinity(0, available[:threads])
  return len(os.sched_getaffinity(0))


def machine_load() -> dict:
  """The 1-minute load average and the number of cores, to judge whether the machine is idle."""
  load1, load5, _ = os.getloadavg()
  return {"load1": load1, "load5": load5, "cores": os.cpu_count() or 1}


def idle_warning(threshold: float = 0.25) -> str | None:
  """A warning if the load average says other work competes for the cores.

  Args:
    threshold: tolerated 1-minute load average per core.

  Returns:
    ``None`` on an idle machine, else a one-line warning.
  """
  load = machine_load()
  if load["load1"] > threshold * load["cores"]:
    return (f"WARNING: the machine is not idle (1-min load average {load['load1']:.2f} "
            f"on {load['cores']} cores); timings will be noisy and ratios unreliable")
  return None


def publish(text: str, result: dict, json_path: str | None) -> None:
  """Prints a benchmark's report and, if ``json_path`` is given, writes its figures."""
  print(text)
  if json_path:
    with open(json_path, "w") as out:
      json.dump(result, out, indent=2)
