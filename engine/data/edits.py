"""Fixing what the doctor found without losing anything: exclude lists, and moves that are journalled and undone.

Nothing is deleted or overwritten. An exclude list is a CSV with a ``path`` column (train's ``--exclude``); a move
puts a file in another class's folder of the same split (a name clash gets a suffix) and appends to a journal in
the app's data folder, from which the app can undo moves, newest first. Files are written atomically.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil

from engine.data.folder import SPLIT_NAMES, excluded_paths
from engine.events import EngineError
from engine.paths import app_data_dir
from engine.runs import atomic_write_text


def exclude_list_for(folder: str) -> str:
    """Where the app keeps the exclude list of ``folder`` (one file per folder, named by its path)."""
    key = hashlib.blake2b(os.path.abspath(folder).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return os.path.join(app_data_dir(), "excludes", f"{os.path.basename(os.path.abspath(folder))}-{key}.csv")


def _write_paths(csv_path: str, paths) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path"])
    w.writerows([p] for p in sorted(paths))
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    atomic_write_text(csv_path, buf.getvalue())


def add_to_exclude_list(csv_path: str, paths: list[str]) -> int:
    """Add ``paths`` to the list (created if missing); returns how many it holds now."""
    have = excluded_paths(csv_path) if os.path.exists(csv_path) else set()
    have |= {os.path.abspath(p) for p in paths}
    _write_paths(csv_path, have)
    return len(have)


def place(src: str, dst: str) -> str:
    """Hard link (no extra space, same file) where the file system allows, else a copy; returns how."""
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        shutil.copy2(src, dst)
        return "copied"


def free_name(path: str) -> str:
    """``path``, or ``path`` with a -2, -3, ... suffix when taken: nothing is ever overwritten."""
    base, ext = os.path.splitext(path)
    n, out = 2, path
    while os.path.exists(out):
        out = f"{base}-{n}{ext}"
        n += 1
    return out


def class_folder(root: str, path: str, cls: str) -> str:
    """The folder of class ``cls`` in the same split as ``path`` (``root/cls`` or ``root/<split dir>/cls``)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root)).split(os.sep)
    if len(rel) >= 3 and rel[0].lower() in SPLIT_NAMES:
        return os.path.join(root, rel[0], cls)
    return os.path.join(root, cls)


def journal_path() -> str:
    return os.path.join(app_data_dir(), "moves.jsonl")


def _journal() -> list[dict]:
    try:
        with open(journal_path(), encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
    except (OSError, json.JSONDecodeError) as exc:
        raise EngineError(f"The move journal {journal_path()} cannot be read ({exc}).") from exc


def _save_journal(entries: list[dict]) -> None:
    os.makedirs(app_data_dir(), exist_ok=True)
    atomic_write_text(journal_path(), "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))


def move_to_class(root: str, path: str, cls: str) -> str:
    """Move ``path`` into class ``cls``'s folder of the same split; journalled; returns the new path."""
    if not os.path.isfile(path):
        raise EngineError(f"{path} is not there any more.")
    folder = class_folder(root, path, cls)
    os.makedirs(folder, exist_ok=True)
    dst = free_name(os.path.join(folder, os.path.basename(path)))
    entries = _journal()
    entries.append({"from": os.path.abspath(path), "to": os.path.abspath(dst), "root": os.path.abspath(root)})
    _save_journal(entries)  # first: a crash between the two leaves a journal entry whose undo says it is gone
    os.replace(path, dst)
    return dst


def undo_last_move() -> dict | None:
    """Put the newest journalled move back (never over another file); returns it, or None when there is none."""
    entries = _journal()
    if not entries:
        return None
    last = entries[-1]
    if not os.path.exists(last["to"]):
        raise EngineError(f"Cannot undo: {last['to']} is not there any more.")
    if os.path.exists(last["from"]):
        raise EngineError(f"Cannot undo: {last['from']} exists again; move it away first.")
    os.makedirs(os.path.dirname(last["from"]), exist_ok=True)
    os.replace(last["to"], last["from"])
    _save_journal(entries[:-1])
    return last
