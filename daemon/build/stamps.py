"""Stamp rules over trees: a stamp and the products it vouches for come together or not at all.

Build systems such as Heads remember finished stages with stamp files
(``build/zlib/.configured``). A tree that enters a build from outside the
build's own chain of steps (its base, a local checkout carrying an old
``build/``, an imported image) may carry products without their stamp (make
would redo the stage over them: extract again over a patched tree, and
``patch`` stops to ask) or a stamp without its products (make skips a stage
it needs). Before the first step, amber applies the spec's ``[[stamp]]``
rules (see ``spec.py`` for their syntax) to the initial tree, until nothing
changes:

- a *stamp without its products* is removed: every ``covers`` pattern of
  the rule, filled with what the stamp's path bound, must match at least one
  present product;
- a *product without its stamp* is removed, whole: a path matching a
  ``covers`` pattern (placeholders matching any name) that no present stamp
  of the rule vouches for is stale.

What counts as present: a file, symlink or other non-directory that exists;
a directory that holds something other than stamps (files matching any
rule's stamp pattern) and empty directories. A ``covers`` pattern naming a
directory that holds the stamp (the default, ``build/{1}`` for
``build/*/.configured``) only ever matches directories, so a stray
``build/README`` is not taken for a product.

Glob syntax in ``covers``: ``*``, ``?`` and ``[...]`` match within one path
component, a leading dot included (like ``*`` in the stamp pattern); there
is no ``**``. Paths the caller asks to keep (the destinations of the spec's
own sources, and the stamps amber wrote for them) are never removed, nor is
anything holding them; such a conflict is reported as ``kept``.

Everything here is pure: it reads trees from a store and, in
``apply_rules``, writes the rewritten directories. Between the steps of one
build amber does not interfere: a stage in progress legitimately has
products without a stamp yet.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from amber.daemon.build.spec import StampRule
from amber.sandbox import tree as treefmt
from amber.sandbox.store import Batch, Store
from amber.sandbox.tree import Entry

__all__ = ["Finding", "apply_rules", "check_tree", "remove_paths"]

Rel = tuple[str, ...]  # a path relative to the workdir, by component

STALE_PRODUCT = "stale-product"
ORPHAN_STAMP = "orphan-stamp"
KEPT = "kept"

_PLACEHOLDER = re.compile(r"\{([A-Za-z][A-Za-z0-9_]*|[1-9][0-9]*)\}")
_MAX_ROUNDS = 1000  # every round removes something, so this is only a guard


@dataclass(frozen=True)
class Finding:
    """One inconsistency: what was (or would be) removed, or kept, and why."""

    path: str  # absolute path in the tree
    kind: str  # stale-product | orphan-stamp | kept | stale-source-stamp
    reason: str
    rule: str | None = None  # the stamp rule's path pattern, when a rule found it

    def note(self) -> str:
        """The line for the build log."""
        verb = "kept" if self.kind == KEPT else "removed"
        rule = f" (stamp rule {self.rule})" if self.rule else ""
        return f"{verb} {self.path}: {self.reason}{rule}"

    def to_dict(self) -> dict[str, Any]:
        """The finding as a problem ``amber verify`` reports."""
        out = {"message": self.reason, "path": self.path, "kind": self.kind}
        if self.rule is not None:
            out["rule"] = self.rule
        return out


def check_tree(
    store: Store,
    root: bytes,
    workdir: str,
    rules: Sequence[StampRule],
    *,
    keep: Iterable[str] = (),
) -> list[Finding]:
    """What ``apply_rules`` would remove from ``root`` (or keep), changing nothing."""
    engine = _Engine(store, root, workdir, rules, keep)
    return engine.run()


def apply_rules(
    store: Store,
    root: bytes,
    workdir: str,
    rules: Sequence[StampRule],
    batch: Batch,
    *,
    keep: Iterable[str] = (),
) -> tuple[bytes, list[Finding]]:
    """``root`` with stale products and orphan stamps removed, and what was done.

    Only the directories on the paths of removed entries are rewritten.
    """
    engine = _Engine(store, root, workdir, rules, keep)
    findings = engine.run()
    removed = ["/".join((*engine.workdir_parts, *rel)) for rel in engine.removed]
    return remove_paths(store, root, removed, batch), findings


def remove_paths(store: Store, root: bytes, paths: Iterable[str], batch: Batch) -> bytes:
    """``root`` without the entries at ``paths`` (absolute or relative to the root).

    Paths that do not exist are ignored; only the directories on the way to
    a removed entry are rewritten.
    """
    trie: dict[str, Any] = {}
    for parts in sorted((tuple(p for p in path.split("/") if p) for path in paths), key=len):
        node: dict[str, Any] | None = trie
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if node is None:
                break  # an ancestor is removed already
        else:
            if parts:
                node[parts[-1]] = None
    return _rewrite(store, root, trie, batch) if trie else root


# --------------------------------------------------------------------------- patterns


def _glob_regex(text: str) -> str:
    """Regex for a piece of one path component written as a glob (``*``, ``?``, ``[...]``)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        i += 1
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            j = i + 1 if i < n and text[i] == "!" else i
            j = j + 1 if j < n and text[j] == "]" else j
            while j < n and text[j] != "]":
                j += 1
            if j >= n:
                out.append(r"\[")
                continue
            body = text[i:j].replace("\\", r"\\")
            i = j + 1
            if body.startswith("!"):
                body = "^" + body[1:]
            elif body.startswith(("^", "[")):
                body = "\\" + body
            out.append(f"[{body}]")
        else:
            out.append(re.escape(char))
    return "".join(out)


