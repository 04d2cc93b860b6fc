"""Atomic writes: a file is written under a temporary name in its folder, then renamed into place.

Readers (a resumed run, a concurrent `report`) therefore see the old file or the new one, never
half of one. Used for every output a run or a cache writes.
"""

import contextlib
import json
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed.

    Args:
        path: str. The final file or folder.
        suffix: str or None. The temporary name's ending (some writers need one, e.g. `.keras`,
            `.weights.h5`, `.npy`). Defaults to `path`'s own extension.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if suffix is None:
        suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    os.remove(tmp)  # the writer creates it (some refuse an existing file, some write a folder)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path, text):
    """Write a text file atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def write_json_atomic(path, payload):
    """Write JSON (indented, keys sorted) atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path, default=None):
    """The JSON in `path`, or `default` when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default
