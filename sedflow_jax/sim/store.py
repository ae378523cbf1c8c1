"""The on-disk shard store of a training set (format in :mod:`sedflow_jax.sim.simulate`).

A folder holds ``shard_{i:05d}.npz`` files and ``manifest.json`` (or, while a multi-host run is
under way, per-host parts ``manifest.host{p}.json``). This module reads and writes manifests,
plans the shards of a run, finds the shards a folder already holds, clears a writer's own files,
writes shards atomically and merges the per-host parts (:func:`merge_manifests`).
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import warnings
from typing import Optional

import numpy as np

from ..util import atomic_write_bytes, atomic_write_json, canonical_json, jsonable, sha256_file
from ..util import utc_now
from .kernel import DROP_REASONS

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "HOST_MANIFEST_PATTERN", "SHARD_PATTERN",
    "read_manifest", "write_manifest", "merge_manifests", "totals", "prepare_out",
    "file_index", "is_own_file", "known_manifests", "shard_size", "warn_environment", "clear_own_files",
    "remove_leftovers",
    "plan_shards", "done_shards", "carried_shards", "write_shard",
]

FORMAT = "sedflow_jax.training_set"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: per-host manifest part written by ``simulate(..., hosts=(p, P))`` with P > 1
HOST_MANIFEST_PATTERN = "manifest.host{}.json"
SHARD_PATTERN = "shard_{:05d}.npz"


# ---------------------------------------------------------------------------------------------
# manifests
# ---------------------------------------------------------------------------------------------
def _sum_counts(items) -> dict:
    tot = {"n_rows": 0, "n_kept": 0, "n_dropped": 0,
           "dropped": {r: 0 for r in DROP_REASONS}, "flagged": {r: 0 for r in DROP_REASONS}}
    for c in items:
        for k in ("n_rows", "n_kept", "n_dropped"):
            tot[k] += int(c[k])
        for k in ("dropped", "flagged"):
            for r in DROP_REASONS:
                tot[k][r] += int(c[k].get(r, 0))
    return tot


def totals(entries) -> dict:
    """The manifest's totals over shard entries: ``n_rows_done``, ``n_kept``, ``n_dropped``,
    ``dropped``, ``flagged`` and ``timings`` (in this order)."""
    tot = _sum_counts(e["counts"] for e in entries)
    comp = sum(e["timing"]["compute_s"] for e in entries)
    wr = sum(e["timing"]["write_s"] for e in entries)
    return {
        "n_rows_done": tot["n_rows"],
        "n_kept": tot["n_kept"],
        "n_dropped": tot["n_dropped"],
        "dropped": tot["dropped"],
        "flagged": tot["flagged"],
        "timings": {"compute_s": comp, "write_s": wr,
                    "galaxies_per_s_compute": tot["n_rows"] / comp if comp > 0 else None},
    }


def write_manifest(folder: str, manifest: dict, name: str = MANIFEST_NAME) -> None:
    atomic_write_json(os.path.join(folder, name), manifest)


def read_manifest(path) -> dict:
    """The manifest dict of a training-set folder (or of a ``manifest.json`` path, or of a
    per-host part ``manifest.host{p}.json``)."""
    path = os.fspath(path)
    base = os.path.basename(path)
    is_file = base == MANIFEST_NAME or (base.startswith("manifest.host") and base.endswith(".json"))
    mpath = path if is_file else os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(mpath):
        folder = os.path.dirname(mpath) or "."
        if glob.glob(os.path.join(folder, HOST_MANIFEST_PATTERN.format("*"))):
            raise FileNotFoundError(
                f"no {MANIFEST_NAME} in {folder}, only per-host parts (manifest.host*.json) of a "
                "multi-host run: finish every host, then call "
                "sedflow_jax.sim.merge_manifests(folder)")
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {folder}: not a "
                                "training set written by sedflow_jax.simulation.simulate")
    with open(mpath) as fh:
        m = json.load(fh)
    if m.get("format") != FORMAT:
        raise ValueError(f"{mpath}: not a {FORMAT} manifest (format={m.get('format')!r})")
    if int(m.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{mpath}: format version {m['format_version']} is newer than this "
                         f"package supports ({FORMAT_VERSION})")
    return m


def _host_parts(folder: str) -> list:
    return sorted(glob.glob(os.path.join(folder, HOST_MANIFEST_PATTERN.format("*"))))


# ---------------------------------------------------------------------------------------------
# the folder: creation, own files, what it already holds
# ---------------------------------------------------------------------------------------------
def prepare_out(out) -> str:
    """Create the folder and prove it is writable (before any computation)."""
    folder = os.path.abspath(os.fspath(out))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"simulate(out={out!r}): exists and is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "wb") as fh:
            fh.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"simulate(out={out!r}): the output folder cannot be created or "
                              f"written ({e.__class__.__name__}: {e})") from e
    return folder


def _our_files(folder: str):
    pats = ("shard_*.npz", "shard_*.npz.tmp-*", MANIFEST_NAME, MANIFEST_NAME + ".tmp-*",
            HOST_MANIFEST_PATTERN.format("*"), HOST_MANIFEST_PATTERN.format("*") + ".tmp-*")
    out = []
    for p in pats:
        out.extend(glob.glob(os.path.join(folder, p)))
    return sorted(set(out))


def file_index(name: str, prefix: str = "shard_"):
    """``shard_00012.npz[.tmp-123]`` -> 12: the number after ``prefix`` in a numbered file's
    name (None for other names)."""
    base = os.path.basename(name)
    if not base.startswith(prefix):
        return None
    digits = base[len(prefix):].split(".", 1)[0]
    return int(digits) if digits.isdigit() else None


def is_own_file(name: str, own_manifest: str, pidx: int, pcount: int) -> bool:
    """Is this file (or temporary file) written by host ``pidx`` of ``pcount``?"""
    base = os.path.basename(name)
    if base == own_manifest or base.startswith(own_manifest + ".tmp-"):
        return True
    i = file_index(base)
    return i is not None and i % pcount == pidx


def _config_diff(a: dict, b: dict) -> list:
    keys = sorted(set(a) | set(b))
    return [k for k in keys if canonical_json(a.get(k)) != canonical_json(b.get(k))]


def known_manifests(folder: str, config: dict) -> list:
    """``[(name, manifest)]`` of every manifest in ``folder`` (``manifest.json`` first, then the
    host parts); raises ValueError when one is unreadable or holds another configuration, or
    when shards lie there without any manifest."""
    # shard files first, manifests second: a writer saves its manifest before any of its
    # shards, so a shard seen here always has its manifest seen below
    shard_files = glob.glob(os.path.join(folder, "shard_*.npz"))
    names = [MANIFEST_NAME] + [os.path.basename(p) for p in _host_parts(folder)]
    known = []
    for name in names:
        mpath = os.path.join(folder, name)
        if not os.path.exists(mpath):
            continue
        try:
            m = read_manifest(mpath)
        except (ValueError, json.JSONDecodeError) as e:
            what = "manifest" if name == MANIFEST_NAME else f"manifest part {name}"
            raise ValueError(f"{folder} holds an unreadable {what} ({e}); pass "
                             "overwrite=True to replace it") from e
        diff = _config_diff(m.get("config", {}), config)
        if diff:
            raise ValueError(
                f"{folder} already holds a training set with a different configuration "
                f"(differs in: {', '.join(diff)}; in {name}). Use another folder, or "
                "overwrite=True to replace it.")
        known.append((name, m))
    if not known and shard_files:
        raise ValueError(f"{folder} holds shard files but no manifest; pass "
                         "overwrite=True to replace them, or use another folder")
    return known


def shard_size(folder: str, known: list, rows_per_shard: int, chunk: int) -> int:
    """The shard size to use: the one of the folder's manifests (warns when it is not the
    requested one), else ``rows_per_shard``."""
    if not known:
        return rows_per_shard
    sizes = {int(m["layout"]["rows_per_shard"]) for _, m in known}
    if len(sizes) > 1:
        raise ValueError(f"{folder}: its manifests disagree on the shard size "
                         f"({sorted(sizes)} rows); pass overwrite=True")
    old_rps = sizes.pop()
    if old_rps != rows_per_shard:
        warnings.warn(f"resuming {folder}: keeping its shard size of {old_rps} rows "
                      f"(chunk={chunk} requested); values are the same either way",
                      stacklevel=4)
    return old_rps


def warn_environment(folder: str, manifest: dict, env: dict) -> None:
    """Warn when the folder was written with another jax, jaxlib or backend."""
    oenv = manifest.get("environment", {})
    for k in ("jax", "jaxlib", "backend"):
        if oenv.get(k) != env.get(k):
            warnings.warn(f"resuming {folder} written with {k}={oenv.get(k)!r}, now "
                          f"{env.get(k)!r}: new shards may not be bit-identical to "
                          "the old ones", stacklevel=4)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:  # another host removed it first
        pass


def clear_own_files(folder: str, own_name: str, pidx: int, pcount: int) -> None:
    """Remove this writer's files (``overwrite=True``): all of them, or with several hosts
    only this host's own ones (and the merged manifest)."""
    for p in _our_files(folder):
        if pcount == 1 or os.path.basename(p).startswith(MANIFEST_NAME) or \
                is_own_file(p, own_name, pidx, pcount):
            _remove(p)


