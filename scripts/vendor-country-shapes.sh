#!/usr/bin/env bash
# Vendors the dashboard's country map (nothing is fetched at run time):
#   query/assets/countries-50m.json   world-atlas 2.0.2 (npm, ISC; Natural Earth 1:50m, public domain)
#   query/assets/world-atlas-LICENSE  its licence
#   query/assets/country-codes.json   ISO 3166-1 numeric -> alpha-2 (from pycountry 24.6.1's ISO data),
#                                     for the atlas's numeric ids against the reports' alpha-2 countries
# Run from the repository root; needs npm and pip (the package registries only).
set -euo pipefail
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent world-atlas@2.0.2 >/dev/null && tar xzf world-atlas-2.0.2.tgz)
cp "$tmp/package/countries-50m.json" query/assets/countries-50m.json
cp "$tmp/package/LICENSE" query/assets/world-atlas-LICENSE
python3 -m pip download --quiet --no-deps -d "$tmp" pycountry==24.6.1
python3 - "$tmp"/pycountry-24.6.1-py3-none-any.whl <<'PY'
import json, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    entries = json.loads(z.read("pycountry/databases/iso3166-1.json"))["3166-1"]
codes = {e["numeric"]: e["alpha_2"] for e in sorted(entries, key=lambda e: e["numeric"])}
with open("query/assets/country-codes.json", "w") as f:
    json.dump(codes, f, separators=(",", ":"))
    f.write("\n")
PY
echo "vendored: $(wc -c < query/assets/countries-50m.json) bytes of shapes, $(python3 -c 'import json;print(len(json.load(open("query/assets/country-codes.json"))))') codes"
