"""Where a build's time went, as `amber show --json` reports it (daemon/build/phases.py)."""

from __future__ import annotations

import json

from amberd_process import Daemon


def show(d: Daemon, build: str) -> dict:
    proc = d.amber("show", "--json", build)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_show_reports_the_phases_of_the_build_and_of_each_step_that_ran(amberd: Daemon):
    spec = amberd.root / "spec.toml"
    spec.write_text(
        '[build]\nname = "phases"\nbase = "host"\n'
        '[[step]]\nname = "nap"\nrun = "sleep 0.3 && echo done > out"\n'
        '[[step]]\nname = "quick"\nrun = "cat out"\n'
    )
    code, report = amberd.build_json(spec)
    assert code == 0, report
    shown = show(amberd, report["build"])
    build = shown["phases"]
    assert {"queued", "resolve_base", "sources", "cache", "unmount"} <= build.keys(), build
    first, second = (s["phases"] for s in shown["steps"])
    for phases in (first, second):
        assert {"sandbox_start", "run", "sandbox_end", "snapshot", "log", "record"} <= phases.keys()
        assert all(isinstance(v, float) and v >= 0 for v in phases.values()), phases
    # The first step that ran opened the mount, and says what that took, part by part.
    assert first["mount"] > 0 and first["mount.wait"] > 0, first
    assert {"mount.eager", "mount.overlay"} <= first.keys() or "mount.attach" in first, first
    assert second["mount"] < first["mount"] and not any(k.startswith("mount.") for k in second)
    # The step's own run is the step's time less the sandbox's start.
    step = shown["steps"][0]
    assert 0.3 <= first["run"] <= step["seconds"]
    assert abs(first["run"] + first["sandbox_start"] - step["seconds"]) < 0.01
    again = show(amberd, amberd.build_json(spec)[1]["build"])
    assert [s["phases"] for s in again["steps"]] == [None, None]  # cache hits run nothing here
    assert again["phases"]["cache"] >= 0
