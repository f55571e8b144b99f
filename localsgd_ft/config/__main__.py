"""``python -m localsgd_ft.config FILE [key=value ...]``: check a config and print it resolved.

``--reference`` prints the key table (docs/config.md); ``--json-schema`` prints the
JSON Schema (``configs/experiment.schema.json``).
"""

import sys
from typing import List

import yaml

from localsgd_ft.config.errors import ConfigError
from localsgd_ft.config.loading import load_config, to_dict
from localsgd_ft.config.reference import json_schema_text, reference_markdown

USAGE = "usage: python -m localsgd_ft.config CONFIG.yaml [dotted.key=value ...] | --reference | --json-schema"


def main(argv: List[str]) -> int:
    if argv == ["--reference"]:
        print(reference_markdown())
        return 0
    if argv == ["--json-schema"]:
        print(json_schema_text(), end="")
        return 0
    if not argv or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        cfg = load_config(argv[0], overrides=argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for note in cfg.advice():
        print(f"warning: {note}", file=sys.stderr)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


sys.exit(main(sys.argv[1:]))
