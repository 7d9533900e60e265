#!/usr/bin/env python3
"""Benchmark: the same zlib build as a plain script, as `amber build` cold and fully cached.

    python scripts/bench/pipeline.py [--runs N] [--concurrent 20]

All in one run, alternating, on this machine's tools (the ``host`` base):

1. plain: ``tar xf; ./configure; make -j2`` in a fresh directory;
2. amber cold: ``amber build`` of a spec with the same three steps, with a
   fresh key salt each run so nothing is cached (mount, sandbox, snapshots
   and result recording are all in the time);
3. amber cached: ``amber build`` of an unchanged spec, end to end (a new
   `amber` process each time, as a user types it);
4. podman build of the same steps, when podman and the benchmark rootfs
   (scripts/make-rootfs) are there: one layer per step, cold.

Then 20 builds at once, sampling amberd's peak memory (VmHWM of the daemon
process only; filesystem processes are separate processes). The last two
lines are ``RESULT cold_ratio <x>`` and ``RESULT cached_seconds <s>``.
Targets: cold at most 1.10 of the plain script, cached at most 0.15 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
BIN = Path(sys.executable).parent

from amberd_process import Daemon  # noqa: E402
from sources import cache_dir, source_tarball  # noqa: E402

STEPS = [
    ("extract", "tar xf zlib.tar.bz2"),
    ("configure", "cd zlib-* && ./configure >/dev/null"),
    ("make", "cd zlib-* && make -j2 >/dev/null"),
]


def spec_text(salt: str) -> str:
    steps = "".join(f'\n[[step]]\nname = "{n}"\nrun = "{r}"\n' for n, r in STEPS)
    return f'[build]\nname = "zlib-bench"\nbase = "host"\nkey_salt = "{salt}"\n\n[[source]]\npath = "zlib.tar.bz2"\n{steps}'


def timed(cmd: list[str], **kwargs) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - started


def plain_run(tarball: Path) -> float:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        shutil.copy(tarball, Path(tmp) / "zlib.tar.bz2")
        script = " && ".join(f"({r})" for _, r in STEPS)  # each step starts in the work dir
        return timed(["sh", "-ec", script], cwd=tmp)


def amber_run(daemon: Daemon, spec: Path) -> float:
    started = time.perf_counter()
    proc = daemon.amber("build", str(spec))
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"amber build failed:\n{proc.stdout.decode()}\n{proc.stderr.decode()}")
    return elapsed


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def concurrent_builds(daemon: Daemon, root: Path, tarball: Path, count: int) -> tuple[float, int]:
    specs = []
    for i in range(count):
        d = root / f"many{i}"
        d.mkdir()
        os.link(tarball, d / "zlib.tar.bz2")
        (d / "spec.toml").write_text(spec_text(f"many-{uuid.uuid4()}"))
        specs.append(d / "spec.toml")
    failures = []

    def one(spec: Path) -> None:
        if daemon.amber("build", str(spec)).returncode != 0:
            failures.append(spec)

    threads = [threading.Thread(target=one, args=(s,)) for s in specs]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit(f"{len(failures)} concurrent builds failed")
    assert daemon.process is not None
    return time.perf_counter() - started, peak_rss(daemon.process.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cached-runs", type=int, default=10)
    parser.add_argument("--concurrent", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")

    tarball = source_tarball("zlib")
    root = Path(tempfile.mkdtemp(prefix="amber-bench-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    daemon = Daemon(root, jobs=4)
    daemon.start()
    try:
        spec_dir = root / "spec"
        spec_dir.mkdir()
        os.link(tarball, spec_dir / "zlib.tar.bz2")
        spec = spec_dir / "spec.toml"
        rows = []
        for run in range(args.runs):
            p = plain_run(tarball)
            spec.write_text(spec_text(f"cold-{uuid.uuid4()}"))
            a = amber_run(daemon, spec)
            rows.append((p, a))
            print(
                f"pair {run + 1}: plain {p:.2f} s, amber cold {a:.2f} s, ratio {a / p:.3f}",
                flush=True,
            )
        cached = [amber_run(daemon, spec) for _ in range(args.cached_runs)]
        podman = None
        made = sorted((cache_dir() / "rootfs").glob("*-buildd/.amber-rootfs-complete"))
        rootfs = made[0].parent if made else None  # whichever release make-rootfs made
        if shutil.which("podman") and rootfs is not None:
            podman = podman_cold(rootfs, tarball, root)
        wall, rss = concurrent_builds(daemon, root, tarball, args.concurrent)

        plain_med = statistics.median(p for p, _ in rows)
        cold_med = statistics.median(a for _, a in rows)
        ratio = statistics.median(a / p for p, a in rows)
        cached_med = statistics.median(cached)
        print()
        print(f"plain script        median {plain_med:.2f} s")
        print(f"amber build cold    median {cold_med:.2f} s   ratio {ratio:.3f}  (target <= 1.10)")
        print(
            f"amber build cached  median {cached_med:.3f} s  min {min(cached):.3f} s  (target <= 0.15 s)"
        )
        if podman is not None:
            print(
                f"podman build cold   {podman:.2f} s   ratio {podman / plain_med:.3f}  (on the buildd rootfs)"
            )
        else:
            print("podman build        skipped (no podman or no rootfs from scripts/make-rootfs)")
        print(
            f"{args.concurrent} concurrent builds {wall:.1f} s; amberd peak RSS {rss / 2**20:.0f} MiB (target < 300 MiB)"
        )
        print(f"RESULT cold_ratio {ratio:.3f}")
        print(f"RESULT cached_seconds {cached_med:.3f}")
    finally:
        daemon.stop()
        from amberd_process import cleanup_root

        cleanup_root(root)


def podman_cold(rootfs: Path, tarball: Path, root: Path) -> float | None:
    """podman build of the same steps on the buildd rootfs, one layer per step."""
    ctx = root / "podman"
    ctx.mkdir()
    store = [
        "--root",
        str(ctx / "storage"),
        "--runroot",
        str(ctx / "run"),
        "--storage-driver",
        "vfs",
    ]
    conf = ctx / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
                    '[engine]\nruntime = "runc"\n')  # fmt: skip
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["podman", *store, "import", "-", "amber-bench-base"], stdin=tar.stdout, check=True,
                   env=env, stdout=subprocess.DEVNULL)  # fmt: skip
    tar.wait()
    shutil.copy(tarball, ctx / "zlib.tar.bz2")
    lines = ["FROM amber-bench-base", "WORKDIR /build", "COPY zlib.tar.bz2 ."]
    lines += [f"RUN {r}" for _, r in STEPS]
    (ctx / "Containerfile").write_text("\n".join(lines) + "\n")
    try:
        return timed(
            ["podman", *store, "build", "--network=none", "-t", "bench", str(ctx)], env=env
        )
    except subprocess.CalledProcessError:
        return None


if __name__ == "__main__":
    main()