def _compile(pattern: str) -> list[re.Pattern[str]]:
    """Per-component regexes for a covers glob; each ``{name}`` matches one or
    more characters as a named group (a repeat must match the same text)."""
    regexes = []
    for component in pattern.split("/"):
        pieces = _PLACEHOLDER.split(component)  # odd indexes: placeholder names
        seen: set[str] = set()
        text = []
        for index, piece in enumerate(pieces):
            if index % 2 == 0:
                text.append(_glob_regex(piece))
            elif piece in seen:
                text.append(f"(?P={_group(piece)})")
            else:
                seen.add(piece)
                text.append(f"(?P<{_group(piece)}>[^/]+)")
        regexes.append(re.compile("".join(text)))
    return regexes


def _group(name: str) -> str:
    return f"p_{name}"


def _stamp_regexes(rule: StampRule) -> list[re.Pattern[str]]:
    """Loose per-component matchers for the stamp pattern (``match_stamp`` decides)."""
    out = []
    for component in rule.path.split("/"):
        pieces = re.split(r"(\{[^{}/]*\}|\*)", component)
        text = []
        for piece in pieces:
            if piece == "*":
                text.append("[^/]*")
            elif piece.startswith("{") and piece.endswith("}"):
                text.append("[^/]+")
            else:
                text.append(re.escape(piece))
        out.append(re.compile("".join(text)))
    return out


def _numbered(rule: StampRule) -> list[str]:
    """The stamp pattern's components with each ``*`` written as its capture ``{1}``..."""
    counter = iter(range(1, rule.path.count("*") + 1))
    return re.sub(r"\*", lambda _: f"{{{next(counter)}}}", rule.path).split("/")


def _holds_stamp(rule: StampRule, cover: str) -> bool:
    """True when ``cover`` names a directory on the way to the stamp (e.g. the default)."""
    parts = cover.split("/")
    stamp = _numbered(rule)
    return len(parts) < len(stamp) and stamp[: len(parts)] == parts


def _fill(pattern_parts: Sequence[str], bindings: dict[str, str]) -> str:
    def fill(match: re.Match[str]) -> str:
        return bindings.get(match.group(1), match.group(0))

    return "/".join(_PLACEHOLDER.sub(fill, part) for part in pattern_parts)


