"""The RuntimeClass overhead recommendation (carapace.cli.overhead.recommend)."""

from __future__ import annotations

from carapace.cli.overhead import Phase, Recommendation, recommend
from carapace.sizing import MiB


def phase(cpu: float, peak: int) -> Phase:
    return Phase(seconds=10, cpu_cores=cpu, memory_bytes=peak, memory_peak_bytes=peak, pids=9)


def test_idle_cost_with_a_margin_rounded_up() -> None:
    # 0.05 cores idle x 1.25 = 62.5m -> 70m; 400 MiB x 1.25 = 500 MiB
    assert recommend(phase(0.05, 400 * MiB)) == Recommendation(70, 500)
    assert recommend(phase(0.05, 400 * MiB + 1)) == Recommendation(70, 501)


def test_at_least_10_millicores() -> None:
    assert recommend(phase(0.0, 100 * MiB)).cpu_millicores == 10


def test_runtimeclass_snippet() -> None:
    text = Recommendation(70, 500).runtimeclass_overhead()
    assert text == 'overhead:\n  podFixed:\n    memory: "500Mi"\n    cpu: "70m"\n'


def test_the_serving_process_memory_is_added() -> None:
    assert recommend(phase(0.05, 400 * MiB), owner_rss=40 * MiB).memory_mib == 550
