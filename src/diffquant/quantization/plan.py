"""Build the per-layer plan (`diffquant.core.plan.LayerPlan`) of one quantization from its sources, in order
of precedence: the denoiser family's default float layers, the recipe's exclude patterns, the caller's
patterns, the model profile's measured float layers, and the layers the backend says the recipe's weight
cannot take (a 4-bit group that does not divide them). The first source that names a layer gives its reason."""

from __future__ import annotations

import fnmatch

import torch

from diffquant.core.errors import DiffquantError
from diffquant.core.plan import FALLBACK, FLOAT, QUANTIZE, LayerEntry, LayerPlan
from diffquant.core.recipes import Recipe
from diffquant.models.denoisers import denoiser_for
from diffquant.quantization.backends import DEFAULT_BACKEND, QUANTIZABLE, get_backend


def _prefixes(name: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b']: a pattern naming a block excludes every layer inside it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def match_exclusions(module: torch.nn.Module, patterns: tuple[str, ...] | list[str], strict: bool = True) -> list[str]:
    """Names of the quantizable layers (Linear/Conv2d) of `module` that match any fnmatch pattern; a
    pattern naming a block excludes every layer inside it.

    A pattern that matches no module at all is an error when `strict`: it is almost always a typo.
    """
    names = [name for name, layer in module.named_modules() if isinstance(layer, QUANTIZABLE)]
    all_names = [name for name, _ in module.named_modules() if name]
    excluded: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)
                or any(fnmatch.fnmatchcase(prefix, pattern) for prefix in _prefixes(n))]
        if strict and not hits and not any(fnmatch.fnmatchcase(n, pattern) for n in all_names):
            top = ", ".join(name for name, _ in module.named_children())
            raise DiffquantError(f"exclude pattern {pattern!r} matches no module of the {type(module).__name__}: check the "
                                 f"name (its top-level modules: {top}; patterns like 'name', 'name.*', '*part*')")
        excluded.extend(h for h in hits if h not in excluded)
    return excluded


def plan_layers(module: torch.nn.Module, recipe: Recipe, exclude: tuple[str, ...] | list[str] = (),
                profile_rule=None, backend: str = DEFAULT_BACKEND) -> LayerPlan:
    """The plan of quantizing the float denoiser `module` with `recipe`.

    Args:
        module: the float denoiser (not changed).
        recipe: the recipe as chosen, before the caller's and the profile's patterns are added to it.
        exclude: the caller's fnmatch patterns of layers kept float (a pattern that matches nothing is an error).
        profile_rule: the model profile's `KeepFloat` for this recipe, or None.
        backend: the backend that will quantize (it says which layers the recipe's weight cannot take).
    """
    family = denoiser_for(module)
    sources = [
        (match_exclusions(module, family.default_exclusions, strict=False), f"{family.name} keeps it float by default"),
        (match_exclusions(module, recipe.exclude), "the recipe's exclude patterns"),
        (match_exclusions(module, exclude), "the caller's exclude patterns"),
    ]
    if profile_rule is not None:
        sources.append((match_exclusions(module, profile_rule.patterns), f"the model profile: {profile_rule.reason}"))
    reasons: dict[str, tuple[str, str]] = {}
    for names, reason in sources:
        for name in names:
            reasons.setdefault(name, (FLOAT, reason))
    unfit = get_backend(backend).unfit_layers(module, recipe, list(reasons))
    for name, why in unfit.items():
        reasons.setdefault(name, (FALLBACK if recipe.fallback is not None else FLOAT, why))
    layers = tuple(LayerEntry(name, *reasons.get(name, (QUANTIZE, "")))
                   for name, layer in module.named_modules() if isinstance(layer, QUANTIZABLE))
    return LayerPlan(recipe=recipe.name, layers=layers)
