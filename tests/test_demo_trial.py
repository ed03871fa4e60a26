"""bench/demo_cnn_trial.sh (the README's demo CNN trials): the phantom it makes is make demo's
(``--preset demo``) unless TRAIN / MINS / MAXS / POS / SCALE / SEED change it, the overrides reach stage 04,
bad settings are refused before anything runs; checked with a stand-in interpreter that records every
command instead of running it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "demo_cnn_trial.sh"


@pytest.fixture()
def run(run_with_stand_in, tmp_path: Path):
    """``run(*args, **env)``: the trial script with the stand-in interpreter, its trial under tmp_path; as
    stage 04 the stand-in prints a line the script's grep keeps."""
    on_call = 'case "$1" in *04_train_cnn.py) echo "pooled out-of-fold slice AUC: stand-in";; esac'
    return lambda *args, **env: run_with_stand_in(SCRIPT, tmp_path, list(args),
                                                  {"TRIALS_DIR": str(tmp_path / "trials"), **env}, on_call)


def _value(call: list[str], flag: str) -> str | None:
    return call[call.index(flag) + 1] if flag in call else None


def test_the_trial_makes_the_demo_phantom_and_passes_overrides_to_stage_04(run, tmp_path):
    proc, calls = run("t1", "epochs=3", "aug=true")
    assert proc.returncode == 0, proc.stderr
    phantom, cnn = calls[0], next(c for c in calls if c[0].endswith("04_train_cnn.py"))
    assert phantom[0].endswith("00_make_phantom.py") and _value(phantom, "--preset") == "demo"
    assert _value(phantom, "--seed") == "0" and _value(phantom, "--out") == str(tmp_path / "trials" / "t1" / "data")
    assert "--train-studies" not in phantom and "--min-slices" not in phantom  # the preset's sizes
    assert cnn[-2:] == ["epochs=3", "aug=true"] and _value(cnn, "--fold") == "0,1"
    assert "pooled out-of-fold slice AUC: stand-in" in proc.stdout
    record = calls[-1]  # after stage 04: the trial keeps its phantom's truth before the phantom is removed
    trial = tmp_path / "trials" / "t1"
    assert record[0].endswith("demo_draws.py") and record[1:3] == ["record", str(trial)]
    assert _value(record, "--data") == str(trial / "data")


def test_sizes_and_seed_from_the_environment_override_the_preset(run):
    proc, calls = run("t2", TRAIN="120", MINS="20", MAXS="30", POS="0.5", SEED="4", FOLDS="3")
    assert proc.returncode == 0, proc.stderr
    phantom = calls[0]
    assert [_value(phantom, f) for f in ("--preset", "--train-studies", "--min-slices", "--max-slices",
                                         "--positive-rate", "--seed")] == ["demo", "120", "20", "30", "0.5", "4"]
    assert _value(next(c for c in calls if c[0].endswith("04_train_cnn.py")), "--fold") == "0,1,2"


@pytest.mark.parametrize("env", [{"SEED": "x"}, {"FOLDS": "1"}, {"CACHE": "0"}, {"KEEP": "2"}])
def test_bad_settings_are_refused_before_anything_runs(run, env):
    proc, calls = run("t3", **env)
    assert proc.returncode == 2 and calls == []


def test_a_bad_trial_name_is_refused(run):
    proc, calls = run("../escape")
    assert proc.returncode == 2 and calls == [] and "bad trial name" in proc.stderr
