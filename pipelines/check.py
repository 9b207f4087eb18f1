"""`cart check`: verify a store the way fsck verifies a filesystem, and repair its pointer.

Checks the history (`manifests/v*.json`), the pointer (`manifest.json`), and every file the
current version names: Parquet footers and full reads (a truncated file fails), npy headers and
index ranges, safetensors headers, JSON, the identifier delta chain (loaded whole), the generator
files `Generator.load` needs. Folders no committed version names are reported as orphans (debris of
killed or refused jobs; `cart compact` removes them), not as problems. `--repair` rewrites
`manifest.json` from the newest intact history file (or, where the newest history file is damaged
and `manifest.json` is an intact copy of it, that history file from the pointer). The version
that answers queries is checked too when it is not the current one. No Ray: it runs anywhere the store is readable.
"""
from __future__ import annotations

import json
import struct

import numpy as np
import pyarrow.parquet as pq

from cart_core.index_version import is_servable, load_ids, referenced_paths
from cart_core.store import MANIFEST, Manifest, Store, StoreError
from pipelines.leases import held_versions
from pipelines.runtime import log

RUN_KINDS = ("features", "queries", "eval", "codebooks", "ids", "generator", "tombstones", "errors")
GENERATOR_FILES = ("model/generator.safetensors", "model/config.json")


def run_check(store: Store, repair: bool = False) -> dict:
    report = inspect(store)
    if repair:
        repaired = repair_pointer(store, report)
        if repaired:
            report = inspect(store)
            report["repaired"] = repaired
    for line in report["problems"]:
        print(f"problem: {line}")
    for line in report["orphans"]:
        print(f"orphan:  {line}")
    for line in report["repaired"]:
        print(f"repaired: {line}")
    for line in report["read_by_jobs"]:
        print(f"reading: {line}")
    print(f"check: {len(report['problems'])} problem(s), {len(report['orphans'])} orphan(s), "
          f"version {report['version']}, servable {'yes' if report['servable'] else 'no'}, "
          f"{report['files_checked']} files read")
    return report


def inspect(store: Store) -> dict:
    report = {"version": None, "servable": False, "problems": [], "orphans": [], "repaired": [],
              "read_by_jobs": [], "files_checked": 0}
    history, broken = read_history(store)
    report["problems"] += broken
    current = None
    text = store._read_bytes(store.path(MANIFEST))
    if text is None:
        if history:
            report["problems"].append(f"{store.uri(MANIFEST)}: missing while {len(history)} versions exist")
    else:
        try:
            current = Manifest.from_json(text, store.uri(MANIFEST))
        except (StoreError, UnicodeDecodeError) as exc:
            report["problems"].append(str(exc))
    newest = history[-1] if history else None
    if current is not None and newest is not None and current.version < newest.version:
        report["problems"].append(f"{store.uri(MANIFEST)}: points at version {current.version}, the newest "
                                  f"committed is {newest.version} (`--repair` advances it)")
    if current is not None and newest is not None and current.version > newest.version:
        report["problems"].append(f"{store.uri(store.history_path(current.version))}: missing or damaged while "
                                  f"{store.uri(MANIFEST)} holds version {current.version} intact (`--repair` "
                                  "rewrites it from there)")
    if current is None or newest is None or current.version <= newest.version:
        current = newest or current  # else the pointer is an intact copy of a damaged newest history file
    if current is None:
        return report
    report["version"] = current.version
    files, checked = [0], set()
    current_problems = check_version(store, current, files, checked)
    report["problems"] += current_problems
    # the version that answers queries when the current one has no generator yet (a refit awaiting
    # `cart train`): its files are what every `cart serve` and `cart retrieve` reads
    served = next((m for m in reversed([*history, current]) if is_servable(m)), None)
    serving_problems = [] if served is None or served.version == current.version else \
        [f"{line} (version {served.version}, which answers queries)"
         for line in check_version(store, served, files, checked)]
    report["problems"] += serving_problems
    report["servable"] = served is not None and not (serving_problems if served.version != current.version
                                                     else current_problems)
    by_number = {m.version: m for m in history}
    for number, jobs in sorted(held_versions(store).items()):  # a running retrieve / evaluate / train reads it
        report["read_by_jobs"].append(f"version {number}: {'; '.join(jobs)}")
        if number in by_number and number not in (current.version, served.version if served else None):
            report["problems"] += [f"{line} (version {number}, which a running job reads)"
                                   for line in check_version(store, by_number[number], files, checked)]
        elif number not in by_number and number != current.version:
            report["problems"].append(f"{store.uri(store.history_path(number))}: missing while a running job reads "
                                      f"version {number} ({'; '.join(jobs)})")
    report["files_checked"] = files[0]
    report["orphans"] = orphans(store, [*history, current])
    return report


