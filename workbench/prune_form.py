"""The prune settings form as data: which config key each field edits, how its text is read,
and how a set of field texts becomes a validated `RunConfig` (validation is the engine's)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from engine.common.errors import ConfigError
from engine.config import DEPLOY_FORMS, RunConfig
from engine.gkp.prune_config import COMPAT_VALUES, GROUPINGS, METHODS, SELECTIONS
from engine.itp.itp_config import GRANULARITIES

DEFAULT_CHOICE = ""  # a select's "use the method's own stage" entry


@dataclass(frozen=True)
class FormField:
    """One form row: the dotted config key, its label, and its kind: `choice` (from `options`,
    `DEFAULT_CHOICE` meaning None when `optional`), `bool` (true/false), `int`, `float`, `beta`
    ("auto" or a number), `window` ("first,last") or `text`."""

    key: str
    label: str
    kind: str
    options: tuple[str, ...] = ()
    optional: bool = False
    placeholder: str = ""

    @property
    def widget_id(self) -> str:
        return "field-" + self.key.replace(".", "-").replace("_", "-")


BOOLEANS: tuple[str, ...] = ("true", "false")

FIELDS: tuple[FormField, ...] = (
    FormField("prune.method", "Method", "choice", tuple(METHODS)),
    FormField("prune.rate", "Rate", "float"),
    FormField("prune.groups", "Groups", "int"),
    FormField("itp.granularity", "ITP masks", "choice", GRANULARITIES),
    FormField("itp.epochs", "ITP epochs", "int"),
    FormField("itp.hw_weight", "ITP HW weight b", "float"),
    FormField("itp.adversarial", "ITP FastAT", "bool", BOOLEANS),
    FormField("model.snapshots", "Snapshots", "text", placeholder="folder of epoch_N.pt (TMI-GKP)"),
    FormField("prune.grouping", "Grouping", "choice", GROUPINGS, optional=True),
    FormField("prune.selection", "Selection", "choice", SELECTIONS, optional=True),
    FormField("prune.compat", "Compat", "choice", COMPAT_VALUES),
    FormField("prune.beam_width", "Beam width", "int"),
    FormField("prune.check_every", "Check every", "int"),
    FormField("prune.csb_alpha", "CSB α", "float"),
    FormField("prune.gamma_ratio", "γ ratio", "float"),
    FormField("prune.beta", "β", "beta"),
    FormField("prune.tmi_alpha", "TMI α", "float"),
    FormField("prune.ticket_window", "Ticket window", "window"),
    FormField("deploy.form", "Deploy form", "choice", DEPLOY_FORMS),
)


def _section_and_name(config: RunConfig, key: str) -> tuple[Any, str]:
    table, _, name = key.partition(".")
    return getattr(config, table), name


def field_text(config: RunConfig, field: FormField) -> str:
    """The text a field shows for the config's current value."""
    section, name = _section_and_name(config, field.key)
    value = getattr(section, name)
    if value is None:
        return DEFAULT_CHOICE
    if field.kind == "window":
        return f"{value[0]},{value[1]}"
    if field.kind == "bool":
        return "true" if value else "false"
    return str(value)


def parse_field(field: FormField, text: str) -> Any:
    """The typed value of a field's text; `ConfigError` naming the field when it cannot be read."""
    text = text.strip()
    try:
        if field.kind in ("choice", "bool"):
            if field.optional and text == DEFAULT_CHOICE:
                return None
            if text not in field.options:
                raise ValueError
            return text == "true" if field.kind == "bool" else text
        if field.kind == "int":
            return int(text)
        if field.kind == "float":
            return float(text)
        if field.kind == "beta":
            return "auto" if text.lower() == "auto" else float(text)
        if field.kind == "window":
            first, last = (int(part) for part in text.replace(" ", "").split(","))
            return (first, last)
        return text
    except ValueError:
        expected = {
            "choice": "one of " + ", ".join(field.options),
            "bool": "true or false",
            "int": "a whole number",
            "float": "a number",
            "beta": '"auto" or a number',
            "window": "two epochs as first,last",
        }[field.kind]
        raise ConfigError(f"{field.label} must be {expected}, got {text!r}") from None


def apply_form(config: RunConfig, texts: dict[str, str]) -> RunConfig:
    """A copy of `config` with the form's fields (by key) applied and every section validated."""
    updated = copy.deepcopy(config)
    for field in FIELDS:
        if field.key in texts:
            section, name = _section_and_name(updated, field.key)
            setattr(section, name, parse_field(field, texts[field.key]))
    updated.validate()
    return updated
