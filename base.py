"""
The bottom of the house: the error types every module raises and the file helpers every writer uses. It
imports nothing of the project, so that any module may import it.

What the user got wrong (a flag, a file, a value, a tensor) is a UserError, with a message that names it;
scripts print it as one line, `error: <message>`, and exit 1 (cli.run_command). Files are written atomically
(`atomic_write`): a reader, a crash or a power loss sees the old file or the new one, never half of one.
"""

import contextlib
import os
import sys


class UserError(ValueError):
    """Bad input the user can fix (a flag, a file, a value, a tensor), with a message that names it. Scripts
    print it as one line, `error: <message>`, and exit 1 (cli.run_command); any other exception is a bug and
    keeps its traceback."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named is not there."""


class DataError(UserError):
    """Bad input data, named in the message; the command line prints it on one line and exits 1."""


# ---------------------------------------------------------------------------------------------------------
# Files.

def make_out_dir(path, flag="--out"):
    """Create an output folder up front; UserError naming the flag and folder if it cannot be."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create the folder ({e.strerror or e})") from None


@contextlib.contextmanager
def output_folder(path, flag="--out"):
    """Create a command's output folder up front, so that one that cannot be made fails before any work
    (make_out_dir); if the command then fails, remove again the folders made here that are still empty, so that
    a command that fails on its input leaves nothing behind."""
    made, folder = [], os.path.abspath(path)
    while not os.path.exists(folder):
        made.append(folder)  # the deepest first
        folder = os.path.dirname(folder)
    make_out_dir(path, flag)
    try:
        yield path
    except BaseException:
        for folder in made:
            try:
                os.rmdir(folder)  # only an empty one
            except OSError:
                break
        raise


def fsync_path(path):
    """Ask the kernel to put path (a file, or a folder's list of names) on disk before going on."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """write(tmp) then rename tmp to path: readers, and a crash or power loss at any moment, see the old file or
    the new one, never half of one (the data is fsynced before the rename, the folder after it). A path that
    cannot be written (a full disk, a read-only folder) is a UserError naming it, and the old file stays."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, lines):
    """Text lines to path atomically, or to standard output when path is None."""
    if path is None:
        sys.stdout.writelines(lines)
        return

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(lines)
    atomic_write(path, write)