def check_version(store: Store, manifest: Manifest, files: list[int], checked: set[str]) -> list[str]:
    """Every file `manifest` names (those in `checked` were read already), its identifier chain and
    its generator's files."""
    problems = []
    for path in sorted(referenced_paths(manifest) - checked):
        problems += check_path(store, path, files, unique="item_id" if path in manifest.features else None)
        checked.add(path)
    problems += check_ids(store, manifest)
    if manifest.generator:
        for name in GENERATOR_FILES:
            if not store.exists(f"{manifest.generator}/{name}"):
                problems.append(f"{store.uri(manifest.generator, name)}: missing (the generator cannot load)")
    return problems


def read_history(store: Store) -> tuple[list[Manifest], list[str]]:
    """Intact history manifests, oldest first, and a problem per unreadable one."""
    good, bad = [], []
    for path in store.history_files():
        try:
            good.append(Manifest.from_json(store.fs.cat_file(path), path))
        except (StoreError, UnicodeDecodeError, OSError) as exc:
            bad.append(f"{path}: unreadable history manifest ({exc})")
    return good, bad


def check_path(store: Store, relpath: str, counter: list[int], unique: str | None = None) -> list[str]:
    """Every file under a folder (or the file) the manifest names, read in full; `unique`: a column
    whose values must not repeat within one Parquet file (a feature file's item_id)."""
    full = store.path(relpath)
    if not store.fs.exists(full):
        return [f"{store.uri(relpath)}: named by the manifest but missing"]
    files = [full] if store.fs.isfile(full) else sorted(store.fs.find(full))
    if relpath.startswith("generator/"):  # the model, not every training checkpoint
        files = [f for f in files if "/checkpoints/" not in f]
    problems = []
    for f in files:
        counter[0] += 1
        reason = check_file(store, f, unique)
        if reason:
            problems.append(f"{store.uri(f[len(store.root):].lstrip('/'))}: {reason}")
    return problems


def check_file(store: Store, path: str, unique: str | None = None) -> str | None:
    """None when the file reads whole (and `unique` does not repeat in it), else why not."""
    try:
        if path.endswith(".parquet"):
            with store.fs.open(path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                table = pq.read_table(fh)
            if table.num_rows != meta.num_rows:
                return f"{table.num_rows} rows read, footer says {meta.num_rows}"
            if unique and unique in table.column_names:
                return repeated_value(table.column(unique).to_pylist(), unique)
        elif path.endswith(".npy"):
            with store.fs.open(path, "rb") as fh:
                np.load(fh, allow_pickle=False)
        elif path.endswith(".safetensors"):
            data = store.fs.cat_file(path)
            (size,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + size])
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if len(data) < 8 + size + end:
                return f"truncated: {len(data)} bytes, the header needs {8 + size + end}"
        elif path.endswith(".json"):
            json.loads(store.fs.cat_file(path))
    except Exception as exc:  # every reader's own error, as one reason
        return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def repeated_value(values: list, column: str) -> str | None:
    """Why a column that must be unique is not: its first repeated value and both rows.

    A feature file that holds one item twice cannot be told apart row by row by the jobs that read
    it (they drop superseded rows by file and item), so `cart quantize` refuses it and sends here."""
    first: dict = {}
    for row, value in enumerate(values):
        if value in first:
            return (f"{column} {value!r} appears in rows {first[value]} and {row} (an item must appear once per "
                    f"feature file: no cart job writes such a file; restore it from its source)")
        first[value] = row
    return None


