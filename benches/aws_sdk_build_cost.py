#!/usr/bin/env python3
"""What the AWS SDK cost a build of Marsad, measured: a scratch crate depending on what
delta-rs's S3 support (`deltalake-aws` 1.0, feature `rustls`) asked for is built cold in
release with `--timings`, pinned to the Cargo.lock of the last revision that built it
(`618833bb`, or the revision given), and the units of every crate Marsad's own dependency
tree (`cargo tree -e all`: any kind of dependency) no longer holds, in a semver-compatible
version, are printed with their build time and summed.

    python3 benches/aws_sdk_build_cost.py [REVISION]

Builds offline: the crates must be in Cargo's cache, as they are once that revision was
built. Takes about two minutes on 2 cores.
"""

import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

MANIFEST = """[package]
name = "aws-sdk-build-cost"
version = "0.1.0"
edition = "2024"

# what deltalake-aws 1.0.0 depends on beyond Marsad's tree, with the features its `rustls` asks
[dependencies]
aws-config = { version = "1.8", features = ["behavior-version-latest", "rt-tokio", "credentials-process", "client-hyper"] }
aws-credential-types = { version = "1.2", features = ["hardcoded-credentials"] }
aws-sdk-sts = { version = "1.101.0", default-features = false, features = ["behavior-version-latest", "rt-tokio", "default-https-client"] }
aws-smithy-runtime-api = "1.11"
time = "=0.3.53"
typed-builder = "0.23.0"
"""


def compatible(version):
    """The part of a version Cargo unifies on: the major (1.x), or the minor under 1.0 (0.x),
    or the patch under 0.1 (0.0.x). The pinned lock is older than the tree, so a crate bumped
    since within the same line is still one Marsad holds, and one of another line is not."""
    parts = version.split("+")[0].split("-")[0].split(".")
    for i, part in enumerate(parts):
        if part != "0" or i == len(parts) - 1:
            return ".".join(parts[: i + 1])
    return version


def marsad_packages():
    """Every package in the workspace's tree (all kinds of dependency), by name and
    compatible version line."""
    out = subprocess.run(
        ["cargo", "tree", "--workspace", "-e", "all", "--prefix", "none", "-f", "{p}"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    held = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            held.add((parts[0], compatible(parts[1].lstrip("v"))))
    return held


def main():
    held = marsad_packages()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "src").mkdir()
        (tmp / "src" / "main.rs").write_text("fn main() {}\n")
        (tmp / "Cargo.toml").write_text(MANIFEST)
        revision = sys.argv[1] if len(sys.argv) > 1 else "618833bb"
        lock = subprocess.run(
            ["git", "show", f"{revision}:Cargo.lock"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        (tmp / "Cargo.lock").write_text(lock)
        began = time.monotonic()
        build = subprocess.run(
            ["cargo", "build", "--release", "--timings", "--offline", "--jobs", "2"],
            cwd=tmp, capture_output=True, text=True,
        )
        wall = time.monotonic() - began
        if build.returncode != 0:
            sys.stderr.write(build.stderr)
            sys.exit(1)
        html = (tmp / "target" / "cargo-timings" / "cargo-timing.html").read_text()
    units = json.loads(re.search(r"const UNIT_DATA = (\[.*?\]);", html, re.S).group(1))
    gone = [
        u for u in units
        if (u["name"], compatible(u["version"])) not in held and u["name"] != "aws-sdk-build-cost"
    ]
    gone.sort(key=lambda u: -u["duration"])
    total = sum(u["duration"] for u in units)
    print(f"the AWS SDK as deltalake-aws 1.0 asked for it (Cargo.lock of {revision}), built cold in release on 2 jobs: "
          f"{wall:.0f} s wall, {len(units)} units, {total:.1f} s of unit time")
    print(f"units of crates Marsad's tree no longer holds ({len({u['name'] + u['version'] for u in gone})} crates):")
    for u in gone:
        target = f" ({u['target'].strip()})" if u.get("target", "").strip() else ""
        print(f"  {u['duration']:7.2f} s  {u['name']} {u['version']}{target}")
    print(f"  {sum(u['duration'] for u in gone):7.2f} s  in all")


if __name__ == "__main__":
    main()
