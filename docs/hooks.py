"""MkDocs hooks of the documentation site.

- Root documents: BENCHMARKS.md and CHANGELOG.md live at the repository root
  and are included into the site as docs/BENCHMARKS.md and docs/CHANGELOG.md.
  The pages link to the root files (`../BENCHMARKS.md#...`, which works when
  reading docs/ on GitHub); the site's build points those links to the
  included pages.
- Pending pages: `PENDING` pages are written on other branches. Until they are
  merged, their nav entries are dropped with an INFO line (instead of failing
  `mkdocs build --strict`); once the files exist, this does nothing. Any other
  missing nav target still fails the build.
"""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger("mkdocs.hooks.pending")

PENDING = {"layer_design.md", "contributing.md"}
ROOT_DOCUMENTS = ("BENCHMARKS.md", "CHANGELOG.md")


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


def on_page_markdown(markdown, page, **kwargs):
    depth = page.file.src_uri.count("/")
    for name in ROOT_DOCUMENTS:
        link = re.compile(r"\]\(" + re.escape("../" * (depth + 1) + name))
        markdown = link.sub("](" + "../" * depth + name, markdown)
    return markdown
