"""Portable flow checkpoints: a JSON description (format, flow config, permutations, z-score
statistics, file hashes, versions) beside msgpack weights, written atomically."""
from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import serialization

from ..util import atomic_write_bytes, jsonable, sha256_bytes, versions
from .flow import Flow, FlowConfig, ZScoreStats, init_flow

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_JSON", "save_checkpoint", "load_checkpoint",
           "load_flow", "flatten_state", "unflatten_like"]


CHECKPOINT_FORMAT = "sedflow_jax.checkpoint/1"


CHECKPOINT_JSON = "checkpoint.json"


def flatten_state(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def unflatten_like(template, flat: dict, what: str):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [jax.tree_util.keystr(p) for p, _ in leaves]
    missing = [k for k in keys if k not in flat]
    extra = [k for k in flat if k not in set(keys)]
    if missing or extra:
        raise ValueError(f"{what}: checkpoint does not match the model structure "
                         f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''})")
    out = []
    for k, (_, ref) in zip(keys, leaves):
        v = np.asarray(flat[k])
        if tuple(v.shape) != tuple(np.shape(ref)):
            raise ValueError(f"{what}: array {k} has shape {tuple(v.shape)} in the checkpoint but "
                             f"{tuple(np.shape(ref))} in the model (incompatible config?)")
        out.append(jnp.asarray(v, dtype=jnp.asarray(ref).dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def save_checkpoint(path: str | os.PathLike, flow: Flow, *, train_config=None,
                    opt_state: Any = None, current_flow: Flow | None = None,
                    epoch: int = 0, history: dict | None = None, extra: dict | None = None) -> str:
    """Write a portable checkpoint directory ``path``.

    Args:
        flow: the model to keep (``load_flow`` returns it); in training, the best weights.
        train_config: recorded in the JSON.
        opt_state: optax state of ``current_flow``'s parameters (for resuming), saved as msgpack.
        current_flow: latest weights when they differ from ``flow`` (defaults to ``flow``).
        epoch: epochs completed.
        history: per-epoch losses.
        extra: additional JSON-serialisable bookkeeping (e.g. RNG state, early-stopping counters).
    Returns the path of ``checkpoint.json``.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tag = f"{int(epoch):06d}-{uuid.uuid4().hex[:8]}"  # never overwrite a referenced file
    files = {}
    flow_bytes = serialization.msgpack_serialize(flatten_state(nnx.state(flow)))
    files["flow"] = f"flow-{tag}.msgpack"
    atomic_write_bytes(os.path.join(path, files["flow"]), flow_bytes)
    hashes = {"flow": sha256_bytes(flow_bytes)}
    if opt_state is not None or current_flow is not None:
        cur = flow if current_flow is None else current_flow
        payload = {"model": flatten_state(nnx.state(cur)),
                   "opt_state": flatten_state(opt_state) if opt_state is not None else {}}
        state_bytes = serialization.msgpack_serialize(payload)
        files["state"] = f"state-{tag}.msgpack"
        atomic_write_bytes(os.path.join(path, files["state"]), state_bytes)
        hashes["state"] = sha256_bytes(state_bytes)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "flow_config": flow.config.to_dict(),
        "permutations": [list(p) for p in flow.permutations],
        "zscore": flow.stats.to_dict(),
        "train_config": train_config.to_dict() if train_config is not None else None,
        "epoch": int(epoch),
        "history": history or {},
        "files": files,
        "sha256": hashes,
        "versions": versions("flax", "optax", "distrax"),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "extra": extra or {},
    }
    jpath = os.path.join(path, CHECKPOINT_JSON)
    atomic_write_bytes(jpath, json.dumps(jsonable(meta), indent=1).encode())
    # remove files no longer referenced (older epochs)
    keep = set(files.values())
    for f in os.listdir(path):
        if f.endswith(".msgpack") and (f.startswith("flow-") or f.startswith("state-")) \
                and f not in keep:
            try:
                os.unlink(os.path.join(path, f))
            except OSError:  # pragma: no cover
                pass
    return jpath


def _read_meta(path: str) -> tuple[str, dict]:
    path = os.fspath(path)
    if os.path.isdir(path):
        d, jpath = path, os.path.join(path, CHECKPOINT_JSON)
    else:
        d, jpath = os.path.dirname(path) or ".", path
    if not os.path.exists(jpath):
        raise ValueError(f"no checkpoint at {path!r} ({CHECKPOINT_JSON} not found)")
    try:
        with open(jpath, "rb") as f:
            meta = json.loads(f.read().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint metadata {jpath} is corrupt or truncated: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{jpath} is not a {CHECKPOINT_FORMAT} checkpoint "
                         f"(format={meta.get('format') if isinstance(meta, dict) else None!r})")
    for key in ("flow_config", "permutations", "zscore", "files", "sha256"):
        if key not in meta:
            raise ValueError(f"checkpoint metadata {jpath} lacks {key!r} (corrupt?)")
    return d, meta


def _read_msgpack(d: str, meta: dict, which: str):
    name = meta["files"].get(which)
    if name is None:
        raise ValueError(f"checkpoint in {d} has no {which!r} file")
    p = os.path.join(d, name)
    if not os.path.exists(p):
        raise ValueError(f"checkpoint file {p} is missing")
    with open(p, "rb") as f:
        b = f.read()
    want = meta["sha256"].get(which)
    if want is not None and sha256_bytes(b) != want:
        raise ValueError(f"checkpoint file {p} is corrupt or truncated (SHA-256 mismatch: "
                         f"{len(b)} bytes on disk)")
    try:
        return serialization.msgpack_restore(b)
    except Exception as e:  # msgpack raises several exception types
        raise ValueError(f"checkpoint file {p} is corrupt or truncated: {e}") from e


def _flow_from_meta(meta: dict, config: FlowConfig | None) -> Flow:
    try:
        cfg = FlowConfig.from_dict(meta["flow_config"])
        stats = ZScoreStats.from_dict(meta["zscore"])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"checkpoint has an invalid flow config / z-score stats: {e}") from e
    if config is not None and cfg != config:
        raise ValueError("checkpoint FlowConfig is incompatible with the requested one: "
                         + "; ".join(cfg.differences(config, "checkpoint", "requested")))
    # build with the stored permutations; weights are overwritten right after
    return init_flow(jax.random.PRNGKey(0), cfg, stats=stats, permutations=meta["permutations"])


def load_checkpoint(path: str | os.PathLike, config: FlowConfig | None = None) -> dict:
    """Read a checkpoint: ``{'flow': best Flow, 'meta': dict, 'current_flow': Flow | None,
    'opt_state_flat': dict | None}``.  Raises ValueError on missing / corrupt / truncated files
    or when ``config`` is given and differs from the stored FlowConfig."""
    d, meta = _read_meta(os.fspath(path))
    flow = _flow_from_meta(meta, config)
    flat = _read_msgpack(d, meta, "flow")
    nnx.update(flow, unflatten_like(nnx.state(flow), flat, "flow weights"))
    out = {"flow": flow, "meta": meta, "current_flow": None, "opt_state_flat": None}
    if "state" in meta["files"]:
        payload = _read_msgpack(d, meta, "state")
        if not isinstance(payload, dict) or "model" not in payload:
            raise ValueError(f"checkpoint state file in {d} is corrupt (no 'model' entry)")
        cur = _flow_from_meta(meta, None)
        nnx.update(cur, unflatten_like(nnx.state(cur), payload["model"], "latest weights"))
        out["current_flow"] = cur
        out["opt_state_flat"] = payload.get("opt_state") or None
    return out


def load_flow(path: str | os.PathLike, config: FlowConfig | None = None) -> Flow:
    """Load the model (best weights) from a checkpoint directory or its ``checkpoint.json``.
    With ``config``, also check that the stored FlowConfig equals it (ValueError otherwise)."""
    return load_checkpoint(path, config)["flow"]