# --------------------------------------------------------------------------- the engine


@dataclass
class _Stamp:
    rel: Rel
    bindings: dict[str, str]


@dataclass
class _Engine:
    store: Store
    root: bytes
    workdir: str
    rules: Sequence[StampRule]
    keep_paths: Iterable[str]
    removed: set[Rel] = field(default_factory=set)
    workdir_parts: Rel = ()
    _dirs: dict[Rel, dict[str, Entry] | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir_parts = tuple(p for p in self.workdir.split("/") if p)
        self.keep: set[Rel] = set()
        for path in self.keep_paths:
            parts = tuple(p for p in path.split("/") if p)
            if parts[: len(self.workdir_parts)] == self.workdir_parts:
                self.keep.add(parts[len(self.workdir_parts) :])
        self._stamp_matchers = [_stamp_regexes(rule) for rule in self.rules]
        top = self.store.lookup_path(self.root, "/".join(self.workdir_parts).encode())
        if not self.workdir_parts:
            self._dirs[()] = self._listing(self.root)
        elif top is not None and top.kind == treefmt.DIR:
            self._dirs[()] = self._listing(top.ref)
        else:
            self._dirs[()] = None

    # -- reading the tree, minus what was removed --------------------------------

    def _listing(self, digest: bytes) -> dict[str, Entry]:
        return {e.name.decode("utf-8", "surrogateescape"): e for e in self.store.get_tree(digest)}

    def entries(self, rel: Rel) -> dict[str, Entry] | None:
        """The directory at ``rel`` (names to entries, removals left out), or None."""
        if rel not in self._dirs:
            parent = self.entries(rel[:-1])
            entry = None if parent is None else parent.get(rel[-1])
            if entry is None or entry.kind != treefmt.DIR:
                self._dirs[rel] = None
            else:
                self._dirs[rel] = self._listing(entry.ref)
        listing = self._dirs[rel]
        if listing is None or not self.removed:
            return listing
        return {name: e for name, e in listing.items() if (*rel, name) not in self.removed}

    def match(self, regexes: list[re.Pattern[str]]) -> list[tuple[Rel, Entry, dict[str, str]]]:
        """Present paths matching per-component ``regexes``, with consistent bindings."""
        level: list[tuple[Rel, Entry | None, dict[str, str]]] = [((), None, {})]
        for regex in regexes:
            following = []
            for rel, _, bindings in level:
                listing = self.entries(rel)
                if listing is None:
                    continue
                for name in sorted(listing):
                    found = regex.fullmatch(name)
                    if found is None:
                        continue
                    merged = dict(bindings)
                    consistent = True
                    for group, value in found.groupdict().items():
                        key = group.removeprefix("p_")
                        if merged.setdefault(key, value) != value:
                            consistent = False
                    if consistent:
                        following.append(((*rel, name), listing[name], merged))
            level = following
        return [(rel, entry, b) for rel, entry, b in level if entry is not None]

    def is_stamp(self, rel: Rel) -> bool:
        text = "/".join(rel)
        return any(rule.match_stamp(text) is not None for rule in self.rules)

    def has_content(self, rel: Rel) -> bool:
        """A directory holds something other than stamps and empty directories."""
        listing = self.entries(rel) or {}
        for name, entry in listing.items():
            child = (*rel, name)
            if self.is_stamp(child):
                continue
            if entry.kind != treefmt.DIR or self.has_content(child):
                return True
        return False

    def present(self, rel: Rel, entry: Entry) -> bool:
        return entry.kind != treefmt.DIR or self.has_content(rel)

    def absolute(self, rel: Rel | str) -> str:
        parts = rel.split("/") if isinstance(rel, str) else rel
        return "/" + "/".join((*self.workdir_parts, *parts))

    def kept(self, rel: Rel) -> bool:
        """Keeping ``rel`` was asked for, or it holds something that was."""
        return any(k[: len(rel)] == rel for k in self.keep)

    # -- one round, and rounds until nothing changes ---------------------------------

    def stamps(self, index: int) -> list[_Stamp]:
        rule = self.rules[index]
        out = []
        for rel, _, _ in self.match(self._stamp_matchers[index]):
            bindings = rule.match_stamp("/".join(rel))
            if bindings is not None:
                out.append(_Stamp(rel, bindings))
        return out

    def round(self) -> list[tuple[Rel, Finding]]:
        """What the rules find in the current tree, topmost paths only."""
        findings: dict[Rel, Finding] = {}
        for index, rule in enumerate(self.rules):
            stamps = self.stamps(index)
            vouched: set[Rel] = set()
            for stamp in stamps:
                missing = None
                for cover, filled in zip(
                    rule.covers, rule.products_for(stamp.bindings), strict=True
                ):
                    dirs_only = _holds_stamp(rule, cover)
                    matches = [
                        (rel, e)
                        for rel, e, _ in self.match(_compile(filled))
                        if not dirs_only or e.kind == treefmt.DIR
                    ]
                    present = [rel for rel, e in matches if self.present(rel, e)]
                    vouched.update(rel for rel, _ in matches)
                    if not present and missing is None:
                        empty = " is empty apart from stamps" if matches else " is missing"
                        missing = self.absolute(_unescape(filled)) + empty
                if missing is not None:
                    reason = f"stamp without its products: {missing}"
                    findings.setdefault(
                        stamp.rel, self._finding(stamp.rel, ORPHAN_STAMP, reason, rule)
                    )
            for cover in rule.covers:
                dirs_only = _holds_stamp(rule, cover)
                for rel, entry, bindings in self.match(_compile(cover)):
                    if rel in vouched or (dirs_only and entry.kind != treefmt.DIR):
                        continue
                    if not self.present(rel, entry):
                        continue
                    stamp = _fill(_numbered(rule), bindings)
                    where = "" if "{" in stamp else " " + self.absolute(stamp)
                    reason = f"product without its stamp{where}"
                    findings.setdefault(rel, self._finding(rel, STALE_PRODUCT, reason, rule))
        # Removing a directory removes what it holds: report the topmost only.
        return [
            (rel, finding)
            for rel, finding in sorted(findings.items())
            if not any(
                rel[:i] in findings and findings[rel[:i]].kind != KEPT for i in range(1, len(rel))
            )
        ]

    def _finding(self, rel: Rel, kind: str, reason: str, rule: StampRule) -> Finding:
        if self.kept(rel):
            reason += ", but a source of the spec puts it there"
            kind = KEPT
        return Finding(self.absolute(rel), kind, reason, rule.path)

    def run(self) -> list[Finding]:
        if self._dirs[()] is None or not self.rules:
            return []
        out: list[Finding] = []
        reported: set[str] = set()
        for _ in range(_MAX_ROUNDS):
            changed = False
            for rel, finding in self.round():
                if finding.kind != KEPT:
                    self.removed.add(rel)
                    changed = True
                if finding.path not in reported:
                    reported.add(finding.path)
                    out.append(finding)
            if not changed:
                break
        return out


def _unescape(pattern: str) -> str:
    """A filled covers glob for messages: ``[[]`` back to ``[``."""
    return re.sub(r"\[([*?\[])\]", r"\1", pattern)


def _rewrite(store: Store, digest: bytes, trie: dict[str, Any], batch: Batch) -> bytes:
    entries = []
    for entry in store.get_tree(digest):
        name = entry.name.decode("utf-8", "surrogateescape")
        if name not in trie:
            entries.append(entry)
        elif trie[name] is not None and entry.kind == treefmt.DIR:
            entries.append(entry._replace(ref=_rewrite(store, entry.ref, trie[name], batch)))
        elif trie[name] is not None:
            entries.append(entry)
    return store.put_tree(entries, batch)
