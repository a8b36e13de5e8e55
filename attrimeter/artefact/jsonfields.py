"""Checked reads of parsed JSON: every error names the file and the field (``attributes[3].meanings``).

The export artefact's files (the manifest, the kernels' launch metadata and index) are read through
:class:`JsonField`, so that a hand-edited or foreign file is refused with a sentence saying which field is wrong,
never with a ``KeyError`` or a silently wrong value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["JsonField"]


@dataclass(frozen=True)
class JsonField:
    """One value of a parsed JSON document and where it sits.

    Attributes:
        value: The value (``dict``, ``list``, ``str``, ``int``, ``float``, ``bool`` or None).
        path: Its place in the document, e.g. ``attributes[3].meanings`` (empty for the document itself).
        where: The document, for messages (e.g. the file's path).
        error: Makes the exception raised for a bad value (e.g. ``ManifestError``).
    """

    value: Any
    path: str
    where: str
    error: Callable[[str], Exception]

    @classmethod
    def root(cls, doc: Any, where: str, error: Callable[[str], Exception]) -> JsonField:
        """The whole document.

        Args:
            doc: What ``json.loads`` returned.
            where: The document's name for messages.
            error: Exception factory for bad values.

        Returns:
            The field of the document.
        """
        return cls(doc, "", where, error)

    def fail(self, what: str) -> Exception:
        """The exception for this field not being ``what`` (raise it)."""
        got = repr(self.value)
        got = got if len(got) <= 60 else got[:57] + "..."
        name = f"field {self.path!r}" if self.path else "the document"
        return self.error(f"{self.where}: {name} must be {what}, got {got}")

    def _child(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def key(self, name: str) -> JsonField:
        """A required member of this object (null allowed: check it with the ``as_*`` methods)."""
        members = self.as_dict()
        if name not in members:
            raise self.error(f"{self.where}: field {self._child(name)!r} is missing")
        return JsonField(members[name], self._child(name), self.where, self.error)

    def optional(self, name: str) -> JsonField | None:
        """A member of this object, or None where it is absent or null."""
        members = self.as_dict()
        if members.get(name) is None:
            return None
        return JsonField(members[name], self._child(name), self.where, self.error)

    def as_dict(self) -> dict[str, Any]:
        """This object's members (raises when it is not a JSON object)."""
        if not isinstance(self.value, dict):
            raise self.fail("an object")
        return self.value

    def members(self) -> list[tuple[str, JsonField]]:
        """This object's members as fields, in document order."""
        return [(k, JsonField(v, self._child(k), self.where, self.error)) for k, v in self.as_dict().items()]

    def items(self, length: int | None = None) -> list[JsonField]:
        """This array's elements as fields; ``length``: the exact number required."""
        if not isinstance(self.value, list) or (length is not None and len(self.value) != length):
            raise self.fail("an array" if length is None else f"an array of {length}")
        return [JsonField(v, self._child(i), self.where, self.error) for i, v in enumerate(self.value)]

    def as_str(self, choices: tuple[str, ...] | None = None) -> str:
        """This string; ``choices``: the values allowed."""
        if not isinstance(self.value, str) or (choices is not None and self.value not in choices):
            raise self.fail("a string" if choices is None else f"one of {list(choices)}")
        return self.value

    def as_int(self, minimum: int | None = None) -> int:
        """This integer (not a bool); ``minimum``: the smallest allowed."""
        if isinstance(self.value, bool) or not isinstance(self.value, int) or (minimum is not None
                                                                             and self.value < minimum):
            raise self.fail("an integer" if minimum is None else f"an integer >= {minimum}")
        return self.value

    def as_float(self) -> float:
        """This finite number (integers are taken as floats)."""
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise self.fail("a finite number")
        return float(self.value)

    def as_bool(self) -> bool:
        """This boolean."""
        if not isinstance(self.value, bool):
            raise self.fail("true or false")
        return self.value

    def as_sha256(self) -> str:
        """This 64-character lower-case hex digest."""
        text = self.value
        if not isinstance(text, str) or len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
            raise self.fail("a sha256 hex digest")
        return text
