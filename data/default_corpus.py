"""The default corpus: the running interpreter's standard library sources and docs.

Real text that exists on every machine with Python and no network, so the pipeline runs out of the box.

Selection rule (deterministic for a given Python installation):

1. Root: ``sysconfig.get_paths()["stdlib"]`` (e.g. ``/usr/lib/python3.11``).
2. Walk it; never enter ``site-packages``, ``dist-packages``, ``__pycache__``, ``lib-dynload``,
   ``config-*`` (build files), ``ensurepip`` (bundled wheels) or hidden directories.
3. Keep files whose extension is one of ``.py .txt .rst .md .toml .cfg .ini`` (source code, docs such as
   ``pydoc_data/topics.py``, ``LICENSE.txt``, ``idlelib/NEWS.txt``). Empty files are passed on (ingest skips and
   counts them).
4. Three tiers, each ordered by relative POSIX path (plain string sort): tier 1 is every kept file outside
   test directories (a path component named ``test``, ``tests``, ``idle_test`` or ``testmock``) and outside
   ``encodings/``; tier 2 is the ``.py`` files inside test directories (the test suite is real code; its data
   files - odd encodings, fixtures - are not taken); tier 3 is ``encodings/`` (mostly generated codec
   tables, so last).
5. Files are taken whole, in that order, while the running total stays within ``default_corpus_bytes``; the
   first file that would exceed it ends the selection. (CPython 3.11.7: ~1800 files, ~32 MB in all, more
   than half of it the test suite.)

Document ids are ``default:<relative path>``; the source column is ``default``.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import NamedTuple

TEXT_SUFFIXES = frozenset({".py", ".txt", ".rst", ".md", ".toml", ".cfg", ".ini"})
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "lib-dynload", "ensurepip"})
TEST_DIRS = frozenset({"test", "tests", "idle_test", "testmock"})
LAST_DIRS = frozenset({"encodings"})


class CorpusFile(NamedTuple):
    rel: str  # relative POSIX path under the stdlib root
    path: str  # absolute path
    size: int
    mtime_ns: int


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _skip_dir(name: str) -> bool:
    return name in SKIP_DIRS or name.startswith(".") or name.startswith("config-")


def default_corpus_files(max_bytes: int, root: str | Path | None = None) -> list[CorpusFile]:
    """The files of the default corpus under ``root`` (the stdlib), following the module's rule."""
    root = Path(root) if root is not None else stdlib_root()
    tier1: list[CorpusFile] = []
    tier2: list[CorpusFile] = []
    tier3: list[CorpusFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
        rel_dir = Path(dirpath).relative_to(root)
        in_tests = any(part in TEST_DIRS for part in rel_dir.parts)
        last = bool(rel_dir.parts) and rel_dir.parts[0] in LAST_DIRS
        for name in filenames:
            suffix = os.path.splitext(name)[1].lower()
            if suffix not in TEXT_SUFFIXES or name.startswith("."):
                continue
            if in_tests and suffix != ".py":
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not os.path.isfile(path):
                continue
            rel = (rel_dir / name).as_posix()
            tier = tier2 if in_tests else tier3 if last else tier1
            tier.append(CorpusFile(rel, path, st.st_size, st.st_mtime_ns))
    chosen: list[CorpusFile] = []
    total = 0
    for f in sorted(tier1) + sorted(tier2) + sorted(tier3):
        if total + f.size > max_bytes:
            break
        chosen.append(f)
        total += f.size
    return chosen


__all__ = ["CorpusFile", "default_corpus_files", "stdlib_root"]
