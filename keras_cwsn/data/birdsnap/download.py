"""Birdsnap downloader: fetches the images listed in images.txt, md5-checked, retried and resumable.

Standard library only (tqdm for the progress bar), so it runs where TensorFlow is not installed.
"""

import concurrent.futures
import dataclasses
import hashlib
import http.client
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from keras_cwsn.atomic import atomic_path, write_text_atomic
from keras_cwsn.data.birdsnap.hierarchy import birdsnap_hierarchy, read_images_file, species_of
from keras_cwsn.errors import UserError

METADATA_FILES = ("images.txt", "species.txt", "test_images.txt")
FAILED_FILE_NAME = "failed.tsv"
USER_AGENT = "keras_cwsn-birdsnap/1.0"


@dataclasses.dataclass
class DownloadSummary:
    """What a `download_images` run did.

    Args:
        total: int. Rows considered (after `subset`).
        downloaded: int. Files fetched in this run.
        already_ok: int. Files already present with the right md5.
        failed: list of `(url, path, reason)`.
    """

    total: int = 0
    downloaded: int = 0
    already_ok: int = 0
    failed: list = dataclasses.field(default_factory=list)


class _Permanent(Exception):
    """A download failure that retrying will not fix (404, bad URL)."""


def _safe_destination(images_dir, rel):
    """Absolute destination of `rel` under `images_dir`; ValueError for a path that would leave it."""
    if not rel:
        raise ValueError("empty path")
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith(("/", "\\")) or os.path.isabs(rel) or os.path.splitdrive(rel)[0]:
        raise ValueError(f"absolute path {rel!r} refused")
    if ".." in parts:
        raise ValueError(f"path {rel!r} with '..' refused")
    dest = os.path.realpath(os.path.join(images_dir, *[p for p in parts if p not in ("", ".")]))
    root = os.path.realpath(images_dir)
    if os.path.commonpath([dest, root]) != root or dest == root:
        raise ValueError(f"path {rel!r} leaves the output folder")
    return dest


