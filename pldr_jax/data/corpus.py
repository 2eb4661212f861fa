"""The embedded default corpus: English text that ships with every CPython, so no download is needed.

It is made of

* every topic of ``pydoc_data.topics.topics`` (the text behind ``help("FOR")`` etc., taken from the
  Python language reference), one document per topic, sorted by topic name; and
* the module docstring of each standard-library module in the fixed list :data:`STDLIB_MODULES`,
  one document per module, in list order. Docstrings of pure-Python modules are read from their
  source with :mod:`ast` (no import, no side effects); built-in/extension/frozen modules are imported
  to read ``__doc__``. Modules that are missing in this Python, fail to import/parse, or have no
  docstring are skipped. Modules are looked up as a fresh interpreter finds them (built-in, frozen, or
  in the standard-library folders), never through ``sys.modules`` or ``sys.path``: what a process
  imported, replaced or put on its path before cannot change the corpus, nor so the data
  fingerprints of runs on it (`pldr_jax.data.pipeline`).

The result is deterministic for a given Python installation (it changes only with the Python
version). Measured on CPython 3.11.7: **270 documents, 625,197 characters** (79 pydoc topics with
464,891 characters + 191 module docstrings with 160,306), i.e. 150,992 tokens (EOS included) with the
paper's 32k tokenizer.
Call :func:`default_corpus_size` to measure it on your interpreter.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import os
import sys
import sysconfig
import warnings
from dataclasses import dataclass

__all__ = ["STDLIB_MODULES", "CorpusSize", "default_corpus_documents", "default_corpus_size"]

#: Standard-library modules whose docstrings join the corpus (fixed order; missing ones skipped).
#: Deliberately excludes modules with import-time side effects (``this``, ``antigravity``).
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "aifc", "argparse", "array", "ast", "asynchat", "asyncio", "asyncore", "atexit",
    "audioop", "base64", "bdb", "binascii", "bisect", "builtins", "bz2", "cProfile", "calendar",
    "cgi", "cgitb", "chunk", "cmath", "cmd", "code", "codecs", "codeop", "collections", "colorsys",
    "compileall", "concurrent.futures", "configparser", "contextlib", "contextvars", "copy",
    "copyreg", "crypt", "csv", "ctypes", "curses", "dataclasses", "datetime", "dbm", "decimal",
    "difflib", "dis", "doctest", "email", "email.message", "email.mime", "email.parser",
    "encodings", "enum", "errno", "faulthandler", "fcntl", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "gc", "getopt", "getpass", "gettext", "glob", "graphlib",
    "grp", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http", "http.client",
    "http.cookiejar", "http.cookies", "http.server", "imaplib", "imghdr", "importlib",
    "importlib.metadata", "importlib.resources", "inspect", "io", "ipaddress", "itertools", "json",
    "keyword", "linecache", "locale", "logging", "logging.handlers", "lzma", "mailbox", "mailcap",
    "marshal", "math", "mimetypes", "mmap", "modulefinder", "multiprocessing", "netrc",
    "nntplib", "numbers", "opcode", "operator", "optparse", "os", "os.path", "pathlib", "pdb",
    "pickle", "pickletools", "pipes", "pkgutil", "platform", "plistlib", "poplib", "posix",
    "pprint", "profile", "pstats", "pty", "pwd", "py_compile", "pyclbr", "pydoc", "queue",
    "quopri", "random", "re", "readline", "reprlib", "resource", "rlcompleter", "runpy", "sched",
    "secrets", "select", "selectors", "shelve", "shlex", "shutil", "signal", "site", "smtpd",
    "smtplib", "sndhdr", "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics",
    "string", "stringprep", "struct", "subprocess", "sunau", "symtable", "sys", "sysconfig",
    "syslog", "tabnanny", "tarfile", "telnetlib", "tempfile", "termios", "textwrap", "threading",
    "time", "timeit", "tkinter", "token", "tokenize", "tomllib", "trace", "traceback",
    "tracemalloc", "tty", "turtle", "types", "typing", "unicodedata", "unittest", "unittest.mock",
    "urllib.error", "urllib.parse", "urllib.request", "urllib.robotparser", "uu", "uuid", "venv",
    "warnings", "wave", "weakref", "webbrowser", "wsgiref", "xdrlib", "xml", "xml.dom",
    "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax", "xmlrpc.client", "xmlrpc.server",
    "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)


@dataclass(frozen=True)
class CorpusSize:
    """Size of a document list: number of documents and total characters (str length)."""
    documents: int
    characters: int


def _stdlib_paths() -> list[str]:
    """The folders of this interpreter's standard library (pure-Python modules and extensions)."""
    paths = [sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")]
    paths += [os.path.join(p, "lib-dynload") for p in paths]
    return list(dict.fromkeys(p for p in paths if p and os.path.isdir(p)))


def _stdlib_spec(name: str):
    """The module spec of stdlib module ``name`` as a fresh interpreter would find it: built-in, frozen
    or in the standard-library folders -- never from ``sys.modules`` or ``sys.path``, so what this
    process imported, replaced or put on its path (cwd, tests, other packages) cannot change it."""
    if name in sys.builtin_module_names:
        return importlib.machinery.BuiltinImporter.find_spec(name)
    spec = importlib.machinery.FrozenImporter.find_spec(name)
    if spec is not None:
        return spec
    path: list[str] | None = _stdlib_paths()
    parts = name.split(".")
    for i in range(len(parts)):
        if path is None:  # a parent that is a module, not a package
            return None
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:i + 1]), path)
        if spec is None:
            return None
        path = list(spec.submodule_search_locations) if spec.submodule_search_locations is not None else None
    return spec


def _module_docstring(name: str) -> str | None:
    """Docstring of stdlib module ``name`` (source via ast when possible), or None."""
    try:
        spec = _stdlib_spec(name)
    except (ImportError, ValueError, AttributeError, OSError):
        return None
    if spec is None:
        return None
    origin = spec.origin or ""
    try:
        if origin.endswith(".py"):
            with open(origin, encoding="utf-8") as f:
                return ast.get_docstring(ast.parse(f.read()), clean=True)
        # built-in / extension / frozen modules: importing them has no side effects of note.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. DeprecationWarning of audioop on 3.11+
            return importlib.import_module(name).__doc__
    except Exception:  # noqa: BLE001 - any failure means "skip this module"
        return None


def default_corpus_documents() -> list[str]:
    """The embedded corpus as a list of non-empty ``str`` documents (deterministic order)."""
    from pydoc_data.topics import topics
    docs = [topics[k].strip() for k in sorted(topics)]
    for name in STDLIB_MODULES:
        doc = _module_docstring(name)
        if doc and doc.strip():
            docs.append(doc.strip())
    return [d for d in docs if d]


def default_corpus_size(documents: list[str] | None = None) -> CorpusSize:
    """(documents, characters) of ``documents`` (default: the embedded corpus)."""
    docs = default_corpus_documents() if documents is None else documents
    return CorpusSize(documents=len(docs), characters=sum(len(d) for d in docs))
