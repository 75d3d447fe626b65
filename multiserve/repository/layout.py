"""The repository layout ``<repo>/<name>/<version>/<artifact>``: names, versions and config
merging. No I/O here."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
_NAME = re.compile(NAME_PATTERN)
# Canonical positive integers only, so "7" and "007" cannot both name version 7.
_VERSION = re.compile(r"[1-9][0-9]{0,17}")

CONFIG_FILE = "config.toml"
# A writer may drop this file into a version directory once every other file is complete;
# the version is then loadable at once instead of after the settle window.
MARKER_FILE = "READY"


def is_valid_name(text: str) -> bool:
    return _NAME.fullmatch(text) is not None


def parse_version(text: str) -> int | None:
    """The version number a directory name stands for, or None if it is not a version."""
    return int(text) if _VERSION.fullmatch(text) else None


def merge_config(
    model_config: Mapping[str, Any], version_config: Mapping[str, Any]
) -> dict[str, Any]:
    """A version's config.toml wins over its model's, key by key (tables are merged one level)."""
    merged: dict[str, Any] = dict(model_config)
    for key, value in version_config.items():
        base = merged.get(key)
        if isinstance(base, dict) and isinstance(value, dict):
            merged[key] = {**base, **value}
        else:
            merged[key] = value
    return merged