def _md5_of(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url, dest, md5, timeout):
    """Downloads `url` to `dest` under a temporary name, so `dest` only ever holds a complete, md5-checked file."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    digest = hashlib.md5()
    with atomic_path(dest, suffix=".part") as tmp, open(tmp, "wb") as out:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if "photo_unavailable" in (response.geturl() or ""):
                    raise _Permanent("photo no longer available (redirected to placeholder)")
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    digest.update(chunk)
                    out.write(chunk)
        except urllib.error.HTTPError as e:
            if e.code in (408, 425, 429) or e.code >= 500:
                raise
            raise _Permanent(f"HTTP {e.code} {e.reason}") from e
        if md5 and digest.hexdigest() != md5.lower():
            raise ValueError(f"md5 mismatch (got {digest.hexdigest()}, expected {md5.lower()})")


def _describe(error):
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"URL error: {error.reason}"
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"{error}" if isinstance(error, (_Permanent, ValueError)) else f"{type(error).__name__}: {error}"


def _download_one(url, dest, md5, retries, timeout, backoff_base):
    """Returns "ok" (already there) or "downloaded", or raises with the last failure."""
    if os.path.isfile(dest) and (not md5 or _md5_of(dest) == md5.lower()):
        return "ok"
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise _Permanent(f"unsupported URL {url!r} (only http and https)")
    attempt = 0
    while True:
        try:
            _fetch(url, dest, md5, timeout)
            return "downloaded"
        except (OSError, ValueError, http.client.HTTPException):  # Network, timeout, md5.
            if attempt >= retries:
                raise
        time.sleep(backoff_base * (2**attempt))
        attempt += 1


def _clean(text):
    """One line for a TSV field: tabs and newlines in a URL or an error message would break the row."""
    return " ".join(str(text).split())


def _check_arguments(images_file, workers, retries, timeout, backoff_base):
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}.")
    if retries < 0:
        raise UserError(f"retries must be >= 0, got {retries}.")
    if not timeout > 0:
        raise UserError(f"timeout must be > 0 seconds, got {timeout}.")
    if backoff_base < 0:
        raise UserError(f"backoff_base must be >= 0, got {backoff_base}.")
    if not os.path.isfile(images_file):
        raise FileNotFoundError(f"images file not found: {images_file}")


def _plan(rows, images_dir, subset, summary):
    """`(url, rel, dest, md5)` per file to fetch; refused paths go to `summary.failed`."""
    wanted = None if subset is None else set(birdsnap_hierarchy(subset)[0])
    jobs, seen = [], set()
    for row in rows:
        url, rel, md5 = row["url"], row["path"], row["md5"]
        try:
            dest = _safe_destination(images_dir, rel)
        except ValueError as e:
            summary.failed.append((url, rel, str(e)))
            continue
        if (wanted is None or species_of(rel) in wanted) and dest not in seen:
            seen.add(dest)
            jobs.append((url, rel, dest, md5))
    return jobs


def _run(jobs, summary, workers, progress, **fetch_options):
    from tqdm.auto import tqdm  # A TFDS dependency.

    with tqdm(total=len(jobs), unit="img", disable=not progress, file=sys.stderr) as bar:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {
                pool.submit(_download_one, url, dest, md5, **fetch_options): (url, rel)
                for url, rel, dest, md5 in jobs
            }
            try:
                for future in concurrent.futures.as_completed(futures):
                    try:
                        outcome = future.result()
                    except Exception as e:  # One bad file must not stop the others.
                        summary.failed.append((*futures[future], _describe(e)))
                    else:
                        summary.already_ok += outcome == "ok"
                        summary.downloaded += outcome == "downloaded"
                    bar.update(1)
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                raise


def _copy_metadata(images_file, out_dir):
    """images.txt, and species.txt / test_images.txt from beside it, so that `out_dir` is a complete download."""
    source_dir = os.path.dirname(os.path.abspath(images_file))
    for name in METADATA_FILES:
        source = images_file if name == "images.txt" else os.path.join(source_dir, name)
        target = os.path.join(out_dir, name)
        if os.path.isfile(source) and not (os.path.exists(target) and os.path.samefile(source, target)):
            shutil.copyfile(source, target)


def download_images(
    images_file, out_dir, subset=None, workers=16, retries=3, timeout=30.0, backoff_base=1.0, progress=True
):
    """Downloads the images listed in Birdsnap's images.txt into `out_dir/images/`.

    Every file is checked against its md5; a bad one is deleted and retried. Files are written
    to a temporary name and renamed when complete, so a rerun skips what is already there with
    the right md5. Rows whose path is absolute or contains `..` are refused (counted as
    failed). images.txt, and species.txt / test_images.txt when they sit beside it, are copied
    into `out_dir`; `out_dir/failed.tsv` lists every failure (url, path, reason).

    Args:
        images_file: path of Birdsnap's images.txt.
        out_dir: output folder (the future manual dir).
        subset: optional `"birdsnap34"` or `"birdsnap500"`: keep only rows whose species folder
            (first component of the path) is in that config's table.
        workers: int. Parallel downloads.
        retries: int. Extra attempts after the first for network errors, timeouts, 5xx/429
            answers and md5 mismatches (404 and the like are not retried).
        timeout: float. Socket timeout in seconds for each attempt.
        backoff_base: float. Sleep `backoff_base * 2**attempt` seconds before a retry.
        progress: bool. Show a tqdm progress bar on stderr.

    Returns:
        A `DownloadSummary`.
    """
    _check_arguments(images_file, workers, retries, timeout, backoff_base)
    rows = read_images_file(images_file)
    out_dir = os.path.abspath(os.fspath(out_dir))
    images_dir = os.path.join(out_dir, "images")
    summary = DownloadSummary()
    jobs = _plan(rows, images_dir, subset, summary)
    summary.total = len(jobs) + len(summary.failed)
    os.makedirs(images_dir, exist_ok=True)
    _run(jobs, summary, workers, progress, retries=retries, timeout=timeout, backoff_base=backoff_base)
    lines = [f"{_clean(url)}\t{_clean(rel)}\t{_clean(reason)}\n" for url, rel, reason in summary.failed]
    write_text_atomic(os.path.join(out_dir, FAILED_FILE_NAME), "url\tpath\treason\n" + "".join(lines))
    _copy_metadata(images_file, out_dir)
    return summary
