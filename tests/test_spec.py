"""Tests for amber.daemon.spec: good specs, every kind of error, stamp rules."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import msgpack
import pytest

from amber.daemon.build.spec import (
    Base,
    Spec,
    SpecError,
    StampRule,
    load_spec,
    parse_duration,
    parse_spec,
    spec_from_dict,
)

DIGEST = "a" * 64

ISSUE3 = """\
[build]
name = "zlib"
base = "host"                 # see below
workdir = "/build"            # created if missing; default cwd of steps
env = { CFLAGS = "-O2" }

[[source]]                    # a local file copied into the tree; the
path = "zlib-1.2.13.tar.gz"   # sources issue extends this
dest = "zlib-1.2.13.tar.gz"

[[step]]
name = "extract"
run = "tar xzf zlib-1.2.13.tar.gz"

[[step]]
name = "build"
run = "cd zlib-1.2.13 && ./configure && make -j2"
# optional: cwd, env, timeout = "10m", network = false, user = "build" | "root"
"""

ISSUE5 = f"""\
[build]
name = "heads"

[[source]]
url = "https://zlib.net/zlib-1.2.13.tar.gz"
sha256 = "{DIGEST.upper()}"
dest = "packages/zlib-1.2.13.tar.gz"
stamp = "packages/.zlib-1.2.13_verify"

[[source]]
path = "checkout"

[[stamp]]
path = "packages/.{{name}}_verify"
covers = "packages/{{name}}.tar.*"

[[stamp]]
path = "build/*/.configured"

