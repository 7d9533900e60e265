#!/usr/bin/env python3
"""Benchmark: the same zlib build as a plain script, as `amber build` cold and fully cached.

    python scripts/bench/pipeline.py [--runs N] [--cached-runs N] [--concurrent 20]

All in one run, alternating, on two bases: this machine's tools (``host``)
and the Debian buildd rootfs of ``scripts/make-rootfs`` imported as an
image (``amber image import bench-buildd dir:PATH``, as a user would):

1. plain: ``tar xf; ./configure; make -j2`` in a fresh directory;
2. amber cold: ``amber build`` of a spec with the same three steps, with a
   fresh key salt each run so nothing is cached (mount, sandbox, snapshots
   and result recording are all in the time), on the host base, then on
   the rootfs image (another toolchain: printed beside the plain script,
   not a RESULT);
3. amber cached: ``amber build`` of an unchanged spec, end to end (a new
   `amber` process each time, as a user types it), on each base;
4. client start: ``amber --version`` beside ``python -S -c pass`` (the
   interpreter's own start, the floor for a Python command), alternating;
5. podman build of the same steps, when podman and the rootfs are there
   (and no ``--no-podman``): one layer per step, cold.

Then 20 builds at once, sampling amberd's peak memory (VmHWM of the daemon
process only; filesystem processes are separate processes). The load
average is printed before and after (common.py). The RESULT lines:
``cold_ratio`` (host base vs the plain script; refused, NORESULT, when the
plain script's runs spread by more than 25 %), ``cached_seconds_rootfs``,
``cached_seconds_host`` and ``client_start_seconds`` (medians). Targets:
cold at most 1.10 of the plain script, cached at most 0.15 s.
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
from common import Session  # noqa: E402
from sources import cache_dir, source_tarball  # noqa: E402

STEPS = [
    ("extract", "tar xf zlib.tar.bz2"),
    ("configure", "cd zlib-* && ./configure >/dev/null"),
    ("make", "cd zlib-* && make -j2 >/dev/null"),
]


ROOTFS_IMAGE = "bench-buildd"


def spec_text(salt: str, base: str = "host") -> str:
    steps = "".join(f'\n[[step]]\nname = "{n}"\nrun = "{r}"\n' for n, r in STEPS)
    return f'[build]\nname = "zlib-bench"\nbase = "{base}"\nkey_salt = "{salt}"\n\n[[source]]\npath = "zlib.tar.bz2"\n{steps}'


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


def buildd_rootfs() -> Path | None:
    """Whichever release scripts/make-rootfs made, if it made one."""
    made = sorted((cache_dir() / "rootfs").glob("*-buildd/.amber-rootfs-complete"))
    return made[0].parent if made else None


def client_start(runs: int) -> tuple[list[float], list[float]]:
    """``amber --version`` and ``python -S -c pass``, alternating: seconds of each."""
    amber, python = [], []
    for _ in range(runs):
        python.append(timed([sys.executable, "-S", "-c", "pass"]))
        amber.append(timed([str(BIN / "amber"), "--version"]))
    return amber, python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="cold pairs (default 3)")
    parser.add_argument("--cached-runs", type=int, default=10,
                        help="cached rebuilds and client starts per base (default 10)")  # fmt: skip
    parser.add_argument("--concurrent", type=int, default=20,
                        help="builds at once for the memory figure (default 20; 0 skips)")  # fmt: skip
    parser.add_argument("--no-podman", action="store_true", help="skip the podman build")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    if args.runs < 1 or args.cached_runs < 1:
        raise SystemExit("pipeline.py: --runs and --cached-runs must be at least 1")

    tarball = source_tarball("zlib")
    rootfs = buildd_rootfs()
    root = Path(tempfile.mkdtemp(prefix="amber-bench-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    daemon = Daemon(root, jobs=4)
    with Session("pipeline.py") as session:
        daemon.start()
        try:
            measure(session, args, daemon, root, tarball, rootfs)
        finally:
            daemon.stop()
            from amberd_process import cleanup_root

            cleanup_root(root)
    session.finish()


def measure(session: Session, args, daemon: Daemon, root: Path, tarball: Path,
            rootfs: Path | None) -> None:  # fmt: skip
    spec_dir = root / "spec"
    spec_dir.mkdir()
    os.link(tarball, spec_dir / "zlib.tar.bz2")
    spec = spec_dir / "spec.toml"
    rootfs_spec = spec_dir / "rootfs.toml"
    if rootfs is not None:
        started = time.perf_counter()
        run_checked(daemon, "image", "import", ROOTFS_IMAGE, f"dir:{rootfs}")
        print(
            f"amber image import {ROOTFS_IMAGE} dir:{rootfs}: {time.perf_counter() - started:.2f} s"
        )
    else:
        print("no buildd rootfs (run scripts/make-rootfs): the rootfs case is skipped")
    rows, rootfs_cold = [], []
    for run in range(args.runs):
        p = plain_run(tarball)
        spec.write_text(spec_text(f"cold-{uuid.uuid4()}"))
        a = amber_run(daemon, spec)
        rows.append((p, a))
        line = f"pair {run + 1}: plain {p:.2f} s, amber cold {a:.2f} s, ratio {a / p:.3f}"
        if rootfs is not None:
            rootfs_spec.write_text(spec_text(f"cold-{uuid.uuid4()}", ROOTFS_IMAGE))
            rootfs_cold.append(amber_run(daemon, rootfs_spec))
            line += f"; rootfs base cold {rootfs_cold[-1]:.2f} s"
        print(f"{line}  (load {os.getloadavg()[0]:.1f})", flush=True)
    cached = [amber_run(daemon, spec) for _ in range(args.cached_runs)]
    cached_rootfs = (
        [amber_run(daemon, rootfs_spec) for _ in range(args.cached_runs)] if rootfs else []
    )
    client, python = client_start(args.cached_runs)
    podman = None
    if shutil.which("podman") and rootfs is not None and not args.no_podman:
        podman = podman_cold(rootfs, tarball, root)
    wall, rss = (
        concurrent_builds(daemon, root, tarball, args.concurrent) if args.concurrent else (0.0, 0)
    )

    med = statistics.median
    plain_med = med(p for p, _ in rows)
    ratio = med(a / p for p, a in rows)
    print()
    print(f"plain script        median {plain_med:.2f} s")
    print(
        f"amber build cold    median {med(a for _, a in rows):.2f} s   ratio {ratio:.3f}  (target <= 1.10)"
    )
    if rootfs_cold:
        print(f"  on the rootfs     median {med(rootfs_cold):.2f} s   ({med(rootfs_cold) / plain_med:.3f} "
              "of the plain script on the host's toolchain)")  # fmt: skip
    for name, runs in (("host", cached), ("rootfs", cached_rootfs)):
        if runs:
            print(f"amber build cached  {name:<6} median {med(runs):.3f} s  min {min(runs):.3f} s  "
                  "(target <= 0.15 s)")  # fmt: skip
    print(
        f"amber --version     median {med(client):.3f} s  beside python -S -c pass {med(python):.3f} s"
    )
    if podman is not None:
        print(
            f"podman build cold   {podman:.2f} s   ratio {podman / plain_med:.3f}  (on the buildd rootfs)"
        )
    else:
        print(
            "podman build        skipped (--no-podman, no podman, no rootfs from scripts/make-rootfs, or it failed)"
        )
    if args.concurrent:
        print(f"{args.concurrent} concurrent builds {wall:.1f} s; amberd peak RSS {rss / 2**20:.0f} MiB "
              "(target < 300 MiB)")  # fmt: skip
    session.ratio("cold_ratio", ratio, "plain script", [p for p, _ in rows])
    if cached_rootfs:
        session.result("cached_seconds_rootfs", med(cached_rootfs))
    else:
        session.refuse("cached_seconds_rootfs", "no buildd rootfs: run scripts/make-rootfs")
    session.result("cached_seconds_host", med(cached))
    session.result("client_start_seconds", med(client))


def run_checked(daemon: Daemon, *args: str) -> None:
    proc = daemon.amber(*args)
    if proc.returncode != 0:
        raise SystemExit(
            f"amber {' '.join(args)} failed:\n{proc.stdout.decode()}{proc.stderr.decode()}"
        )


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
