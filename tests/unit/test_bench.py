"""The benchmark's pure parts: the summary of runs, merging results, the BENCHMARKS.md report.

Speed itself is never asserted: these tests only check how figures are summarized and shown.
"""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


def test_summary_is_median_min_max_and_count():
    assert compare.summarize([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert compare.summarize([4.567]) == {"median": 4.57, "min": 4.57, "max": 4.57, "n": 1}
    assert compare.summarize([]) is None


def test_ratio_is_ours_over_the_baseline_and_a_dash_when_unknown():
    assert compare.ratio({"median": 2.0, "min": 1, "max": 3, "n": 3}, {"median": 8.0, "min": 8, "max": 8, "n": 1}) \
        == "0.25×"
    assert compare.ratio(6, 3) == "2.00×"
    assert compare.ratio(None, 3) == "—"
    assert compare.ratio(3, 0) == "—"


def test_merge_keeps_old_figures_and_host_counts_not_measured_now():
    old = {"warm_s": {"median": 9}, "hosts_wall_s": {"1": 5.0, "2": 6.0, "4": None, "8": None}, "date": "old"}
    new = {"warm_s": {"median": 7}, "hosts_wall_s": {"1": None, "2": None, "4": None, "8": 11.0}, "date": "new"}
    merged = compare.merge(old, new)
    assert merged["warm_s"] == {"median": 7}
    assert merged["hosts_wall_s"] == {"1": 5.0, "2": 6.0, "4": None, "8": 11.0}
    assert merged["date"] == "new"


def test_merge_keeps_the_control_machine_figures_measured_at_more_hosts():
    old = {"control_peak_rss_mb": 90.0, "control_cpu_s": 9.0, "control_measured_at_hosts": 8}
    assert compare.merge(old, {"control_peak_rss_mb": 70.0, "control_measured_at_hosts": 4}) == old
    assert compare.merge({"control_peak_rss_mb": 70.0, "control_measured_at_hosts": 4}, old) == old


SAMPLE = {
    "hosts": 1,
    "warm_s": {"median": 4.2, "min": 4.0, "max": 5.1, "n": 5},
    "baseline_warm_s": {"median": 8.4, "min": 8.0, "max": 9.0, "n": 5},
    "cold_s": {"median": 30.0, "min": 30.0, "max": 30.0, "n": 1},
    "baseline_cold_s": None,
    "round_trips_per_host": 9,
    "baseline_round_trips_per_host": 18,
    "connections_per_host": 1,
    "baseline_connections_per_host": 1,
    "bytes_one_file_change": 51200,
    "baseline_bytes_one_file_change": 40960,
    "longest_wait_s": 0.21,
    "baseline_longest_wait_s": 3.5,
    "failed_deploy_s": 19.5,
    "verify_timeout_s": 15,
    "hosts_wall_s": {"1": 4.2, "2": 5.0, "4": None, "8": None},
    "control_peak_rss_mb": None,
    "phases_s": {"lock+check": 0.8},
    "date": "2026-11-25T10:00:00+00:00",
    "machine": {"cpus": 2, "kernel": "6.1.0", "python": "3.11.2"},
}


def test_markdown_shows_each_figure_beside_the_baseline_with_its_ratio():
    text = compare.render_markdown(SAMPLE)
    row = next(line for line in text.splitlines() if line.startswith("| warm deploy"))
    assert "4.20 s (4.00–5.10, n=5)" in row and "8.40 s (8.00–9.00, n=5)" in row and row.endswith("| 0.50× |")
    cold = next(line for line in text.splitlines() if line.startswith("| cold deploy"))
    assert "not measured" in cold and cold.endswith("| — |")
    assert "| SSH round trips (channels) per host, warm deploy | 9 | 18 | 0.50× |" in text
    assert "| bytes sent per host, one-file change | 51,200 B | 40,960 B | 1.25× |" in text
    assert "verification timeout 15 s | 19.50 s | — | — |" in text
    assert "| 4 | not measured |" in text and "| 2 | 5.00 s |" in text
    assert "2026-11-25T10:00:00+00:00" in text and "2 CPU(s), Linux 6.1.0, Python 3.11.2" in text


def test_markdown_renders_from_json_round_trip_and_from_nothing():
    assert compare.render_markdown(json.loads(json.dumps(SAMPLE))) == compare.render_markdown(SAMPLE)
    assert "not measured" in compare.render_markdown({})


def test_start_up_is_read_from_the_ready_line_of_the_journal():
    journal = ("1764590000.100000 h1 systemd[1]: Started dk-startup-bench.service.\n"
               "1764590001.000000 h1 python[7]: [... INFO/MainProcess] Connected to redis://x\n"
               "1764590002.350000 h1 python[7]: [... INFO/MainProcess] dk-startup-bench@h1 ready.\n")
    assert compare.ready_after(1764590000.0, journal) == 2.35
    assert compare.ready_after(1764590000.0, journal.replace("ready.", "starting")) is None


def test_the_failed_verification_is_timed_from_the_first_verify_step_that_failed():
    states = [{"steps": [{"name": "start", "ok": True, "ended": 100.0},
                         {"name": "verify", "ok": False, "ended": 117.0}]},
              {"steps": [{"name": "verify", "ok": True, "ended": 110.0}]}]
    assert compare.failed_verification_to_end(states, 119.5) == 2.5
    assert compare.failed_verification_to_end([{"steps": []}], 119.5) is None


def test_markdown_shows_the_start_up_and_the_failed_verification_to_end():
    text = compare.render_markdown({**SAMPLE, "failed_after_verify_s": 2.4,
                                    "startup_ready_s": {"default": compare.summarize([2.0, 2.2, 2.1]),
                                                        "without_mingle": compare.summarize([1.0])}})
    assert "| failed deploy, failed verification to end | 2.40 s | — | — |" in text
    assert "| mingle and gossip on (Celery's default) | 2.10 s (2.00–2.20, n=3) |" in text
    assert "| `mingle = false` | 1.00 s (n=1) |" in text
    assert "failed verification to end" not in compare.render_markdown(SAMPLE)
