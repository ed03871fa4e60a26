"""src/run_pipeline.sh (what `make demo` runs): its stage order and the PHANTOM_SEED option, checked with
a stand-in interpreter that records every command instead of running it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "src" / "run_pipeline.sh"


@pytest.fixture()
def run(run_with_stand_in, tmp_path: Path):
    """``run(**env)``: run_pipeline.sh demo with the stand-in interpreter and the PE_* folders under tmp_path."""
    dirs = {f"PE_{k}_DIR": str(tmp_path / k.lower()) for k in ("DATA", "WORK", "OOF", "SUBMISSIONS", "REPORTS")}
    return lambda **env: run_with_stand_in(SCRIPT, tmp_path, ["demo"], {**dirs, **env})


def _seed_of(call: list[str]) -> str:
    return call[call.index("--seed") + 1]


def test_demo_runs_every_stage_in_order_with_phantom_seed_0_by_default(run, tmp_path):
    proc, calls = run()
    assert proc.returncode == 0, proc.stderr
    scripts = [Path(c[0]).name for c in calls]
    assert scripts[0] == "00_make_phantom.py" and _seed_of(calls[0]) == "0"
    order = ["00_make_phantom.py", "01_parse_metadata.py", "02_cache_images.py", "03_make_folds.py",
             "04_train_cnn.py", "05_export_embeddings.py", "06_train_sequence.py", "07_ensemble.py",
             "08_make_submission.py", "09_score.py", "10_report.py"]
    firsts = [scripts.index(s) for s in order]
    assert firsts == sorted(firsts) and set(scripts) == set(order)
    assert str(tmp_path / "data") in calls[0]  # the phantom goes where PE_DATA_DIR says
    assert calls[0][calls[0].index("--preset") + 1] == "demo"  # its sizes: pe.synthetic.phantom.PRESETS
    assert "demo finished" in proc.stdout


def test_phantom_seed_reaches_stage_00(run):
    proc, calls = run(PHANTOM_SEED="7")
    assert proc.returncode == 0, proc.stderr
    assert _seed_of(calls[0]) == "7"


@pytest.mark.parametrize("bad", ["x", "-1", "1.5", "1;2", "1e3", "1234567890"])
def test_a_bad_phantom_seed_is_refused_before_anything_runs(run, bad):
    proc, calls = run(PHANTOM_SEED=bad)
    assert proc.returncode == 2 and calls == []
    assert "PHANTOM_SEED must be a non-negative integer" in proc.stderr


def test_an_empty_phantom_seed_means_the_default(run):
    proc, calls = run(PHANTOM_SEED="")
    assert proc.returncode == 0 and _seed_of(calls[0]) == "0"
