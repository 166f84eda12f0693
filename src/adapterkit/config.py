"""The base of every method's config: a validated dataclass that round-trips through JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .errors import AdapterkitError
from .settings import Option, check_fields, option, options_of


@dataclass
class AdapterConfig:
    """Base of every method's config. Subclasses set `method` and implement `validate`."""

    method: ClassVar[str] = ""
    # Trained token rows (token_rows.py), beside whatever the method trains: an option of every method.
    new_tokens: list[str] | None = option(
        None, "tokens to add to the vocabulary: only their embedding rows (and an untied output head's rows) train, "
        "beside the method; saved with the adapter, which resizes its base when loaded")
    token_ids: list[int] | None = option(None, "the ids of the trained token rows (set when the tokens are added)",
                                         cli=False)
    token_head: bool = option(True, "an untied output head trains the tokens' rows too", cli=False)

    def __post_init__(self) -> None:
        check_fields(self, lambda f: f"{self.method} {f.name}")
        self._check_token_rows()
        self.validate()

    def _check_token_rows(self) -> None:
        tokens, ids = self.new_tokens, self.token_ids
        if tokens is not None:
            if not tokens or any(not isinstance(t, str) or not t.strip() for t in tokens):
                raise AdapterkitError(f"{self.method} new_tokens holds an empty token ({tokens!r}); give non-empty "
                                      "tokens separated by commas, e.g. --new-tokens '<tool>,<eot>'")
            if len(set(tokens)) != len(tokens):
                twice = next(t for t in tokens if tokens.count(t) > 1)
                raise AdapterkitError(f"{self.method} new_tokens names {twice!r} twice; name each token once")
        if ids is not None:
            if not ids or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids) \
                    or len(set(ids)) != len(ids):
                raise AdapterkitError(f"{self.method} token_ids must be distinct non-negative ids, got {ids!r}")
            if tokens is not None and len(tokens) != len(ids):
                raise AdapterkitError(f"{self.method} has {len(tokens)} new_tokens but {len(ids)} token_ids; the "
                                      "adapter config is corrupt")

    def validate(self) -> None:
        """Raise AdapterkitError naming the bad field and the accepted values."""

    def for_loaded_weights(self) -> AdapterConfig:
        """The same adapter with starting values that cost nothing (no tokenizer, no forward pass):
        what to attach when saved weights replace the starting values at once."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterConfig:
        if not isinstance(values, dict):
            raise AdapterkitError(f"{cls.method} config must be a mapping of option names to values")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise AdapterkitError(
                f"{cls.method} config has unknown keys {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**values)
        except TypeError as exc:  # a value of the wrong type that validate() compared or measured
            raise AdapterkitError(f"{cls.method} config has a value of the wrong type ({exc})") from exc

    @classmethod
    def options(cls) -> list[Option]:
        """Each option with its type, default, help and CLI flag: for `adapterkit methods` and the CLI."""
        hidden = {f.name for f in fields(cls) if not f.metadata.get("cli", True)}  # set by adapterkit, not a flag
        return [o for o in options_of(cls) if o.name not in hidden]
