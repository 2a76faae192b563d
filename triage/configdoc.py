"""The configuration reference (docs/configuration.md), generated from triage/config.py.

Every setting, its TOML key, its environment variable, its type and default come from the
pydantic models; the explanation is the comment written beside the field (or the
section's docstring). ``python -m triage.configdoc > docs/configuration.md`` regenerates
it; a test fails when the committed file is out of date, so the reference cannot drift.
"""

from __future__ import annotations

import inspect
import io
import json
import tokenize
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

from triage import config
from triage.config import Settings

__all__ = ["reference"]


def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment at the end of its line (or on the lines just above it)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    line_field: dict[int, str] = {}
    toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    for i, tok in enumerate(toks):
        if (tok.type == tokenize.NAME and tok.start[1] == 4 and i + 1 < len(toks)
                and toks[i + 1].string == ":"):
            line_field[tok.start[0]] = tok.string
    for tok in toks:
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            name = line_field.get(tok.start[0])
            if name is not None:
                out[name] = " ".join([*above, text]) if above else text
                above = []
            elif tok.start[1] == 4:
                above.append(text)
        elif tok.type == tokenize.NAME and tok.start[0] in line_field and tok.start[1] == 4:
            name = line_field[tok.start[0]]
            if above and name not in out:
                out[name] = " ".join(above)
            above = []
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _type(ann: Any) -> str:
    origin = get_origin(ann)
    if origin is None:
        return getattr(ann, "__name__", str(ann)).replace("NoneType", "none")
    args = ", ".join(_type(a) for a in get_args(ann))
    name = getattr(origin, "__name__", str(origin)).replace("UnionType", "union").replace("Union", "union")
    if name in ("union",):
        return " | ".join(_type(a) for a in get_args(ann))
    if name == "Literal":
        return " | ".join(json.dumps(a) for a in get_args(ann))
    return f"{name}[{args}]"


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else "(computed)"
    v = field.default
    if isinstance(v, SecretStr):
        return "(secret)"
    if isinstance(v, BaseModel):
        return "(section)"
    if isinstance(v, list) and v and isinstance(v[0], BaseModel):
        return f"{len(v)} built-in entries (see triage/config.py)"
    if isinstance(v, Path):
        v = str(v)
    return "`" + json.dumps(v, default=str) + "`"


def _model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in get_args(ann):
        m = _model(a)
        if m is not None:
            return m
    return None


def _section(lines: list[str], model: type[BaseModel], prefix: list[str], title: str) -> None:
    doc = inspect.getdoc(model)
    if model is not Settings:
        lines += [f"## `{title}`", ""]
        if doc and doc != inspect.getdoc(config._Section):
            lines += [doc, ""]
    notes = _comments(model)
    rows = []
    nested = []
    for name, field in model.model_fields.items():
        sub = _model(field.annotation)
        is_list = get_origin(field.annotation) is list
        if sub is not None and not is_list and isinstance(field.default, BaseModel):
            nested.append((name, sub))
            continue
        key = ".".join([*prefix, name])
        env = "TRIAGE_" + "__".join(p.upper() for p in [*prefix, name])
        if sub is not None:
            entry = ", ".join(f"`{n}`" for n in sub.model_fields)
            what = (notes.get(name, "") + f" Keys: {entry} (below).").strip()
            shape = "list of tables" if is_list else "table (optional)"
            rows.append(f"| `{key}` | `{env}` (JSON) | {shape} | {_default(field)} | {_cell(what)} |")
        else:
            cells = (_type(field.annotation), _default(field), notes.get(name, ""))
            rows.append(f"| `{key}` | `{env}` | " + " | ".join(_cell(c) for c in cells) + " |")
    if rows:
        lines += ["| setting | environment variable | type | default | meaning |", "|---|---|---|---|---|",
                  *rows, ""]
    for name, sub in nested:
        _section(lines, sub, [*prefix, name], ".".join([*prefix, name]))
    # the keys of table and list-of-table settings
    for name, field in model.model_fields.items():
        sub = _model(field.annotation)
        if sub is not None and not isinstance(field.default, BaseModel):
            sub_notes = _comments(sub)
            lines += [f"### keys of `{'.'.join([*prefix, name])}` ({sub.__name__})", ""]
            if inspect.getdoc(sub):
                lines += [inspect.getdoc(sub) or "", ""]
            lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
            for n, f in sub.model_fields.items():
                lines.append(f"| `{n}` | {_cell(_type(f.annotation))} | {_cell(_default(f))} | "
                             f"{_cell(sub_notes.get(n, ''))} |")
            lines.append("")


def reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `triage/config.py` by `python -m triage.configdoc > docs/configuration.md`",
        "(a test checks that this file is current). Settings come from, highest first: keyword",
        "arguments in code, `TRIAGE_*` environment variables (sections joined by `__`; lists and",
        "tables as JSON), the TOML file given by `--config` or `$TRIAGE_CONFIG`, then the defaults",
        "below. Unknown keys are errors, and every error names the setting, its environment",
        "variable and the file.",
        "",
    ]
    _section(lines, Settings, [], "")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