def remove_leftovers(folder: str, own_name: str, pidx: int, pcount: int) -> None:
    """Remove temporary files of a killed run (with several hosts, only this host's)."""
    for p in glob.glob(os.path.join(folder, "*.tmp-*")):
        base = os.path.basename(p)
        if not base.startswith(("shard_", MANIFEST_NAME, "manifest.host")):
            continue
        if pcount > 1 and not is_own_file(base, own_name, pidx, pcount):
            continue  # another host may be writing it right now
        _remove(p)


# ---------------------------------------------------------------------------------------------
# the plan and the shards already done
# ---------------------------------------------------------------------------------------------
def plan_shards(n: int, rows_per_shard: int, block: int) -> list:
    """One dict per shard: ``index``, ``file``, ``row_start/stop``, ``block_start/stop``."""
    plan = []
    for s in range(math.ceil(n / rows_per_shard)):
        r0 = s * rows_per_shard
        r1 = min(n, r0 + rows_per_shard)
        plan.append({"index": s, "file": SHARD_PATTERN.format(s), "row_start": r0,
                     "row_stop": r1, "block_start": r0 // block,
                     "block_stop": math.ceil(r1 / block)})
    return plan


def _same_rows(e: dict, p: dict) -> bool:
    return (e.get("file") == p["file"]
            and (e["row_start"], e["row_stop"]) == (p["row_start"], p["row_stop"]))


