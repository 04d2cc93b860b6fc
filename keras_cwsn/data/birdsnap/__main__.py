"""`python -m keras_cwsn.data.birdsnap download|prepare`: fetch a Birdsnap download, or prepare it into TFRecords.

`download` never imports TensorFlow, so it runs on a machine without it; `prepare` imports it on demand.
"""

import argparse
import os
import sys

from keras_cwsn.data.birdsnap.download import FAILED_FILE_NAME, download_images
from keras_cwsn.data.birdsnap.hierarchy import CONFIGS, DEFAULT_DATA_DIR, DEFAULT_MANUAL_DIR, MANUAL_DIR_ENV
from keras_cwsn.errors import UsageError, print_error


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; main prints one line and returns 2.
        raise UsageError(message)


def _parser():
    parser = _Parser(
        prog="python -m keras_cwsn.data.birdsnap",
        description="Download Birdsnap images, or prepare a Birdsnap download into TFRecords.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    download = commands.add_parser("download", help="Fetch the images listed in images.txt.")
    download.add_argument("--images-file", required=True, help="Birdsnap's images.txt.")
    download.add_argument("--out", required=True, help="Output folder (the manual dir).")
    download.add_argument("--subset", choices=sorted(CONFIGS), default=None)
    download.add_argument("--workers", type=int, default=16)
    download.add_argument("--retries", type=int, default=3)
    download.add_argument("--timeout", type=float, default=30.0, help="Seconds per attempt.")
    download.add_argument("--backoff-base", type=float, default=1.0, help="Seconds; doubles per retry.")
    download.add_argument("--no-progress", action="store_true", help="No progress bar.")
    prepare = commands.add_parser("prepare", help="Prepare a download into TFRecords once.")
    prepare.add_argument("--config", choices=sorted(CONFIGS), default="birdsnap34")
    prepare.add_argument("--manual-dir", default=None, help=f"Default ${MANUAL_DIR_ENV} or {DEFAULT_MANUAL_DIR}.")
    prepare.add_argument("--data-dir", default=None, help=f"Default {DEFAULT_DATA_DIR}.")
    return parser


def _download(args):
    summary = download_images(
        args.images_file,
        args.out,
        subset=args.subset,
        workers=args.workers,
        retries=args.retries,
        timeout=args.timeout,
        backoff_base=args.backoff_base,
        progress=not args.no_progress,
    )
    out = os.path.abspath(args.out)
    print(
        f"Birdsnap download: {summary.downloaded} downloaded, {summary.already_ok} already ok, "
        f"{len(summary.failed)} failed of {summary.total} images into {os.path.join(out, 'images')}"
        + (f" (see {os.path.join(out, FAILED_FILE_NAME)})." if summary.failed else "."),
        flush=True,
    )
    return 1 if summary.failed else 0


def _prepare(args):
    from keras_cwsn.data.birdsnap.builder import prepare_birdsnap  # TensorFlow only for this command.

    prepare_birdsnap(args.config, data_dir=args.data_dir, manual_dir=args.manual_dir, option="--manual-dir")
    return 0


def main(argv=None):
    """Command line entry point; returns the exit status (0 ok, 1 some downloads failed, 2 bad input)."""
    try:
        args = _parser().parse_args(argv)
    except UsageError as e:
        print_error(e, prog="birdsnap")
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    try:
        return _prepare(args) if args.command == "prepare" else _download(args)
    except (OSError, ValueError) as e:  # UserError is a ValueError; OSError: unreadable file, full disk.
        print_error(e, prog=f"birdsnap {args.command}")
        return 2
    except KeyboardInterrupt:
        print(f"birdsnap {args.command}: interrupted; run it again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
