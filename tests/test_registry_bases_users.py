"""Pulled bases are per user, attacked as a real second uid (MAL, 4242) against BOB (4243).

BOB pulls a private image (htpasswd registry, his own credentials). MAL, without
credentials, names the same tag, the same digest, and the tree it became: each
is refused, nothing of BOB's reaches MAL. With credentials of her own, MAL pulls
the image herself (the registry's access log shows the downloads): BOB's record is
never her shortcut, and her pulls never change what BOB's base is.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from pathlib import Path

from rootfs import make_busybox_root
from second_user import BOB, Mal, mal_daemon, user_of
from test_registry_bases import (
    ON_BASE,
    access_log,
    blob_gets,
    htpasswd_registry,  # noqa: F401 (a fixture)
    push_image,
)


def login(user: Mal, host: str, name: str, password: str) -> None:
    """``user``'s own ~/.docker/config.json, as `docker login` writes it."""
    token = base64.b64encode(f"{name}:{password}".encode()).decode()
    user.write(".docker/config.json", json.dumps({"auths": {host: {"auth": token}}}))
    os.chown(user.home / ".docker", user.uid, user.uid)


def build(user: Mal, name: str, base: str) -> tuple[int, dict]:
    path = user.write(name, ON_BASE.format(base=base))
    proc = user.amber("build", "--json", path)
    return proc.returncode, json.loads(proc.stdout or b"{}")


def test_a_pulled_base_is_its_users_only(daemon_root: Path, htpasswd_registry: str, tmp_path: Path):  # noqa: F811
    reg = htpasswd_registry
    with mal_daemon(daemon_root) as mal:
        daemon = mal.daemon
        root = daemon.root / "bbroot"
        make_busybox_root(root)
        assert daemon.amber("image", "import", "bb", f"dir:{root}").returncode == 0  # shared
        digest = push_image(daemon, reg, "amber/private:v1", "secret", creds="alice:s3cret")
        by_tag, by_digest = (
            f"docker://{reg}/amber/private:v1",
            f"docker://{reg}/amber/private@{digest}",
        )
        bob = user_of(daemon, BOB)
        login(bob, reg, "alice", "s3cret")
        code, result = build(bob, "bob.toml", by_tag)
        assert code == 0, result
        with sqlite3.connect(daemon.state / "amber.db") as db:
            (tree,) = db.execute("SELECT tree FROM pulled_bases WHERE uid = ?", (BOB,)).fetchone()

        # MAL, no credentials: not by tag, not by digest, not as an image, not by its tree.
        for i, base in enumerate((by_tag, by_digest)):
            code, result = build(mal, f"mal{i}.toml", base)
            assert code != 0 and result["status"] == "errored", result
            assert "no credentials" in result["error"], result
            assert "secret" not in mal.amber("log", result["build"]).stdout.decode()
        code, said = mal.said("image", "import", "stolen", by_digest)
        assert code != 0 and "no credentials" in said, said
        code, said = mal.said("build", mal.write("tree.toml", ON_BASE.format(base=f"tree:{tree}")))
        assert code != 0 and "not in the store, or not a state of your builds" in said, said

        # MAL with a login of her own pulls it herself: her downloads, which the
        # registry (htpasswd for every request) served on her credentials.
        login(mal, reg, "mallory", "m4l")
        registry_log = tmp_path / "registry.log"
        mark = registry_log.stat().st_size
        code, result = build(mal, "mal-own.toml", by_digest)
        assert code == 0, result
        gets = blob_gets(access_log(registry_log, mark))
        assert gets and all('HTTP/1.1" 200 ' in line for line in gets), gets
        # BOB's base is still his own pull, downloaded by nobody since.
        mark = registry_log.stat().st_size
        code, result = build(bob, "bob-again.toml", by_digest)
        assert code == 0, result
        assert access_log(registry_log, mark) == []
        assert "secret" in bob.amber("log", result["build"], "--step", "after").stdout.decode()
