"""Pull requests read their own repository then trunk, and write only their own.

Two ways a fleet enforces it, both with a real docker-registry and real
amberd hosts: a read-only instance serving trunk's storage (every push
there is HTTP 405), and a registry credential whose tokens grant push on
the PR repository only. Either way the PR host's build succeeds, its
pushes to trunk are dropped at once (never retried), its reads of trunk
are hits, and its pushes to its own repository land. The daemon's
credentials come from ``[cache] registry-auth-file``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from amberd_process import BIN, Daemon
from conftest import serve_registry
from test_registry_auth import TokenGate, auth_json, htpasswd_registry  # noqa: F401
from test_remote import SPEC, notes, public, statuses, write_spec
from test_remote_pins import remote_host, repo_tags, trunk

from amber.daemon.oci.auth import Credentials
from amber.daemon.oci.registry import RegistryClient
from amber.daemon.oci.spec import OCI_MANIFEST

PR = "amber/pr-1234"


def wait_for(what, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return found


def pr_build(trunk_host: Daemon, pr_host: Daemon, root: Path, trunk_tags) -> dict:
    """Trunk builds the spec; the PR changes step three of four: one and two are trunk hits."""
    assert trunk_host.build_json(write_spec(root, SPEC.format(three="3")))[0] == 0
    wait_for(lambda: len(trunk_tags()) >= 4)
    code, report = pr_host.build_json(write_spec(root, SPEC.format(three="pr"), "pr.toml"))
    assert code == 0, report  # pushes refused never fail a build
    assert statuses(report) == ["cached", "cached", "ran", "ran"]
    return report


def refused_pushes(daemon: Daemon, count: int) -> str:
    """The daemon's log, once it says ``count`` pushes were refused (and none retried)."""
    log = wait_for(lambda: daemon.log.read_text().count("refused, not retried") >= count
                   and daemon.log.read_text())  # fmt: skip
    return log


def test_a_read_only_trunk_instance_refuses_pr_pushes_and_serves_its_hits(
    daemon_root: Path, registry: str, tmp_path: Path
):
    readonly = "  maintenance:\n    readonly:\n      enabled: true\n"
    with serve_registry(tmp_path, storage=readonly, name="readonly") as ro:
        a = remote_host(daemon_root, "ci-trunk", [(trunk(registry), True)], sign=True, trusted={})
        # Misconfigured on purpose: it would push to trunk, and the instance says no.
        pr = remote_host(daemon_root, "ci-pr", [(f"http://{registry}/{PR}", True), (trunk(ro), True)],
                         sign=True, trusted={"ci-trunk": public(a)})  # fmt: skip
        try:
            report = pr_build(a, pr, daemon_root, lambda: repo_tags(registry))
            assert f"via {trunk(ro)}" in notes(pr, report["build"])  # read through the instance
            wait_for(lambda: len(repo_tags(registry, PR)) >= 2)  # its own repository: landed
            log = refused_pushes(pr, 2)
            assert "HTTP 405" in log and "will retry" not in log
            time.sleep(2)  # no retry comes later either
            assert pr.log.read_text().count("refused, not retried") == 2
            assert len(repo_tags(registry)) == 4  # trunk: only trunk's own results
        finally:
            a.stop()
            pr.stop()


class PrGate(TokenGate):
    """Tokens grant pull on every repository, push on the PR repository only."""

    def grant(self, scope: str) -> str:
        repo = scope.split(":")[1] if scope.count(":") == 2 else ""
        return scope if repo == PR else f"repository:{repo}:pull"

    def allows(self, granted: str | None, repo: str, method: str) -> bool:
        if method in ("GET", "HEAD"):
            return granted in (f"repository:{repo}:pull", f"repository:{repo}:pull,push")
        return granted == f"repository:{repo}:pull,push"


def root_only(path: Path) -> Path:
    os.chmod(path, 0o600)
    return path


def test_a_credential_with_push_on_the_pr_repository_only(
    daemon_root: Path, registry: str, tmp_path: Path
):
    gate = PrGate(registry, "ci-pr", "pr-secret")
    auth = root_only(auth_json(tmp_path / "pr-auth.json", gate.address, "ci-pr", "pr-secret"))
    a = remote_host(daemon_root, "ci-trunk", [(trunk(registry), True)], sign=True, trusted={})
    pr = remote_host(daemon_root, "ci-pr", [(f"http://{gate.address}/{PR}", True),
                                            (trunk(gate.address), True)],
                     sign=True, trusted={"ci-trunk": public(a)},
                     cache=f'registry-auth-file = "{auth}"')  # fmt: skip
    try:
        report = pr_build(a, pr, daemon_root, lambda: repo_tags(registry))
        assert f"via {trunk(gate.address)}" in notes(pr, report["build"])
        wait_for(lambda: len(repo_tags(registry, PR)) >= 2)
        log = refused_pushes(pr, 2)
        assert "refused its own token" in log and "will retry" not in log
        assert "pr-secret" not in log
        assert len(repo_tags(registry)) == 4
        assert gate.token_requests  # the daemon logged in, with the file's credentials
    finally:
        a.stop()
        pr.stop()
        gate.server.shutdown()


def test_the_registry_auth_file_logs_amberd_in_and_must_be_roots_alone(
    daemon_root: Path,
    htpasswd_registry: str,  # noqa: F811
    tmp_path: Path,
):
    auth = auth_json(tmp_path / "auth.json", htpasswd_registry, "alice", "s3cret")
    for mode, said in ((0o620, "group or world writable"), (0o604, "world readable")):
        os.chmod(auth, mode)
        with pytest.raises(RuntimeError, match=said):
            remote_host(daemon_root, f"bad-{mode:o}", [(trunk(htpasswd_registry), True)],
                        sign=True, trusted={}, cache=f'registry-auth-file = "{auth}"')  # fmt: skip
    root_only(auth)
    a = remote_host(daemon_root, "ci-a", [(trunk(htpasswd_registry), True)], sign=True,
                    trusted={}, cache=f'registry-auth-file = "{auth}"')  # fmt: skip
    try:
        code, report = a.build_json(write_spec(daemon_root, SPEC.format(three="3")))
        assert code == 0
        shown = json.loads(a.amber("show", "--json", report["build"]).stdout)
        tag = f"step-{shown['steps'][-1]['key']}"
        client = RegistryClient(htpasswd_registry, credentials=Credentials("alice", "s3cret"))
        wait_for(
            lambda: (
                client.request(
                    "HEAD", f"/v2/amber/trunk/manifests/{tag}", headers={"Accept": OCI_MANIFEST}
                ).status
                == 200
            )
        )
        client.close()
        printed = subprocess.run([str(BIN / "amberd"), "--print-config", "--config",
                                  str(a.root / "amberd.toml")], capture_output=True, text=True)  # fmt: skip
        assert f'registry-auth-file = "{auth}"' in printed.stdout, printed.stderr
        checked = subprocess.run([str(BIN / "amberd"), "--check", "--config",
                                  str(a.root / "amberd.toml")], capture_output=True, text=True)  # fmt: skip
        assert f"logins for {htpasswd_registry}" in checked.stdout, checked.stdout
        assert "s3cret" not in a.log.read_text()
        assert base64.b64encode(b"alice:s3cret").decode() not in a.log.read_text()
    finally:
        a.stop()
