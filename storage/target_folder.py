"""The target folder's protocol around the shards: open it while another process may be creating it,
tell a written shard (file + sidecar) from one in progress, and decide whether the manifest of a
folder whose shards are all verified can stay. Claiming and writing shards: :mod:`.target_writer`."""
from __future__ import annotations

import json
import time
from pathlib import Path

from cocomix.core.errors import CocomixError, MismatchError
from cocomix.storage.identity import folder_identity
from cocomix.storage.target_reader import load_manifest
from cocomix.storage.target_schema import sidecar_path
from cocomix.storage.targets import MANIFEST, PLAN, TargetWriter


def written(out: Path, shard) -> bool:
    """Shard file and its sidecar exist (the sidecar is written last; the checksum is finalize's job)."""
    final = out / shard.relpath
    return final.is_file() and sidecar_path(final).is_file()


def manifest_problem(writer, out: Path) -> str | None:
    """Why the manifest of a folder whose shards are all verified must be rewritten; None if it can stay.

    It must load as readers load it (``load_manifest``), carry plan.json's settings and identity
    (paths that only locate an input may differ: ``folder_identity``), and list exactly the
    verified shards' sidecars with the split lengths they cover.
    """
    try:
        manifest = load_manifest(out)
    except CocomixError as err:
        return str(err)
    except AttributeError:  # valid JSON, but not an object
        return f"{out / MANIFEST} is not a JSON object"
    plan = json.loads((out / PLAN).read_text())
    for key in sorted(set(plan) - {"format", "meta", "shards"}):
        if manifest.get(key) != plan[key]:
            return f"its {key} is {manifest.get(key)!r}, {PLAN} says {plan[key]!r}"
    if folder_identity(manifest)["meta"] != folder_identity(plan)["meta"]:
        return f"its meta differs from {PLAN}"
    sidecars = [json.loads(sidecar_path(out / s.relpath).read_text()) for s in writer.plan]
    if manifest.get("shards") != sidecars:
        return "its shard list differs from the verified shards"
    lengths: dict[str, int] = {}
    for s in writer.plan:
        lengths[s.split] = max(lengths.get(s.split, 0), s.end)
    if manifest.get("splits") != lengths:
        return f"its split lengths {manifest.get('splits')} differ from the plan's {lengths}"
    return None


def open_retrying(out: Path, attempts: int = 5, **kwargs) -> TargetWriter:
    """Open the writer; a folder another extract is creating this very moment (its plan.json not
    yet renamed into place) looks "not empty without plan.json" for a few milliseconds: retry."""
    for attempt in range(attempts):
        try:
            return TargetWriter(out, **kwargs)
        except MismatchError:
            raise
        except CocomixError:
            racing = (out / PLAN).exists() or being_created(out)
            if attempt == attempts - 1 or not racing:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def being_created(out: Path) -> bool:
    """Only lock files or temporary files so far: another process is setting the folder up."""
    return out.is_dir() and all(p.name == ".locks" or p.name.endswith(".tmp") for p in out.iterdir())
