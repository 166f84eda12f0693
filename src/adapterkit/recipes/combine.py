"""`adapterkit combine`: several adapters of one base model and method, weighted, into one new adapter
(PEFT's add_weighted_adapter: cat, linear, svd, ties, dare_linear, dare_ties and the *_svd forms)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import AdaptedModel
from ..errors import AdapterkitError
from ..io import fingerprint, load, save
from ..io.files import check_output
from ..io.native import IDENTITY_KEYS, read_adapter, recorded_base
from ..io.peft import is_peft_folder
from ..methods.combining import COMBINATIONS, SIGN_METHODS, Combination
from ..models import DEFAULT_MODEL, load_model
from ..settings import check_fields, option

COMBINED = "combined"


@dataclass
class CombineSettings:
    adapters: list[str] = option(None, "adapter folders to combine (adapterkit's format, one base model and method)",
                                 required=True, positional=True)
    weights: list[float] = option(None, "one weight per adapter, comma-separated, e.g. 0.7,0.3 (may be negative)",
                                  required=True)
    how: str = option("cat", "cat: ranks concatenated, the exact weighted sum of the updates; linear: weighted sums "
                      "of the A's and of the B's (equal ranks); svd: the weighted sum of the updates cut to "
                      "--svd-rank; ties, dare_linear, dare_ties: those rules on the A's and B's (with --density); "
                      "ties_svd, dare_linear_svd, dare_ties_svd: on the updates, then SVD", choices=COMBINATIONS)
    density: float | None = option(None, "ties and dare: the fraction of entries kept, in (0, 1]", above=0, maximum=1)
    majority_sign_method: str = option("total", "ties: elect each entry's sign by the sum of the values (total) or "
                                       "by the count of signs (frequency)", choices=SIGN_METHODS)
    svd_rank: int | None = option(None, "svd kinds: rank of the result (default: the largest rank combined)",
                                  minimum=1)
    seed: int = option(0, "dare: seed of the random drop masks (the same seed, the same adapter)")
    model: str | None = option(None, "the base model (default: the one recorded in the adapters)")
    output: str = option(None, "folder for the combined adapter", required=True)
    overwrite: bool = option(False, "replace an output folder that holds only adapterkit's outputs")

    def __post_init__(self) -> None:
        check_fields(self)
        if len(self.weights) != len(self.adapters):
            raise AdapterkitError(f"--weights gives {len(self.weights)} weight(s) for {len(self.adapters)} "
                                  "adapter(s); give one per adapter, in the same order")
        self.combination.validate()

    @property
    def combination(self) -> Combination:
        return Combination(self.how, self.density, self.majority_sign_method, self.svd_rank, self.seed)


def combine(settings: CombineSettings) -> dict:
    """Load the adapters on their base model, combine them, check the result changes the model, and save
    it as a new adapter folder (nothing is written when a check fails). Returns what was done."""
    out = Path(settings.output)
    check_output(out, settings.overwrite)
    metas = [_read(d) for d in settings.adapters]
    _check_compatible(settings.adapters, metas)
    model, tokenizer = load_model(settings.model or recorded_base(metas[0]) or DEFAULT_MODEL)
    adapted = AdaptedModel(model)
    adapted.tokenizer = tokenizer
    names = [f"source{i}" for i in range(len(settings.adapters))]
    for name, directory in zip(names, settings.adapters, strict=True):
        load(adapted, directory, name)  # each checked against this base (identity and fingerprint)
    how = settings.combination
    adapted.add_weighted_adapter(names, settings.weights, COMBINED, combination=how.how, density=how.density,
                                 majority_sign_method=how.majority_sign_method, svd_rank=how.svd_rank, seed=how.seed)
    for name in names:
        adapted.delete(name)
    change = fingerprint.compute(adapted, COMBINED)["max_change"]
    if not change > 0:
        raise AdapterkitError(f"the combined adapter gives exactly the base model's logits (the weighted updates "
                              f"cancel, or --density trims them away); nothing written to {out}")
    save(adapted, out, COMBINED)
    config = adapted.records[COMBINED].config
    return {"output": str(out), "how": how.how, "adapters": list(settings.adapters), "weights": settings.weights,
            "method": config.method, "rank": getattr(config, "r", None), "max_logit_change": change}


def _read(directory: str) -> dict:
    if is_peft_folder(directory):
        raise AdapterkitError(f"{directory} is a PEFT folder, which records no base model to check; load it with "
                              "adapterkit, save it (adapted.save) and combine that folder")
    return read_adapter(directory)[0]


def _check_compatible(directories: list[str], metas: list[dict]) -> None:
    """One method, one base model (identity and fingerprint base logits), the same modules: else one line."""
    first, meta0 = directories[0], metas[0]
    for directory, meta in zip(directories[1:], metas[1:], strict=True):
        if meta.get("method") != meta0.get("method"):
            raise AdapterkitError(f"{first} is a {meta0.get('method')} adapter and {directory} a {meta.get('method')} "
                                  "one; combine adapters of one method")
        a, b = meta0.get("base_model"), meta.get("base_model")
        if isinstance(a, dict) and isinstance(b, dict):
            differ = [k for k in IDENTITY_KEYS if k in a and k in b and a[k] != b[k]]
            if differ or not _same_base_logits(meta0.get("fingerprint"), meta.get("fingerprint")):
                what = ", ".join(f"{k} {a[k]} vs {b[k]}" for k in differ) or "their base logits differ"
                raise AdapterkitError(f"{first} and {directory} were trained on different base models ({what}); "
                                      "combine adapters of one base model")
        extra = sorted(set(meta.get("modules", [])) ^ set(meta0.get("modules", [])))
        if extra:
            raise AdapterkitError(f"{first} and {directory} target different modules (e.g. {extra[0]}); combine "
                                  "adapters trained on the same target modules")


def _same_base_logits(a, b) -> bool:
    """Whether two saved fingerprints were taken on the same base weights (True when one cannot tell:
    loading then checks each against the base model)."""
    if not isinstance(a, dict) or not isinstance(b, dict) or a.get("probe_ids") != b.get("probe_ids"):
        return True
    names = {str(d).removeprefix("torch."): t for d, t in fingerprint.TOLERANCE.items()}
    try:
        tolerance = max(names.get(a.get("dtype"), 5e-2), names.get(b.get("dtype"), 5e-2))
        return fingerprint.relative_drift(torch.tensor(a["base"]), torch.tensor(b["base"])) <= tolerance
    except (KeyError, TypeError, ValueError, RuntimeError):
        return True  # malformed: the load reports it
