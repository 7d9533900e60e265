"""A build's overlay is mounted ``volatile`` (sandbox/fsmode.VOLATILE): a step's fsyncs
are free, and what it wrote still reaches the next step and the store whole."""

from __future__ import annotations

from amberd_process import Daemon

ROOT_OPTIONS = (
    "awk '$5 == \\\"/\\\" {print $NF}' /proc/self/mountinfo | tr , '\\\\n' > root-options"
)
FSYNCED = "for i in $(seq 1 50); do seq 1 $i > f$i; sync -d f$i; done"
INTACT = "seq 1 50 | cmp - f50 && test $(wc -l < f7) = 7"


def spec(d: Daemon, volatile: bool) -> str:
    path = d.root / "spec.toml"
    check = (
        "grep -qxE 'volatile|fsync=volatile' root-options"
        if volatile
        else "! grep -qxE 'volatile|fsync=volatile' root-options"
    )
    path.write_text(
        '[build]\nname = "volatile"\nbase = "host"\n'
        f'[[step]]\nname = "write"\nrun = "{ROOT_OPTIONS} && {FSYNCED}"\n'
        f'[[step]]\nname = "read"\nrun = "grep -qx metacopy=on root-options && {check} && {INTACT}"\n'
    )
    return str(path)


def test_the_steps_root_is_volatile_and_what_it_fsynced_is_kept(amberd: Daemon):
    code, report = amberd.build_json(spec(amberd, True))
    log = amberd.amber("log", report["build"]).stdout.decode()
    assert code == 0 and [s["status"] for s in report["steps"]] == ["ran", "ran"], (report, log)
    code, again = amberd.build_json(spec(amberd, True))
    assert code == 0 and [s["status"] for s in again["steps"]] == ["cached", "cached"], again


def test_amber_overlay_volatile_0_mounts_without(daemon_root):
    d = Daemon(daemon_root, extra_env={"AMBER_OVERLAY_VOLATILE": "0"}).start()
    code, report = d.build_json(spec(d, False))
    assert code == 0, report
    assert d.stop() == 0