def done_shards(folder: Optional[str], known: list, own_name: str, mine: list,
                n_shards: int) -> list:
    """Entry per shard index of the shards of ``mine`` already on disk with a manifest entry
    matching the plan and the file's sha256 (None elsewhere; own manifest preferred)."""
    shards = [None] * n_shards
    cands = {}
    for _, m in sorted(known, key=lambda nm: nm[0] != own_name):  # own manifest first
        for e in m.get("shards", []):
            cands.setdefault(int(e["index"]), []).append(e)
    for p in mine:
        es = [e for e in cands.get(p["index"], []) if _same_rows(e, p)]
        fpath = os.path.join(folder, p["file"]) if folder is not None else None
        if es and os.path.isfile(fpath):
            h = sha256_file(fpath)
            shards[p["index"]] = next((e for e in es if e.get("sha256") == h), None)
    return shards


def carried_shards(folder: str, old: dict, mine: list, plan: list) -> list:
    """Entries of ``old`` (this host's earlier part) for shards now assigned to other hosts
    that still exist: a host restarted with another process count keeps listing them, so that
    no manifest forgets a finished shard."""
    mine_idx = {p["index"] for p in mine}
    carry = []
    for e in old.get("shards", []):
        i = int(e["index"])
        if i not in mine_idx and i < len(plan) and _same_rows(e, plan[i]) and \
                os.path.isfile(os.path.join(folder, e["file"])):
            carry.append(e)
    return carry


