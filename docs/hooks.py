"""MkDocs hook: keeps the nav entries of pages that are written elsewhere.

`PENDING` pages are written on other branches. Until they are merged, their nav
entries are dropped with an INFO line (instead of failing `mkdocs build
--strict`); once the files exist, this hook does nothing. Any other missing nav
target still fails the build.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("mkdocs.hooks.pending")

PENDING = {"layer_design.md", "contributing.md"}


def _prune(items, docs_dir):
    kept = []
    for item in items:
        if isinstance(item, dict):
            (title, value), *_ = item.items()
            if isinstance(value, list):
                value = _prune(value, docs_dir)
                if value:
                    kept.append({title: value})
                continue
            if value in PENDING and not os.path.exists(os.path.join(docs_dir, value)):
                log.info("Nav entry %r -> %s left out: the page is not written yet", title, value)
                continue
        kept.append(item)
    return kept


def on_config(config):
    config["nav"] = _prune(config["nav"], config["docs_dir"])
    return config