def check_ids(store: Store, manifest: Manifest) -> list[str]:
    """The delta chain: a whole table first, deltas after, each dead row inside its table."""
    if not manifest.ids:
        return []
    chain = [*(manifest.extra.get("ids_chain") or []), manifest.ids]
    if not store.exists(f"{chain[0]}/ids.parquet"):
        return [f"{store.uri(chain[0])}: the identifier chain must start with a whole table (ids.parquet)"]
    for part in chain[1:]:
        for name in ("append.parquet", "dead.npy"):
            if not store.exists(f"{part}/{name}") and not store.exists(f"{part}/ids.parquet"):
                return [f"{store.uri(part, name)}: missing link of the identifier delta chain"]
    try:
        table, _ = load_ids(store, manifest)
    except Exception as exc:
        return [f"{exc}"]
    if manifest.extra.get("vocab_sizes") and list(table.vocab_sizes) != list(manifest.extra["vocab_sizes"]):
        return [f"{store.uri(manifest.ids)}: vocabulary {table.vocab_sizes} differs from the manifest's "
                f"{manifest.extra['vocab_sizes']}"]
    return []


def orphans(store: Store, history: list[Manifest]) -> list[str]:
    named = set().union(*(referenced_paths(m) for m in history))
    pending = None
    if store.exists("jobs/train-pending.json"):
        try:
            pending = store.read_json("jobs/train-pending.json").get("run")
        except ValueError:
            pending = None
    found = []
    for kind in RUN_KINDS:
        for name in store.listdir(kind):
            path = f"{kind}/{name}"
            if kind == "generator" and name == pending:
                continue
            if not (path in named or any(p.startswith(path + "/") for p in named)):
                found.append(store.uri(path))
    found += [store.uri(f[len(store.root):].lstrip("/")) for f in store.fs.find(store.root) if ".tmp-" in f]
    return found


def repair_pointer(store: Store, report: dict) -> list[str]:
    """Point manifest.json at the newest intact history manifest when it is missing, damaged or behind."""
    history, _ = read_history(store)
    if not history:
        return []
    newest = history[-1]
    text = store._read_bytes(store.path(MANIFEST))
    try:
        current = Manifest.from_json(text, MANIFEST) if text is not None else None
    except (StoreError, UnicodeDecodeError):
        current = None
    done = []
    for path in store.history_files():  # damaged history newer than the newest intact one: set aside
        number = int(path.rsplit("/v", 1)[1].split(".")[0])
        if current is not None and number == current.version > newest.version:
            # the pointer is an intact copy of this version: restore the history from it (moving it
            # aside would undo a committed version, a delete included)
            store._write_bytes(path, current.to_json().encode())
            done.append(f"{path}: damaged, rewritten from {store.uri(MANIFEST)} (an intact copy of version {number})")
            newest = current
        elif number > newest.version:
            store.fs.mv(path, f"{path}.corrupt")
            done.append(f"{path}: damaged, moved to {path}.corrupt")
    if current is not None and current.version > newest.version and \
            not store.exists(store.history_path(current.version)):
        # the pointer is the only copy of its version (its history file lost): restore that file
        store._write_bytes(store.path(store.history_path(current.version)), current.to_json().encode())
        done.append(f"{store.uri(store.history_path(current.version))}: missing, rewritten from "
                    f"{store.uri(MANIFEST)} (an intact copy of version {current.version})")
        newest = current
    if done or current is None or current != newest:
        store.repair_pointer(newest)
        done.append(f"{store.uri(MANIFEST)}: rewritten from {store.uri(store.history_path(newest.version))}")
    for message in done:
        log("check", message)
    return done