[[step]]
name = "make"
run = "make"
"""


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    """A spec folder holding the local sources the examples name."""
    (tmp_path / "zlib-1.2.13.tar.gz").write_bytes(b"not really a tarball")
    (tmp_path / "checkout").mkdir()
    return tmp_path


def parse(text: str, base_dir: Path) -> Spec:
    return parse_spec(textwrap.dedent(text), "spec.toml", base_dir)


def spec_error(text: str, base_dir: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(text, base_dir)
    return info.value


def with_steps(body: str) -> str:
    """A minimal valid spec around ``body``, which is appended after it."""
    return '[build]\nname = "x"\n\n[[step]]\nname = "s"\nrun = "true"\n\n' + body


# --------------------------------------------------------------------------- good specs


def test_issue3_example(spec_dir: Path) -> None:
    spec = parse(ISSUE3, spec_dir)
    assert spec.name == "zlib"
    assert spec.base == Base("host")
    assert spec.workdir == "/build"
    assert dict(spec.env) == {"CFLAGS": "-O2"}
    assert spec.output is None and spec.key_salt is None
    (source,) = spec.sources
    assert source.path == spec_dir / "zlib-1.2.13.tar.gz"
    assert source.dest == "/build/zlib-1.2.13.tar.gz"
    assert source.url is None and source.sha256 is None
    extract, build = spec.steps
    assert extract.name == "extract"
    assert build.run == "cd zlib-1.2.13 && ./configure && make -j2"
    assert build.cwd == "/build"
    assert build.timeout == 3600.0
    assert build.network is False and build.user == "build"
    assert dict(build.env) == {}
    assert spec.step_env(build) == {"CFLAGS": "-O2"}


def test_issue5_example(spec_dir: Path) -> None:
    spec = parse(ISSUE5, spec_dir)
    url_source, dir_source = spec.sources
    assert url_source.url == "https://zlib.net/zlib-1.2.13.tar.gz"
    assert url_source.sha256 == DIGEST  # normalised to lowercase
    assert url_source.dest == "/build/packages/zlib-1.2.13.tar.gz"
    assert url_source.stamp == "/build/packages/.zlib-1.2.13_verify"
    assert dir_source.path == spec_dir / "checkout"
    assert dir_source.dest == "/build/checkout"
    verify, configured = spec.stamps
    assert verify == StampRule("packages/.{name}_verify", ("packages/{name}.tar.*",))
    assert configured == StampRule("build/*/.configured", ("build/{1}",))


def test_load_spec_resolves_paths_against_the_spec_folder(spec_dir: Path) -> None:
    spec_file = spec_dir / "spec.toml"
    spec_file.write_text(ISSUE3)
    spec = load_spec(spec_file)
    assert spec.sources[0].path == spec_dir / "zlib-1.2.13.tar.gz"


def test_load_spec_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"nothere\.toml: cannot read spec"):
        load_spec(tmp_path / "nothere.toml")


def test_all_optional_fields(spec_dir: Path) -> None:
    text = """\
        [build]
        name = "all"
        base = "dir:rootfs"
        workdir = "/src/"
        env = { A = "1", B = "2" }
        output = "out"
        key_salt = "v2"

        [[source]]
        url = "file:///srv/mirror/lua-5.4.tar.gz"
        blake3 = "DIGEST"

        [[step]]
        name = "configure"
        run = "./configure"
        cwd = "lua"
        env = { B = "3", C = "4" }
        timeout = "1h30m"
        network = true
        user = "root"

        [[step]]
        name = "make"
        run = "make"
        cwd = "/tmp/../opt"
        timeout = 90

        [[step]]
        name = "test"
        run = "make test"
        timeout = 1.5
        """
    spec = parse(text.replace("DIGEST", DIGEST), spec_dir)
    assert spec.base == Base("dir", str(spec_dir / "rootfs"))
    assert spec.workdir == "/src"
    assert spec.output == "/src/out"
    assert spec.key_salt == "v2"
    assert spec.sources[0].dest == "/src/lua-5.4.tar.gz"
    assert spec.sources[0].blake3 == DIGEST
    configure, make, _ = spec.steps
    assert configure.cwd == "/src/lua"
    assert configure.timeout == 5400.0
    assert configure.network is True and configure.user == "root"
    assert spec.step_env(configure) == {"A": "1", "B": "3", "C": "4"}
    assert make.cwd == "/opt"
    assert make.timeout == 90.0
    assert spec.steps[2].timeout == 1.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host", Base("host")),
        ("oci:/images/alpine.tar", Base("oci", "/images/alpine.tar")),
        (f"tree:{DIGEST.upper()}", Base("tree", DIGEST)),
        ("debian-bookworm", Base("image", "debian-bookworm")),
        ("ci/debian_12.1", Base("image", "ci/debian_12.1")),
    ],
)
def test_bases(spec_dir: Path, text: str, expected: Base) -> None:
    spec = parse(
        f'[build]\nname = "x"\nbase = "{text}"\n[[step]]\nname = "s"\nrun = "true"\n', spec_dir
    )
    assert spec.base == expected
    assert str(spec.base) in (text, text.lower())


def test_to_dict_is_canonical_and_round_trips(spec_dir: Path) -> None:
    spec = parse(ISSUE5, spec_dir)
    document = spec.to_dict()
    assert json.loads(json.dumps(document)) == document
    assert msgpack.unpackb(msgpack.packb(document)) == document
    assert list(document) == ["build", "source", "stamp", "step"]
    assert list(document["build"]) == sorted(document["build"])
    assert "key_salt" not in document["build"]  # unset keys are left out, not null
    assert spec_from_dict(document, "wire", Path("/")) == spec
    assert parse(ISSUE5, spec_dir).to_dict() == document


def test_step_definition_is_sorted_and_complete(spec_dir: Path) -> None:
    step = parse(ISSUE3, spec_dir).steps[1]
    definition = step.definition()
    assert list(definition) == ["cwd", "env", "name", "network", "run", "timeout", "user"]
    assert definition["timeout"] == 3600.0
    assert msgpack.packb(definition) == msgpack.packb(parse(ISSUE3, spec_dir).steps[1].definition())


def test_multiline_run_does_not_confuse_line_numbers(spec_dir: Path) -> None:
    error = spec_error(
        '''\
        [build]
        name = "x"

        [[step]]
        name = "check"
        run = """
        [ -f x ] || exit 1
        [[step]]
        """

        [[step]]
        name = "bad"
        run = "true"
        timeout = "soon"
        ''',
        spec_dir,
    )
    assert error.key == "step[2].timeout"
    assert error.line == 14


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("10m", 600.0), ("1h", 3600.0), ("1h30m", 5400.0), ("1h2m3s", 3723.0),
     ("1.5h", 5400.0), (" 2m ", 120.0), ("0s", 0.0)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "m", "10x", "1m1h", "1h 30m", "-5s", "1.m", "10mm"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


# --------------------------------------------------------------------------- errors


def test_toml_syntax_error_names_file_and_line(spec_dir: Path) -> None:
    error = spec_error('[build]\nname = "x"\nrun = oops\n', spec_dir)
    assert error.line == 3
    assert str(error).startswith("spec.toml:3: invalid TOML:")


@pytest.mark.parametrize(
    ("text", "key", "line", "words"),
    [
        # unknown keys, with a hint when one is close
        ('[build]\nnmae = "x"\n', "build.nmae", 2, 'did you mean "name"'),
        (with_steps('[[step]]\nname = "t"\nrun = "x"\ntimout = "1m"\n'), "step[2].timout", 11,
         'did you mean "timeout"'),
        (with_steps("[[source]]\npth = 'x'\n"), "source[1].pth", 9, "unknown key"),
        (with_steps("[[stamp]]\npath = 'a/.s'\ncover = 'a'\n"), "stamp[1].cover", 10, "unknown"),
        (with_steps("[extra]\na = 1\n"), "extra", 8, "unknown key"),
        # missing required keys and tables
        ('[[step]]\nname = "s"\nrun = "true"\n', "build", None, "missing required table"),
        ('[build]\nbase = "host"\n[[step]]\nname = "s"\nrun = "x"\n', "build.name", 1,
         "missing required key"),
        (with_steps('[[step]]\nname = "t"\n'), "step[2].run", 8, "missing required key"),
        ('[build]\nname = "x"\n', "step", None, "at least one [[step]]"),
        # wrong types; bool is not int
        ('[build]\nname = 5\n', "build.name", 2, "expected a string, got 5"),
        (with_steps('[[step]]\nname = "t"\nrun = "x"\ntimeout = true\n'), "step[2].timeout", 11,
         "got true"),
        (with_steps('[[step]]\nname = "t"\nrun = "x"\nnetwork = 1\n'), "step[2].network", 11,
         "expected a boolean"),
        (with_steps('[[step]]\nname = "t"\nrun = "x"\ntimeout = 0\n'), "step[2].timeout", 11,
         'expected a duration like "10m", got 0'),
        (with_steps('[[step]]\nname = "t"\nrun = "x"\ntimeout = "ten"\n'), "step[2].timeout", 11,
         "duration"),
        (with_steps('[[step]]\nname = "t"\nrun = "x"\nuser = "admin"\n'), "step[2].user", 11,
         '"build" or "root"'),
        ('[build]\nname = "x"\nenv = { A = 1 }\n[[step]]\nname = "s"\nrun = "x"\n',
         "build.env.A", 3, "expected a string, got 1"),
        ('[build]\nname = "x"\n[build.env]\nA = true\n[[step]]\nname = "s"\nrun = "x"\n',
         "build.env.A", 4, "got true"),
        ('build = "x"\n[[step]]\nname = "s"\nrun = "x"\n', "build", 1, "expected a table"),
        ('[build]\nname = "x"\n[step]\nname = "s"\n', "step", 3, "array of tables"),
        # bad names and duplicates
        ('[build]\nname = "my build"\n[[step]]\nname = "s"\nrun = "x"\n', "build.name", 2,
         "letters, digits"),
        (with_steps('[[step]]\nname = ".."\nrun = "x"\n'), "step[2].name", 9, "letters"),
        (with_steps('[[step]]\nname = "s"\nrun = "x"\n'), "step[2].name", 9,
         'duplicate step name "s" (first used by step[1])'),
        # bases
        ('[build]\nname = "x"\nbase = "docker:alpine"\n', "build.base", 3, "image name"),
        ('[build]\nname = "x"\nbase = "tree:abc"\n', "build.base", 3, "64-digit hex"),
        ('[build]\nname = "x"\nbase = "dir:"\n', "build.base", 3, "needs a path"),
        ('[build]\nname = "x"\nbase = "/abs"\n', "build.base", 3, "image name"),
        ('[build]\nname = "x"\nworkdir = "build"\n', "build.workdir", 3, "absolute"),
        # sources
        (with_steps("[[source]]\ndest = 'x'\n"), "source[1]", 8, "exactly one of path or url"),
        (with_steps(f"[[source]]\npath = 'a'\nurl = 'https://h/a'\nsha256 = '{DIGEST}'\n"),
         "source[1]", 8, "exactly one"),
        (with_steps("[[source]]\npath = 'missing.tar'\n"), "source[1].path", 9,
         "missing.tar: No such file"),
        (with_steps("[[source]]\nurl = 'https://h/a.tar'\n"), "source[1].url", 9,
         "needs a sha256 or blake3"),
        (with_steps(f"[[source]]\nurl = 'ftp://h/a.tar'\nsha256 = '{DIGEST}'\n"),
         "source[1].url", 9, "only http://, https:// and file://"),
        (with_steps(f"[[source]]\nurl = 'https:///a.tar'\nsha256 = '{DIGEST}'\n"),
         "source[1].url", 9, "no host"),
        (with_steps(f"[[source]]\nurl = 'https://h/'\nsha256 = '{DIGEST}'\n"),
         "source[1].url", 9, "no path"),
        (with_steps(f"[[source]]\nurl = 'https://h/d/'\nsha256 = '{DIGEST}'\n"),
         "source[1].dest", 8, "give dest"),
        (with_steps("[[source]]\nurl = 'https://h/a'\nsha256 = 'abc'\n"), "source[1].sha256", 10,
         "64 hex digits"),
        (with_steps(f"[[source]]\npath = 'checkout'\nblake3 = '{DIGEST}'\n"), "source[1].path", 9,
         "digests are for files"),
        (with_steps("[[source]]\npath = 'checkout'\ndest = '/'\n"), "source[1].dest", 10,
         "root of the tree"),
        (with_steps("[[source]]\npath = 'checkout'\n[[source]]\npath = 'checkout'\n"),
         "source[2].dest", 10, "already the dest of source[1]"),
        # stamp rules
        (with_steps("[[stamp]]\npath = '.configured'\n"), "stamp[1].covers", 8,
         "directly in the workdir"),
        (with_steps("[[stamp]]\npath = 'p/.{n}_v'\ncovers = 'p/{m}.tar'\n"), "stamp[1].covers", 10,
         "{m} is not bound"),
        (with_steps("[[stamp]]\npath = 'b/*/.c'\ncovers = ['b/{2}']\n"), "stamp[1].covers", 10,
         "{2} is not bound"),
        (with_steps("[[stamp]]\npath = 'b/?/.c'\n"), "stamp[1].path", 9, "only '*' and {name}"),
        (with_steps("[[stamp]]\npath = 'b/**/.c'\n"), "stamp[1].path", 9, "'**' is not supported"),
        (with_steps("[[stamp]]\npath = 'b/{1}/.c'\n"), "stamp[1].path", 9, "placeholder"),
        (with_steps("[[stamp]]\npath = 'b/{a b}/.c'\n"), "stamp[1].path", 9, "placeholder"),
        (with_steps("[[stamp]]\npath = 'b/.c'\ncovers = 'b/{x'\n"), "stamp[1].covers", 10,
         "braces"),
        (with_steps("[[stamp]]\npath = 'b/.c'\ncovers = []\n"), "stamp[1].covers", 10,
         "at least one"),
        (with_steps("[[stamp]]\npath = 'b/.c'\ncovers = [1]\n"), "stamp[1].covers", 10,
         "expected a string pattern"),
        (with_steps("[[stamp]]\ncovers = 'b'\n"), "stamp[1].path", 8, "missing required key"),
    ],
)  # fmt: skip
def test_errors_name_key_and_line(
    spec_dir: Path, text: str, key: str, line: int | None, words: str
) -> None:
    error = spec_error(text, spec_dir)
    assert error.key == key
    assert error.line == line
    assert words in error.problem
    where = "spec.toml" if line is None else f"spec.toml:{line}"
    assert str(error) == f"{where}: {key}: {error.problem}"


# --------------------------------------------------------------------------- hostile paths

HOSTILE = ["../../etc/passwd", "/../x", "a/../../../x", "ok\0/x"]


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize(
    ("template", "key"),
    [
        ("[[source]]\npath = 'checkout'\ndest = {v}\n", "source[1].dest"),
        ("[[source]]\npath = 'checkout'\nstamp = {v}\n", "source[1].stamp"),
        ("[[step]]\nname = 't'\nrun = 'x'\ncwd = {v}\n", "step[2].cwd"),
        ("[[stamp]]\npath = 'b/.c'\ncovers = {v}\n", "stamp[1].covers"),
        ("[[stamp]]\npath = 'b/.c'\ncovers = ['b', {v}]\n", "stamp[1].covers"),
        ("[[stamp]]\npath = {v}\ncovers = 'b'\n", "stamp[1].path"),
    ],
)
def test_hostile_paths_in_tables(spec_dir: Path, template: str, key: str, value: str) -> None:
    error = spec_error(with_steps(template.format(v=json.dumps(value))), spec_dir)
    assert error.key == key
    assert error.line is not None


@pytest.mark.parametrize("value", [*HOSTILE, "/build/../../x"])
@pytest.mark.parametrize("key", ["workdir", "output"])
def test_hostile_paths_in_build(spec_dir: Path, key: str, value: str) -> None:
    text = f'[build]\nname = "x"\n{key} = {json.dumps(value)}\n[[step]]\nname = "s"\nrun = "x"\n'
    error = spec_error(text, spec_dir)
    assert error.key == f"build.{key}"
    assert error.line == 3


@pytest.mark.parametrize(
    ("template", "key"),
    [
        ("[[step]]\nname = 't'\nrun = {v}\n", "step[2].run"),
        ("[[step]]\nname = 't'\nrun = 'x'\nenv = {{ A = {v} }}\n", "step[2].env.A"),
        ("[[source]]\npath = {v}\n", "source[1].path"),
    ],
)
def test_nul_bytes_are_refused(spec_dir: Path, template: str, key: str) -> None:
    error = spec_error(with_steps(template.format(v=json.dumps("a\0b"))), spec_dir)
    assert error.key == key
    assert "NUL" in error.problem


def test_dotdot_inside_the_tree_is_fine(spec_dir: Path) -> None:
    spec = parse(with_steps("[[source]]\npath = 'checkout'\ndest = '../src/./x//y'\n"), spec_dir)
    assert spec.sources[0].dest == "/src/x/y"


def test_absolute_stamp_patterns_inside_workdir_become_relative(spec_dir: Path) -> None:
    spec = parse(
        with_steps("[[stamp]]\npath = '/build/b/*/.c'\ncovers = '/build/b/{1}'\n"), spec_dir
    )
    assert spec.stamps[0] == StampRule("b/*/.c", ("b/{1}",))
    error = spec_error(with_steps("[[stamp]]\npath = '/etc/b/.c'\n"), spec_dir)
    assert error.key == "stamp[1].path"
    assert "leaves the workdir" in error.problem


# --------------------------------------------------------------------------- stamp rules


def test_stamp_rule_with_named_placeholder() -> None:
    rule = StampRule("packages/.{name}_verify", ("packages/{name}.tar.*",))
    bindings = rule.match_stamp("packages/.zlib-1.2.13_verify")
    assert bindings == {"name": "zlib-1.2.13"}
    assert rule.products_for(bindings) == ["packages/zlib-1.2.13.tar.*"]


def test_stamp_rule_with_default_covers(spec_dir: Path) -> None:
    (rule,) = parse(with_steps("[[stamp]]\npath = 'build/*/.configured'\n"), spec_dir).stamps
    bindings = rule.match_stamp("build/zlib-1.2.13/.configured")
    assert bindings == {"1": "zlib-1.2.13"}
    assert rule.products_for(bindings) == ["build/zlib-1.2.13"]


@pytest.mark.parametrize(
    "relpath",
    [
        "packages/.zlib_verify/extra",
        "packages/._verify",  # {name} needs at least one character
        "other/.zlib_verify",
        "packages/sub/.zlib_verify",  # {name} never spans a '/'
        "x/packages/.zlib_verify",
        "packages/../packages/.zlib_verify",
    ],
)
def test_stamp_rule_non_matches(relpath: str) -> None:
    rule = StampRule("packages/.{name}_verify", ("packages/{name}.tar.*",))
    assert rule.match_stamp(relpath) is None


def test_stamp_rule_repeated_placeholder_must_agree() -> None:
    rule = StampRule("build/{pkg}/.{pkg}.done", ("build/{pkg}",))
    assert rule.match_stamp("build/lua/.lua.done") == {"pkg": "lua"}
    assert rule.match_stamp("build/lua/.zlib.done") is None


def test_stamp_rule_products_escape_glob_characters() -> None:
    rule = StampRule("build/*/.build", ("build/{1}/*.o", "out/{1}"))
    bindings = rule.match_stamp("build/odd[1]*/.build")
    assert bindings == {"1": "odd[1]*"}
    assert rule.products_for(bindings) == ["build/odd[[]1][*]/*.o", "out/odd[[]1][*]"]


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({1: "x"}, "1"),
        ({"build": {"name": "x", "env": {1: "a"}}, "step": []}, "build.env.1"),
        ({"build": {"name": "x"}, "step": ["run"]}, "step[1]"),
        ({"build": {"name": "x"}, "step": [{"name": "s", "run": "x", "timeout": float("nan")}]},
         "step[1].timeout"),
    ],
)  # fmt: skip
def test_documents_off_the_wire_are_checked(document: dict, key: str) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict(document, "wire", Path("/"))
    assert info.value.key == key
    assert info.value.line is None