def write_shard(folder: str, name: str, payload: dict) -> dict:
    """``np.savez`` (uncompressed) of ``payload`` written atomically; its sha256 and size."""
    buf = io.BytesIO()
    np.savez(buf, **payload)
    data = buf.getvalue()
    atomic_write_bytes(os.path.join(folder, name), data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


# ---------------------------------------------------------------------------------------------
# multi-host training sets
# ---------------------------------------------------------------------------------------------
def _merge_sources(folder: str, strict: bool):
    """(host parts, every manifest to merge, the first part) or None (no parts, not strict)."""
    part_files = _host_parts(folder)
    if not part_files:
        if strict:
            raise FileNotFoundError(f"{folder}: no per-host manifest parts (manifest.host*.json)")
        return None
    parts = [(os.path.basename(p), read_manifest(p)) for p in part_files]
    main_path = os.path.join(folder, MANIFEST_NAME)
    shas = {m["config_sha256"] for _, m in parts}
    if len(shas) > 1:
        raise ValueError(f"{folder}: the manifest parts hold different configurations "
                         f"({', '.join(n for n, _ in parts)}); re-run the stale hosts with the "
                         "same arguments, or remove their parts")
    base = parts[0][1]
    sources = list(parts)
    if os.path.exists(main_path):
        main = read_manifest(main_path)
        if main.get("config_sha256") == base["config_sha256"]:
            sources.append((MANIFEST_NAME, main))
    return parts, sources, base


def _entries_by_index(folder: str, sources: list, n: int, rps: int) -> dict:
    """Shard index -> every entry listing it; raises on entries off the plan."""
    n_shards = math.ceil(n / rps)
    by_index: dict = {}
    for name, m in sources:
        for e in m.get("shards", []):
            i = int(e["index"])
            want = (i * rps, min(n, (i + 1) * rps))
            if not 0 <= i < n_shards or (e["row_start"], e["row_stop"]) != want:
                raise ValueError(f"{folder}/{name}: shard {i} has rows "
                                 f"[{e['row_start']}, {e['row_stop']}), the plan says {want}")
            by_index.setdefault(i, []).append(e)
    return by_index


def _choose_entry(folder: str, es: list, verify: bool):
    """(the entry of one shard that matches its file, None) or (None, the problem)."""
    if not es:
        return None, "not done"
    path = os.path.join(folder, es[0]["file"])
    if not os.path.isfile(path):
        return None, f"{es[0]['file']} missing"
    distinct = {e.get("sha256") for e in es}
    if verify or len(distinct) > 1:
        h = sha256_file(path)
        e = next((e for e in es if e.get("sha256") == h), None)
        if e is None:
            return None, f"{es[0]['file']} does not match its manifest entry"
        return e, None
    e = es[0]
    if e.get("bytes") is not None and os.path.getsize(path) != int(e["bytes"]):
        return None, f"{e['file']} has {os.path.getsize(path)} bytes, manifest says {e['bytes']}"
    return e, None


def _check_cover(folder: str, chosen: list, n: int) -> None:
    """The chosen shards cover rows 0..n exactly once, in order."""
    stop = 0
    for e in chosen:
        if e["row_start"] != stop:
            raise ValueError(f"{folder}: rows [{stop}, {e['row_start']}) are not covered")
        stop = e["row_stop"]
    if stop != n:
        raise ValueError(f"{folder}: shards cover {stop} of {n} rows")


def _merged_sessions(sources: list) -> list:
    sessions, seen = [], set()
    for _, m in sources:
        for sess in m.get("sessions", []):
            k = json.dumps(sess, sort_keys=True, default=str)
            if k not in seen:
                seen.add(k)
                sessions.append(sess)
    sessions.sort(key=lambda s_: s_.get("started", ""))
    return sessions


def merge_manifests(out, *, strict: bool = True, verify: bool = False) -> Optional[dict]:
    """Join the per-host manifest parts (``manifest.host{p}.json``) of a training-set folder
    into its ``manifest.json``.

    Every shard of the plan (``n`` rows in ``rows_per_shard`` shards) must be listed by some
    part (or by an earlier ``manifest.json``) with the planned row range and exist on disk; the
    merged shard list covers rows ``0..n`` exactly once (a shard listed by several parts, e.g.
    after restarts with another process count, is taken once). ``verify=True`` hashes every
    shard against its sha256 (otherwise only existence and size are checked, and a file is
    hashed only when two parts disagree about it).

    Returns the merged manifest, or None when ``strict=False`` and shards are still missing.
    Raises ValueError (parts with different configurations, missing or corrupt shards with
    ``strict``) or FileNotFoundError (no parts).
    """
    folder = os.path.abspath(os.fspath(out))
    found = _merge_sources(folder, strict)
    if found is None:
        return None
    parts, sources, base = found
    n = int(base["n"])
    rps = int(base["layout"]["rows_per_shard"])
    if any(int(m["layout"]["rows_per_shard"]) != rps for _, m in sources):
        raise ValueError(f"{folder}: the manifests disagree on the shard size")
    by_index = _entries_by_index(folder, sources, n, rps)
    chosen, problems = [], []
    for i in range(math.ceil(n / rps)):
        e, problem = _choose_entry(folder, by_index.get(i, []), verify)
        if e is None:
            problems.append(f"shard {i} not done" if problem == "not done" else problem)
        else:
            chosen.append(e)
    if problems:
        if strict:
            raise ValueError(f"{folder}: cannot merge the host manifests: "
                             + "; ".join(problems[:10])
                             + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
                             + ". Finish (or restart) the hosts with the same arguments.")
        return None
    _check_cover(folder, chosen, n)
    merged = {k: v for k, v in base.items() if k != "host"}
    merged.update(
        complete=True,
        created=min(m.get("created", utc_now()) for _, m in sources),
        updated=utc_now(),
        shards=chosen,
        **totals(chosen),
        sessions=_merged_sessions(sources),
        hosts={"parts": [nm for nm, _ in parts],
               "process_counts": sorted({int(m["host"]["process_count"]) for _, m in parts
                                         if "host" in m})},
    )
    atomic_write_json(os.path.join(folder, MANIFEST_NAME), merged)
    return jsonable(merged)
