#!/usr/bin/env bash
# OHIF's built viewer (npm @ohif/app: its tarball holds dist/, no build needed), checked against its npm
# shasum and unpacked where segnode looks for it (segnode/demo/viewer.py: ohif_dist). Fast when present.
set -euo pipefail
VERSION=3.13.2
SHA1=26a51ffcc1704c30fff403258a1d7392e9a991f3  # `npm view @ohif/app@3.13.2 dist.shasum`
DEST="${SEGNODE_OHIF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/segnode/ohif-$VERSION}"
[ -f "$DEST/dist/index.html" ] && exit 0
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if command -v npm >/dev/null; then  # honours the machine's npm registry configuration
    (cd "$tmp" && npm pack --silent "@ohif/app@$VERSION" >/dev/null)
else
    registry="${NPM_CONFIG_REGISTRY:-https://registry.npmjs.org/}"
    "${PYTHON:-python3}" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
        "${registry%/}/@ohif/app/-/app-$VERSION.tgz" "$tmp/ohif-app-$VERSION.tgz"
fi
echo "$SHA1  $tmp/ohif-app-$VERSION.tgz" | sha1sum -c --quiet -
mkdir -p "$DEST.partial"
tar -xzf "$tmp/ohif-app-$VERSION.tgz" -C "$DEST.partial" --strip-components=1
rm -rf "$DEST" && mv "$DEST.partial" "$DEST"
echo "setup: OHIF $VERSION in $DEST"
