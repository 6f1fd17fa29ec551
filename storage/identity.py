"""What differs between two identity records, in one wording for every "resume or refuse" message.

A resumable command (``tokenize``, ``extract``, ``sae train``, ``pretrain --resume``) records what
its output was made with, and on a re-run compares that record with the one it would write now.
When they differ it refuses (or, with ``--overwrite``, starts over) and says what differs.
:func:`describe_diff` is that sentence, leaf by leaf::

    >>> describe_diff({"sae": {"k": 8, "d": 64}}, {"sae": {"k": 16, "d": 64}})
    'sae.k was 8, now 16'

Records are JSON-like (dicts are walked key by key; any other value is compared whole). A caller
may show a path under the name the user knows (``names``: ``flags.lr`` -> ``--lr``) and may
describe a part in its own words (``special``: a shard plan as "windows per shard was 5, now 3").
"""
from __future__ import annotations

import json
from typing import Any, Callable, Mapping, NamedTuple, Union

ABSENT = "(absent)"  #: shown for a key one record has and the other lacks
LIMIT = 6  #: differences named in one message; the rest are counted
BRIEF = 80  #: characters of a value shown

Names = Union[Mapping[str, str], Callable[[str], Union[str, None]], None]


class Difference(NamedTuple):
    """One leaf that differs: where (a dotted path or a user-facing name), its old and new value."""

    where: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.where} was {brief(self.old)}, now {brief(self.new)}"


Special = Mapping[str, Callable[[Any, Any], "list[Difference]"]]


def brief(value: Any) -> str:
    """``value`` as text, cut to :data:`BRIEF` characters."""
    text = str(value)
    return text if len(text) <= BRIEF else text[: BRIEF - 1] + "…"


def _jsonable(obj: Any) -> Any:
    """The same types a record has after a JSON round trip (tuples -> lists, int keys -> str)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _shown(path: str, names: Names) -> str:
    if names is None:
        return path
    if callable(names):
        return names(path) or path
    return names.get(path, path)


def differences(old: Any, new: Any, *, names: Names = None, special: Special | None = None,
                where: str = "") -> list[Difference]:
    """Every leaf where ``old`` and ``new`` differ, in key order (see the module docstring)."""
    return _walk(_jsonable(old), _jsonable(new), where, names, special or {})


def _walk(old: Any, new: Any, where: str, names: Names, special: Special) -> list[Difference]:
    if where in special:
        return [] if old == new else special[where](old, new)
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[Difference] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{where}.{key}" if where else str(key)
            found += _walk(old.get(key, ABSENT), new.get(key, ABSENT), path, names, special)
        return found
    return [] if old == new else [Difference(_shown(where, names) or "value", old, new)]


def describe_diff(old: Any, new: Any, *, names: Names = None, special: Special | None = None,
                  limit: int = LIMIT) -> str:
    """One line naming what differs (``"a.b was 1, now 2; c was x, now y"``), at most ``limit``
    differences and a count of the rest; the empty string when the records are equal."""
    found = differences(old, new, names=names, special=special)
    shown = [str(d) for d in found[:limit]]
    if len(found) > limit:
        shown.append(f"and {len(found) - limit} more")
    return "; ".join(shown)


def without_when_hashed(parent: dict, part: str, key: str, *, hashed_by: str) -> dict:
    """``parent`` with ``parent[part]`` less ``key`` when that part carries a ``hashed_by`` content hash."""
    value = parent.get(part)
    if isinstance(value, dict) and value.get(hashed_by):
        return {**parent, part: {k: v for k, v in value.items() if k != key}}
    return parent


def content_identity(provenance: dict | None) -> dict:
    """A store's provenance (or ``tokenize``'s identity record) without what only locates or spells
    its inputs: ``path``, the corpus ``source`` when a fingerprint identifies the corpus, the
    tokenizer ``name`` when its sha256 does. Every resume check compares this, so a moved store
    or ``corpus/`` vs ``/abs/corpus`` still matches."""
    identity = {k: v for k, v in (provenance or {}).items() if k != "path"}
    identity = without_when_hashed(identity, "corpus", "source", hashed_by="fingerprint")
    return without_when_hashed(identity, "tokenizer", "name", hashed_by="sha256")


def folder_identity(record: dict) -> dict:
    """What must match for a run to continue a target folder: ``record`` (plan.json or
    manifest.json) without the paths that only say where an input was found.

    A local teacher is its weights' sha256 (its ``id`` is the folder it was read from), an SAE
    its file's sha256 (``source`` is the spec as typed), a token store its content provenance
    (corpus fingerprint, tokenizer sha256, split, counts; ``path``, the corpus ``source`` and the
    tokenizer ``name`` are spellings). A hub teacher has no sha256: its id and revision count.
    The paths stay in the record for provenance.
    """
    record = {k: v for k, v in record.items() if k != "compute"}  # how, not what: adopted, never compared
    meta = dict(record.get("meta") or {})
    meta = without_when_hashed(meta, "teacher", "id", hashed_by="sha256")
    meta = without_when_hashed(meta, "sae", "source", hashed_by="sha256")
    if isinstance(meta.get("tokens"), dict):
        meta["tokens"] = content_identity(meta["tokens"])
    return {**record, "meta": meta}
