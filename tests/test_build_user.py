"""The build user is named ``build`` in the sandbox, whatever the host calls uid 1000."""

from __future__ import annotations

from amberd_process import Daemon
from rootfs import make_busybox_root

from amber.daemon.build.sandbox_users import sandbox_group, sandbox_passwd

HOST_SPEC = """
[build]
name = "who"
base = "host"

[[step]]
name = "as-build"
run = "id -un; id -gn; echo ~"

[[step]]
name = "as-root"
user = "root"
run = "id -un"

[[step]]
name = "fails"
run = "exit 3"
"""


def log(d: Daemon, build: str, step: str) -> bytes:
    out = d.amber("log", build, "--step", step)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_on_the_host_base_uid_1000_is_build(amberd: Daemon):
    spec = amberd.root / "who" / "spec.toml"
    spec.parent.mkdir()
    spec.write_text(HOST_SPEC)
    code, report = amberd.build_json(spec)
    assert code == 1 and report["status"] == "failed", report
    build = report["build"]
    assert log(amberd, build, "as-build") == b"build\nbuild\n/tmp\n"
    assert log(amberd, build, "as-root") == b"root\n"
    shell = amberd.amber("shell", build, "--", "id", "-un")
    assert shell.returncode == 0 and shell.stdout == b"build\n", shell
    # The host's other users are still there: files under /usr and /etc name them.
    daemon = amberd.amber("shell", build, "--", "id", "-un", "1")
    assert daemon.stdout == b"daemon\n", daemon


def test_a_dir_base_keeps_its_own_passwd(amberd: Daemon):
    root = make_busybox_root(amberd.root / "rootfs")
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nmaker:x:1000:1000:image's user:/build:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\nmaker:x:1000:\n")
    spec = amberd.root / "dirbase" / "spec.toml"
    spec.parent.mkdir()
    spec.write_text(
        f'[build]\nname = "dirbase"\nbase = "dir:{root}"\n'
        '[[step]]\nname = "who"\nrun = "id -un"\n'
        '[[step]]\nname = "add"\nuser = "root"\n'
        "run = \"echo 'tester:x:2000:2000::/:/bin/sh' >> /etc/passwd\"\n"
        '[[step]]\nname = "added"\nrun = "id -u tester"\n'
    )
    code, report = amberd.build_json(spec)
    assert code == 0, (report["steps"], amberd.amber("log", report["build"]).stdout)
    assert log(amberd, report["build"], "who") == b"maker\n"  # the image's name, not build
    assert log(amberd, report["build"], "added") == b"2000\n"  # and it is the tree's own file


def test_generated_files_replace_uid_1000_and_the_names_root_and_build():
    host_passwd = (
        "root:x:0:0:root:/root:/bin/bash\n"
        "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
        "alice:x:1000:1000:Alice:/home/alice:/bin/bash\n"
        "build:x:1500:1500::/home/build:/bin/sh\n"
        "toor:x:0:0::/:/bin/sh\n"
    )
    passwd = sandbox_passwd(host_passwd).splitlines()
    assert passwd == [
        "root:x:0:0:root:/root:/bin/sh",
        "build:x:1000:1000:amber build user:/tmp:/bin/sh",
        "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin",
    ]
    host_group = "root:x:0:\nalice:x:1000:\nsudo:x:27:alice,bob\nbuild:x:1500:\n"
    group = sandbox_group(host_group, {"alice", "toor"}).splitlines()
    assert group == ["root:x:0:", "build:x:1000:", "sudo:x:27:bob"]
