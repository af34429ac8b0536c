#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Replace the block between <!-- bench:begin --> and <!-- bench:end --> in README.md with the
header and table of bench/results/latest.json (the same markdown as results/latest.md).

    python3 bench/update_readme.py [--json bench/results/latest.json] [--readme README.md]

Touches nothing else in the README; exits non-zero (README unchanged) if the markers are missing
or the JSON is not a concur-bench result. Also run by `cmake --build build --target bench-readme`.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402  (render_markdown and the schema name live in the runner)

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"))
    ap.add_argument("--readme", default=os.path.join(os.path.dirname(HERE), "README.md"))
    ap.add_argument("--force", action="store_true",
                    help="accept a --quick or --filter run's results")
    args = ap.parse_args()
    try:
        with open(args.json) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit("cannot read %s: %s (run bench/run.py first)" % (args.json, e))
    if result.get("schema") != run.SCHEMA:
        sys.exit("%s: schema %r, expected %r" % (args.json, result.get("schema"), run.SCHEMA))
    cfg = result.get("config", {})
    if (cfg.get("quick") or cfg.get("filter")) and not args.force:
        sys.exit("%s is from a %s run; README left unchanged (--force to use it anyway)" %
                 (args.json, "quick" if cfg.get("quick") else "filtered"))
    try:
        with open(args.readme) as f:
            text = f.read()
    except OSError as e:
        sys.exit("cannot read %s: %s" % (args.readme, e))
    b, e = text.find(BEGIN), text.find(END)
    if b < 0 or e < 0 or e < b:
        sys.exit("%s: markers %s ... %s not found; README left unchanged" %
                 (args.readme, BEGIN, END))
    block = BEGIN + "\n" + run.render_markdown(result) + END
    new = text[:b] + block + text[e + len(END):]
    if new == text:
        print("%s: already up to date" % args.readme)
        return 0
    tmp = args.readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, args.readme)
    print("%s: benchmark table updated from %s" % (args.readme, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
