"""scripts/w4_ratios.py on synthetic W4 results: the two ratios, the target counts, the files it writes."""
import json
import os
import subprocess
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
sys.path.insert(0, SCRIPTS)
import w4_ratios  # noqa: E402


def _record(on_tok_s, off_tok_s, on_ttft_s, off_ttft_s):
    row = lambda name, tok_s, ttft: {"backend": name, "output_tok_s": tok_s, "mean_ttft_s": ttft,  # noqa: E731
                                     "passes": [{"mean_ttft_s": ttft}, {"mean_ttft_s": ttft * 1.5}]}
    return {"env": {"date": "2026-11-27", "device": "test"},
            "results": [row(w4_ratios.ON, on_tok_s, on_ttft_s),
                        row("yaie prefix_cache=on cascade=off", 1.0, 1.0),
                        row(w4_ratios.OFF, off_tok_s, off_ttft_s)]}


def test_run_ratios():
    r = w4_ratios.run_ratios(_record(300.0, 100.0, 0.02, 0.08))
    assert r["throughput_ratio"] == pytest.approx(3.0) and r["ttft_ratio"] == pytest.approx(0.25)
    assert r["on_ttft_ms_passes"] == pytest.approx([20.0, 30.0])
    with pytest.raises(KeyError):
        w4_ratios.run_ratios({"env": {}, "results": [_record(1, 1, 1, 1)["results"][0]]})


def test_main_counts_runs_meeting_targets(tmp_path):
    paths = []
    for i, rec in enumerate([_record(210, 100, 0.03, 0.1), _record(190, 100, 0.05, 0.1)]):
        p = tmp_path / f"r{i}.json"
        p.write_text(json.dumps(rec))
        paths.append(f"run{i}={p}")
    subprocess.run([sys.executable, os.path.join(SCRIPTS, "w4_ratios.py"), "--name", "t", "--out", str(tmp_path),
                    *paths], check=True, capture_output=True)
    summary = json.loads((tmp_path / "t.json").read_text())["summary"]
    assert summary["runs"] == 2 and summary["throughput_ratio_met"] == 1 and summary["ttft_ratio_met"] == 1
    assert summary["ttft_ratio_median"] == pytest.approx(0.4)
