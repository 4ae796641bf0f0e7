"""docs/configuration.md, generated from the schema in agent/config.py (its types, defaults and descriptions).

    python -m agent.config_reference > docs/configuration.md
"""
from __future__ import annotations

import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import Config


def _type(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return "list"
    name = "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))
    words = {"Path": "path", "str": "text", "bool": "true \\| false", "float": "number", "int": "integer"}
    return words.get(name, name)


def _section(annotation) -> type[BaseModel] | None:
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        if typing.get_origin(a) is list:
            return _section(typing.get_args(a)[0])
    return None


def rows(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, description) for every leaf key, in schema order."""
    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        section = _section(field.annotation)
        if section is not None:
            out += rows(section, key + ("[].") if typing.get_origin(field.annotation) is list else key + ".")
            continue
        if field.default_factory is not None:
            default = "the host name" if name == "device_id" else "computed"
        elif field.default is PydanticUndefined:
            default = "required"
        else:
            default = "null" if field.default is None else f"`{field.default}`"
        out.append((key, _type(field.annotation), default, field.description or ""))
    return out


def markdown() -> str:
    lines = ["# Configuration reference", "",
             "Generated from the schema (`agent/config.py`) by `python -m agent.config_reference`; a test keeps it",
             "in step. One YAML file; unknown keys are refused and every error names its key path.",
             "`tta-agent validate-config FILE` checks a file; `tta-agent replay --set KEY=VALUE` overrides any key.",
             "The keys a user sets are at the top level (`configs/camera.yaml` shows them); the rest live under",
             "`advanced:`, which most users never set.",
             ""]
    table = rows()
    for title, advanced in (("Keys a user sets", False), ("Advanced keys: `advanced:`", True)):
        lines += [f"## {title}", "", "| key | type | default | what it does |", "|---|---|---|---|"]
        lines += [f"| `{k}` | {t} | {d} | {text} |" for k, t, d, text in table
                  if k.startswith("advanced.") == advanced]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
